"""GAAF against the plain model, side by side in one process: ``python -m benchmarks.run``.

::

    python -m benchmarks.run                       # every model, eager + torch.compile (see --compile-models)
    python -m benchmarks.run --quick               # CI size: MLP + ResNet-18, eager only, < 60 s
    python -m benchmarks.run --models mlp,vit --no-compile --json out.json --markdown out.md

Hugging Face models (BERT, GPT-2, Llama; their attention code runs under run-time scopes) are measured by
``python -m benchmarks.hf_overhead`` (``--size tiny|base``), against the same plain-model baseline.

Models (synthetic data, 10 classes): the paper's MNIST MLP 784-512-256-256-10 (tanh, batch 128), torchvision
ResNet-18 and ResNet-50 (ReLU, 3x64x64, batch 16), timm ``vit_tiny_patch16_224`` at ``img_size=64`` (GELU, batch 16).

Variants of each model, all from the same initial weights:

- ``base``: the model as built.
- ``dropout``: base plus dropout, the regulariser GAAF is meant to replace. MLP: ``nn.Dropout(0.5)`` after each
  hidden activation (the paper's setting); ResNets: ``nn.Dropout(0.5)`` before the classifier; ViT: timm
  ``drop_rate=0.5`` (head) and ``proj_drop_rate=0.1`` (after each attention projection and MLP layer).
- ``gaaf_exact`` / ``gaaf_sawtooth``: ``gaaf_patch.patch(base, mode=...)``; ``gaaf_exact`` has the default auto gain
  (gaaf_patch/gain.py), ``gaaf_paper`` is exact mode with the paper's gain (``shapes="paper"``), the default before.
- ``naive``: eq. 7-8 written with plain torch ops (:class:`NaiveGAAF`), everything differentiated by autograd: what
  GAAF costs without a custom backward.

Measured, per variant, interleaved across repeats (the order rotates every repeat) so that drift on a shared machine
hits every variant alike; each number is the median over repeats, and each ratio the median of the per-repeat
ratios to ``base`` measured in the same repeat:

- ``step``: one SGD (momentum 0.9) training step: zero_grad, forward, cross-entropy, backward, optimizer step.
- ``fwd``: the training forward (train mode, autograd recording, graph dropped).
- ``infer``: eval mode under ``torch.inference_mode()``.
- ``peak``: peak memory of one training step, from the C allocator: glibc ``mallinfo2()`` (bytes in use, heap +
  mmap) sampled before and after every ATen op of the step by a ``TorchDispatchMode``, minus the bytes in use when
  the step starts, plus the bytes of the parameters, buffers and optimizer state (gradients are set to None before
  the step, so they are part of the peak). Deterministic on one machine; ``n/a`` where mallinfo2 is missing.
- ``saved``: bytes of the distinct storages autograd keeps for backward in the forward (not parameters), counted by
  ``torch.autograd.graph.saved_tensors_hooks``: the activation memory.
- ``patch``: wall time of ``gaaf_patch.patch`` on each model (and always on ResNet-50).
- compiled (unless ``--no-compile``/``--quick``): ``torch.compile(base, backend="inductor")`` against
  ``torch.compile(gaaf_patch.patch(base), backend="inductor")`` and ``torch.compile(base, backend="gaaf")`` (when
  ``gaaf_patch.backend`` is importable), step time and the first call's compile latency.

The pieces live beside this driver: :mod:`benchmarks.workloads` (models, variants, the runner),
:mod:`benchmarks.timing` (the interleaved timer and its ratios), :mod:`benchmarks.memory` (peak and saved bytes),
:mod:`benchmarks.compiled` (the torch.compile runners), :mod:`benchmarks.render` (the tables) and
:mod:`benchmarks.machine` (what the numbers were measured on).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import gaaf_patch
from benchmarks.compiled import compiled_runners
from benchmarks.machine import loadavg, machine_info
from benchmarks.memory import peak_step_bytes, saved_bytes
from benchmarks.render import markdown, render
from benchmarks.timing import interleaved, per_call, summarize
from benchmarks.workloads import ALL_MODELS, NUM_CLASSES, SPECS, ModelSpec, Runner, build_variants


def patch_seconds(spec: ModelSpec, repeats: int) -> float:
    torch.manual_seed(0)
    model = spec.build(False)
    ts = []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        gaaf_patch.patch(m)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_model(spec: ModelSpec, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    variants = build_variants(spec)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec.input_shape, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (spec.input_shape[0],), generator=gen)
    runners = {n: Runner(m, x, target) for n, m in variants.items()}
    for r in runners.values():  # warm-up (and optimizer state)
        for _ in range(args.warmup):
            r.step()
    t_step = min(per_call(runners["base"].step, 1) for _ in range(2))
    inner = max(1, round(args.block / max(t_step, 1e-6)))
    log(f"{spec.name}: base step ~{1e3 * t_step:.1f} ms, {args.repeats} repeats x {inner} calls")
    out: dict[str, Any] = {"label": spec.label, "inner": inner, "repeats": args.repeats, "notes": []}
    out["eager"] = {
        what: summarize(interleaved(runners, what, args.repeats, inner if what == "step" else 2 * inner))
        for what in ("step", "fwd", "infer")
    }
    mem: dict[str, Any] = {}
    for n, r in runners.items():
        peak = peak_step_bytes(r)
        mem[n] = {"peak_MB": None if peak is None else peak / 2**20, "saved_MB": saved_bytes(r) / 2**20}
    base_mem = mem["base"]
    for m in mem.values():
        m["peak_ratio"] = None if m["peak_MB"] is None else m["peak_MB"] / base_mem["peak_MB"]
        m["saved_ratio"] = m["saved_MB"] / base_mem["saved_MB"]
    out["memory"] = mem
    out["patch_s"] = patch_seconds(spec, 1 if args.quick else 3)
    if args.compile and spec.name in args.compile_models:
        log(f"{spec.name}: compiling")
        cr, latency = compiled_runners(variants, x, target, out["notes"])
        if "base" in cr:
            cr = {"base": cr.pop("base"), **cr}
            res = summarize(interleaved(cr, "step", args.repeats, inner))
            eager_base = out["eager"]["step"]["base"]["ms"]
            for n in res:
                res[n]["compile_s"] = latency[n]
                res[n]["vs_eager_base"] = res[n]["ms"] / eager_base
            out["compiled"] = res
    del runners, variants
    gc.collect()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size: mlp + resnet18, eager only, 3 repeats (< 60 s)")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument(
        "--compile-models",
        default="mlp,resnet18,vit",
        help="models also measured under torch.compile ('all' for every selected one; compiling ResNet-50 "
        "takes minutes on 2 cores)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 11, quick 3)")
    p.add_argument("--block", type=float, default=None, help="seconds per timed block (default 0.3, quick 0.1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    if args.quick:
        args.compile = False
    args.models = [
        m.strip() for m in (args.models or ("mlp,resnet18" if args.quick else ",".join(ALL_MODELS))).split(",")
    ]
    unknown = set(args.models) - set(ALL_MODELS)
    if unknown:
        p.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(ALL_MODELS)}")
    cm = args.compile_models
    args.compile_models = set(args.models) if cm == "all" else {m.strip() for m in cm.split(",")}
    args.repeats = args.repeats or (3 if args.quick else 11)
    args.block = args.block or (0.1 if args.quick else 0.3)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 132)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)],
        "machine": machine_info(torch.get_num_threads()),
        "models": {},
        "patch_s": {},
    }
    for name in args.models:
        spec = SPECS[name]
        results["models"][name] = bench_model(spec, args, lambda s: console.print(f"[dim]{s}[/]"))
        results["patch_s"][name] = results["models"][name]["patch_s"]
    if "resnet50" not in results["patch_s"]:
        results["patch_s"]["resnet50"] = patch_seconds(SPECS["resnet50"], 1 if args.quick else 3)
    results["machine"]["loadavg_end"] = loadavg()
    results["wall_s"] = time.perf_counter() - t0
    render(results, console)
    console.print(f"[dim]{results['wall_s']:.0f} s[/]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results))
    return results


if __name__ == "__main__":
    main()
