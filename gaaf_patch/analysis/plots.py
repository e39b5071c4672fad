"""The paper's figures from the probes' plain results (or from ``results.json``, which stores the same histograms).

Each function takes ``{model label: per-site data}`` and returns a matplotlib ``Figure`` (saved to ``path`` when
given). Built on ``matplotlib.figure.Figure``, not pyplot, so nothing needs a display or a global backend.

- :func:`net_histograms`: Figures 3/5/6, the distribution of nets per site, models overlaid, saturation bounds marked;
- :func:`gradient_info`: Table 2 as bars, eq. 5 per layer and model, log scale;
- :func:`correlation_histograms`: Figure 1, the distribution of node-pair correlations per layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["histogram", "net_histograms", "gradient_info", "correlation_histograms"]


def _figure(nrows: int, ncols: int, width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("plots need matplotlib: pip install 'gaaf-patch[plot]' (or matplotlib)") from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: str | os.PathLike | None):
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def histogram(values: np.ndarray, bins: int = 40, range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, Any]:  # noqa: A002
    """``{"counts", "edges"}`` of ``values``: the form the plots and ``results.json`` use."""
    counts, edges = np.histogram(np.asarray(values), bins=bins, range=range)
    return {"counts": counts, "edges": edges}


def _density(h: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(h["counts"], dtype=float)
    edges = np.asarray(h["edges"], dtype=float)
    total = counts.sum() + float(h.get("below", 0)) + float(h.get("above", 0))
    width = np.diff(edges)
    return edges, counts / max(total, 1.0) / width


def _site_names(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for per_site in data.values():
        names += [s for s in per_site if s not in names]
    return names


def net_histograms(
    data: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    saturation: float | None = 2.0,
    labels: Mapping[str, str] | None = None,
    title: str = "Net values per activation site",
    path: str | os.PathLike | None = None,
):
    """``data[model][site]`` is a :class:`~gaaf_patch.analysis.NetValues` result (``counts``, ``edges``, ...); one
    panel per site, one line per model (density; mass beyond the range is in the legend's saturation figure)."""
    sites = _site_names(data)
    fig, axes = _figure(1, len(sites), 4.2, 3.2)
    for ax, site in zip(axes[0], sites, strict=True):
        for model, per_site in data.items():
            if site not in per_site:
                continue
            h = per_site[site]
            edges, dens = _density(h)
            sat = h.get("saturated")
            label = model + (f" ({sat:.1%} sat.)" if sat is not None else "")
            ax.stairs(dens, edges, label=label, linewidth=1.4)
        if saturation:
            for x in (-saturation, saturation):
                ax.axvline(x, color="0.5", linestyle=":", linewidth=1)
        ax.set_title((labels or {}).get(site, f"site {site}"))
        ax.set_xlabel("net value z")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    fig.suptitle(title)
    return _save(fig, path)


def gradient_info(
    data: Mapping[str, Mapping[str, float]],
    *,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    labels: Mapping[str, str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "Gradient information per layer (eq. 5)",
    path: str | os.PathLike | None = None,
):
    """``data[model][layer]`` = eq. 5's value; grouped bars per layer (log scale), optional error bars (std over
    seeds) and reference markers (``reference[model][layer]``, e.g. the paper's Table 2)."""
    layers = _site_names(data)
    models = list(data)
    fig, axes = _figure(1, 1, min(11.0, max(6.0, 0.45 * len(layers) * max(1, len(models)))), 3.8)
    ax = axes[0][0]
    width = 0.8 / max(1, len(models))
    x = np.arange(len(layers))
    for i, model in enumerate(models):
        vals = [data[model].get(layer, np.nan) for layer in layers]
        err = [(errors or {}).get(model, {}).get(layer, 0.0) for layer in layers] if errors else None
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, yerr=err, label=model, capsize=2)
        ref = (reference or {}).get(model)
        if ref:
            rv = [ref.get(layer, np.nan) for layer in layers]
            ax.scatter(x + (i - (len(models) - 1) / 2) * width, rv, marker="_", s=200, color="k", zorder=3,
                       label="paper" if i == 0 else None)  # fmt: skip
            _ = bars
    ax.set_xticks(x, [(labels or {}).get(layer, layer) for layer in layers])
    ax.set_yscale("log")
    ax.set_ylabel("mean |dL/dw| over steps")
    ax.legend(fontsize=8, ncols=2)
    ax.set_title(title)
    return _save(fig, path)


def correlation_histograms(
    data: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    labels: Mapping[str, str] | None = None,
    thresholds: Sequence[float] = (0.5,),
    title: str = "Node-pair correlations per layer",
    path: str | os.PathLike | None = None,
):
    """``data[model][site]`` holds ``counts``/``edges`` (see :func:`histogram`) of the site's node-pair
    correlations; one panel per site, one line per model (fraction of pairs per bin)."""
    sites = _site_names(data)
    fig, axes = _figure(1, len(sites), 4.2, 3.2)
    for ax, site in zip(axes[0], sites, strict=True):
        for model, per_site in data.items():
            if site in per_site:
                counts = np.asarray(per_site[site]["counts"], dtype=float)
                ax.stairs(counts / max(counts.sum(), 1.0), np.asarray(per_site[site]["edges"]), label=model)
        for t in thresholds:
            ax.axvline(t, color="0.5", linestyle=":", linewidth=1)
        ax.set_title((labels or {}).get(site, f"site {site}"))
        ax.set_xlabel("Pearson r between two nodes")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of pairs")
    fig.suptitle(title)
    return _save(fig, path)
