"""Net values (pre-activations) per activation site: histograms and the fraction in the saturation area.

The paper's argument is about where nets sit: dropout and GAAF push them into the saturation area of the
activation (for tanh, ``|z| > 2`` or so; Figures 3, 5 and 6 show histograms of the nets with and without). This
probe records, for each site, the input the site receives, over a data set: a fixed-range histogram (values beyond
the range are counted as ``below`` / ``above``, not dropped), the count in the saturation area, mean and std.
Everything is accumulated on the model's device, so a pass costs a few reductions per site and batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .sites import Hooks, SiteSpec, select

__all__ = ["NetValues", "DEFAULT_SATURATION"]

DEFAULT_SATURATION = 2.0  # tanh: tanh(2) = 0.964, tanh'(2) = 0.07


class _Acc:
    def __init__(self, bins: int, lo: float, hi: float) -> None:
        self.bins, self.lo, self.hi = bins, lo, hi
        self.hist: Tensor | None = None
        self.stats: Tensor | None = None  # n, saturated, below, above, sum, sum of squares (float64)

    def add(self, z: Tensor, saturated: Tensor) -> None:
        z = z.detach()
        zf = z.float().reshape(-1)
        h = torch.histc(zf, self.bins, self.lo, self.hi)  # drops values outside [lo, hi]
        zd = zf.double()
        s = torch.stack(
            [
                zd.new_tensor(float(zf.numel())),
                saturated.sum().double(),
                (zf < self.lo).sum().double(),
                (zf > self.hi).sum().double(),
                zd.sum(),
                (zd * zd).sum(),
            ]
        )
        self.hist = h.double() if self.hist is None else self.hist + h
        self.stats = s if self.stats is None else self.stats + s


class NetValues:
    """Histogram and saturation fraction of the input of each site.

    ``sites``: see :func:`gaaf_patch.analysis.sites.select` (default: every activation and GAAF module).
    ``saturation``: a threshold ``t`` (saturated means ``|z| > t``; default 2, for tanh) or a function of the net
    returning a boolean mask (``lambda z: z < 0`` for ReLU). ``bins`` / ``range``: the histogram.

    >>> with NetValues(model) as nv:
    ...     forward_over(model, test_images)
    >>> nv.result()["1"]["saturated"]   # fraction of nets with |z| > 2 at site "1"
    """

    def __init__(
        self,
        model: nn.Module,
        sites: SiteSpec = "activations",
        *,
        saturation: float | Callable[[Tensor], Tensor] = DEFAULT_SATURATION,
        bins: int = 120,
        range: tuple[float, float] = (-6.0, 6.0),  # noqa: A002 - numpy's name
    ) -> None:
        lo, hi = float(range[0]), float(range[1])
        if not hi > lo or bins < 1:
            raise ValueError(f"need bins >= 1 and range lo < hi, got bins={bins}, range={range}")
        self.sites = select(model, sites)
        self.saturation = saturation
        self.bins, self.range = int(bins), (lo, hi)
        self._hooks = Hooks()
        self._acc: dict[str, _Acc] = {}
        self.reset()

    def reset(self) -> None:
        self._acc = {n: _Acc(self.bins, *self.range) for n in self.sites}

    def _mask(self, z: Tensor) -> Tensor:
        if callable(self.saturation):
            return self.saturation(z)
        return z.abs() > self.saturation

    def _hook(self, name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                z = args[0].detach()
                self._acc[name].add(z, self._mask(z))

        return hook

    def attach(self) -> NetValues:
        if not len(self._hooks):
            for name, m in self.sites.items():
                self._hooks.add(m.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> NetValues:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def edges(self) -> np.ndarray:
        return np.linspace(self.range[0], self.range[1], self.bins + 1)

    def result(self) -> dict[str, dict[str, Any]]:
        """Per site (model order): ``count``, ``saturated`` (fraction), ``mean``, ``std``, ``below``/``above`` (counts
        outside the histogram range), ``counts`` (numpy, ``bins`` long) and ``edges`` (numpy, ``bins + 1``)."""
        out: dict[str, dict[str, Any]] = {}
        for name, acc in self._acc.items():
            if acc.stats is None:
                out[name] = {"count": 0, "saturated": float("nan"), "mean": float("nan"), "std": float("nan"),
                             "below": 0, "above": 0, "counts": np.zeros(self.bins), "edges": self.edges()}  # fmt: skip
                continue
            n, sat, below, above, s1, s2 = acc.stats.tolist()
            mean = s1 / n
            var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
            out[name] = {
                "count": int(n),
                "saturated": sat / n,
                "mean": mean,
                "std": var**0.5,
                "below": int(below),
                "above": int(above),
                "counts": acc.hist.cpu().numpy(),
                "edges": self.edges(),
            }
        return out
