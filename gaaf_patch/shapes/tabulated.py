"""The dropout-matched shape tabulated: ``s`` once per (activation, sigma), then read off by arithmetic.

- ``s`` is tabulated on a uniform grid of spacing ``h = W / 32`` (``W`` the quadrature's panel width,
  :mod:`gaaf_patch.shapes.quadrature`) with every kink on a node, and stored cell by cell (``s = max(0, A_c + B_c
  u)``, ``u = (x - lo) / h``, in cell ``c``), so the jump of ``s`` at a kink is exact, not smeared over a cell. The
  clip comes after the interpolation, so its own kink is exact too. Measured table error: 7.4e-6 for ReLU (vs. the
  closed form), 1.8e-5 for tanh (vs. scipy).
- the table spans the range where ``s > 1e-7``; outside it ``s = 0`` (tested: the true ``s`` there is below 1e-6
  for every built-in activation at sigma 0.25, 1, 3). At a kink itself ``s`` takes its left limit (ReLU:
  ``s(0) = 0.5``, so ``relu'(0) + s(0) = m(0)`` with PyTorch's ``relu'(0) = 0``); a float32 input within rounding of
  a kink (``|x - kink| < ~1e-7 |lo|``) may fall on its left side too.

Evaluating the shape costs 4 elementwise passes for the cell (affine, clamp, ceil, NaN guard), an int32 cast, two
``index_select``, one ``addcmul`` and one clamp, on the input's device and dtype; the table is copied there once
and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .quadrature import TRUNCATION, act_spec, activation_fn, derivative, panels, smoothed

__all__ = ["Table", "table", "TOLERANCE"]

TOLERANCE = 1e-7  # the table covers every x where s > TOLERANCE
_CELLS_PER_PANEL = 32  # table spacing = panel width / 32, about min(sigma, 1) / 64
_MAX_MARGIN = 128.0
_KINK_DELTA = 1e-9  # one-sided derivatives at a kink: phi'(x -+ delta)


class Table:
    """``s(x)`` tabulated cell by cell on a uniform grid: ``max(0, A[c] + B[c] u)`` in cell ``c``, ``u = (x - lo) / h``.

    Cell ``c`` (``1..n``) is ``(nodes[c-1], nodes[c]]``, found by arithmetic (``ceil(u)``), so a node takes the cell
    on its left; cells 0 and ``n+1`` lie outside the table and hold ``A = B = 0``. A cell holds its own straight
    line, so a jump of ``s`` at a node (a kink of ``phi``) is represented exactly.
    """

    def __init__(self, nodes: Tensor, left: Tensor, right: Tensor) -> None:
        self.nodes = nodes  # float64, n+1 nodes, uniform
        self.n = max(len(nodes) - 1, 0)
        if self.n:
            self.lo, self.h = float(nodes[0]), float(nodes[1] - nodes[0])
            cells = torch.arange(self.n, dtype=torch.float64)  # cell c + 1 starts at u = c
            zero = nodes.new_zeros(1)
            slope = right - left  # per unit of u
            self.A = torch.cat([zero, left - slope * cells, zero])
            self.B = torch.cat([zero, slope, zero])
        else:
            self.lo, self.h = 0.0, 1.0
            self.A = self.B = nodes.new_zeros(2)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @property
    def range(self) -> tuple[float, float]:
        """Where the table holds values; ``s = 0`` outside."""
        return (self.lo, self.lo + self.n * self.h) if self.n else (0.0, 0.0)

    def _tensors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = (x.device, x.dtype)
        found = self._on.get(key)
        if found is None:
            found = (
                self.A.to(x.device, x.dtype),
                self.B.to(x.device, x.dtype),
                torch.tensor(-self.lo / self.h, dtype=x.dtype, device=x.device),
                torch.tensor(1.0 / self.h, dtype=x.dtype, device=x.device),
            )
            if type(x) is Tensor and not torch.compiler.is_compiling():  # never cache a fake or traced tensor
                self._on[key] = found
        return found

    def _cell(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a, b, offset, scale = self._tensors(x)
        # u = (x - lo) / h in one pass, clamped to [0, n + 1/2]: below the table it lands in cell 0, above in n+1
        # (A = B = 0 there, so +-inf gives 0, as the built-in shapes do); NaN goes to cell 0 and stays NaN. The
        # power-of-two h makes u exact at the kinks. int32 index_select: ~2.5x cheaper on CPU than int64 gathers.
        u = torch.addcmul(offset, x.reshape(-1), scale).clamp_(0.0, self.n + 0.5)
        cell = torch.ceil(u).nan_to_num_(0.0).int()
        return u, cell, a, b

    def __call__(self, x: Tensor) -> Tensor:
        if not self.n:
            return torch.zeros_like(x)
        if x.dtype in (torch.float16, torch.bfloat16):  # u needs float32: half has no integers above 2048
            return self(x.float()).to(x.dtype)  # (GAAF's backward already calls shapes in float32 for half inputs)
        u, cell, a, b = self._cell(x)
        return torch.addcmul(a.index_select(0, cell), b.index_select(0, cell), u).clamp_min_(0).view(x.shape)

    def slope(self, x: Tensor) -> Tensor:
        """``ds/dx``: the cell's slope where ``s > 0``, else 0 (for double backward through a compiled graph)."""
        if not self.n:
            return torch.zeros_like(x)
        if x.dtype in (torch.float16, torch.bfloat16):
            return self.slope(x.float()).to(x.dtype)
        u, cell, a, b = self._cell(x)
        bc = b.index_select(0, cell)
        return torch.where(torch.addcmul(a.index_select(0, cell), bc, u) > 0, bc / self.h, 0.0).view(x.shape)


