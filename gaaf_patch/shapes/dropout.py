"""Dropout-matched shapes: the gradient a dropout of net-noise ``sigma`` actually adds to an activation.

Dropout makes a unit's net noisy: ``z + eps`` with ``Var(eps) = sigma^2`` (Hahn & Choi, eq. 6). The gradient the
unit then passes back is, on average over the noise, ``m(x) = E[phi'(x + eps)]``; what dropout adds over the
deterministic net is the excess ``m(x) - phi'(x)``. The dropout-matched shape keeps that excess where it is positive::

    s_sigma(x) = max(0, E[phi'(x + eps)] - phi'(x)),        eps ~ N(0, sigma^2)

so GAAF's gradient ``phi'(x) + s_sigma(x) = max(phi'(x), m(x))``. Why clip, rather than use ``m(x)`` itself: where
noise lowers the expected slope (tanh near 0, an active ReLU just above 0) the unclipped form would make GAAF
*reduce* the deterministic gradient, i.e. train a blurred activation. That is dropout's regularising side, not the
gradient-acceleration side GAAF is meant to reproduce; GAAF only ever adds (docs/calibration.md).

ReLU has a closed form: ``m(x) = Phi(x / sigma)``, so ``s = Phi(x / sigma)`` for ``x <= 0`` and ``0`` above (the
shifted sigmoid the paper guessed). Every other activation (or any callable) is integrated numerically. The parts:

- :mod:`gaaf_patch.shapes.quadrature`: ``m(x)`` by a kink-aware Gauss-Legendre rule;
- :mod:`gaaf_patch.shapes.tabulated`: ``s`` tabulated once per (activation, sigma), exact at the kinks;
- :mod:`gaaf_patch.shapes.dropout_op`: the shape as one opaque operator under ``torch.compile``;
- this module: the registered family and :func:`dropout_matched`.

``dropout_matched("tanh", 0.8)`` is the registered family ``dropout_matched(act='tanh', sigma=0.8)``: its spec
string round-trips, so a patch configuration that holds it replays. ``act`` may carry the activation's parameters:
``act='leaky_relu(negative_slope=0.2)'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .dropout_op import shape_op
from .quadrature import TRUNCATION, act_spec, expected_derivative, relu_closed_form
from .registry import ShapeFn, get, register
from .tabulated import TOLERANCE, Table, table

__all__ = [
    "dropout_matched",
    "expected_derivative",
    "relu_closed_form",
    "act_spec",
    "table",
    "Table",
    "TRUNCATION",
    "TOLERANCE",
]


@register("dropout_matched", act="relu", sigma=1.0)
def dropout_matched_shape(x: Tensor, act: str, sigma: float) -> Tensor:
    """s(x) = max(0, E[phi'(x + eps)] - phi'(x)), eps ~ N(0, sigma^2), phi the activation ``act``.

    The gradient a dropout that puts noise of standard deviation ``sigma`` on the net adds, on average, to a unit at
    net ``x`` (see :mod:`gaaf_patch.shapes.dropout`). Tabulated once per (act, sigma).
    """
    if torch.compiler.is_compiling():
        return shape_op(x, act, float(sigma))
    tab = _BUILT.get((act, sigma))  # the hot path: one dict lookup, no parsing
    if tab is None:
        tab = _BUILT[(act, sigma)] = table(act, sigma)
    return tab(x)


_BUILT: dict[tuple[str, float], Table] = {}


def dropout_matched(
    activation: str | Callable[[Tensor], Tensor], sigma: float, *, kinks: Sequence[float] = (), **params: Any
) -> ShapeFn:
    """The dropout-matched shape of ``activation`` for net noise ``sigma``.

    ``activation``: a registered name (``params`` are its parameters: ``dropout_matched("leaky_relu", 0.5,
    negative_slope=0.2)``), or a callable ``phi`` (``kinks``: where its derivative jumps). A named one is the
    registered family, whose spec (``dropout_matched(act='tanh', sigma=0.8)``) a saved patch configuration replays;
    a callable's cannot be saved.
    """
    if params and not isinstance(activation, str):
        raise TypeError(f"activation parameters {sorted(params)} go with a registered name; a callable takes none")
    tab = table(activation if not isinstance(activation, str) else act_spec(activation, params), sigma, kinks)
    if isinstance(activation, str):
        return get("dropout_matched").with_params(act=act_spec(activation, params), sigma=float(sigma))
    label = f"<dropout_matched:{getattr(activation, '__name__', type(activation).__name__)}>"
    return ShapeFn(label, lambda x, sigma: tab(x), {"sigma": float(sigma)}, label, dropout_matched_shape.__doc__ or "")
