"""The activations gaaf-patch knows: one :class:`Activation` record each in :data:`ACTIVATIONS`, the one place.

Everything the rest of the package knows about an activation is read off its record: the op (:mod:`gaaf_patch.ops`:
derivative, what backward saves, PyTorch's backward kernel, the fused kernel's codes), the default shape
(:mod:`gaaf_patch.shapes.library`), the kinks the dropout-matched shapes integrate across, the aten operators and
module class names the coverage audits and the patch's warnings recognise. Adding an activation is one entry here
(plus its tests; ``passes/targets.py`` lists how models call it, when the patch must find it in models).

Each record pairs ``phi`` (the very torch function the original model calls, so that exact mode is bit-identical)
with ``dphi``, its derivative written as one pointwise expression, and says whether ``phi`` can be inverted from its
output. Invertible activations (tanh, sigmoid) save only their output for backward, as PyTorch itself does; the
others save their input, because every shape function of the ReLU family needs ``x`` on the negative side, where the
output is zero.

Derivatives follow PyTorch's conventions at kinks (``relu'(0) = 0``, ``hardtanh'`` is 0 at both ends, ...), so a
GAAF site whose shape is zero everywhere has exactly PyTorch's gradient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """One activation function and every fact gaaf-patch needs about it: one entry of :data:`ACTIVATIONS`.

    ``phi(x, **params)`` and ``dphi(x, y, **params)`` (``y = phi(x)``) must be pointwise. The rest, by who reads it:

    - ``shape``: the default shape, ``(family, params)`` (registered under the activation's name by
      :mod:`gaaf_patch.shapes.library`).
    - ``defaults``: the parameters ``phi`` takes, with their defaults.
    - ``inverse``: recovers ``x`` from ``y``. Given, backward saves the output (as PyTorch does for tanh and
      sigmoid), else the input (:attr:`saves_output`). ``exact_inverse``: the same without the clamp that keeps
      ``x`` finite, used with shapes that are 0 at +-inf (the exact saturation ``y = +-1`` of tanh is ``x = +-inf``).
    - ``slope``: ``phi'`` in the linear regime, what the auto gain blends toward (:mod:`gaaf_patch.gain`).
    - ``gate_like``: sigmoid-shaped; in "auto" mode a site whose output multiplies a tensor is a gate, left alone.
    - ``native(dy, t, params)``: PyTorch's own fused backward kernel, ``dy phi'(x)`` from what backward saved ``t``
      (:mod:`gaaf_patch.ops`). None: the generic ``dy dphi`` is used.
    - ``dphi_from_output(params)``: whether ``native`` given the output equals ``native`` given the input (the
      output's sign or range is the input's), so a site after a fused BatchNorm may keep its output
      (:mod:`gaaf_patch.fused`).
    - ``kinks(params)``: where ``phi'`` or ``phi''`` jumps: the dropout-matched shapes' quadrature splits there
      (:mod:`gaaf_patch.shapes.quadrature`).
    - ``kernel_x``, ``kernel_y``: the fused CPU kernel's code (``act`` in ``csrc/gaaf_cpu.cpp``) computing ``phi'``
      itself from the input or from the output. None: the kernel adds the shape to ``native``'s result.
    - ``aten_ops``: the aten operators (in-place ``_`` dropped) that count as this activation in coverage audits
      (:mod:`gaaf_patch.coverage.count`).
    - ``class_names``: endings of module class names (case-insensitive regular expressions; timm's ``Me`` suffix is
      allowed after them) that look like this activation (:mod:`gaaf_patch.passes.context`).
    """

    name: str
    phi: Callable[..., Tensor]
    dphi: Callable[..., Tensor]
    _: KW_ONLY
    shape: tuple[str, Mapping[str, float]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    inverse: Callable[[Tensor], Tensor] | None = None
    exact_inverse: Callable[[Tensor], Tensor] | None = None
    slope: float = 1.0
    gate_like: bool = False
    native: Callable[[Tensor, Tensor, Mapping[str, Any]], Tensor] | None = None
    dphi_from_output: Callable[[Mapping[str, Any]], bool] | None = None
    kinks: Callable[[Mapping[str, Any]], tuple[float, ...]] = lambda p: ()
    kernel_x: int | None = None
    kernel_y: int | None = None
    aten_ops: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()

    def __reduce__(self):
        return (get, (self.name,))  # by name: the table holds lambdas, which do not pickle

    @property
    def saves_output(self) -> bool:
        """Whether GAAF's backward keeps the output (inverted when ``x`` is needed) instead of the input."""
        return self.inverse is not None

    def params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults completed with ``given``; rejects names the activation does not take."""
        given = dict(given or {})
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes no parameter {sorted(unknown)}; it takes {sorted(self.defaults)}")
        return {**self.defaults, **given}

    def output_determines_dphi(self, params: Mapping[str, Any]) -> bool:
        """Whether ``dy phi'(x)`` can be computed from the output alone (see ``dphi_from_output``)."""
        return self.dphi_from_output is not None and self.dphi_from_output(params)


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


