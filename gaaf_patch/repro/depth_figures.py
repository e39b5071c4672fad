"""The depth study's figures (:mod:`.depth`): validation error and training loss per epoch for every variant, and the
GAAF gradient ratio per stage over training, each the mean over seeds with the min..max band. matplotlib is
optional: :func:`write_figures` raises ImportError without it, and the study records why there are no PNGs.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .depth_setup import GAAF_VARIANTS, STAGES, VARIANTS

__all__ = ["write_figures"]

COLORS = {"plain": "tab:blue", "dropout": "tab:orange", "gaaf-paper": "tab:red", "gaaf-auto": "tab:green"}


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per epoch the mean, min and max over the runs that got that far (a diverged run's curve ends early)."""
    n = max((len(c) for c in curves), default=0)
    cols = [[c[i] for c in curves if i < len(c) and math.isfinite(c[i])] for i in range(n)]
    cols = [c for c in cols if c]
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _tag(results: dict[str, Any]) -> str:
    seeds = max((len(r) for r in _cells(results).values()), default=0)
    d = results.get("data", {})
    return (f"{d.get('source', '?')} {d.get('train', '?')} train / {d.get('val', '?')} val, {seeds} seed(s)"
            + (" (quick)" if results["setup"].get("quick") else ""))  # fmt: skip


def _cells(results: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results["runs"]:
        cells.setdefault((r["model"], r["regime"], r["variant"]), []).append(r)
    return cells


def write_figures(results: dict[str, Any], out: Path, prefix: str = "depth_") -> list[Path]:
    """Validation error (100 - accuracy, log scale) and training loss per epoch (rows: regimes, columns: models, one
    line per variant, the mean over seeds, the band min..max), and the GAAF gradient ratio per stage over training
    (rows: model x regime, columns: stages, gaaf-paper dashed vs gaaf-auto solid, the band min..max)."""
    from matplotlib.ticker import MaxNLocator

    from ..analysis.plots import _figure, _save

    cells = _cells(results)
    if not cells:
        return []
    models = [m for m in results["models"] if any(k[0] == m for k in cells)]
    regimes = [g for g in results["regimes"] if any(k[1] == g for k in cells)]
    tag = _tag(results)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ylabel in (("val_error", "validation error % (100 - accuracy)"), ("train_loss", "training loss")):
        fig, axes = _figure(len(regimes), len(models), 4.6, 3.4)
        for i, g in enumerate(regimes):
            for j, m in enumerate(models):
                ax = axes[i][j]
                for v in VARIANTS:
                    curves = [[100.0 - a for a in r["history"]["val_acc"]] if key == "val_error" else r["history"][key]
                              for r in cells.get((m, g, v), [])]  # fmt: skip
                    mean, lo, hi = _mean_curve(curves)
                    div = sum(r["diverged"] for r in cells.get((m, g, v), []))
                    if div:  # a run that diverged in its first epoch has no point to plot: say so
                        ax.annotate(f"{v}: {div}/{len(curves)} diverged", (0.02, 0.02 + 0.08 * VARIANTS.index(v)),
                                    xycoords="axes fraction", fontsize=8, color=COLORS[v])  # fmt: skip
                    if mean:
                        x = range(1, len(mean) + 1)
                        ax.plot(x, mean, marker="o", ms=3, color=COLORS[v], label=v)
                        ax.fill_between(x, lo, hi, color=COLORS[v], alpha=0.15, linewidth=0)
                ax.set_yscale("log")  # a stalled variant (90% error) and the 1% ones on one axis
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{m}, {g}")
                ax.set_xlabel("epoch")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
        fig.suptitle(f"{ylabel} per epoch, log scale\nmean over seeds, band min..max; {tag}")
        paths.append(out / f"{prefix}{key}.png")
        _save(fig, paths[-1])
    rows = [(m, g) for m in models for g in regimes if any((m, g, v) in cells for v in GAAF_VARIANTS)]
    if rows:
        stages = [*STAGES, "params"]
        fig, axes = _figure(len(rows), len(stages), 3.2, 2.6)
        for i, (m, g) in enumerate(rows):
            for j, st in enumerate(stages):
                ax = axes[i][j]
                ax.axhspan(0.5, 2.0, color="0.9", zorder=0)
                ax.axhline(1.0, color="0.6", linewidth=0.8)
                for v, style in (("gaaf-paper", "--"), ("gaaf-auto", "-")):
                    mean, lo, hi = _mean_curve([r["grad_ratio"][st] for r in cells.get((m, g, v), [])])
                    if mean:
                        x = range(len(mean))
                        ax.plot(x, mean, style, marker="o", ms=3, color=COLORS[v], label=v)
                        ax.fill_between(x, lo, hi, color=COLORS[v], alpha=0.15, linewidth=0)
                ax.set_yscale("log")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{m} {g}: {st}", fontsize=9)
                ax.set_xlabel("epoch (0: start)")
                if j == 0:
                    ax.set_ylabel("patched / plain grad norm")
                    ax.legend(fontsize=7)
        fig.suptitle(f"GAAF gradient ratio (patched / unpatched, same weights) at each stage's output, fixed batch; "
                     f"grey: [0.5, 2]\nmean over seeds, band min..max; {tag}")  # fmt: skip
        paths.append(out / f"{prefix}grad_ratio.png")
        _save(fig, paths[-1])
    return paths
