"""GPU memory bandwidth of the fused GAAF op, against a device-to-device copy: ``python -m benchmarks.bandwidth``.

A pointwise op is memory-bound: the best it can do is move its bytes as fast as a copy does. The target (issue 3)
is that the Inductor-fused GAAF forward + backward of a large tensor reaches >= 85% of the copy's bandwidth.

First result (H100, 2026-11-23, default mode, 2^26 elements): relu float32 0.88 of the copy, bfloat16 and tanh 0.65,
with the forward alone at 0.79: the per-call overhead is the first suspect. Rerun with ``--compile-mode
reduce-overhead`` and ``--numel 268435456`` to separate overhead from the kernels.

Bytes counted per element: copy 2 (read, write); GAAF forward 2 (read x, write y); GAAF backward 3 (read the saved
tensor and dy, write dx). Times are CUDA-event medians over repeats after warm-up. Without a CUDA device the script
says so and exits 0, so it can sit in any run script.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

import gaaf_patch as gaaf


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    activation: str, numel: int, dtype: torch.dtype, repeats: int, compile_mode: str | None = None
) -> dict[str, float]:
    x = torch.randn(numel, device="cuda", dtype=dtype)
    gy = torch.randn_like(x)
    out = torch.empty_like(x)
    size = x.element_size()
    copy_ms = _median_ms(lambda: out.copy_(x), repeats)
    copy_gbs = 2 * numel * size / copy_ms / 1e6

    site = gaaf.GAAF(activation)
    fwd = torch.compile(lambda t: site(t), dynamic=False, mode=compile_mode)
    xr = x.detach().clone().requires_grad_()  # one leaf for every call: CUDA graphs must not copy a new input in
    if compile_mode == "reduce-overhead":
        for t in (x, xr, gy):
            torch._dynamo.mark_static_address(t)

    def fwd_bwd():
        (g,) = torch.autograd.grad(fwd(xr), xr, gy)
        return g

    fwd_ms = _median_ms(lambda: fwd(x), repeats)
    total_ms = _median_ms(fwd_bwd, repeats)
    moved = (2 + 3) * numel * size  # forward 2, backward 3 element-moves
    return {
        "activation": activation,
        "dtype": str(dtype).replace("torch.", ""),
        "numel": numel,
        "compile_mode": compile_mode or "default",
        "copy_GBs": copy_gbs,
        "fwd_GBs": 2 * numel * size / fwd_ms / 1e6,
        "fwd_bwd_GBs": moved / total_ms / 1e6,
        "fwd_bwd_vs_copy": moved / total_ms / 1e6 / copy_gbs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 26)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--activations", default="relu,tanh,gelu")
    ap.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        default="default",
        help="torch.compile mode; reduce-overhead (CUDA graphs) takes the per-call Python and guard cost out",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the bandwidth benchmark needs a GPU")
        return 0
    rows = [
        measure(a, args.numel, dt, args.repeats, None if args.compile_mode == "default" else args.compile_mode)
        for a in args.activations.split(",")
        for dt in (torch.float32, torch.bfloat16)
    ]
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GAAF fused forward+backward vs copy on {torch.cuda.get_device_name()}")
    for col in ("activation", "dtype", "copy GB/s", "fwd GB/s", "fwd+bwd GB/s", "fwd+bwd / copy"):
        t.add_column(col, justify="left" if col in ("activation", "dtype") else "right")
    for r in rows:
        t.add_row(
            r["activation"],
            r["dtype"],
            f"{r['copy_GBs']:.0f}",
            f"{r['fwd_GBs']:.0f}",
            f"{r['fwd_bwd_GBs']:.0f}",
            f"{r['fwd_bwd_vs_copy']:.2f}",
        )
    Console().print(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
