"""Check a patch on one batch: the forward is unchanged, the input gradient is not.

The batch is a seeded random tensor of a given shape, or an :class:`Example` of positional and keyword inputs (a
Hugging Face model's ``input_ids``, ``pixel_values``, ...). Token ids are integers, so there is no input gradient;
the gradient is then taken with respect to the output of the model's input embeddings (``get_input_embeddings()``),
the first floating tensor the ids become, and the check says so; a model of integer inputs without embeddings has
its gradient check skipped, with that note, never passed silently.

A patch that silently changes the forward, or silently changes nothing, is the failure a user cannot see otherwise;
this module is the one place that decides it, for the CLI's ``patch`` check, the coverage sweep and the fine-tuning
deployment check alike.

Equality is bit for bit with one exception: NaN equals NaN at the same place. A random-init model may overflow, and
the unpatched and the patched model then overflow identically; a NaN where the other side is finite is a difference
(``max_abs_diff`` is then NaN, so no tolerance can pass it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .audit import audit
from .errors import GaafError, one_line
from .models import output_tensors
from .report import report

__all__ = [
    "Verification",
    "OutputComparison",
    "VerificationFailed",
    "UncheckableError",
    "verify",
    "Example",
    "as_example",
    "forward_and_input_grad",
    "compare_outputs",
    "bit_equal",
    "all_bit_equal",
    "max_abs_diff",
    "output_scale",
    "SAWTOOTH_RTOL",
    "WRT_INPUT",
    "WRT_EMBEDDINGS",
    "NOT_DIFFERENTIABLE",
]

SEED = 0
# sawtooth mode moves the forward by at most max|s| / (2K) per site; this bounds the whole model's output drift,
# relative to max(1, max|reference|).
SAWTOOTH_RTOL = 1e-3
NO_GRADIENT = "the unpatched output does not depend on the input (a zero-initialised head?)"


class VerificationFailed(GaafError):
    """The patched model does not behave as a patch must (it fails where the original runs, or its output has
    another structure); the CLI exits with code 1."""


class UncheckableError(GaafError, ValueError):
    """The check cannot run as asked: the unpatched model rejects the batch, or its output has nothing to
    differentiate. Not the patch's fault; the message says what to change."""


# ------------------------------------------------------------------------------------------------------ comparisons