@functools.lru_cache(maxsize=256)
def _build(phi: Callable[[Tensor], Tensor], kinks: tuple[float, ...], sigma: float) -> Table:
    empty = Table(torch.zeros(0, dtype=torch.float64), torch.zeros(0), torch.zeros(0))
    if sigma == 0:
        return empty
    anchor, w = panels(sigma, kinks)
    lo_k, hi_k = (min(kinks), max(kinks)) if kinks else (0.0, 0.0)

    def excess(x: Tensor) -> tuple[Tensor, Tensor]:
        """(d(x+), d(x-)): m(x) - phi'(x) with phi' taken just right and just left of x."""
        m = smoothed(phi, x, sigma, anchor, w)
        return m - derivative(phi, x + _KINK_DELTA), m - derivative(phi, x - _KINK_DELTA)

    # Coarse pass on the panel boundaries: find where s > TOLERANCE, widening until s has died out at both ends.
    margin = TRUNCATION * sigma + 8.0
    while True:
        k0 = math.floor((lo_k - margin - anchor) / w)
        k1 = math.ceil((hi_k + margin - anchor) / w)
        coarse = anchor + torch.arange(k0, k1 + 1, dtype=torch.float64) * w
        right, left = excess(coarse)
        s = torch.maximum(right, left).clamp_min(0)
        if s[:4].max() <= TOLERANCE and s[-4:].max() <= TOLERANCE:
            break
        margin *= 2
        if margin > _MAX_MARGIN * max(sigma, 1.0):
            raise ValueError(
                f"the dropout-matched shape does not decay (s = {float(s[-1]):.3g} at x = {float(coarse[-1]):.3g}): "
                "E[phi'(x + eps)] - phi'(x) must vanish for large |x|"
            )
    alive = torch.nonzero(s > TOLERANCE).flatten()
    if len(alive) == 0:
        return empty
    first, last = max(int(alive[0]) - 2, 0), min(int(alive[-1]) + 2, len(coarse) - 1)
    # Fine pass: 32 cells per panel, so every kink (a panel boundary) is a node.
    n = (last - first) * _CELLS_PER_PANEL
    nodes = coarse[first] + torch.arange(n + 1, dtype=torch.float64) * (w / _CELLS_PER_PANEL)
    right, left = excess(nodes)
    return Table(nodes, right[:-1], left[1:])


def table(activation: str | Callable[[Tensor], Tensor], sigma: float, kinks: Sequence[float] = ()) -> Table:
    """The cached table of ``s_sigma`` for ``activation`` (a registered name, with parameters, or a callable)."""
    sigma = float(sigma)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if isinstance(activation, str):
        return _build_named(act_spec(activation), sigma)
    phi, kinks = activation_fn(activation, kinks)
    return _build(phi, kinks, sigma)


@functools.lru_cache(maxsize=256)
def _build_named(spec: str, sigma: float) -> Table:
    phi, kinks = activation_fn(spec)
    return _build.__wrapped__(phi, kinks, sigma)  # keyed by the spelling: a fresh lambda per call would never hit
