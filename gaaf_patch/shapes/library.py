"""The built-in shapes: three families and the per-activation defaults built on them.

Which are the paper's: ``tanh`` (an exponential, read off Hahn & Choi's Figure 4) and ``relu`` (a shifted sigmoid,
same figure). ``tanh_keras`` and ``relu_keras`` are the variants of a public Keras port. Every other default is ours,
chosen by the paper's principle: add gradient where a small noise on the net would move the output, and none in
the far saturation, where dropout does not move a net either. docs/shapes.md plots each default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import add_check, register


@register("gauss", width=4.0, center=0.0, scale=1.0, height=1.0)
def gauss(x: Tensor, width: float, center: float, scale: float, height: float) -> Tensor:
    """s(x) = height * exp(-((x - center) / scale)^2 / width).

    The paper's tanh shape is gauss(width=4): 1 at 0, about 0.78, 0.37, 0.11 at |x| = 1, 2, 3.
    """
    z = x if center == 0 and scale == 1 else (x - center) / scale
    e = torch.exp(z * z * (-1.0 / width))
    return e if height == 1 else e * height


@register("shifted_sigmoid", slope=5.0, shift=0.5, height=1.0)
def shifted_sigmoid(x: Tensor, slope: float, shift: float, height: float) -> Tensor:
    """s(x) = height * sigmoid(slope * (x + shift)).

    The paper's ReLU shape is shifted_sigmoid(slope=5, shift=0.5): 0.5 at x = -0.5, near 1 for x > 0 (an active unit
    gets gradient ~2), below 0.01 for x < -1.5.
    """
    s = torch.sigmoid((x + shift) * slope)
    return s if height == 1 else s * height


@register("band", lo=0.0, hi=6.0, slope=5.0, margin=0.5)
def band(x: Tensor, lo: float, hi: float, slope: float, margin: float) -> Tensor:
    """s(x) = sigmoid(slope * (x - lo + margin)) * sigmoid(slope * (hi + margin - x)).

    A shifted sigmoid on each edge of an activation that saturates on both sides of [lo, hi] (ReLU6).
    """
    return torch.sigmoid(slope * (x - lo + margin)) * torch.sigmoid(slope * (hi + margin - x))


@register("zero")
def zero(x: Tensor) -> Tensor:
    """s(x) = 0: GAAF then has exactly the activation's own gradient (a control in experiments)."""
    return torch.zeros_like(x)


# Parameter sets that make no shape (a negative or zero width, an empty band): an error when the shape is made.
add_check("gauss", lambda p: "width must be > 0" if not p["width"] > 0 else None)
add_check("gauss", lambda p: "scale must not be 0" if p["scale"] == 0 else None)
add_check("band", lambda p: "lo must be below hi" if not p["lo"] < p["hi"] else None)
add_check("band", lambda p: "slope must be > 0" if not p["slope"] > 0 else None)
add_check("band", lambda p: "margin must be >= 0" if not p["margin"] >= 0 else None)

# The paper's shapes and the Keras port's variants.
register("tanh", family="gauss", width=4.0)
register("tanh_keras", family="gauss", width=3.0)
register("relu", family="shifted_sigmoid", slope=5.0, shift=0.5)
register("relu_keras", family="shifted_sigmoid", slope=1.0, shift=4.0)

# Ours, by the same principle.
for _act in ("leaky_relu", "elu", "selu", "celu", "gelu", "silu", "quick_gelu", "mish", "softplus"):
    register(_act, family="shifted_sigmoid", slope=5.0, shift=0.5)
register("hardswish", family="shifted_sigmoid", slope=5.0, shift=3.5)  # saturates below x = -3
register("relu6", family="band", lo=0.0, hi=6.0)
register("hardtanh", family="gauss", width=4.0)
register("sigmoid", family="gauss", scale=2.0, height=0.25)  # sigmoid(x) = (1 + tanh(x/2)) / 2
register("hardsigmoid", family="gauss", scale=3.0, height=1.0 / 6.0)

PAPER = ("tanh", "relu")
KERAS = ("tanh_keras", "relu_keras")
