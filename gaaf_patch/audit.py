"""``gaaf_patch.audit``: what actually runs, measured, never believed.

One train-mode forward and backward of (a copy of) the model under a ``TorchDispatchMode`` lists every ATen op that
matters to a patch and ran outside GAAF:

- native activation ops, forward (``aten.gelu``, ``aten.tanh_``, ...) and backward (``aten.gelu_backward``,
  ``aten.threshold_backward`` for ReLU, ...): an activation GAAF did not reach;
- random ops (every op PyTorch tags ``nondeterministic_seeded``), except the ones the arguments make deterministic
  (``p=0``, ``train=False``), in two kinds, by one rule:

  - ``random``: *dropout-like*: an op that draws a keep/drop mask (``bernoulli``, ``native_dropout``, fused
    dropout, attention kernels with ``dropout_p > 0``, ``rrelu_with_noise``, any seeded op not listed below), or a
    uniform draw (:data:`UNIFORM`: ``rand``, ``rand_like``, ``uniform_``) whose values, directly or through ops on
    that tensor alone (``* p``, ``.view``, ``.uniform_``), are *compared* (``<``, ``>``, ``<=``, ``>=``):
    ``torch.rand(n) < p`` is a keep/drop mask with probability ``p`` (a custom dropout, a LayerDrop), and is found as
    such. (A Gaussian sample compared with a bound, as in VITS's spline flows, is a sample, not a mask.) A dropout
    ``strip_dropout`` did not reach, unless the report explains it.
  - ``draw``: a sampling draw (:data:`SAMPLING`: ``rand``, ``randn``, ``uniform_``, ``exponential_``, ``randint``,
    ``multinomial``, ...) whose values are used as data, never compared: a VAE's ``randn_like``, ViT-MAE's random
    masking (``rand`` then ``argsort``), Gumbel noise, a vocoder's noise input. Random sampling that is part of the
    model, not dropout: explained as "random draw kept (part of the model)", listed with its module and op. The
    audit cannot tell such sampling from noise injected as a regularizer; the known regularizers with a knob are
    turned off by ``strip_dropout`` (:mod:`gaaf_patch.passes.noise`) and then draw nothing.

  Randomness outside PyTorch (numpy, Python's ``random``) is invisible here: the report lists what it knows of it
  (SpecAugment under ``kept``; Python-random LayerDrop zeroed under ``stripped``).

Each op is attributed to the innermost module running it: in forward by a module stack kept by global forward
hooks, in backward by the module that created the autograd node (each module's nodes are tagged when its forward
returns). GAAF's own ops (its forward runs the original activation on purpose; its backward evaluates the shape)
are not findings.

Then each finding is checked against :func:`gaaf_patch.report`: it is *explained* when the report lists its site
as unreached (with the reason), as a gate left alone, as noise kept on purpose (DropPath without
``strip_droppath``, the ``kept`` rows of :mod:`gaaf_patch.passes.noise`), or as a noise knob turned off whose draw
still runs and decides nothing; a ``draw`` is otherwise explained as part of the model. The rest are *silent
misses*: the contract of ``gaaf.patch`` is that there are none, and ``audit(model, x).ok`` checks it per model.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .draws import SAMPLING, UNIFORM, Draws, Token
from .errors import GaafError, one_line
from .models import output_tensors
from .modules import GAAF
from .passes.targets import LAYERDROP_ATTRS

__all__ = ["Audit", "Finding", "audit", "ACTIVATION_FORWARD", "ACTIVATION_BACKWARD", "DRAW_KEPT"]

# aten overload packet (in-place underscore dropped) -> activation family, for the forward ops and their backward.
# relu6, selu and celu reach the dispatcher as hardtanh and elu (they are composite ops).
ACTIVATION_FORWARD: dict[str, str] = {
    "relu": "relu", "relu6": "relu6", "hardtanh": "hardtanh", "leaky_relu": "leaky_relu", "elu": "elu",
    "selu": "selu", "celu": "celu", "gelu": "gelu", "silu": "silu", "mish": "mish", "softplus": "softplus",
    "tanh": "tanh", "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid", "hardswish": "hardswish",
    "prelu": "prelu", "_prelu_kernel": "prelu", "rrelu_with_noise": "rrelu", "glu": "glu",
}  # fmt: skip
ACTIVATION_BACKWARD: dict[str, str] = {
    "threshold_backward": "relu", "hardtanh_backward": "hardtanh", "leaky_relu_backward": "leaky_relu",
    "elu_backward": "elu", "gelu_backward": "gelu", "silu_backward": "silu", "mish_backward": "mish",
    "softplus_backward": "softplus", "tanh_backward": "tanh", "sigmoid_backward": "sigmoid",
    "hardsigmoid_backward": "hardsigmoid", "hardswish_backward": "hardswish", "_prelu_kernel_backward": "prelu",
    "rrelu_with_noise_backward": "rrelu", "glu_backward": "glu",
}  # fmt: skip
DRAW_KEPT = "random draw kept (part of the model): its values are used as data, never compared into a mask"
_NODE_KEY = "gaaf_audit_module"
_GAAF_BACKWARD = "GAAFFunctionBackward"


@dataclass(frozen=True)
class Finding:
    """One kind of op that ran outside GAAF in one module: ``kind`` is ``activation``, ``random`` (dropout-like)
    or ``draw`` (a sampling draw used as data)."""

    module: str  # qualified module name, "" for the root
    kind: str
    op: str  # "aten.gelu", "aten.bernoulli_", ...
    phase: str  # "forward" or "backward"
    count: int
    explained: str | None = None  # why the report accounts for it; None: a silent miss

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "op": self.op,
            "phase": self.phase,
            "count": self.count,
            "explained": self.explained,
        }

    def line(self) -> str:
        where = self.module or "<root>"
        why = f" ({self.explained})" if self.explained else " (silent: not in the report)"
        return f"{where}: {self.op} x{self.count} in {self.phase}{why}"


@dataclass
class Audit:
    """What ran outside GAAF in one train-mode step, and which of it the report accounts for."""

    findings: list[Finding] = field(default_factory=list)
    gaaf_calls: int = 0  # GAAF module calls seen in the forward (a patch that reached something runs them)

    @property
    def silent(self) -> list[Finding]:
        """Findings the report does not account for: each one is a bug in the patch or its report."""
        return [f for f in self.findings if f.explained is None]

    @property
    def ok(self) -> bool:
        return not self.silent

    def activations(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "activation"]

    def randoms(self) -> list[Finding]:
        """Dropout-like random ops (masks)."""
        return [f for f in self.findings if f.kind == "random"]

    def draws(self) -> list[Finding]:
        """Sampling draws used as data (random sampling that is part of the model)."""
        return [f for f in self.findings if f.kind == "draw"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "gaaf_calls": self.gaaf_calls,
            "findings": [f.to_dict() for f in self.findings],
            "silent": len(self.silent),
        }

    def __str__(self) -> str:
        head = f"audit: {len(self.findings)} finding(s), {len(self.silent)} silent, {self.gaaf_calls} GAAF call(s)"
        return "\n".join([head, *("  " + f.line() for f in self.findings)])


def _deterministic(func: Any, args: tuple, kwargs: dict) -> bool:
    """A seeded op whose arguments make it draw nothing: dropout with p=0 or train=False, attention without
    dropout, rrelu in eval."""
    schema = func._schema.arguments
    values = {a.name: a.default_value for a in schema if a.has_default_value()}
    values.update(zip((a.name for a in schema), args, strict=False))
    values.update(kwargs)
    if "dropout_p" in values:
        return not values["dropout_p"]
    if "train" in values and not values["train"]:
        return True
    if "training" in values and not values["training"]:
        return True
    if func.overloadpacket.__name__.startswith("native_dropout") and not values.get("p", 1):
        return True
    return False


def _classify(func: Any, args: tuple, kwargs: dict) -> tuple[str, str, str] | None:
    """(kind, family, phase) of an op that matters to the audit, else None."""
    name = func.overloadpacket.__name__
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    if base in ACTIVATION_BACKWARD:
        return "activation", ACTIVATION_BACKWARD[base], "backward"
    if torch.Tag.nondeterministic_seeded in func.tags:
        if _deterministic(func, args, kwargs):
            return None
        return ("draw" if base in SAMPLING else "random"), name, "forward"
    if base in ACTIVATION_FORWARD:
        return "activation", ACTIVATION_FORWARD[base], "forward"
    return None


class _Recorder(TorchDispatchMode):
    """Counts the ops :func:`_classify` keeps, by innermost module, outside GAAF's forward and backward."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.stack: list[nn.Module] = []
        self.inputs: list[set[Any]] = []
        self.in_gaaf = 0
        self.gaaf_calls = 0
        self.counts: Counter = Counter()
        self.draws = Draws()
        self._hooks: list[Any] = []

    # forward: a module stack, and a tag on every autograd node a module creates (innermost module first)
    def _pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)
        self.inputs.append({t.grad_fn for t in _tensors(args) if t.grad_fn is not None})
        if isinstance(module, GAAF):
            self.in_gaaf += 1
            self.gaaf_calls += 1

    def _post(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if not self.stack or self.stack[-1] is not module:
            return
        self.stack.pop()
        # Keyword inputs bound the walk too (a global pre-hook sees positional ones only): Hugging Face passes
        # reference points, masks and embeddings by keyword, and a walk past them tagged the caller's nodes.
        boundary = self.inputs.pop() | {t.grad_fn for t in _tensors(kwargs) if t.grad_fn is not None}
        if isinstance(module, GAAF):
            self.in_gaaf -= 1
        name = self.names.get(id(module))
        if name is None:
            return
        # Walk back from the outputs to the inputs; nodes a child already tagged are walked through (the module's
        # own nodes may lie before them) but keep the child's tag. Cost: the graph times the module depth.
        todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node is None or node in boundary or node in seen:
                continue
            seen.add(node)
            node.metadata.setdefault(_NODE_KEY, (name, isinstance(module, GAAF)))
            todo.extend(n for n, _ in node.next_functions)

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._hooks = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = _classify(func, args, kwargs)
        key = None
        if hit is not None:
            kind, family, phase = hit
            node = torch._C._current_autograd_node()
            if node is not None:  # backward: the module that created the node
                if node.name() != _GAAF_BACKWARD:
                    where, in_gaaf = node.metadata.get(_NODE_KEY, ("", False))
                    if not in_gaaf:
                        key = (where, kind, f"aten.{func.overloadpacket.__name__}", "backward")
            elif not self.in_gaaf:
                where = next((self.names[id(m)] for m in reversed(self.stack) if id(m) in self.names), "")
                key = (where, kind, f"aten.{func.overloadpacket.__name__}", phase)
            if key is not None:
                self.counts[key] += 1
        out = func(*args, **kwargs)
        if key is not None and key[1] == "draw" and func.overloadpacket.__name__.rstrip("_") in UNIFORM:
            self.draws.mark(out, [Token(key)])
        elif self.draws:
            self.draws.follow(func, args, kwargs, out, self.counts)
        return out


def _tensors(obj: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


def _explain(module: str, kind: str, op: str, rep: Any, modules: set[str]) -> str | None:
    """Why the report accounts for a finding in ``module``, or None. A report entry names a module (the site is
    that module, and everything inside it) or a site in a module's own code (``<module>.<node>``, or ``<node>`` in
    the root's code), which covers findings in that module's code only."""

    def covers(entry: dict[str, Any]) -> bool:
        name = str(entry.get("name", "")).split(":", 1)[0]
        if name in modules:
            return module == name or module.startswith(name + ".") or name == ""
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        return module == owner

    for entry in rep.unreached:
        if covers(entry):
            return f"unreached: {entry.get('reason', '')}"
    if kind == "activation":
        for entry in rep.skipped:
            if covers(entry):
                return entry.get("reason", "skipped")
    for entry in getattr(rep, "kept", []):
        # noise kept on purpose (a ``kind``) explains what runs in its module's own code, not in the modules inside
        if (module == entry["module"]) if entry.get("kind") else covers(entry):
            return entry.get("reason", "kept")
    if kind == "random" and rep.config is not None and not rep.config.get("strip_dropout", False):
        return "dropout kept (strip_dropout=False)"
    if kind in ("random", "draw") and op.removeprefix("aten.").rstrip("_") in SAMPLING:
        # OmniASR draws torch.rand([]) per layer whatever its LayerDrop, DAC its randint whatever its quantizer
        # dropout: the knob turned off, the draw (in the code of the module that reads the knob) decides nothing
        for entry in rep.stripped:
            knob = entry.get("knob")
            if knob is None and entry.get("form") == "attribute" and entry.get("target") in LAYERDROP_ATTRS:
                knob = entry["target"]  # a record written before knobs were named
            if knob is not None and (module == entry["module"] if "module" in entry else covers(entry)):
                kind_name = entry.get("kind", "LayerDrop")
                return f"{kind_name} off ({knob} {entry.get('p')} -> {entry.get('off', 0.0)}): the draw decides nothing"
    if kind == "draw":
        return DRAW_KEPT
    return None


def audit(model: nn.Module, *inputs: Any, **kwargs: Any) -> Audit:
    """Run one train-mode forward and backward of a copy of ``model`` on ``inputs`` (loss: the sum of its floating
    outputs) and list every native activation and random op that ran outside GAAF, each checked against
    ``gaaf_patch.report(model)``. The model itself is not touched (no BatchNorm statistics, no gradients)."""
    from .report import report

    if not isinstance(model, nn.Module):
        raise GaafError(f"gaaf_patch.audit takes an nn.Module, not {type(model).__name__}")
    rep = report(model)
    try:
        twin = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any failure to copy is the user's model's
        raise GaafError(f"cannot audit: the model cannot be copied ({one_line(e)})") from e
    twin.train()
    names = {id(m): n for n, m in twin.named_modules(remove_duplicate=False)}
    modules = set(names.values())
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, Tensor) else x for x in inputs)
    recorder = _Recorder(names)
    with torch.random.fork_rng(devices=[]), recorder:
        torch.manual_seed(0)
        out = twin(*xs, **kwargs)
        outs = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
        if outs:
            sum(t.float().sum() for t in outs).backward()
    findings = [
        Finding(where, kind, op, phase, n, _explain(where, kind, op, rep, modules))
        for (where, kind, op, phase), n in sorted(recorder.counts.items())
    ]
    return Audit(findings, recorder.gaaf_calls)
