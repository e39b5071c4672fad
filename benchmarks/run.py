"""GAAF against the plain model, side by side in one process: ``python -m benchmarks.run``.

::

    python -m benchmarks.run                       # every model, eager + torch.compile (see --compile-models)
    python -m benchmarks.run --quick               # CI size: MLP + ResNet-18, eager only, < 60 s
    python -m benchmarks.run --models mlp,vit --no-compile --json out.json --markdown out.md

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
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import activations as _acts
from gaaf_patch import shapes as _shapes

ALL_MODELS = ("mlp", "resnet18", "resnet50", "vit")
VARIANTS = ("base", "dropout", "gaaf_exact", "gaaf_paper", "gaaf_sawtooth", "naive")
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------------------------------
# models


class NaiveGAAF(nn.Module):
    """``phi(x) + g(x) s(x)`` (eq. 7-8) in plain torch ops; autograd differentiates all of it, ``g s'`` included."""

    def __init__(self, activation: str, K: float = 10_000.0, **params: Any) -> None:
        super().__init__()
        self.act = _acts.get(activation)
        self.params = self.act.params(params)
        self.shape = _shapes.get(activation)
        self.K = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x * self.K
        g = (xk - torch.floor(xk) - 0.5) / self.K
        return self.act.phi(x, **self.params) + g * self.shape(x)


_NAIVE_OF: dict[type, Callable[[nn.Module], NaiveGAAF]] = {
    nn.ReLU: lambda m: NaiveGAAF("relu"),
    nn.Tanh: lambda m: NaiveGAAF("tanh"),
    nn.GELU: lambda m: NaiveGAAF("gelu", approximate=m.approximate),
}


def naive(model: nn.Module) -> nn.Module:
    """``model`` with every ReLU / Tanh / GELU module replaced by :class:`NaiveGAAF` (in place; returns it)."""
    for name, child in list(model.named_children()):
        make = _NAIVE_OF.get(type(child))
        if make is not None:
            setattr(model, name, make(child))
        else:
            naive(child)
    return model


def mlp(dropout: bool) -> nn.Module:
    sizes = (784, 512, 256, 256, NUM_CLASSES)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
            if dropout:
                layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


def resnet(depth: int) -> Callable[[bool], nn.Module]:
    def build(dropout: bool) -> nn.Module:
        import torchvision

        m = getattr(torchvision.models, f"resnet{depth}")(num_classes=NUM_CLASSES)
        if dropout:
            m.fc = nn.Sequential(nn.Dropout(0.5), m.fc)
        return m

    return build


def vit(dropout: bool) -> nn.Module:
    import timm

    kw = {"drop_rate": 0.5, "proj_drop_rate": 0.1} if dropout else {}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=NUM_CLASSES, **kw)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[bool], nn.Module]
    input_shape: tuple[int, ...]
    activation: str
    label: str


SPECS = {
    "mlp": ModelSpec("mlp", mlp, (128, 784), "tanh", "MLP 784-512-256-256-10, tanh, batch 128"),
    "resnet18": ModelSpec("resnet18", resnet(18), (16, 3, 64, 64), "relu", "ResNet-18 (torchvision), 64x64, batch 16"),
    "resnet50": ModelSpec("resnet50", resnet(50), (16, 3, 64, 64), "relu", "ResNet-50 (torchvision), 64x64, batch 16"),
    "vit": ModelSpec("vit", vit, (16, 3, 64, 64), "gelu", "ViT-Tiny/16 (timm), img_size 64, batch 16"),
}


