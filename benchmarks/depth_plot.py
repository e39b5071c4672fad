"""The depth benchmark's figure (:mod:`benchmarks.depth`): the gradient-norm ratio patched / plain against relative
depth (0: the input, 1: the last stage), log scale, one panel per gain at init and one after training, with the
target band ``gaaf_patch.gradscale.SAFE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gaaf_patch.gradscale import SAFE

__all__ = ["plot"]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results.get("trained", []) if r["status"] == "ok"]
    panels = [("init, gain='paper'", "paper"), ("init, gain='auto' (default)", "auto")]
    fig, axes = plt.subplots(1, 3 if trained else 2, figsize=(19 if trained else 13, 6.5), squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20")

    def curve(m: dict[str, Any], gain: str) -> tuple[list[float], list[float]]:
        xs, ys = [0.0], [m["whole"][gain]["input"]]
        for s in m["stages"]:
            xs.append(s["depth"])
            ys.append(s[f"{gain}_ratio"])
        pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b is not None and b > 0]
        return [a for a, _ in pts], [b for _, b in pts]

    ok = [r for r in results["init"] if r["status"] == "ok"]
    for ax, (title, g) in zip(axes, panels, strict=False):
        ci = 0
        for r in ok:
            if r["zero_gradient"] and "head_reinit" not in r:
                continue
            xs, ys = curve(r.get("head_reinit", r), g)
            if r["group"] != "zoo":
                ax.plot(xs, ys, "-o", ms=3, lw=1.6, color=colors(ci % 20), label=f"{r['model']} ({r['input_size'][1]})")
                ci += 1
            else:
                ax.plot(xs, ys, "-", lw=0.6, color="0.6", alpha=0.6)
        ax.plot([], [], "-", lw=0.6, color="0.6", label="coverage zoo (one model per family)")
        ax.set_title(title)
    if trained:
        ax = axes[2]
        for i, r in enumerate(trained):
            c = colors(i % 20)
            for g, style in (("paper", "--"), ("auto", "-o")):
                xs, ys = curve(r["trained"], g)
                acc = r["train"]["train_acc"]
                label = f"{r['model']} ({r['input_size'][1]}, acc {acc:.2f})" if g == "auto" else None
                ax.plot(xs, ys, style, ms=3, lw=1.4, color=c, label=label)
        ax.plot([], [], "--", color="k", label="gain='paper'")
        ax.plot([], [], "-", color="k", label="gain='auto'")
        batch = trained[0]["batch"]
        ax.set_title(f"after a short training on digits (checkpoint reloaded; {batch} held-out images)", fontsize=10)
    axes[1].set_ylim(0.25, 4.0)  # the auto gain stays near 1: show the band's edges
    for ax in axes:
        ax.set_yscale("log")
        ax.axhspan(*SAFE, color="tab:green", alpha=0.15, label=f"target [{SAFE[0]}, {SAFE[1]}]")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("relative depth (0: input, 1: last stage)")
        ax.set_ylabel("gradient norm, patched / plain")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, loc="upper right", ncol=1)
    fig.suptitle(
        f"GAAF gradient scale with depth, batch {results['settings']['batch']}, seed {results['settings']['seed']} "
        f"(torch {results['machine']['torch']}, commit {results['machine']['git_commit'] or '?'})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
