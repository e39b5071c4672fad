"""GAAF's backward when it is itself differentiated (``create_graph=True``: gradient penalties, ``gradgradcheck``).

The first-order backward of :mod:`gaaf_patch.ops` writes into buffers in place and, for tanh and sigmoid, reads
``x`` off the saved output; neither can be differentiated correctly. This module computes the same
``dy (phi'(x) + s(x))`` (or the auto blend) in plain out-of-place ops whose derivative is the formula's:
``dy (phi''(x) + s'(x))``, plus the derivative of the auto gain's coefficient, a function of the batch
(:func:`gaaf_patch.gain.coefficient` returns it as a tensor then). ops imports this module, which imports nothing
of ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import gain as _gain
from .activations import Activation
from .shapes import ShapeFn

__all__ = ["differentiable_backward"]


def differentiable_backward(
    saved: Tensor,
    gy: Tensor,
    from_output: bool,
    act: Activation,
    shape: ShapeFn,
    params,
    x: Tensor | None,
    delta: float | None,
) -> Tensor:
    """``dy (phi'(x) + s(x))`` (or the auto blend) in plain out-of-place ops, for double backward: its derivative is
    the formula's, ``dy (phi''(x) + s'(x))`` (and the blend coefficient's, which depends on the batch).

    Where the output ``y`` was saved (tanh and sigmoid in exact mode; a ReLU after a fused BatchNorm, whose ``x`` is
    recomputed from tensors that do not lead back to it), ``y``'s autograd history is this very GAAF node: a function
    of ``inverse(y)`` would be differentiated through GAAF's backward, which multiplies by ``phi' + s`` where the chain
    rule wants ``phi'`` (the second derivative came out ``(phi' + s) / phi'`` times too large). So ``x`` is rebuilt as
    ``x0 + (y - y0) / m0`` (``x0``, ``y0`` and the multiplier ``m0`` that GAAF's backward applies, all detached): its
    value is ``x0`` and its derivative through GAAF's backward is ``m0 / m0 = 1``.
    """
    t = saved.float() if saved.dtype in (torch.float16, torch.bfloat16) else saved  # ops' opmath dtype
    if x is not None or from_output:
        t = _rebuilt_input(t, None if x is None else x.detach(), act, shape, params, delta)
    m = _multiplier(t, act.phi(t, **params) if act.saves_output else None, act, shape, params, delta)
    g = gy if gy.dtype == m.dtype else gy.to(m.dtype)
    return (m * g).to(gy.dtype)


def _multiplier(x: Tensor, y: Tensor | None, act: Activation, shape: ShapeFn, params, delta: float | None) -> Tensor:
    """``phi'(x) + s(x)``, or the auto blend ``phi' + c s~ (slope - phi')`` with ``c`` from the same sample as the
    first-order backward takes (:func:`gaaf_patch.gain.sample`); ``y = phi(x)`` where the activation reads it."""
    dphi = act.dphi(x, y, **params)
    if delta is None:
        s = shape(x)
        return dphi + (s if isinstance(s, Tensor) else torch.as_tensor(s, dtype=x.dtype, device=x.device))
    s = _plain_term(shape, x)
    if s is None:
        return dphi
    xs = _gain.sample(x)
    dphi_s = act.dphi(xs, None if y is None else _gain.sample(y), **params)
    c = _gain.coefficient(dphi_s, _plain_term(shape, xs) * (act.slope - dphi_s), delta)
    return dphi + c * s * (act.slope - dphi)


def _rebuilt_input(
    y: Tensor, x0: Tensor | None, act: Activation, shape: ShapeFn, params, delta: float | None
) -> Tensor:
    """``x`` from the saved output ``y`` (and ``x0``, the input recomputed after a fused BatchNorm), with derivative
    1 through GAAF's own backward (see :func:`differentiable_backward`)."""
    y0 = y.detach()
    with torch.no_grad():  # m0: what GAAF's first-order backward multiplies by (to rounding)
        if x0 is None:
            x0, y_at = act.inverse(y0), y0
        else:
            y_at = act.phi(x0, **params) if act.saves_output else None
        m0 = _multiplier(x0, y_at, act, shape, params, delta)
        # where the multiplier underflows, GAAF's backward passes nothing back: neither does the rebuilt x
        inv = torch.where(m0 > torch.finfo(m0.dtype).tiny, m0.reciprocal(), torch.zeros_like(m0))
    return x0 + (y - y0) * inv


def _plain_term(shape: ShapeFn, x: Tensor) -> Tensor | None:
    """``s~(x) = s(x) / h``, differentiable (the in-place fast forms write into buffers autograd cannot follow)."""
    fast = shape.fast
    if fast is not None and fast.zero:
        return None
    h = 1.0
    if fast is not None and fast.term is not None:  # the family's h, read off its fast form on an empty tensor
        h = fast.term(x.detach().new_empty(0), True, shape.params)[1]
    s = shape(x)
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s if h == 1 else s / h