def build_variants(spec: ModelSpec) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = spec.build(False)
    torch.manual_seed(0)
    with_dropout = spec.build(True)
    return {
        "base": base,
        "dropout": with_dropout,
        "gaaf_exact": gaaf_patch.patch(copy.deepcopy(base), mode="exact"),
        "gaaf_paper": gaaf_patch.patch(copy.deepcopy(base), mode="exact", shapes="paper"),
        "gaaf_sawtooth": gaaf_patch.patch(copy.deepcopy(base), mode="sawtooth"),
        "naive": naive(copy.deepcopy(base)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# what is timed


@dataclass
class Runner:
    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.target).backward()
        self.opt.step()

    def fwd(self) -> None:
        F.cross_entropy(self.model(self.x), self.target)

    def infer(self) -> None:
        with torch.inference_mode():
            self.model(self.x)


def _time(fn: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(runners: dict[str, Runner], what: str, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of ``Runner.<what>`` for each variant, ``repeats`` times, the order rotating every repeat."""
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            runner = runners[n]
            if what == "infer":
                runner.model.eval()
            out[n].append(_time(getattr(runner, what), inner))
            if what == "infer":
                runner.model.train()
    return out


def summarize(times: dict[str, list[float]], base: str = "base") -> dict[str, dict[str, float]]:
    res = {}
    for n, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, times[base], strict=True))
        q1, q3 = statistics.quantiles(ratios, n=4)[0::2] if len(ratios) > 1 else (ratios[0], ratios[0])
        res[n] = {"ms": 1e3 * statistics.median(ts), "ratio": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3}
    return res


# ---------------------------------------------------------------------------------------------------------------------
# memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


_IN_USE = _mallinfo()


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def static_bytes(runner: Runner) -> int:
    m = runner.model
    tensors = [*m.parameters(), *m.buffers()]
    for state in runner.opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(_storages(tensors).values())


def peak_step_bytes(runner: Runner) -> int | None:
    """Peak bytes in use during one training step (see the module docstring), or None without mallinfo2."""
    if _IN_USE is None:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    in_use = _IN_USE

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.peak = max(self.peak, in_use())
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    runner.opt.zero_grad(set_to_none=True)
    gc.collect()
    start = in_use()
    mode = Peak()
    mode.peak = start
    with mode:
        runner.step()
    return mode.peak - start + static_bytes(runner)


def saved_bytes(runner: Runner) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one training forward."""
    params = _storages([*runner.model.parameters(), *runner.model.buffers()])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(runner.model(runner.x), runner.target)
    del loss
    return sum(seen.values())


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


# ---------------------------------------------------------------------------------------------------------------------
# compile


def _gaaf_backend() -> tuple[Any, str | None]:
    """``backend=`` for the gaaf Dynamo backend, or (None, why not)."""
    try:
        import importlib

        mod = importlib.import_module("gaaf_patch.backend")
    except Exception as e:  # noqa: BLE001 - any failure means: skip, and say why
        return None, f"gaaf_patch.backend not importable ({type(e).__name__}: {e})"
    try:
        import torch._dynamo

        if "gaaf" in torch._dynamo.list_backends():
            return "gaaf", None
    except Exception:  # noqa: BLE001
        pass
    fn = getattr(mod, "gaaf_backend", None)
    return (fn, None) if fn is not None else (None, "gaaf_patch.backend has no gaaf_backend")


def compiled_runners(
    variants: dict[str, nn.Module], x: torch.Tensor, target: torch.Tensor, notes: list[str]
) -> tuple[dict[str, Runner], dict[str, float]]:
    """Compiled runners (first step done, its wall time returned as the compile latency)."""
    import torch._dynamo

    torch._dynamo.reset()
    wanted: dict[str, tuple[nn.Module, Any]] = {
        "base": (variants["base"], "inductor"),
        "gaaf_exact": (variants["gaaf_exact"], "inductor"),
    }
    backend, why = _gaaf_backend()
    if backend is None:
        notes.append(f"backend='gaaf' skipped: {why}")
    else:
        wanted["backend_gaaf"] = (variants["base"], backend)
    runners, latency = {}, {}
    for name, (model, be) in wanted.items():
        try:
            compiled = torch.compile(copy.deepcopy(model), backend=be)
            runner = Runner(compiled, x, target)
            t0 = time.perf_counter()
            runner.step()
            latency[name] = time.perf_counter() - t0
            runner.step()
            runners[name] = runner
        except Exception as e:  # noqa: BLE001 - a failing compile is a result to report, not a crash
            notes.append(f"compiled {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return runners, latency


# ---------------------------------------------------------------------------------------------------------------------
# driver


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
        commit = commit.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import timm
    import torchvision

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "gaaf_patch": gaaf_patch.__version__,
        "git_commit": commit,
        "platform": platform.platform(),
        "clock": "wall, time.perf_counter",
    }


def bench_model(spec: ModelSpec, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    variants = build_variants(spec)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec.input_shape, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (spec.input_shape[0],), generator=gen)
    runners = {n: Runner(m, x, target) for n, m in variants.items()}
    for r in runners.values():  # warm-up (and optimizer state)
        for _ in range(args.warmup):
            r.step()
    t_step = min(_time(runners["base"].step, 1) for _ in range(2))
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


def _fmt_ratio(r: dict[str, float], iqr: bool = False) -> str:
    """``1.034x``, with the interquartile range of the per-repeat ratios when ``iqr``: ``1.034x [1.01-1.06]``."""
    return f"{r['ratio']:.3f}x" + (f" [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]" if iqr else "")


def render(results: dict[str, Any], console) -> None:
    from rich.table import Table

    info = results["machine"]
    console.print(
        f"[bold]gaaf-patch benchmarks[/] {info['date']}  {info['cpu']} ({info['cpu_count']} cpus, "
        f"{info['torch_threads']} torch threads)  torch {info['torch']}"
    )
    for r in results["models"].values():
        t = Table(title=f"{r['label']} - eager (base: absolute; others: ratio to base, median of per-repeat ratios)")
        for col in ("variant", "step", "fwd (train)", "infer", "peak mem", "saved act."):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for v in r["eager"]["step"]:
            cells = _eager_cells(r, v)
            t.add_row(v, *cells)
        console.print(t)
        if "compiled" in r:
            c = Table(title=f"{r['label']} - torch.compile (ratio to compiled base)")
            for col in ("variant", "step", "vs eager base", "compile (first step)"):
                c.add_column(col, justify="left" if col == "variant" else "right")
            for v, s in r["compiled"].items():
                step = f"{s['ms']:.2f} ms" if v == "base" else _fmt_ratio(s, iqr=True)
                c.add_row(v, step, f"{s['vs_eager_base']:.3f}x", f"{s['compile_s']:.1f} s")
            console.print(c)
        for note in r["notes"]:
            console.print(f"  note: {note}")
    console.print("patch time: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in results["patch_s"].items()))


def _eager_cells(r: dict[str, Any], v: str) -> list[str]:
    """The eager row of variant ``v``: absolute for the base, ratios to it for the others."""
    e, m = r["eager"], r["memory"][v]
    if v == "base":
        cells = [f"{e[w][v]['ms']:.2f} ms" for w in ("step", "fwd", "infer")]
        return cells + [f"{m['peak_MB']:.1f} MB" if m["peak_MB"] is not None else "n/a", f"{m['saved_MB']:.1f} MB"]
    cells = [_fmt_ratio(e[w][v], iqr=w == "step") for w in ("step", "fwd", "infer")]
    return cells + [f"{m['peak_ratio']:.3f}x" if m["peak_ratio"] is not None else "n/a", f"{m['saved_ratio']:.3f}x"]


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"`{' '.join(results['command'])}` on {info['date'][:10]}, {info['cpu']} ({info['cpu_count']} cpus, "
        f"{info['torch_threads']} torch threads, {info['cpu_capability']}), torch {info['torch']}, "
        f"torchvision {info['torchvision']}, timm {info['timm']}, commit {info['git_commit'] or '?'}.",
        "",
        "| model | variant | step | fwd (train) | infer | peak mem | saved act. |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        for v in r["eager"]["step"]:
            cells = _eager_cells(r, v)
            lines.append(f"| {name} | {v} | " + " | ".join(cells) + " |")
    if any("compiled" in r for r in results["models"].values()):
        lines += [
            "",
            "| model | compiled variant | step | vs eager base | compile (first step) |",
            "|---|---|---:|---:|---:|",
        ]
        for name, r in results["models"].items():
            for v, s in r.get("compiled", {}).items():
                step = f"{s['ms']:.2f} ms" if v == "base" else _fmt_ratio(s, iqr=True)
                lines.append(f"| {name} | {v} | {step} | {s['vs_eager_base']:.3f}x | {s['compile_s']:.1f} s |")
    lines += ["", "patch time: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in results["patch_s"].items())]
    notes = [f"{n}: {note}" for n, r in results["models"].items() for note in r["notes"]]
    lines += [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


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
    results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
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
