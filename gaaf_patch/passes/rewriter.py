"""Rewrite the activation and dropout sites of one ``torch.fx`` graph into GAAF children::

    relu = torch.nn.functional.relu(conv, inplace=True)      ->  gaaf_relu = self.gaaf_relu(conv)
    dropout = torch.nn.functional.dropout(x, 0.1, True)      ->  (uses of dropout read x)

The GAAF module is added as a child of the module that owns the graph (it holds no state: ``state_dict`` keys do
not change). The ``functional`` pass runs a :class:`Rewriter` on each traced user module; the Dynamo backend
(backend.py) runs a subclass on each graph Dynamo captures.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .. import activations as _acts
from ..modules import Site
from . import targets
from .context import Context
from .gates import GLU_FUNCTIONS, glu_skip, reaches_mul

__all__ = ["Rewriter"]


def _input_of(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


_VIEW_METHODS = {
    "view", "view_as", "narrow", "select", "transpose", "permute", "unsqueeze", "squeeze", "expand", "as_strided",
    "t", "chunk", "split", "unflatten", "flatten", "reshape", "diagonal", "unbind", "movedim", "swapaxes", "detach",
    "__getitem__",
}  # fmt: skip
_VIEW_FNS = {
    operator.getitem, torch.narrow, torch.select, torch.transpose, torch.permute, torch.flatten, torch.reshape,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.t, torch.unbind, torch.movedim, torch.diagonal,
}  # fmt: skip


def _may_alias(node: fx.Node) -> bool:
    """Whether an in-place change of ``node`` is visible outside this graph's reads: an input, or a view."""
    return (
        node.op == "placeholder"
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_function" and node.target in _VIEW_FNS)
    )


def _rewire_after(graph: fx.Graph, site: fx.Node, old: fx.Node, new: fx.Node) -> None:
    """An in-place call changed ``old``: code after it that reads ``old`` must read the new value."""
    seen = False
    for n in graph.nodes:
        if n is site:
            seen = True
            continue
        if seen and n is not new and old in n.all_input_nodes:
            n.replace_input_with(old, new)


