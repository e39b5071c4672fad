"""``benchmarks.run`` under ``torch.compile``: the base model and its GAAF patch compiled by Inductor, and the base
model compiled by gaaf-patch's own Dynamo backend (``backend="gaaf"``) when ``gaaf_patch.backend`` is importable.
The first step's wall time is the compile latency; a compile that fails is a note in the results, not a crash."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from benchmarks.workloads import Runner

__all__ = ["compiled_runners"]


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