def bit_equal(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` with equal shapes and dtypes, except that NaN equals NaN at the same place."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0), b.masked_fill(nb, 0))


def all_bit_equal(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """:func:`bit_equal` for two lists of outputs: the same number of tensors, each bit-equal to its partner."""
    return len(a) == len(b) and all(bit_equal(x, y) for x, y in zip(a, b, strict=True))


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """The largest ``|a - b|`` over paired tensors (in float64); NaN where one side is NaN and the other is not (NaN
    on both sides counts as equal), so that no tolerance can pass a forward that turned finite values into NaN."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        if not x.numel():
            continue
        if x.is_floating_point() and not torch.equal(x.isnan(), y.isnan()):
            return math.nan
        diffs.append((x.double() - y.double()).abs().nan_to_num(0.0).max().item())
    return max(diffs, default=0.0)


def output_scale(reference: Sequence[Tensor]) -> float:
    """``max(1, max|reference|)`` over the finite values: what a relative tolerance is relative to."""
    return max([1.0] + [t.abs().nan_to_num(0.0).max().item() for t in reference if t.numel()])


@dataclass(frozen=True)
class OutputComparison:
    """Two models' outputs compared: ``check`` is ``bit-identical`` (``rtol`` 0) or ``allclose``."""

    ok: bool
    check: str
    max_abs_diff: float
    tolerance: float
    bit_identical: bool


def compare_outputs(reference: Sequence[Tensor], outputs: Sequence[Tensor], rtol: float = 0.0) -> OutputComparison:
    """Compare ``outputs`` with ``reference`` (same length, same shapes): with ``rtol`` 0 they must be bit-equal,
    else within ``rtol * output_scale(reference)``."""
    identical = all_bit_equal(reference, outputs)
    diff = max_abs_diff(reference, outputs)
    if rtol == 0:
        return OutputComparison(identical, "bit-identical", diff, 0.0, identical)
    tol = rtol * output_scale(reference)
    return OutputComparison(identical or diff <= tol, "allclose", diff, tol, identical)


# ---------------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Example:
    """The inputs of one check: positional ``args`` and keyword ``kwargs`` (tensors or anything else the forward
    takes), e.g. ``Example((batch,))`` for an image model or ``Example(kwargs=hf.example_inputs(model))``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def random(cls, shape: Sequence[int], seed: int = SEED) -> Example:
        """One seeded standard-normal batch of ``shape`` (batch dimension included)."""
        return cls((torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)),))

    def tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of every tensor input: ``"0"``, ``"1"``... for positional ones, keywords by name."""
        out = [(str(i), a) for i, a in enumerate(self.args) if isinstance(a, Tensor)]
        return out + [(k, v) for k, v in self.kwargs.items() if isinstance(v, Tensor)]

    @property
    def shape(self) -> tuple[int, ...]:
        """The first tensor input's shape: what ``Verification.input_shape`` records."""
        first = next(iter(self.tensors()), None)
        return () if first is None else tuple(first[1].shape)

    def describe(self) -> str:
        """``[2, 3, 32, 32]`` for one float batch; ``input_ids [2, 8] int64, ...`` otherwise."""
        named = self.tensors()
        if not self.kwargs and len(named) == 1 and named[0][1].is_floating_point():
            return str(list(named[0][1].shape))
        return ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in named)

    def fresh(self) -> Example:
        """A copy whose floating tensors are new leaves that require grad (the originals are never touched)."""

        def leaf(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            return v.detach().clone().requires_grad_(v.is_floating_point())

        return Example(tuple(leaf(a) for a in self.args), {k: leaf(v) for k, v in self.kwargs.items()})


def as_example(inputs: Sequence[int] | Example | Tensor, seed: int = SEED) -> Example:
    """An :class:`Example` from a shape (a seeded random batch), a tensor or an Example."""
    if isinstance(inputs, Example):
        return inputs
    if isinstance(inputs, Tensor):
        return Example((inputs,))
    return Example.random(inputs, seed)


# What the input gradient is taken with respect to; the second when every input is an integer tensor (token ids).
WRT_INPUT = "input"
WRT_EMBEDDINGS = "input embeddings' output (the inputs are integer token ids)"
NOT_DIFFERENTIABLE = (
    "not checked: the inputs are integers and the model has no get_input_embeddings() to differentiate at"
)


class _EmbeddingOutputs:
    """Keeps every output of the model's input-embedding module during one forward (an encoder-decoder calls it
    twice): what the gradient of a model fed token ids is taken with respect to."""

    def __init__(self, model: nn.Module) -> None:
        get = getattr(model, "get_input_embeddings", None)
        module = None
        if callable(get):
            try:
                module = get()
            except Exception:  # noqa: BLE001 - not implemented for this model: no embeddings to differentiate at
                module = None
        # ... and the modules that share its weight (T5's encoder and decoder each hold an Embedding tied to it)
        self.modules: list[nn.Module] = []
        if isinstance(module, nn.Module):
            weight = getattr(module, "weight", None)
            tied = [m for m in model.modules() if weight is not None and getattr(m, "weight", None) is weight]
            self.modules = [module, *(m for m in tied if m is not module)]
        self.outputs: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _EmbeddingOutputs:
        self._handles = [m.register_forward_hook(self._keep) for m in self.modules]
        return self

    def _keep(self, module: nn.Module, args: Any, out: Any) -> None:
        self.outputs += [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def forward_and_input_grad(model: nn.Module, batch: Tensor | Example) -> tuple[list[Tensor], Tensor | None, str]:
    """The model's output tensors on ``batch``, the gradient of their summed floating outputs with respect to the
    floating inputs (flattened and concatenated; zeros where the output does not depend on them), and what it was
    taken with respect to. Integer inputs only (token ids): with respect to the outputs of the model's input
    embeddings; without those, the gradient is None (:data:`NOT_DIFFERENTIABLE`)."""
    example = as_example(batch).fresh()
    leaves = [t for _n, t in example.tensors() if t.requires_grad]
    with _EmbeddingOutputs(model) as embedded:
        outs = output_tensors(model(*example.args, **example.kwargs))
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not floats:
        raise UncheckableError("the model output has no differentiable tensor to check the gradient on")
    wrt, what = (leaves, WRT_INPUT) if leaves else (embedded.outputs, WRT_EMBEDDINGS)
    if not wrt:
        return [o.detach() for o in outs], None, NOT_DIFFERENTIABLE
    grads = torch.autograd.grad(sum(o.sum() for o in floats), wrt, allow_unused=True)
    flat = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads, strict=True)]
    grad = flat[0] if len(flat) == 1 else torch.cat([g.flatten() for g in flat])
    return [o.detach() for o in outs], grad, what


# ---------------------------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    """What :func:`verify` found: the forward check, the gradient check, and whether both passed."""

    input_shape: tuple[int, ...]
    mode: str
    output_ok: bool
    output_check: str  # "bit-identical" or "allclose"
    output_max_abs_diff: float
    output_tolerance: float
    gradient_ok: bool
    gradient_expect: str  # "differ" (sites were replaced), "equal" (nothing was) or NO_GRADIENT
    gradient_max_abs_diff: float
    seed: int = SEED
    audit: Any = None  # gaaf_patch.audit.Audit of one train-mode step: the ops that ran outside GAAF, explained or not
    inputs: str = ""  # Example.describe(): the inputs checked on
    gradient_wrt: str = WRT_INPUT  # WRT_INPUT, WRT_EMBEDDINGS, or NOT_DIFFERENTIABLE (the gradient was not checked)

    @property
    def audit_ok(self) -> bool:
        return self.audit is None or self.audit.ok

    @property
    def ok(self) -> bool:
        return self.output_ok and self.gradient_ok and self.audit_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "input_shape": list(self.input_shape),
            "seed": self.seed,
            "output": {
                "ok": self.output_ok,
                "check": self.output_check,
                "max_abs_diff": self.output_max_abs_diff,
                "tolerance": self.output_tolerance,
            },
            "gradient": {
                "ok": self.gradient_ok,
                "expect": self.gradient_expect,
                "max_abs_diff": self.gradient_max_abs_diff,
            },
            "audit": None if self.audit is None else self.audit.to_dict(),
            "inputs": self.inputs,
            "gradient_wrt": self.gradient_wrt,
        }


def verify(
    original: nn.Module,
    patched: nn.Module,
    inputs: Sequence[int] | Example,
    mode: str = "exact",
    *,
    replaced: bool | None = None,
    seed: int = SEED,
) -> Verification:
    """Compare ``patched`` with its unpatched ``original`` on ``inputs``: a shape (one seeded random batch, batch
    dimension included) or an :class:`Example` (positional and keyword inputs, e.g. a Hugging Face model's token
    ids), both models put in eval mode.

    Forward: ``exact`` mode must be bit-identical; ``sawtooth`` within ``SAWTOOTH_RTOL * max(1, max|reference|)``.
    Gradient of the summed output with respect to the floating inputs (integer inputs only: with respect to the input
    embeddings' output, see :func:`forward_and_input_grad`): it must differ when sites were ``replaced`` (GAAF adds
    ``s(x)`` where activations saturate) and be identical when none were; ``replaced`` None reads it (after the run)
    from ``gaaf_patch.report(patched)``. Then :func:`gaaf_patch.audit.audit` of one train-mode step. Raises
    :class:`UncheckableError` when the original rejects the inputs and :class:`VerificationFailed` when the patched
    model fails where the original runs.
    """
    example = as_example(inputs, seed)
    original.eval()
    patched.eval()
    try:
        ref_out, ref_grad, wrt = forward_and_input_grad(original, example)
    except UncheckableError:
        raise
    except Exception as e:  # the unpatched model rejects the batch: almost always an input size it does not take
        why = one_line(e) or type(e).__name__
        if isinstance(inputs, Example):
            raise UncheckableError(f"the model fails on its inputs ({example.describe()}): {why}") from e
        raise UncheckableError(
            f"the model fails on a batch of shape {list(example.shape)} ({why}); set --input-size"
        ) from e
    try:
        new_out, new_grad, _ = forward_and_input_grad(patched, example)
    except Exception as e:  # the original ran on this batch, so the patch broke the model
        raise VerificationFailed(
            f"the patched model fails where the original runs: {type(e).__name__}: {one_line(e)}"
        ) from e
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out, strict=True)):
        raise VerificationFailed("the patched model's output has a different structure or shape")
    if replaced is None:  # read after the run: code patched at run time (passes/scope.py) lists its sites then
        replaced = bool(report(patched).replaced)
    out = compare_outputs(ref_out, new_out, 0.0 if mode == "exact" else SAWTOOTH_RTOL)
    expect, grad_ok, grad_diff = _gradient_verdict(ref_grad, new_grad, replaced, wrt)
    try:
        found = audit(patched, *example.args, **example.kwargs)
    except Exception as e:  # noqa: BLE001 - the model ran in eval mode above; train mode is the model's business
        raise VerificationFailed(f"the patched model fails in train mode: {type(e).__name__}: {one_line(e)}") from e
    return Verification(
        example.shape,
        mode,
        out.ok,
        out.check,
        out.max_abs_diff,
        out.tolerance,
        grad_ok,
        expect,
        grad_diff,
        seed,
        found,
        example.describe(),
        wrt,
    )


def _gradient_verdict(ref: Tensor | None, new: Tensor | None, replaced: bool, wrt: str) -> tuple[str, bool, float]:
    """(what the gradient should do, whether it did, max |diff|)."""
    if ref is None or new is None:  # integer inputs and no embeddings to differentiate at: said, not guessed
        return NOT_DIFFERENTIABLE, True, 0.0
    diff = max_abs_diff([ref], [new])
    same = bit_equal(ref, new)
    if replaced and same and not ref.any():
        # e.g. torchvision's ViTs zero-initialise the head: the output does not depend on the input at all
        return NO_GRADIENT, True, diff
    return ("differ", not same, diff) if replaced else ("equal", same, diff)
