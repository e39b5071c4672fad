"""Time of one activation site, forward + backward: ``python -m benchmarks.sites``.

Per activation and tensor size, side by side in one process (interleaved repeats, median): PyTorch's own activation,
GAAF exact in eager mode with the fused C++ backward (``gaaf``, when it can be built) and with plain torch ops
(``gaaf_plain``, ``GAAF_KERNELS=off``), and the same GAAF site compiled by Inductor (``torch.compile`` of the site
alone, which is what compiling a whole patched model does to it). The numbers behind docs/performance.md's
per-site table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

import gaaf_patch as gaaf
from benchmarks.timing import per_call
from gaaf_patch import activations as _acts
from gaaf_patch import kernels

SIZES = {"128x512": (128, 512), "16x64x32x32": (16, 64, 32, 32)}


def _fwd_bwd(
    site: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gy: torch.Tensor, kernel: bool = True
) -> Callable[[], None]:
    def run() -> None:
        previous = kernels.set_enabled(kernel)
        xr = x.detach().requires_grad_()
        site(xr).backward(gy)
        kernels.set_enabled(previous)

    return run


def measure(activation: str, shape: tuple[int, ...], repeats: int, compile_: bool) -> dict[str, float]:
    torch.manual_seed(0)
    x, gy = torch.randn(shape), torch.randn(shape)
    act = _acts.get(activation)
    variants: dict[str, Callable[[], None]] = {
        "torch": _fwd_bwd(lambda t: act.phi(t, **act.params()), x, gy),
        "gaaf": _fwd_bwd(gaaf.GAAF(activation), x, gy),
        "gaaf_plain": _fwd_bwd(gaaf.GAAF(activation), x, gy, kernel=False),
    }
    if not kernels.available():
        del variants["gaaf"]
    if compile_:
        variants["gaaf_inductor"] = _fwd_bwd(torch.compile(gaaf.GAAF(activation), dynamic=False), x, gy)
    inner = max(1, int(2e6 / x.numel()))
    for fn in variants.values():  # warm-up (and compile)
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(per_call(fn, inner) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", default="tanh,relu,gelu")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for a in args.activations.split(","):
        for label, shape in SIZES.items():
            r = measure(a, shape, args.repeats, not args.no_compile)
            rows.append({"activation": a, "tensor": label, **r})
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in ("torch", "gaaf", "gaaf_plain", "gaaf_inductor") if c in rows[0]]
    best = "gaaf" if "gaaf" in rows[0] else "gaaf_plain"
    t = Table(title=f"one site, forward + backward, float32, {torch.get_num_threads()} thread(s): median us")
    for c in ("activation", "tensor", *cols, f"{best} / torch"):
        t.add_column(c, justify="left" if c in ("activation", "tensor") else "right")
    for r in rows:
        t.add_row(r["activation"], r["tensor"], *(f"{r[c]:.0f}" for c in cols), f"{r[best] / r['torch']:.2f}x")
    Console().print(t)
    if args.json:
        with open(args.json, "w") as f:
            meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernel": kernels.available()}
            json.dump({**meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