class Rewriter:
    """Rewrites the sites of one module's graph, sharing GAAF children between its train and eval graphs.

    Shared by the Dynamo backend (backend.py), which overrides ``site_name`` (Dynamo's module paths) and
    ``_activation`` (to skip GAAF's own ops); keep both signatures stable. What it did is in ``added`` (GAAF
    children), ``stripped`` (dropout entries for the report), ``unreached`` and :meth:`counts`.
    """

    def __init__(self, ctx: Context, module: nn.Module, fqn: str, method: str = "forward") -> None:
        self.ctx, self.module, self.fqn = ctx, module, fqn
        self.prefix = "" if method == "forward" else f"{method}_"  # a helper method's sites: <fqn>.<method>_<node>
        self.stripped: dict[str, dict[str, Any]] = {}
        self.added: list[str] = []
        self.unreached: dict[str, dict[str, Any]] = {}

    def site_name(self, node: fx.Node) -> str:
        name = self.prefix + node.name
        return f"{self.fqn}.{name}" if self.fqn else name

    def counts(self) -> dict[str, int]:
        """The sites rewritten so far, over every graph this rewriter saw (a site of both modes counts once)."""
        return {"activations": len(self.added), "dropout": len(self.stripped)}

    def rewrite(self, graph: fx.Graph) -> int:
        """Rewrite ``graph`` in place; returns the number of nodes changed."""
        n_changed = 0
        for node in list(graph.nodes):
            if node.op == "call_module":
                self._note_gate(node)
            elif node.op == "call_function" and node.target in GLU_FUNCTIONS:
                self._glu(node)
            elif node.op in ("call_function", "call_method"):
                n_changed += self._activation(graph, node) or self._dropout(graph, node)
        if n_changed:
            graph.lint()
        return n_changed

    def _note_gate(self, node: fx.Node) -> None:
        """A sigmoid-like module whose output multiplies a tensor is a gate (also the last layer of a Sequential)."""
        target, child = node.target, self.module.get_submodule(node.target)
        while isinstance(child, nn.Sequential) and len(child):
            last = str(len(child) - 1)
            target, child = f"{target}.{last}", child[-1]
        form = targets.module_form(child)
        if form is not None and _acts.get(form.activation).gate_like and reaches_mul(node):
            self.ctx.gates.add(f"{self.fqn}.{target}" if self.fqn else target)

    def _glu(self, node: fx.Node) -> None:
        """A GLU is a gate with no GAAF form: left as it is, and said so (the audit sees ``aten.glu`` run)."""
        name = self.site_name(node)
        self.ctx.skip(glu_skip(name))

    def _activation(self, graph: fx.Graph, node: fx.Node) -> int:
        if node.op == "call_function":
            form = targets.FUNCTIONS.get(node.target) if callable(node.target) else None
            label = (
                f"{getattr(node.target, '__module__', None) or 'torch'}.{getattr(node.target, '__name__', node.target)}"
            )
            kind = "function"
        else:
            form, label, kind = targets.METHODS.get(node.target), f".{node.target}", "method"
        if form is None:
            return 0
        name = self.site_name(node)
        act = _acts.get(form.activation)
        is_gate = act.gate_like and reaches_mul(node)
        if not self.ctx.decide(form.activation, name, is_gate, self.module):
            return 0
        params, inplace = targets.read_params(form, tuple(node.args[1:]), dict(node.kwargs))
        params.pop("input", None)
        if any(isinstance(v, fx.Node) for v in params.values()):
            self.unreached[name] = {
                "name": name,
                "form": kind,
                "target": label,
                "reason": "parameter computed at run time",
            }
            return 0
        attr = f"gaaf_{self.prefix}{node.name}"
        if attr not in self.module._modules:
            gaaf = self.ctx.make_gaaf(form.activation, act.params(params), Site(name, kind, label))
            self.module.add_module(attr, gaaf)
            self.added.append(attr)
        inp = _input_of(node)
        with graph.inserting_before(node):
            new = graph.call_module(attr, (inp,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if inplace and isinstance(inp, fx.Node):
            _rewire_after(graph, new, inp, new)
            if _may_alias(inp):  # the caller, or the view's base, sees the in-place change: write the result back
                with graph.inserting_before(new):
                    new.args = (graph.call_method("clone", (inp,)),)  # GAAF may save its input for backward
                with graph.inserting_after(new):
                    graph.call_method("copy_", (inp, new))
        return 1

    def _dropout(self, graph: fx.Graph, node: fx.Node) -> int:
        cfg = self.ctx.config
        if not cfg.strip_dropout or node.op != "call_function":
            return 0
        name = self.site_name(node)
        label = f"torch.nn.functional.{getattr(node.target, '__name__', node.target)}"
        if node.target in targets.DROPOUT_FUNCTIONS:
            if not self.ctx.allowed(self.module, name):
                return 0
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            self.stripped.setdefault(name, {"name": name, "form": "function", "target": label, "p": p})
            node.replace_all_uses_with(_input_of(node))
            graph.erase_node(node)
            return 1
        if node.target is targets.SDPA:
            i = targets.SDPA_DROPOUT_INDEX
            p = node.args[i] if len(node.args) > i else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, fx.Node):
                self.unreached[name] = {
                    "name": name,
                    "form": "function",
                    "target": label,
                    "reason": "dropout_p computed at run time",
                }
                return 0
            if not p or not self.ctx.allowed(self.module, name):
                return 0
            self.stripped.setdefault(name, {"name": name, "form": "function", "target": label + "(dropout_p)", "p": p})
            if len(node.args) > i:
                node.args = node.args[:i] + (0.0,) + node.args[i + 1 :]
            else:
                node.kwargs = {**node.kwargs, "dropout_p": 0.0}
            return 1
        return 0
