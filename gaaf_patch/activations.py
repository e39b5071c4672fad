"""The activations gaaf-patch knows: their function, their derivative, and what backward must keep.

Each :class:`Activation` pairs ``phi`` (the very torch function the original model calls, so that exact mode is
bit-identical) with ``dphi``, its derivative written as one pointwise expression, and says whether ``phi`` can be
inverted from its output. Invertible activations (tanh, sigmoid) save only their output for backward, as PyTorch
itself does; the others save their input, because every shape function of the ReLU family needs ``x`` on the
negative side, where the output is zero.

Derivatives follow PyTorch's conventions at kinks (``relu'(0) = 0``, ``hardtanh'`` is 0 at both ends, ...), so a
GAAF site whose shape is zero everywhere has exactly PyTorch's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """One activation function: ``phi``, its derivative and the parameters it takes.

    ``phi(x, **params)`` and ``dphi(x, y, **params)`` (``y = phi(x)``) must be pointwise. ``inverse`` recovers ``x``
    from ``y`` for activations that save only their output.
    """

    name: str
    phi: Callable[..., Tensor]
    dphi: Callable[..., Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    inverse: Callable[[Tensor], Tensor] | None = None
    gate_like: bool = False  # sigmoid-shaped: in "auto" mode, a site whose output multiplies a tensor is a gate
    slope: float = 1.0  # phi' where the unit is not saturated (its linear regime): what the "auto" gain blends toward

    def __reduce__(self):
        return (get, (self.name,))  # by name: the table holds lambdas, which do not pickle

    def params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults completed with ``given``; rejects names the activation does not take."""
        given = dict(given or {})
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes no parameter {sorted(unknown)}; it takes {sorted(self.defaults)}")
        return {**self.defaults, **given}


def _where(cond: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    return torch.where(cond, a, b)


def _relu_d(x: Tensor, y: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _hardtanh_d(x: Tensor, y: Tensor, min_val: float, max_val: float) -> Tensor:
    return ((x > min_val) & (x < max_val)).to(x.dtype)


def _leaky_d(x: Tensor, y: Tensor, negative_slope: float) -> Tensor:
    return torch.where(x > 0, x.new_ones(()), x.new_full((), negative_slope))


def _elu_d(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    return _where(x > 0, 1.0, alpha * torch.exp(x)).to(x.dtype)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu_d(x: Tensor, y: Tensor) -> Tensor:
    return _SELU_SCALE * _where(x > 0, 1.0, _SELU_ALPHA * torch.exp(x)).to(x.dtype)


def _celu_d(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    return _where(x > 0, 1.0, torch.exp(x / alpha)).to(x.dtype)


def _gelu_d(x: Tensor, y: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / _SQRT_2))
    return cdf + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _silu_d(x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


_QUICK = 1.702  # CLIP's QuickGELU: x * sigmoid(1.702 x)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(_QUICK * x)  # timm.layers.quick_gelu's formula, op for op


def _quick_gelu_d(x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(_QUICK * x)
    return s * (1 + _QUICK * x * (1 - s))


def _mish_d(x: Tensor, y: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


def _softplus_d(x: Tensor, y: Tensor, beta: float, threshold: float) -> Tensor:
    return _where(x * beta > threshold, 1.0, torch.sigmoid(x * beta)).to(x.dtype)


def _tanh_d(x: Tensor, y: Tensor) -> Tensor:
    return torch.addcmul(torch.ones_like(y), y, y, value=-1)


def _sigmoid_d(x: Tensor, y: Tensor) -> Tensor:
    return y * (1 - y)


def _hardsigmoid_d(x: Tensor, y: Tensor) -> Tensor:
    return ((x > -3) & (x < 3)).to(x.dtype) / 6


def _hardswish_d(x: Tensor, y: Tensor) -> Tensor:
    # PyTorch's hardswish_backward: 0 for x <= -3, x/3 + 1/2 strictly inside, 1 for x >= 3 (both kinks excluded).
    return _where(x <= -3, 0.0, _where(x < 3, x / 3 + 0.5, 1.0)).to(x.dtype)


def _atanh_clamped(y: Tensor) -> Tensor:
    # tanh saturates to exactly +-1 in floating point; clamping keeps x finite (and huge, where every shape is ~0).
    eps = torch.finfo(y.dtype).eps
    return torch.atanh(y.clamp(-1 + eps, 1 - eps))


def _logit_clamped(y: Tensor) -> Tensor:
    eps = torch.finfo(y.dtype).eps
    return torch.logit(y, eps=eps)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("relu", lambda x: torch.relu(x), _relu_d),
        Activation("relu6", lambda x: F.relu6(x), lambda x, y: _hardtanh_d(x, y, 0.0, 6.0)),
        Activation("leaky_relu", F.leaky_relu, _leaky_d, {"negative_slope": 0.01}),
        Activation("elu", F.elu, _elu_d, {"alpha": 1.0}),
        Activation("selu", lambda x: F.selu(x), _selu_d, slope=_SELU_SCALE),
        Activation("celu", F.celu, _celu_d, {"alpha": 1.0}),
        Activation("gelu", F.gelu, _gelu_d, {"approximate": "none"}),
        Activation("silu", lambda x: F.silu(x), _silu_d),
        Activation("quick_gelu", _quick_gelu, _quick_gelu_d),
        Activation("mish", lambda x: F.mish(x), _mish_d),
        Activation("softplus", F.softplus, _softplus_d, {"beta": 1.0, "threshold": 20.0}),
        Activation("tanh", torch.tanh, _tanh_d, inverse=_atanh_clamped),
        Activation("hardtanh", F.hardtanh, _hardtanh_d, {"min_val": -1.0, "max_val": 1.0}),
        Activation("sigmoid", torch.sigmoid, _sigmoid_d, inverse=_logit_clamped, gate_like=True, slope=0.25),
        Activation("hardsigmoid", lambda x: F.hardsigmoid(x), _hardsigmoid_d, gate_like=True, slope=1.0 / 6.0),
        Activation("hardswish", lambda x: F.hardswish(x), _hardswish_d),
    ]
}


def get(name: str) -> Activation:
    """The activation called ``name``; an unknown name raises an error listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None
