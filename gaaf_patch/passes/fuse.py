"""The ``fuse`` pass: BatchNorm -> GAAF ReLU pairs, so the ReLU keeps no extra tensor (see :mod:`gaaf_patch.fused`).

::

    (bn1): BatchNorm2d(64)   ->  (bn1): BatchNorm2d(64)    class gaaf_patch.fused.BatchNorm2d (same state)
    (relu): GAAF(relu, ...)      (relu): GAAF(relu, ...)   recomputes its input from bn1's saved one

Pairs come from two places: the training graphs the ``functional`` pass traced and rewrote (``x =
self.relu(self.bn1(x))``, or ``F.relu(self.bn1(x))`` now a GAAF child: each plain BatchNorm whose only user is a
module call, see :func:`bn_feeds`) and ``nn.Sequential`` containers (a BatchNorm directly followed by the
activation, as in torchvision's ``Conv2dNormActivation``). A pair is fused only when the activation is an
exact-mode GAAF site of the ReLU family; anything else is left as it is. Fusing changes which tensor is saved, never
a value: outputs are bit-identical, gradients equal to float32 rounding in ``s``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

from .. import fused, ops
from ..modules import GAAF
from .context import Context
from .result import PatchPassResult

PASS_NAME = "fuse"

_ADD_FNS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def bn_feeds(module: nn.Module, fqn: str, graph: fx.Graph) -> Iterator[tuple[str, str]]:
    """(BatchNorm, module) pairs in one module's training graph: a plain BatchNorm (or a Sequential ending in one,
    like torchvision's ``downsample``) whose output goes to one module call only, directly or through one residual
    add whose result goes to one module call only."""
    prefix = f"{fqn}." if fqn else ""
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        bn_name, child = node.target, module.get_submodule(node.target)
        while isinstance(child, nn.Sequential) and len(child):
            bn_name, child = f"{bn_name}.{len(child) - 1}", child[-1]
        if fused.fusable_class(child) is None:
            continue
        (user,) = node.users
        is_add = (user.op == "call_function" and user.target in _ADD_FNS) or (
            user.op == "call_method" and user.target in _ADD_METHODS
        )
        if is_add and len(user.users) == 1 and len(user.args) == 2 and not user.kwargs:
            (user,) = user.users
        if user.op == "call_module":
            yield prefix + bn_name, prefix + user.target


def _sequential_pairs(root: nn.Module) -> Iterator[tuple[str, str]]:
    for fqn, m in root.named_modules():
        if type(m) is nn.Sequential:
            names = list(m._modules)
            for a, b in zip(names, names[1:], strict=False):
                yield (f"{fqn}.{a}" if fqn else a), (f"{fqn}.{b}" if fqn else b)


def _fusable(act: nn.Module) -> bool:
    return isinstance(act, GAAF) and act.mode == "exact" and ops.output_determines_dphi(act.act, act.params)


def run(ctx: Context) -> PatchPassResult:
    """Fuse each pair; counts ``batchnorms`` (BatchNorms switched to their recomputing class)."""
    traced = [pair for fqn, module, graph in ctx.graphs for pair in bn_feeds(module, fqn, graph)]
    n = 0
    for bn_name, act_name in [*traced, *_sequential_pairs(ctx.root)]:
        try:
            bn, act = ctx.root.get_submodule(bn_name), ctx.root.get_submodule(act_name)
        except AttributeError:
            continue
        cls = fused.fusable_class(bn)
        if cls is None or not _fusable(act):
            continue
        ctx.attributes.append((bn, "__class__", type(bn), {"fused_batchnorm": bn_name, "into": act_name}))
        bn.__class__ = cls
        n += 1
    return PatchPassResult(PASS_NAME, n, {"batchnorms": n}, ctx.root)
