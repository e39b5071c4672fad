"""The depth benchmark's measurement (:mod:`benchmarks.depth`): how much GAAF scales a network's gradient, as a
whole and per stage, with the paper gain and with the auto gain.

Three copies of the same weights (plain, ``gain="paper"``, ``gain="auto"``) run one train-mode forward and backward
on the same batch under the same forked and re-seeded RNG (dropout and drop-path draw the same masks; the forwards
are checked bit for bit), loss = the mean of the squared outputs (:func:`gaaf_patch.measure_gradient_scale`'s).
Ratios patched / plain: the input and parameter gradient norms, and the gradient norm at each stage's output.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import gaaf_patch
from gaaf_patch.gradscale import SAFE
from gaaf_patch.models import output_tensors
from gaaf_patch.modules import GAAF

__all__ = ["SEED", "GAINS", "stage_names", "grad_norms", "measure", "in_target"]

SEED = 0
GAINS = ("paper", "auto")


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _ratio(a: float, b: float) -> float | None:
    """``a / b``; ``None`` where it says nothing: no gradient in the plain run, or a non-finite norm."""
    return _finite(a / b) if b > 0 and math.isfinite(b) else None


def stage_names(model: nn.Module) -> tuple[list[str], str]:
    """The modules whose outputs are the model's stages (any order; the forward orders them) and where they came
    from; ``([], "none")`` when the model exposes no stage list."""

    def resolve(name: str) -> str | None:
        for n in (name, name.replace("_", ".")):
            try:
                model.get_submodule(n)
                return n
            except AttributeError:
                continue
        return None

    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(d, dict) and "module" in d for d in info):
        names = [n for n in (resolve(str(d["module"])) for d in info) if n is not None]
        names = list(dict.fromkeys(names))
        if len(names) >= 2:
            return names, "timm feature_info"
    for attr in ("stages", "layers", "blocks", "features", "encoder.layers"):
        try:
            box = model.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(box, (nn.Sequential, nn.ModuleList)) and len(box) >= 2:
            return [f"{attr}.{n}" for n, _ in box.named_children()], f"container {attr}"
    layers = [n for n, _ in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    if len(layers) >= 2:
        return layers, "children layer1..N"
    return [], "none"


def grad_norms(model: nn.Module, x: Tensor, seed: int, stages: Sequence[str]) -> dict[str, Any]:
    """One train-mode forward and backward of ``model`` on ``x`` (loss: mean of squared outputs, RNG forked and
    seeded with ``seed``): gradient norms on the input, on all parameters and on each stage's output."""
    model.train()
    captured: dict[str, list[Tensor]] = {}

    def hook(name: str) -> Callable[..., Any]:
        def fn(module: nn.Module, args: Any, out: Any) -> Any:
            if isinstance(out, Tensor) and out.is_floating_point() and out.requires_grad:
                captured.setdefault(name, []).append(out)
                return out.clone()  # downstream in-place ops act on the clone, not on the tensor measured
            ts = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
            if ts:
                captured.setdefault(name, []).extend(ts)
            return None

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in stages]
    xr = x.detach().clone().requires_grad_()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            outs = [o for o in output_tensors(model(xr)) if o.is_floating_point() and o.requires_grad]
    finally:
        for h in handles:
            h.remove()
    if not outs:
        raise ValueError("the model output has no differentiable tensor")
    loss = sum(o.float().square().mean() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    order = list(captured)  # insertion order: the order the forward first called each stage
    flat = [t for n in order for t in captured[n]]
    grads = torch.autograd.grad(loss, [xr, *params, *flat], allow_unused=True)

    def norm(gs: Sequence[Tensor | None]) -> float | None:
        gs = [g for g in gs if g is not None]
        return math.sqrt(sum(g.double().square().sum().item() for g in gs)) if gs else None

    stage_norms: dict[str, float | None] = {}
    i = 1 + len(params)
    for n in order:
        k = len(captured[n])
        stage_norms[n] = norm(grads[i : i + k])
        i += k
    return {
        "input": norm(grads[:1]) or 0.0,
        "params": norm(grads[1 : 1 + len(params)]) or 0.0,
        "stages": stage_norms,
        "outputs": [o.detach() for o in outs],
        "loss": float(loss.detach()),
    }


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b, strict=True)
    )


def measure(base: nn.Module, x: Tensor, seed: int = SEED) -> dict[str, Any]:
    """Plain, paper-gain and auto-gain copies of ``base`` (left untouched) on ``x``: whole-network and per-stage
    gradient-norm ratios patched / plain."""
    names, source = stage_names(base)
    runs: dict[str, dict[str, Any]] = {}
    sites: dict[str, Any] = {}
    for variant in ("plain", *GAINS):
        model = copy.deepcopy(base)
        if variant != "plain":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gaaf_patch.patch(model, gain=variant)
            gaaf_sites = [m for m in model.modules() if isinstance(m, GAAF)]
            sites[variant] = len(gaaf_sites)
            if variant == "auto":
                deltas = {m.delta for m in gaaf_sites}
                sites["auto_delta"] = deltas.pop() if len(deltas) == 1 else sorted(d for d in deltas if d is not None)
        runs[variant] = grad_norms(model, x, seed, names)
        del model
    plain = runs["plain"]
    # stages reached by the gradient in every run, in the plain forward's order
    order = [n for n in plain["stages"] if all(runs[v]["stages"].get(n) is not None for v in runs)]
    stages = []
    for k, n in enumerate(order, 1):
        row: dict[str, Any] = {"name": n, "depth": k / len(order), "plain": plain["stages"][n]}
        for g in GAINS:
            row[g] = runs[g]["stages"][n]
            row[f"{g}_ratio"] = _ratio(runs[g]["stages"][n], plain["stages"][n])
        stages.append(row)
    whole = {
        g: {
            "input": _ratio(runs[g]["input"], plain["input"]),
            "params": _ratio(runs[g]["params"], plain["params"]),
        }
        for g in GAINS
    }
    norms = {
        v: {"input": _finite(r["input"]), "params": _finite(r["params"]), "loss": _finite(r["loss"])}
        for v, r in runs.items()
    }
    auto_stage = [s["auto_ratio"] for s in stages if s["auto_ratio"] is not None]
    # a zero-initialised head (torchvision's ViT) sends no gradient back at init: nothing to compare
    zero = plain["input"] == 0 and plain["params"] == 0
    return {
        "stage_source": source if stages else "none: whole network only",
        "stages": stages,
        "whole": whole,
        "norms": norms,
        "sites": sites,
        "forward_identical": {g: _same(plain["outputs"], runs[g]["outputs"]) for g in GAINS},
        "auto_stage_range": [min(auto_stage), max(auto_stage)] if auto_stage else None,
        "zero_gradient": zero,
        "in_target": None if zero else in_target(whole["auto"]),
    }


def in_target(ratios: dict[str, float | None]) -> bool:
    lo, hi = SAFE
    return all(r is not None and lo <= r <= hi for r in ratios.values())
