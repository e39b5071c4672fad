"""The GAAF operation: ``phi_new(x) = phi(x) + g(x) s(x)`` with gradient ``phi'(x) + s(x)``.

``g(x) = (x K - floor(x K) - 0.5) / K`` is a sawtooth of amplitude ``1/(2K)`` and slope 1 (Hahn & Choi, eq. 7-8).
Two modes:

- ``exact`` (default): the forward is ``phi(x)`` itself, bit for bit (the K -> infinity limit), the backward
  ``phi'(x) + s(x)``. A model trained this way deploys unpatched with nothing changed.
- ``sawtooth``: the literal equations with a finite ``K``. ``g`` is computed in float32 (float64 for float64
  inputs) whatever the input dtype: in float16, ``x K`` overflows for ``|x| > 6.5``.

Both use one :class:`torch.autograd.Function` whose backward is a single pointwise expression. It saves one tensor:
the output for activations that can be inverted (tanh, sigmoid, as PyTorch does), else the input. The ``g s'``
term of the literal derivative (below ``max|s'|/(2K)``) is dropped, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from . import activations as _acts
from .activations import Activation
from .shapes import ShapeFn, resolve

Mode = Literal["exact", "sawtooth"]
MODES = ("exact", "sawtooth")
DEFAULT_K = 10_000.0

__all__ = ["gaaf", "sawtooth", "GAAFFunction", "MODES", "DEFAULT_K"]


def _opmath(t: Tensor) -> Tensor:
    """float32 for half types, the tensor itself otherwise: where the shape and derivative are computed."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sawtooth(x: Tensor, K: float = DEFAULT_K) -> Tensor:
    """g(x) = (x K - floor(x K) - 0.5) / K, in float32 (float64 for float64 input)."""
    xk = (x if x.dtype == torch.float64 else x.float()) * K
    return (xk - torch.floor(xk) - 0.5) / K


def _forward(x: Tensor, act: Activation, shape: ShapeFn, mode: str, K: float, params: Mapping[str, Any], phi=None) -> Tensor:
    y = act.phi(x, **params) if phi is None else phi(x)
    if mode == "sawtooth":
        xo = x if x.dtype == torch.float64 else x.float()
        y = (y.to(xo.dtype) + sawtooth(x, K) * shape(xo)).to(y.dtype)
    return y


def _multiplier(saved: Tensor, from_output: bool, act: Activation, shape: ShapeFn, params: Mapping[str, Any]) -> Tensor:
    """phi'(x) + s(x), from the saved input, or from the output through the activation's inverse."""
    t = _opmath(saved)
    if from_output:
        x, y = act.inverse(t), t
    else:
        x, y = t, None
    return act.dphi(x, y, **params).add_(shape(x))


class GAAFFunction(torch.autograd.Function):
    """``y = phi(x) [+ g(x) s(x)]``, ``dx = dy * (phi'(x) + s(x))``; saves one tensor."""

    @staticmethod
    def forward(ctx, x, act, shape, mode, K, params, phi=None):  # noqa: D102
        y = _forward(x, act, shape, mode, K, params, phi)
        ctx.act, ctx.shape, ctx.params = act, shape, params
        ctx.from_output = act.inverse is not None
        ctx.save_for_backward(y if ctx.from_output else x)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        (saved,) = ctx.saved_tensors
        m = _multiplier(saved, ctx.from_output, ctx.act, ctx.shape, ctx.params)
        return m.mul_(gy).to(gy.dtype), None, None, None, None, None, None


def apply(
    x: Tensor, act: Activation, shape: ShapeFn, mode: str, K: float, params: Mapping[str, Any], phi=None
) -> Tensor:
    """GAAF on already-validated arguments (the hot path used by :class:`gaaf_patch.GAAF`).

    ``phi``, when given, computes the forward instead of ``act.phi`` (a timm module whose formula differs from the
    torch function in the last bit): exact mode stays bit-identical to the module it replaced.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return GAAFFunction.apply(x, act, shape, mode, K, params, phi)
    return _forward(x, act, shape, mode, K, params, phi)


def check_mode(mode: str, K: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not K > 0:
        raise ValueError(f"K must be positive, got {K}")


def gaaf(
    x: Tensor,
    activation: str = "relu",
    shape: str | ShapeFn | Any | None = None,
    *,
    mode: Mode = "exact",
    K: float = DEFAULT_K,
    **params: Any,
) -> Tensor:
    """Apply the GAAF version of ``activation`` to ``x``.

    ``shape`` defaults to the activation's registered default (``gaaf_patch.shapes.get(activation)``); ``params``
    are the activation's own (``negative_slope=0.1``, ``approximate="tanh"``, ...).
    """
    act = _acts.get(activation)
    check_mode(mode, K)
    return apply(x, act, resolve(shape if shape is not None else activation), mode, float(K), act.params(params))
