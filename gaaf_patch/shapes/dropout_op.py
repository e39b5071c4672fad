"""The dropout-matched shape as one opaque operator, for ``torch.compile``.

Dynamo must not trace the table's construction (a quadrature with autograd inside), and a table built during
tracing would be a fake tensor. So under compilation the shape is ``torch.ops.gaaf_patch.dropout_matched``, with a
fake (shape-only) implementation and an autograd formula (the table's slope, itself an opaque op, for double
backward through a compiled graph). Eager calls skip the op's dispatch and call the table directly
(:mod:`gaaf_patch.shapes.dropout`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .tabulated import table

__all__ = ["shape_op", "slope_op"]


@torch.library.custom_op("gaaf_patch::dropout_matched", mutates_args=())
def shape_op(x: Tensor, act: str, sigma: float) -> Tensor:
    return table(act, sigma)(x)


@torch.library.custom_op("gaaf_patch::dropout_matched_slope", mutates_args=())
def slope_op(x: Tensor, act: str, sigma: float) -> Tensor:
    return table(act, sigma).slope(x)


@shape_op.register_fake
def _(x: Tensor, act: str, sigma: float) -> Tensor:
    return x.new_empty(x.shape)


@slope_op.register_fake
def _(x: Tensor, act: str, sigma: float) -> Tensor:
    return x.new_empty(x.shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.act, ctx.sigma = inputs[1], inputs[2]


def _shape_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    (x,) = ctx.saved_tensors
    return grad * slope_op(x, ctx.act, ctx.sigma), None, None


shape_op.register_autograd(_shape_backward, setup_context=_setup)
