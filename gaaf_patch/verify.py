"""Check a patch on one batch: the forward is unchanged, the input gradient is not.

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
from dataclasses import dataclass
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
    "compare_outputs",
    "bit_equal",
    "all_bit_equal",
    "max_abs_diff",
    "output_scale",
    "SAWTOOTH_RTOL",
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
        }


def forward_and_input_grad(model: nn.Module, batch: Tensor) -> tuple[list[Tensor], Tensor]:
    """The model's output tensors on ``batch`` and the gradient of their summed floating outputs with respect to
    the input (zeros where the output does not depend on it)."""
    x = batch.clone().requires_grad_(True)
    outs = output_tensors(model(x))
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not floats:
        raise UncheckableError("the model output has no differentiable tensor to check the gradient on")
    (grad,) = torch.autograd.grad(sum(o.sum() for o in floats), x, allow_unused=True)
    return [o.detach() for o in outs], torch.zeros_like(x) if grad is None else grad


def verify(
    original: nn.Module,
    patched: nn.Module,
    input_shape: Sequence[int],
    mode: str = "exact",
    *,
    replaced: bool | None = None,
    seed: int = SEED,
) -> Verification:
    """Compare ``patched`` with its unpatched ``original`` on one seeded random batch of ``input_shape`` (batch
    dimension included), both put in eval mode.

    Forward: ``exact`` mode must be bit-identical; ``sawtooth`` within ``SAWTOOTH_RTOL * max(1, max|reference|)``.
    Gradient of the summed output with respect to the input: it must differ when sites were ``replaced`` (GAAF adds
    ``s(x)`` where activations saturate) and be identical when none were; ``replaced`` None reads it (after the run) from
    ``gaaf_patch.report(patched)``. Raises :class:`UncheckableError` when the original rejects the batch and
    :class:`VerificationFailed` when the patched model fails where the original runs.
    """
    batch = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed))
    original.eval()
    patched.eval()
    try:
        ref_out, ref_grad = forward_and_input_grad(original, batch)
    except UncheckableError:
        raise
    except Exception as e:  # the unpatched model rejects the batch: almost always an input size it does not take
        raise UncheckableError(
            f"the model fails on a batch of shape {list(batch.shape)} ({one_line(e) or type(e).__name__}); "
            "set --input-size"
        ) from e
    try:
        new_out, new_grad = forward_and_input_grad(patched, batch)
    except Exception as e:  # the original ran on this batch, so the patch broke the model
        raise VerificationFailed(
            f"the patched model fails where the original runs: {type(e).__name__}: {one_line(e)}"
        ) from e
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out, strict=True)):
        raise VerificationFailed("the patched model's output has a different structure or shape")
    if replaced is None:  # read after the run: code patched at run time (passes/scope.py) lists its sites then
        replaced = bool(report(patched).replaced)
    out = compare_outputs(ref_out, new_out, 0.0 if mode == "exact" else SAWTOOTH_RTOL)
    grad_diff = max_abs_diff([ref_grad], [new_grad])
    same_grad = bit_equal(ref_grad, new_grad)
    expect, grad_ok = ("differ", not same_grad) if replaced else ("equal", same_grad)
    if replaced and same_grad and not ref_grad.any():
        # e.g. torchvision's ViTs zero-initialise the head: the output does not depend on the input at all
        expect, grad_ok = NO_GRADIENT, True
    try:
        found = audit(patched, batch)
    except Exception as e:  # noqa: BLE001 - the model ran in eval mode above; train mode is the model's business
        raise VerificationFailed(f"the patched model fails in train mode: {type(e).__name__}: {one_line(e)}") from e
    return Verification(
        tuple(input_shape),
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
    )
