"""BatchNorm -> GAAF ReLU without an extra saved tensor: the ReLU recomputes its input from the BatchNorm's.

A GAAF ReLU needs ``x`` in its backward (the shape ``s(x)`` lives on the negative side, where the output is 0), so
unlike PyTorch's ReLU, which saves its output (a tensor the next conv saves anyway), it keeps one tensor per site
alive: +6-10% peak training memory on ResNets. Where the ReLU's input is a training-mode BatchNorm's output, that
tensor is recomputable: ``x = (u - mean) * invstd * weight + bias`` from the BatchNorm's own input ``u`` and batch
statistics, which the BatchNorm saves for its backward anyway. So::

    u -> BatchNorm2d -> x -> GAAF(relu) -> y         saved: u, mean, invstd (BN);  x (GAAF)
    u -> BatchNormRecompute -> x -> GAAF(relu) -> y  saved: u, mean, invstd (BN);  y (GAAF; the next conv saves y)

The pass (``passes/fuse.py``) swaps the class of each plain ``nn.BatchNorm1d/2d/3d`` that feeds a GAAF ReLU-family
site to the matching class here (same parameters, buffers and ``state_dict``; ``isinstance`` still holds). Its
training forward is the same ``_batch_norm_impl_index`` call ``F.batch_norm`` makes (bit-identical output, running
statistics updated the same way) inside :class:`BatchNormFunction`, whose backward is PyTorch's own
``_batch_norm_impl_index_backward``. :class:`gaaf_patch.ops.GAAFFunction` sees that its input came from such a node
(:func:`source_of`; ops tells it which of its own nodes kept their output, so this module imports nothing of ops)
and then saves its output instead of its input: ``phi'`` is read off the output exactly as
PyTorch's ReLU does, and ``s(x)`` is evaluated on the recomputed ``x`` (equal to the forward's to a rounding).

Eval mode, ``torch.compile`` (Inductor's partitioner decides what to recompute) and fx tracing take the stock
BatchNorm path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.autograd.function import once_differentiable

__all__ = ["BatchNormFunction", "BatchNormRecompute", "recompute_input", "source_of", "FUSABLE", "fusable_class"]


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm as ``F.batch_norm`` computes it, as a node a following GAAF site can read."""

    @staticmethod
    def forward(ctx, u, weight, bias, running_mean, running_var, momentum, eps):  # noqa: D102
        out, save_mean, save_var, reserve, impl = torch._batch_norm_impl_index(
            u, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
        )
        ctx.impl, ctx.eps = impl, eps
        ctx.save_for_backward(u, weight, bias, running_mean, running_var, save_mean, save_var, reserve)
        return out

    @staticmethod
    @once_differentiable  # a double backward through BatchNorm (a gradient penalty) fails loudly, not silently
    def backward(ctx, gy):  # noqa: D102
        u, weight, bias, running_mean, running_var, save_mean, save_var, reserve = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ]
        du, dw, db = torch.ops.aten._batch_norm_impl_index_backward(
            ctx.impl, u, gy.contiguous(memory_format=_memory_format(u)), weight, running_mean, running_var,
            save_mean, save_var, True, ctx.eps, mask, reserve,
        )  # fmt: skip
        return du, dw, db, None, None, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def source_of(x: Tensor, keeps_output: Callable[[Any], bool]) -> tuple | None:
    """How to recompute ``x`` in backward from what other nodes keep anyway, or None (always None under Dynamo, and
    under non-reentrant checkpointing, which lets each saved tensor be unpacked once, by its own node).

    ``(bn,)``: ``x`` is a :class:`BatchNormFunction` output. ``(a, b)``: ``x = a + b`` (a residual add, ``alpha``
    1, no broadcasting) where each operand is such an output, or the output of a node for which ``keeps_output``
    holds: a GAAF site that saved its output as its one tensor.
    """
    if _compiling() or _saved_tensor_hooks():
        return None
    fn = x.grad_fn
    if isinstance(fn, _BN_NODE):
        return (fn,)
    if type(fn).__name__ == "AddBackward0" and fn._saved_alpha == 1:
        nodes = tuple(n for n, _ in fn.next_functions)
        if len(nodes) == 2 and all(_operand_shape(n, keeps_output) == x.shape for n in nodes):
            return nodes
    return None


_BN_NODE = BatchNormFunction._backward_cls


def _operand_shape(node, keeps_output: Callable[[Any], bool]) -> torch.Size | None:
    if isinstance(node, _BN_NODE) or keeps_output(node):
        return node.saved_tensors[0].shape
    return None


def recompute_input(plan: tuple) -> Tensor:
    """The tensor :func:`source_of` described, recomputed (float32 for half inputs; owned by the caller)."""
    x = _value(plan[0])
    for node in plan[1:]:
        x.add_(_value(node))
    return x


def _value(node) -> Tensor:
    if isinstance(node, _BN_NODE):
        return _batchnorm_output(node)
    (y,) = node.saved_tensors  # a GAAF site's output
    return y.to(torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype, copy=True)


def _batchnorm_output(node) -> Tensor:
    """``u * (invstd w) + (b - mean invstd w)`` from what the node saved. Every implementation (native, cuDNN,
    MIOpen) saves the inverse standard deviation."""
    u, weight, bias, _rm, _rv, mean, invstd, _reserve = node.saved_tensors
    dtype = torch.float32 if u.dtype in (torch.float16, torch.bfloat16) else u.dtype
    scale = invstd.to(dtype) if weight is None else invstd.to(dtype) * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    view = (1, -1) + (1,) * (u.dim() - 2)
    return torch.addcmul(shift.view(view), u.to(dtype), scale.view(view))


class BatchNormRecompute:
    """Mixin for the BatchNorm classes below: the stock forward, except in training mode on plain tensors."""

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):  # a whole-model fx trace: one call of this module, as for torch.nn's own
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        if (
            not self.training
            or not torch.is_grad_enabled()
            or _compiling()
            or torch.is_autocast_enabled(input.device.type)  # autocast decides batch_norm's dtypes: keep its path
        ):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        track = self.track_running_stats
        return BatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            momentum,
            self.eps,
        )


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _saved_tensor_hooks() -> bool:
    """Whether non-reentrant ``torch.utils.checkpoint``'s saved-tensor hooks are active: reading another node's
    saved tensors would unpack them a second time, which they refuse. (Other hooks, such as offloading, unpack as
    often as asked.)"""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


class BatchNorm1d(BatchNormRecompute, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose output a following GAAF ReLU recomputes instead of keeping (see module doc)."""


class BatchNorm2d(BatchNormRecompute, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose output a following GAAF ReLU recomputes instead of keeping (see module doc)."""


class BatchNorm3d(BatchNormRecompute, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose output a following GAAF ReLU recomputes instead of keeping (see module doc)."""


FUSABLE: dict[type, type] = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def fusable_class(module: nn.Module) -> type | None:
    """The recompute class for a plain BatchNorm (exact class: not SyncBatchNorm, not timm's BatchNormAct2d)."""
    return FUSABLE.get(type(module))
