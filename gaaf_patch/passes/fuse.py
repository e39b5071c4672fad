"""Fuse BatchNorm -> GAAF ReLU pairs so the ReLU keeps no extra tensor (see :mod:`gaaf_patch.fused`).

::

    (bn1): BatchNorm2d(64)   ->  (bn1): BatchNorm2d(64)    class gaaf_patch.fused.BatchNorm2d (same state)
    (relu): GAAF(relu, ...)      (relu): GAAF(relu, ...)   recomputes its input from bn1's saved one

Pairs come from two places: the traced code of user modules (``x = self.relu(self.bn1(x))``: the functional pass
records each plain BatchNorm whose only user is a module call) and ``nn.Sequential`` containers (a BatchNorm
directly followed by the activation, as in torchvision's ``Conv2dNormActivation``). A pair is fused only when the
activation is an exact-mode GAAF site of the ReLU family; anything else is left as it is. Fusing changes which
tensor is saved, never a value: outputs are bit-identical, gradients equal to float32 rounding in ``s``.
"""

from __future__ import annotations

from torch import nn

from .. import fused, ops
from ..modules import GAAF
from .context import Context

PASS_NAME = "fuse"


def _sequential_pairs(root: nn.Module):
    for fqn, m in root.named_modules():
        if type(m) is nn.Sequential:
            names = list(m._modules)
            for a, b in zip(names, names[1:], strict=False):
                yield (f"{fqn}.{a}" if fqn else a), (f"{fqn}.{b}" if fqn else b)


def _fusable(act: nn.Module) -> bool:
    return isinstance(act, GAAF) and act.mode == "exact" and ops.output_determines_dphi(act.act, act.params)


def run(ctx: Context) -> int:
    n = 0
    for bn_name, act_name in [*ctx.bn_feeds, *_sequential_pairs(ctx.root)]:
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
    ctx.changed[PASS_NAME] = n
    return n
