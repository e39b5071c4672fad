"""Which depth-safe gain? The alternatives issue 11 named, measured on deep networks at init.

For each model: patched / plain gradient-norm ratios (input and parameters; train mode, random init, loss = mean of
the squared logits, one seeded batch) for GAAF backward multipliers ``m(x)`` that differ only in how they add the
shape ``s`` (``s~`` at unit height, ``a`` the activation's linear slope):

- ``paper``: ``phi' + s`` (gaaf-patch's default before the auto gain).
- ``normalised``: ``k (phi' + s)``, ``k = sqrt(E[phi'^2] / E[(phi' + s)^2])`` over the site's batch: the per-site
  second-moment normalisation (the issue's first suggestion).
- ``blend``: ``phi' + s~ (a - phi')`` (the auto gain's form with ``c = 1``: no budget).
- ``blend_delta0.1``: the blend with a fixed 10% energy allowance per site.
- ``auto``: the library's default (blend, allowance ``2^(1/n) - 1`` for ``n`` site calls).

The alternatives are evaluated by swapping the backward of every GAAF site for the formula above written in plain
torch ops (the library's own backward for ``paper`` and ``auto``). The result table is in docs/depth.md.

    python -m benchmarks.gain_alternatives --json benchmarks/results/gain-alternatives-2026-11-29-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

import gaaf_patch
from benchmarks.depth_measure import grad_norms
from benchmarks.machine import git_commit
from gaaf_patch import gain, ops
from gaaf_patch.models import build_model
from gaaf_patch.repro.study import save

MODELS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "vit_tiny_patch16_224",
    "densenet121",
    "tv:resnet152",
)
ALTERNATIVES = ("paper", "normalised", "blend", "blend_delta0.1", "auto")


def _multiplier(kind: str, x: torch.Tensor, y, act, shape, params, delta) -> torch.Tensor:
    dphi = act.dphi(x, y, **params)
    s_unit, h = ops._shape_term(shape, x, owned=False)
    s_unit = torch.zeros_like(x) if s_unit is None else s_unit
    if kind == "normalised":
        m = dphi + h * s_unit
        return m * torch.sqrt((dphi * dphi).mean() / (m * m).mean().clamp_min(1e-30))
    st = s_unit * (act.slope - dphi)
    if kind == "blend":
        return dphi + st
    c = gain.coefficient(dphi, st, delta)
    return dphi + c * st


@contextlib.contextmanager
def _backward_as(kind: str):
    """Every GAAF site's backward computes ``kind``'s multiplier (plain ops) while the block runs."""
    if kind in ("paper", "auto"):
        yield
        return
    original = ops._backward

    def backward(saved, gy, from_output, act, shape, params, x=None, delta=None):
        t = ops._opmath(saved if x is None else x)
        xx, y = ops._x_y(t, from_output and x is None, act, params)
        return (gy * _multiplier(kind, xx, y, act, shape, params, 0.1)).to(gy.dtype)

    ops._backward = backward
    try:
        yield
    finally:
        ops._backward = original


def _norms(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Input and parameter gradient norms of one seeded train-mode step (the depth benchmark's ``grad_norms``)."""
    n = grad_norms(model, x, seed=0, stages=())
    return n["input"], n["params"]


def measure(name: str, size: int, batch: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    plain = build_model(name, 10, (3, size, size))
    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(0))
    qi, qp = _norms(copy.deepcopy(plain), x)
    out = {}
    for kind in ALTERNATIVES:
        patched = gaaf_patch.patch(copy.deepcopy(plain), gain="auto" if kind == "auto" else "paper")
        with _backward_as(kind):
            pi, pp = _norms(patched, x)
        out[kind] = {"input": pi / qi, "params": pp / qp}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    args = p.parse_args(argv)
    results = {
        "command": ["python", "-m", "benchmarks.gain_alternatives", *(argv if argv is not None else sys.argv[1:])],
        "commit": git_commit(),
        "torch": torch.__version__,
        "size": args.size,
        "batch": args.batch,
        "models": {},
    }
    print("| model | " + " | ".join(f"{k} (input / params)" for k in ALTERNATIVES) + " |")
    print("|---|" + "---|" * len(ALTERNATIVES))
    for name in args.models.split(","):
        r = results["models"][name] = measure(name, args.size, args.batch)
        cells = [f"x{r[k]['input']:.3g} / x{r[k]['params']:.3g}" for k in ALTERNATIVES]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        save(results, Path(args.json))
    return results


if __name__ == "__main__":
    main()
