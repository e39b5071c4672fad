"""Plot every default shape function: phi'(x), s(x) and phi'(x) + s(x) on [-6, 6].

    .venv/bin/python scripts/plot_shapes.py            # writes docs/img/shapes.png and docs/img/paper_shapes.png
    .venv/bin/python scripts/plot_shapes.py --out DIR

The curves come from the library itself: ``phi'`` is the gradient of ``gaaf_patch.gaaf(x, name, "zero")``,
``phi' + s`` the gradient of ``gaaf_patch.gaaf(x, name)`` (exact mode, the default shape), ``s`` the registered
shape ``gaaf_patch.shapes.get(name)``. docs/shapes.md embeds both images.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gaaf_patch  # noqa: E402
from gaaf_patch import shapes  # noqa: E402
from gaaf_patch.activations import ACTIVATIONS  # noqa: E402

X_RANGE = (-6.0, 6.0)
N = 1201  # a point every 0.01: the kinks at integers are on the grid
DPI = 100
COLORS = {"phi'": "#1f77b4", "s": "#ff7f0e", "phi'+s": "#2ca02c", "keras": "#9467bd"}
ORDER = [
    # the paper's two first, then the ReLU family, then the two-sided ones
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "gelu",
    "silu",
    "mish",
    "softplus",
    "hardswish",
    "relu6",
    "hardtanh",
    "sigmoid",
    "hardsigmoid",
]


def label(name: str) -> str:
    """``name: family(k=v, ...)`` with parameters to 4 significant digits (1/6 prints as 0.1667)."""
    shape = shapes.get(name)
    base = shapes.get(shape.family).params
    args = ", ".join(f"{k}={v:.4g}" for k, v in shape.params.items() if base.get(k) != v)
    return f"{name}:  {shape.family}({args})"


def curves(name: str, shape: str | None = None, x: torch.Tensor | None = None):
    """x, phi'(x), s(x), phi'(x) + s(x), in float64, through the library."""
    if x is None:
        x = torch.linspace(*X_RANGE, N, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    gaaf_patch.gaaf(xa, name, "zero").sum().backward()
    xb = x.clone().requires_grad_()
    gaaf_patch.gaaf(xb, name, shape).sum().backward()
    s = shapes.get(shape if shape is not None else name)(x)
    return x, xa.grad, s, xb.grad


def plot_grid(path: Path) -> None:
    names = [n for n in ORDER if n in ACTIVATIONS] + sorted(set(ACTIVATIONS) - set(ORDER))
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), sharex=True)
    for ax, name in zip(list(axes.flat)[: len(names)], names, strict=True):
        x, d, s, total = curves(name)
        ax.plot(x, total, color=COLORS["phi'+s"], lw=2.2, label="phi'(x) + s(x)")
        ax.plot(x, d, color=COLORS["phi'"], lw=1.4, label="phi'(x)")
        ax.plot(x, s, color=COLORS["s"], lw=1.4, ls="--", label="s(x)")
        ax.set_title(label(name), fontsize=9)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.grid(alpha=0.3)
        ax.set_xlim(*X_RANGE)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("x")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("GAAF default shapes: the gradient phi'(x) + s(x); s decays in the far saturation", y=0.995)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=3, frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def plot_paper(path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x, d, s, total = curves("tanh")
    _, _, sk, totalk = curves("tanh", "tanh_keras")
    a.plot(x, s, color=COLORS["s"], lw=2, label="paper: exp(-x²/4)")
    a.plot(x, sk, color=COLORS["keras"], lw=2, ls="--", label="Keras port: exp(-x²/3)")
    a.plot(x, d, color=COLORS["phi'"], lw=1.2, label="tanh'(x)")
    a.plot(x, total, color=COLORS["phi'+s"], lw=1.2, alpha=0.8, label="tanh'(x) + paper s(x)")
    pts = torch.tensor([0.0, 1.0, 2.0, 3.0])
    a.plot(pts, shapes.get("tanh")(pts.double()), "ko", ms=4, label="1, 0.78, 0.37, 0.105")
    a.set_title("tanh: exponential shape (Hahn & Choi, Fig. 4)")

    x, d, s, total = curves("relu")
    _, _, sk, _ = curves("relu", "relu_keras")
    b.plot(x, s, color=COLORS["s"], lw=2, label="paper: sigmoid(5(x + 0.5))")
    b.plot(x, sk, color=COLORS["keras"], lw=2, ls="--", label="Keras port: sigmoid(x + 4)")
    b.plot(x, d, color=COLORS["phi'"], lw=1.2, label="relu'(x)")
    b.plot(x, total, color=COLORS["phi'+s"], lw=1.2, alpha=0.8, label="relu'(x) + paper s(x)")
    b.plot([-0.5], [0.5], "ko", ms=4, label="s(-0.5) = 0.5")
    b.set_title("ReLU: shifted-sigmoid shape (Hahn & Choi, Fig. 4)")
    for ax in (a, b):
        ax.set_xlim(*X_RANGE)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("shapes.png", plot_grid), ("paper_shapes.png", plot_paper)):
        path = args.out / name
        fn(path)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
