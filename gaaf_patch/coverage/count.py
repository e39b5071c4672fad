"""Activations a patch left behind, counted without trusting the patch's report, three ways.

- ``modules``: instances of activation classes (the classes of ``passes.targets``, their subclasses included, and
  timm's activation classes) that are still in the model tree.
- ``fx``: the patched model traced whole by ``torch.fx`` (GAAF modules and timm's non-traceable modules leaves):
  ``F.relu``/``x.sigmoid()``/... nodes still in the graph. Many models defeat a whole-model trace (vgg11,
  mobilevit_xxs, ...); then this count is ``None`` and says why.
- ``runtime``: the aten activation ops (``aten.relu``, ``aten.gelu``, ``aten.sigmoid``, ... in place or not) that
  actually run during a forward and backward, caught by a ``TorchDispatchMode``, outside GAAF (whose forward
  runs the original function on purpose, and whose backward evaluates the shape). This reaches code no tracer does. Each op is attributed to the innermost module
  running it (global forward hooks keep the stack).

Gates (a sigmoid-like output that multiplies a tensor, as in squeeze-excite) are left alone by
``activations="auto"`` and listed in ``report(model).skipped``; a leftover that the report lists as a gate is
counted as a gate, not as a miss. The ``fx`` count recognises gates from the graph itself (the node's value reaches
a multiplication); the ``runtime`` count by the module a reported gate sits in.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import activations as _acts
from ..modules import GAAF, StrippedDropout
from ..ops import GAAFFunction
from ..passes import targets
from ..passes.gates import reaches_mul

__all__ = ["Leftover", "leftover_modules", "leftover_fx", "RuntimeCounter", "ACTIVATION_OPS"]

# aten op (overload packet name, in-place underscore dropped) -> activation: each activation's ``aten_ops``. relu6
# and selu reach the dispatcher as hardtanh and elu (composite ops), except in inference mode.
ACTIVATION_OPS: dict[str, str] = {op: a.name for a in _acts.ACTIVATIONS.values() for op in a.aten_ops}
_GATE_LIKE = {a.name for a in _acts.ACTIVATIONS.values() if a.gate_like}


@dataclass
class Leftover:
    """One activation still in the patched model: where, what, and whether the report lists it as a gate."""

    where: str
    what: str
    gate: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "what": self.what, "gate": self.gate}


def _activation_classes() -> tuple[type, ...]:
    """targets' module classes plus every activation class timm defines (QuickGELU, HardMish, PReLU have no
    GAAF form, but are activations all the same)."""
    classes = set(targets.MODULES)
    try:
        from timm.layers import activations, activations_me

        for mod in (activations, activations_me):
            for _n, cls in inspect.getmembers(mod, inspect.isclass):
                if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__:
                    classes.add(cls)
    except ImportError:
        pass
    return tuple(classes)


ACTIVATION_CLASSES = _activation_classes()


def _gate_names(report: Any) -> set[str]:
    return {s["name"] for s in getattr(report, "skipped", [])}


def leftover_modules(model: nn.Module, report: Any) -> list[Leftover]:
    """Activation-class instances still in ``model`` (GAAF and what it wraps are outside the tree)."""
    gates = _gate_names(report)
    names: dict[int, list[str]] = {}
    mods: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        mods[id(m)] = m
    out = []
    for key, m in mods.items():
        if isinstance(m, ACTIVATION_CLASSES) and not isinstance(m, GAAF):
            where = names[key][0]
            out.append(Leftover(where, type(m).__name__, gate=any(n in gates for n in names[key])))
    return out


class _WholeTracer(fx.Tracer):
    """Traces through every user module; GAAF, StrippedDropout, torch.nn's and timm's non-traceable ones are leaves."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            fns, self._leaves = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except ImportError:
            fns, self._leaves = (), ()
        super().__init__(autowrap_functions=fns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            isinstance(m, (GAAF, StrippedDropout) + self._leaves)
            or isinstance(m, ACTIVATION_CLASSES)
            or super().is_leaf_module(m, qualname)
        )


class _Root(nn.Module):
    """fx traces ``type(root).forward``; the patched root's own forward is an instance attribute, so call it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _node_activation(node: fx.Node) -> str | None:
    if not targets.is_activation_node(node):
        return None
    form = targets.FUNCTIONS.get(node.target) if node.op == "call_function" else targets.METHODS.get(node.target)
    return form.activation if form else None


def leftover_fx(model: nn.Module) -> tuple[list[Leftover] | None, str]:
    """Activation function/method nodes of the whole patched model's fx graph, in train and eval mode.

    Returns ``(None, why)`` when the model cannot be traced whole.
    """
    was = model.training
    found: dict[str, Leftover] = {}
    try:
        for mode in (False, True):
            model.train(mode)
            graph = _WholeTracer().trace(_Root(model))
            for node in graph.nodes:
                act = _node_activation(node)
                if act is not None:  # node names follow the module path: blocks_0_attn_sigmoid
                    found[f"{node.name}@{mode}"] = Leftover(node.name, act, act in _GATE_LIKE and reaches_mul(node))
    except Exception as e:  # noqa: BLE001 - whole-model fx fails on many models; the per-module passes do not
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    finally:
        model.train(was)
    return list(found.values()), ""


_GAAF_BACKWARD = f"{GAAFFunction.__name__}Backward"


def _in_gaaf_backward() -> bool:
    node = torch._C._current_autograd_node()
    return node is not None and node.name() == _GAAF_BACKWARD


class RuntimeCounter(TorchDispatchMode):
    """Counts the aten activation ops that run outside GAAF modules, by innermost module name.

    ``with RuntimeCounter(model, report) as rc: model(x).sum().backward()``; then ``rc.leftovers()``. GAAF's own
    ops (its forward runs the original activation; its backward, ``sigmoid`` for ReLU's shape) are not counted.
    """

    def __init__(self, model: nn.Module, report: Any = None) -> None:
        super().__init__()
        self.report = report
        self.counts: Counter = Counter()  # (module name, activation) -> ops run
        self._names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self._stack: list[nn.Module] = []
        self._in_gaaf = 0
        self._hooks: list[Any] = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)
        self._in_gaaf += isinstance(module, GAAF)

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
            self._in_gaaf -= isinstance(module, GAAF)

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._hooks = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        act = ACTIVATION_OPS.get(name[:-1] if name.endswith("_") else name)
        if act is not None and not self._in_gaaf and not _in_gaaf_backward():
            where = next((self._names[id(m)] for m in reversed(self._stack) if id(m) in self._names), "")
            self.counts[(where, act)] += 1
        return func(*args, **(kwargs or {}))

    def leftovers(self) -> list[Leftover]:
        """One entry per (module, activation); ``gate`` when the report lists a gate at that module or in its code."""
        gates = _gate_names(self.report)
        # A functional gate is reported as "<module>.<node>": the module's own code runs that activation as a gate.
        in_code = (
            {
                (g.rsplit(".", 1)[0] if "." in g else "", s["activation"])
                for s in self.report.skipped
                for g in [s["name"]]
            }
            if self.report
            else set()
        )
        out = []
        for (where, act), n in sorted(self.counts.items()):
            gate = where in gates or (where, act) in in_code
            out.append(Leftover(where or "<root>", f"aten.{act} x{n}", gate))
        return out
