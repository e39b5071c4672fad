"""A noisy activation (Gulcehre, Moczulski, Denil & Bengio, "Noisy Activation Functions", ICML 2016), the baseline
GAAF's paper takes its inspiration from: noise injected only where the activation saturates, so that a saturated
unit still moves and gets gradient.

We implement their hard-tanh with half-normal noise (their eq. 9 with ``d(x) = -sgn(x) sgn(1 - alpha)``)::

    h(x) = hardtanh(x),  u(x) = x,  Delta = h(x) - u(x)
    phi(x) = alpha h(x) + (1 - alpha) u(x) + d(x) sigma(x) |xi|,   sigma(x) = c (sigmoid(p Delta) - 1/2)^2

with ``xi ~ N(0, 1)`` in training and ``|xi|`` replaced by its mean ``sqrt(2/pi)`` in evaluation. Their defaults:
``alpha = 1.15``, ``c = 0.5``, ``p`` learned (here one scalar, initialised to 1). In the linear region ``Delta = 0``,
so there is no noise and the unit is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NoisyHardTanh"]

_HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)


class NoisyHardTanh(nn.Module):
    def __init__(self, alpha: float = 1.15, c: float = 0.5, p: float = 1.0, learn_p: bool = True) -> None:
        super().__init__()
        self.alpha, self.c = float(alpha), float(c)
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)

    def forward(self, x: Tensor) -> Tensor:
        h = F.hardtanh(x)
        delta = h - x
        sigma = self.c * (torch.sigmoid(self.p * delta) - 0.5).square()
        d = -torch.sign(x) * math.copysign(1.0, 1.0 - self.alpha)
        if self.training:
            xi = torch.randn_like(x).abs_()
        else:
            xi = _HALF_NORMAL_MEAN
        return self.alpha * h + (1.0 - self.alpha) * x + d * sigma * xi

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, c={self.c:g}"
