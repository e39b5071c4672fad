"""The depth-safe gain (``shapes="auto"``, the default of ``gaaf_patch.patch``): how much gradient a site may add.

The paper's form adds ``s(x)`` on top of ``phi'(x)``. Each site then passes back more gradient energy than the plain
activation, and the excess multiplies layer after layer: on timm's resnet50 the gradient norm grows x1e4, on
resnet101 x1e9 (docs/depth.md). The auto gain keeps the paper's mechanism (gradient where units saturate) and bounds
what it costs:

1. **Blend, don't add.** ``phi'(x) + w(x) (a - phi'(x))``, ``w = c s~(x)``: where the shape says a unit is near
   saturation, its derivative is drawn toward ``a``, the activation's slope in its linear regime (1 for ReLU and
   tanh, 0.25 for sigmoid; ``Activation.slope``). ``s~`` is the shape at unit height (``s = h s~``), ``c`` in
   ``[0, 1]``. An active ReLU keeps exactly 1, an inactive one gets ``w``; no unit's gradient exceeds ``a``, so a
   chain of identical masks (a residual stream: the same units active block after block) does not grow.
2. **An energy budget per site.** ``c`` is chosen per batch so that the site's gradient energy over its input is at
   most ``1 + delta`` times the plain one: ``E[(phi' + c st)^2] = (1 + delta) E[phi'^2]``, ``st = s~ (a - phi')``,
   solved for ``c`` (clipped to ``[0, 1]``). ``delta = BUDGET^(1/n) - 1`` for a model with ``n`` site calls, so a
   chain through every site would gain at most ``BUDGET`` in energy (``sqrt(2)`` in norm) if the sites' extra gains
   were independent: a design rule, not a bound (docs/depth.md measures x0.97-x1.43 in whole-network gradient norm
   on 127 models); shallow nets get
   a large ``delta`` (up to 1), deep ones a small one. The expectations are taken on a fixed strided sample of at most
   ``SAMPLES`` elements of what backward saved (memory order), so ``c`` costs a few small ops, not a pass.

A site that passes no gradient at all (every unit far in the saturation) stays at none: its budget is a fraction
of zero. ``shapes="paper"`` (and ``mode="sawtooth"``, the paper's literal equations) keep ``phi' + s``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BUDGET", "SAMPLES", "MAX_DELTA", "delta_for", "sample", "coefficient", "check_delta"]

BUDGET = 2.0  # gradient energy a chain through every site of a model may gain (norm: sqrt(2))
MAX_DELTA = 1.0  # a single site may at most double its gradient energy
SAMPLES = 4096  # elements read to estimate c: about 1% relative error on c


def delta_for(n_sites: int) -> float:
    """The per-site energy allowance for a model with ``n_sites`` GAAF sites."""
    return min(MAX_DELTA, BUDGET ** (1.0 / max(int(n_sites), 1)) - 1.0)


def sample(t: Tensor) -> Tensor:
    """At most about ``SAMPLES`` elements of ``t``, every ``step``-th in memory order (``step`` odd, so a power-of-two
    channel count in a channels-last tensor is not aliased); the whole tensor when it is small. A view where it can
    be (dense tensors), so nothing is copied but what is read."""
    n = t.numel()
    if t.dim() > 1 and not t.is_contiguous():
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        t = t.permute(order)
    flat = t.reshape(-1)
    if n <= 2 * SAMPLES:
        return flat
    step = n // SAMPLES
    step = step + 1 - step % 2
    return flat[::step]


def coefficient(dphi: Tensor, st: Tensor, delta: float) -> Tensor | float:
    """``c`` in ``[0, 1]`` with ``mean((dphi + c st)^2) = (1 + delta) mean(dphi^2)``.

    ``dphi`` and ``st`` are the site's ``phi'`` and blend term on the sample. Where ``st`` is zero, ``c`` is 0. On the
    CPU outside tracing, a Python float (the three moments are read once); elsewhere, and in double backward (inputs
    that require grad: ``c`` is then differentiated too), a 0-dim tensor (no device sync).
    """
    m = torch.stack((dphi.reshape(-1), st.reshape(-1)))
    gram = (m @ m.T).div_(m.shape[1])  # [[A, b], [b, a]]: the second moments, in one product
    if m.is_cpu and not m.requires_grad and not torch.compiler.is_compiling() and type(m) is Tensor:
        (A, b), (_b, a) = gram.tolist()
        return _solve(A, a, b, delta)
    A, b, a = gram[0, 0], gram[0, 1], gram[1, 1]
    tiny = torch.finfo(a.dtype).tiny
    root = torch.sqrt(b * b + a * (delta * A))
    # the root of a c^2 + 2 b c - delta A = 0, written so that neither branch cancels
    c = torch.where(b >= 0, (delta * A) / (root + b).clamp_min(tiny), (root - b) / a.clamp_min(tiny))
    return torch.where(a > 0, c, torch.zeros_like(c)).clamp(0.0, 1.0)


def _solve(A: float, a: float, b: float, delta: float) -> float:
    """The same root in Python floats."""
    if not a > 0:
        return 0.0
    root = math.sqrt(b * b + a * delta * A)
    c = delta * A / (root + b) if b >= 0 and root + b > 0 else (root - b) / a
    return min(max(c, 0.0), 1.0) if math.isfinite(c) else 0.0


def check_delta(delta: float | None) -> float | None:
    if delta is not None and not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"the auto gain's energy allowance must be a finite number >= 0, got {delta}")
    return None if delta is None else float(delta)