def _relu2(x: Tensor) -> Tensor:
    return torch.square(torch.relu(x))  # transformers' ReLUSquaredActivation, op for op


def _relu2_d(x: Tensor, y: Tensor) -> Tensor:
    return 2 * torch.relu(x)


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


# Default shapes (gaaf_patch.shapes.library has the families). The paper's: tanh's gauss(width=4) and ReLU's
# shifted_sigmoid(slope=5, shift=0.5) (Hahn & Choi, Figure 4). Every other default is ours, by the paper's principle:
# gradient where a small noise on the net would move the output, none in the far saturation.
_RELU_LIKE = ("shifted_sigmoid", {"slope": 5.0, "shift": 0.5})
_aten = torch.ops.aten

# The fused kernel's phi' codes (`act` in csrc/gaaf_cpu.cpp): from the input or from the output.
_K_TANH_Y, _K_SIGMOID_Y, _K_RELU, _K_TANH_X, _K_SIGMOID_X = 0, 1, 2, 4, 5

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation(
            "relu", lambda x: torch.relu(x), _relu_d, shape=_RELU_LIKE, kinks=lambda p: (0.0,),
            native=lambda g, t, p: _aten.threshold_backward(g, t, 0), dphi_from_output=lambda p: True,
            kernel_x=_K_RELU, aten_ops=("relu",), class_names=("relu",),
        ),
        Activation(
            "relu6", lambda x: F.relu6(x), lambda x, y: _hardtanh_d(x, y, 0.0, 6.0),
            shape=("band", {"lo": 0.0, "hi": 6.0}), kinks=lambda p: (0.0, 6.0),
            native=lambda g, t, p: _aten.hardtanh_backward(g, t, 0.0, 6.0), dphi_from_output=lambda p: True,
            aten_ops=("relu6",), class_names=(r"relu\d+",),  # ReLU6 and other capped ReLUs
        ),
        Activation(
            "leaky_relu", F.leaky_relu, _leaky_d, shape=_RELU_LIKE, defaults={"negative_slope": 0.01},
            kinks=lambda p: (0.0,),
            native=lambda g, t, p: _aten.leaky_relu_backward(g, t, p["negative_slope"], False),
            dphi_from_output=lambda p: p["negative_slope"] > 0,  # a positive slope keeps the sign
            aten_ops=("leaky_relu",), class_names=("leakyrelu",),
        ),
        Activation(
            "elu", F.elu, _elu_d, shape=_RELU_LIKE, defaults={"alpha": 1.0}, kinks=lambda p: (0.0,),
            native=lambda g, t, p: _aten.elu_backward(g, p["alpha"], 1.0, 1.0, False, t),
            aten_ops=("elu",), class_names=("elu",),
        ),
        Activation(
            "selu", lambda x: F.selu(x), _selu_d, shape=_RELU_LIKE, slope=_SELU_SCALE, kinks=lambda p: (0.0,),
            native=lambda g, t, p: _aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, t),
            aten_ops=("selu",), class_names=("selu",),  # selu runs as aten.elu, except in inference mode
        ),
        Activation(
            "celu", F.celu, _celu_d, shape=_RELU_LIKE, defaults={"alpha": 1.0}, kinks=lambda p: (0.0,),
            native=lambda g, t, p: _aten.elu_backward(g, p["alpha"], 1.0, 1.0 / p["alpha"], False, t),
            aten_ops=("celu",), class_names=("celu",),
        ),
        Activation(
            "gelu", F.gelu, _gelu_d, shape=_RELU_LIKE, defaults={"approximate": "none"},
            # PyTorch's tanh-approximate gelu_backward cancels badly in float32 for x < -4 (1e-6 off); ours does not
            native=lambda g, t, p: (
                _aten.gelu_backward(g, t) if p["approximate"] == "none" else _gelu_d(t, None, **p).mul_(g)
            ),
            aten_ops=("gelu",), class_names=("gelu", "gelutanh"),
        ),
        Activation(
            "silu", lambda x: F.silu(x), _silu_d, shape=_RELU_LIKE,
            native=lambda g, t, p: _aten.silu_backward(g, t), aten_ops=("silu",), class_names=("silu", "swish"),
        ),
        Activation(
            "quick_gelu", _quick_gelu, _quick_gelu_d, shape=_RELU_LIKE,  # no PyTorch kernel of its own: mul, sigmoid
            class_names=("quickgelu",),
        ),
        Activation(
            # Primer's squared ReLU. Its phi' = 2x never settles at a slope, so the shape lives on the saturated side
            # only (a bump at x = -1.5, 0.1 at x = 0): relu's, near 1 for x > 0, would pull phi' toward 1 there.
            "relu2", _relu2, _relu2_d, shape=("gauss", {"width": 1.0, "center": -1.5}), kinks=lambda p: (0.0,),
            class_names=("relu2", "relusquared", "squaredrelu"),
        ),
        Activation(
            "mish", lambda x: F.mish(x), _mish_d, shape=_RELU_LIKE,
            native=lambda g, t, p: _aten.mish_backward(g, t), aten_ops=("mish",), class_names=("mish",),
        ),
        Activation(
            "softplus", F.softplus, _softplus_d, shape=_RELU_LIKE, defaults={"beta": 1.0, "threshold": 20.0},
            native=lambda g, t, p: _aten.softplus_backward(g, t, p["beta"], p["threshold"]),
            aten_ops=("softplus",), class_names=("softplus",),
        ),
        Activation(
            "tanh", torch.tanh, _tanh_d, shape=("gauss", {"width": 4.0}), inverse=_atanh_clamped,
            exact_inverse=torch.atanh, native=lambda g, t, p: _aten.tanh_backward(g, t),
            kernel_x=_K_TANH_X, kernel_y=_K_TANH_Y, aten_ops=("tanh",), class_names=("tanh",),
        ),
        Activation(
            "hardtanh", F.hardtanh, _hardtanh_d, shape=("gauss", {"width": 4.0}),
            defaults={"min_val": -1.0, "max_val": 1.0}, kinks=lambda p: (float(p["min_val"]), float(p["max_val"])),
            native=lambda g, t, p: _aten.hardtanh_backward(g, t, p["min_val"], p["max_val"]),
            aten_ops=("hardtanh",), class_names=("hardtanh",),
        ),
        Activation(
            "sigmoid", torch.sigmoid, _sigmoid_d, inverse=_logit_clamped, gate_like=True, slope=0.25,
            shape=("gauss", {"scale": 2.0, "height": 0.25}),  # sigmoid(x) = (1 + tanh(x/2)) / 2
            native=lambda g, t, p: _aten.sigmoid_backward(g, t),
            kernel_x=_K_SIGMOID_X, kernel_y=_K_SIGMOID_Y, aten_ops=("sigmoid",), class_names=("sigmoid",),
        ),
        Activation(
            "hardsigmoid", lambda x: F.hardsigmoid(x), _hardsigmoid_d, gate_like=True, slope=1.0 / 6.0,
            shape=("gauss", {"scale": 3.0, "height": 1.0 / 6.0}), kinks=lambda p: (-3.0, 3.0),
            native=lambda g, t, p: _aten.hardsigmoid_backward(g, t),
            aten_ops=("hardsigmoid",), class_names=("hardsigmoid",),
        ),
        Activation(
            "hardswish", lambda x: F.hardswish(x), _hardswish_d, kinks=lambda p: (-3.0, 3.0),
            shape=("shifted_sigmoid", {"slope": 5.0, "shift": 3.5}),  # saturates below x = -3
            native=lambda g, t, p: _aten.hardswish_backward(g, t),
            aten_ops=("hardswish",), class_names=("hardswish",),
        ),
    ]
}  # fmt: skip


def get(name: str) -> Activation:
    """The activation called ``name``; an unknown name raises an error listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


def class_name_pattern() -> re.Pattern[str]:
    """What a module class called like an activation matches: any entry's ``class_names`` at the end of the name."""
    endings = sorted({c for a in ACTIVATIONS.values() for c in a.class_names})
    return re.compile(rf"(?i)({'|'.join(endings)})(me)?$")
