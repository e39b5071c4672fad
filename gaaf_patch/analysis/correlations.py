"""Node correlations per layer, as in the paper's Table 1 and Figure 1.

Dropout is said to prevent co-adaptation; Hahn & Choi count node pairs of each hidden layer whose correlation over
the data set is above 0.9, 0.8, ..., 0.5 and find *more* such pairs with dropout than without. This probe records the
output of each site (the node values) over a data set and computes Pearson correlations between its nodes.

Nodes are the features of dimension 1: for an ``N x D`` output, the D units; for an ``N x C x H x W`` output, the C
channels, with every position counted as a sample. Sums are kept in float64 about the first batch's mean (shifted
sums stay accurate when the mean is large), so memory is ``D x D`` whatever the data set size. A node that never
varies (a dead ReLU) has no correlation: its pairs are left out of the counts and reported as ``constant``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .sites import Hooks, SiteSpec, select

__all__ = ["NodeCorrelations", "THRESHOLDS", "correlation_counts"]

THRESHOLDS = (0.9, 0.8, 0.7, 0.6, 0.5)


def _nodes(y: Tensor) -> Tensor:
    """``samples x nodes``: dimension 1 is the node, every other dimension a sample."""
    if y.dim() == 1:
        return y.unsqueeze(1)
    if y.dim() > 2:
        y = y.movedim(1, -1)
    return y.reshape(-1, y.shape[-1])


def correlation_counts(corr: np.ndarray, thresholds=THRESHOLDS, absolute: bool = False) -> dict[str, int]:
    """Pairs ``i < j`` whose correlation (or its absolute value) is above each threshold; NaN pairs never count."""
    iu = np.triu_indices(corr.shape[0], k=1)
    r = corr[iu]
    r = r[np.isfinite(r)]
    if absolute:
        r = np.abs(r)
    return {f"{t:g}": int((r > t).sum()) for t in thresholds}


class _Acc:
    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None

    def add(self, y: Tensor) -> None:
        x = _nodes(y.detach()).double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(len(self.shift), len(self.shift), dtype=x.dtype, device=x.device)
        x = x - self.shift
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def corr(self) -> np.ndarray:
        n = self.n
        mean = self.s1 / n
        cov = (self.s2 - n * torch.outer(mean, mean)) / max(n - 1, 1)
        var = cov.diagonal().clamp_min(0)
        std = var.sqrt()
        # A constant node: exactly zero variance up to rounding of the shifted sums.
        dead = var <= 1e-12 * (1 + (self.shift.abs() + mean.abs()) ** 2)
        c = cov / torch.outer(std, std)
        c[dead, :] = float("nan")
        c[:, dead] = float("nan")
        c = c.clamp(-1, 1)
        return c.cpu().numpy()


class NodeCorrelations:
    """Pearson correlations between the nodes of each site's output, over the samples seen while attached.

    >>> with NodeCorrelations(model) as nc:
    ...     forward_over(model, test_images)
    >>> nc.result()["1"]["counts"]   # {"0.9": 12, "0.8": 140, ...} pairs above each threshold

    ``sites``: see :func:`gaaf_patch.analysis.sites.select`; default the activation modules (the hidden layers'
    node values). ``absolute``: count ``|r|`` above a threshold instead of ``r``.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: SiteSpec = "activations",
        *,
        thresholds: tuple[float, ...] = THRESHOLDS,
        absolute: bool = False,
    ) -> None:
        self.sites = select(model, sites)
        self.thresholds = tuple(thresholds)
        self.absolute = absolute
        self._hooks = Hooks()
        self._acc: dict[str, _Acc] = {}
        self.reset()

    def reset(self) -> None:
        self._acc = {n: _Acc() for n in self.sites}

    def _hook(self, name: str):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                self._acc[name].add(out)

        return hook

    def attach(self) -> NodeCorrelations:
        if not len(self._hooks):
            for name, m in self.sites.items():
                self._hooks.add(m.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> NodeCorrelations:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def result(self) -> dict[str, dict[str, Any]]:
        """Per site: ``nodes``, ``samples``, ``pairs`` (``D(D-1)/2``), ``constant`` (nodes that never varied),
        ``counts`` (threshold -> pairs above it), ``corr`` (``D x D`` numpy, NaN rows for constant nodes) and
        ``values`` (the finite upper-triangle correlations, for a histogram)."""
        out: dict[str, dict[str, Any]] = {}
        for name, acc in self._acc.items():
            if acc.n < 2:
                raise ValueError(f"site {name!r} saw {acc.n} sample(s); correlations need at least 2")
            c = acc.corr()
            d = c.shape[0]
            iu = np.triu_indices(d, k=1)
            vals = c[iu]
            out[name] = {
                "nodes": d,
                "samples": acc.n,
                "pairs": d * (d - 1) // 2,
                "constant": int(np.isnan(c.diagonal()).sum()),
                "counts": correlation_counts(c, self.thresholds, self.absolute),
                "corr": c,
                "values": vals[np.isfinite(vals)],
            }
        return out
