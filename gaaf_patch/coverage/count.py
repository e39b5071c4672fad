"""Activations a patch left behind, counted without trusting the patch's report: in the model tree and in a
whole-model fx graph. (What actually runs is :func:`gaaf_patch.audit.audit`'s business: the sweep runs it too.)

- ``modules``: instances of activation classes (the classes of ``passes.targets``, their subclasses included, and
  timm's activation classes) that are still in the model tree.
- ``fx``: the patched model traced whole by ``torch.fx`` (GAAF modules and timm's non-traceable modules leaves):
  ``F.relu``/``x.sigmoid()``/... nodes still in the graph. Many models defeat a whole-model trace (vgg11,
  mobilevit_xxs, ...); then this count is ``None`` and says why.

Gates (a sigmoid-like output that multiplies a tensor, as in squeeze-excite) are left alone by
``activations="auto"`` and listed in ``report(model).skipped``; a leftover that the report lists as a gate is
counted as a gate, not as a miss. The ``fx`` count recognises gates from the graph itself (the node's value reaches
a multiplication).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .. import activations as _acts
from ..modules import GAAF, StrippedDropout
from ..passes import targets
from ..passes.gates import reaches_mul

__all__ = ["Leftover", "leftover_modules", "leftover_fx", "ACTIVATION_OPS"]

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
