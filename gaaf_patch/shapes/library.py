"""The built-in shapes: four families, each with its fast path for GAAF's backward, and the per-activation defaults.

Each activation's default shape is the ``shape`` of its entry in :data:`gaaf_patch.activations.ACTIVATIONS`,
registered here under the activation's name. Which are the paper's: ``tanh`` (an exponential, read off Hahn & Choi's
Figure 4) and ``relu`` (a shifted sigmoid, same figure). ``tanh_keras`` and ``relu_keras`` are the variants of a
public Keras port. docs/shapes.md plots each default.

A family's :class:`~gaaf_patch.shapes.registry.FastPath` says how GAAF's backward evaluates it in place on one
buffer (``gauss`` through ``exp2``, about 3x cheaper than ``exp`` on CPU) and which code the fused CPU kernel
(``csrc/gaaf_cpu.cpp``, argument ``shape``) has for it; a family without one is simply called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import activations as _acts
from .registry import FastPath, add_check, register

_LOG2E = 1.0 / math.log(2.0)

# The fused kernel's shape codes (`shape` in csrc/gaaf_cpu.cpp).
_K_GAUSS, _K_SHIFTED_SIGMOID, _K_BAND = 0, 1, 2


def _scaled_square(z: Tensor, k: float, owned: bool) -> Tensor:
    """``k z^2``: one pass on CPU (``addcmul(0, z, z, value=k)``, the 0 broadcast), into ``z`` when ``owned``.

    The 0 is made here, not kept as a module constant: a real tensor would break tracing under fake tensors.
    """
    if z.device.type == "cpu":
        zero = z.new_zeros(())
        return torch.addcmul(zero, z, z, value=k, out=z) if owned else torch.addcmul(zero, z, z, value=k)
    return (z.mul_(z) if owned else torch.mul(z, z)).mul_(k)


def _gauss_k(p: Mapping[str, Any]) -> float:
    """exp(-((x - c) / scale)^2 / width) = exp2(k (x - c)^2)."""
    return -_LOG2E / (p["width"] * p["scale"] * p["scale"])


def _gauss_term(x: Tensor, owned: bool, p: Mapping[str, Any]) -> tuple[Tensor, float]:
    # exp2(k (x - c)^2): 2 passes (3 with a center) instead of 4-6; exp2 is also about 3x cheaper than exp on CPU.
    # Same value to a few ulps.
    z = x
    if p["center"] != 0:
        z, owned = (z.sub_(p["center"]) if owned else torch.sub(z, p["center"])), True
    return _scaled_square(z, _gauss_k(p), owned).exp2_(), float(p["height"])


def _shifted_sigmoid_term(x: Tensor, owned: bool, p: Mapping[str, Any]) -> tuple[Tensor, float]:
    z = x.add_(p["shift"]) if owned else torch.add(x, p["shift"])
    return z.mul_(p["slope"]).sigmoid_(), float(p["height"])


@register(
    "gauss",
    width=4.0,
    center=0.0,
    scale=1.0,
    height=1.0,
    fast=FastPath(
        _gauss_term,
        lambda p: (_K_GAUSS, _gauss_k(p), float(p["center"]), 0.0, float(p["height"])),
        zero_at_infinity=True,
    ),
)
def gauss(x: Tensor, width: float, center: float, scale: float, height: float) -> Tensor:
    """s(x) = height * exp(-((x - center) / scale)^2 / width).

    The paper's tanh shape is gauss(width=4): 1 at 0, about 0.78, 0.37, 0.11 at |x| = 1, 2, 3.
    """
    z = x if center == 0 and scale == 1 else (x - center) / scale
    e = torch.exp(z * z * (-1.0 / width))
    return e if height == 1 else e * height


@register(
    "shifted_sigmoid",
    slope=5.0,
    shift=0.5,
    height=1.0,
    fast=FastPath(
        _shifted_sigmoid_term,
        lambda p: (_K_SHIFTED_SIGMOID, float(p["slope"]), float(p["shift"]), 0.0, float(p["height"])),
    ),
)
def shifted_sigmoid(x: Tensor, slope: float, shift: float, height: float) -> Tensor:
    """s(x) = height * sigmoid(slope * (x + shift)).

    The paper's ReLU shape is shifted_sigmoid(slope=5, shift=0.5): 0.5 at x = -0.5, near 1 for x > 0 (an active unit
    gets gradient ~2), below 0.01 for x < -1.5.
    """
    s = torch.sigmoid((x + shift) * slope)
    return s if height == 1 else s * height


@register(
    "band",
    lo=0.0,
    hi=6.0,
    slope=5.0,
    margin=0.5,
    fast=FastPath(  # no in-place form (it is called), but a kernel code
        kernel=lambda p: (_K_BAND, float(p["slope"]), float(p["lo"] - p["margin"]), float(p["hi"] + p["margin"]), 1.0),
    ),
)
def band(x: Tensor, lo: float, hi: float, slope: float, margin: float) -> Tensor:
    """s(x) = sigmoid(slope * (x - lo + margin)) * sigmoid(slope * (hi + margin - x)).

    A shifted sigmoid on each edge of an activation that saturates on both sides of [lo, hi] (ReLU6).
    """
    return torch.sigmoid(slope * (x - lo + margin)) * torch.sigmoid(slope * (hi + margin - x))


@register("zero", fast=FastPath(lambda x, owned, p: (None, 0.0), zero=True))
def zero(x: Tensor) -> Tensor:
    """s(x) = 0: GAAF then has exactly the activation's own gradient (a control in experiments)."""
    return torch.zeros_like(x)


# Parameter sets that make no shape (a negative or zero width, an empty band): an error when the shape is made. The
# fast paths rely on them (a gauss width > 0).
add_check("gauss", lambda p: "width must be > 0" if not p["width"] > 0 else None)
add_check("gauss", lambda p: "scale must not be 0" if p["scale"] == 0 else None)
add_check("band", lambda p: "lo must be below hi" if not p["lo"] < p["hi"] else None)
add_check("band", lambda p: "slope must be > 0" if not p["slope"] > 0 else None)
add_check("band", lambda p: "margin must be >= 0" if not p["margin"] >= 0 else None)

# Each activation's default, from its entry in the activation table.
for _act in _acts.ACTIVATIONS.values():
    register(_act.name, family=_act.shape[0], **_act.shape[1])

# The Keras port's variants.
register("tanh_keras", family="gauss", width=3.0)
register("relu_keras", family="shifted_sigmoid", slope=1.0, shift=4.0)

PAPER = ("tanh", "relu")
KERAS = ("tanh_keras", "relu_keras")
