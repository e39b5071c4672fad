"""Does GAAF train deep networks at their usual learning rate? ``gaaf-patch repro depth``, resumable.

Four variants of one ResNet are trained the way ResNets are trained (SGD, momentum 0.9, the usual learning rates):

- ``plain``: timm's ``ResNet`` (BasicBlock [2,2,2,2] = ResNet-18, [3,4,6,3] = ResNet-34; Bottleneck [3,4,6,3] =
  ResNet-50), narrow (channels 16-32-64-128, stem 16) so the study fits two CPU cores, ``in_chans=1``, 10 classes;
- ``dropout``: the same network with timm's two regularisation knobs as its training recipes set them
  (:data:`DROPOUT`): dropout before the classifier (``drop_rate``) and stochastic depth in the residual blocks
  (``drop_path_rate``);
- ``gaaf-paper``: ``gaaf_patch.patch(model, shapes="paper")``, the paper's ``phi' + s`` whose gain compounds with depth;
- ``gaaf-auto``: ``gaaf_patch.patch(model)``, the default depth-safe gain (:mod:`gaaf_patch.gain`).

in two regimes (:data:`RECIPES`): ``scratch`` (random init, lr 0.1, batch 128, weight decay 5e-4, cosine to 0 per
step, no warm-up) and ``finetune`` (a plain checkpoint trained on digits 0-4 with the scratch recipe, made once per
(model, seed) and saved under ``OUT/checkpoints``, loaded with ``strict=True``, given a new 10-way head, then trained
on all ten digits at lr 0.01 with the same schedule). Within a (model, regime, seed) every variant starts from the
same weights and sees the same batches.

Per run: the per-epoch curves, test accuracy at the best validation epoch, whether and when the loss became
non-finite (the run stops there), the epochs and seconds a variant needed to reach the plain model's best validation
accuracy (same model, regime, seed), and for the GAAF variants the gradient ratio per stage: on a fixed training
batch, the gradient norm of the cross-entropy at the outputs of ``layer1`` ... ``layer4`` (and over all parameters)
with the variant's patch over the same weights unpatched, at the start (epoch 0) and after every epoch.

``results.json`` is rewritten atomically after every run (:func:`.study.save`); ``resume=True`` skips finished runs
and refuses a study whose setup (sizing, recipes, variants' definitions) differs.

This module runs the study; what it compares is in :mod:`.depth_setup`, the data in :mod:`.depth_data`, the
gradient probe in :mod:`.depth_probe`, the training loop in :mod:`.depth_fit`, the summary in :mod:`.depth_results`
and the figures in :mod:`.depth_figures`. Their public names are re-exported here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import patch
from ..finetune.checkpoint import atomic_save
from ..models import load_state_dict_strict
from . import study
from .depth_data import load_data, only_classes
from .depth_figures import write_figures
from .depth_fit import fit
from .depth_probe import stage_ratios
from .depth_results import reach_plain_best, summarize
from .depth_setup import (
    DEFAULT_MODELS,
    DROPOUT,
    FULL,
    GAAF_VARIANTS,
    MODELS,
    PRETRAIN_CLASSES,
    QUICK,
    RECIPES,
    REGIMES,
    STAGES,
    VARIANTS,
    DepthConfig,
    Recipe,
    Sizing,
    build,
    patch_variant,
    with_overrides,
)
from .study import Reporter
from .train import Data, StudyError

__all__ = [
    "MODELS",
    "DEFAULT_MODELS",
    "VARIANTS",
    "GAAF_VARIANTS",
    "REGIMES",
    "STAGES",
    "DROPOUT",
    "PRETRAIN_CLASSES",
    "RECIPES",
    "FULL",
    "QUICK",
    "Recipe",
    "Sizing",
    "DepthConfig",
    "with_overrides",
    "build",
    "load_data",
    "fit",
    "stage_ratios",
    "run_one",
    "run_study",
    "summarize",
    "write_figures",
    "RESULTS",
    "VERSION",
]

RESULTS = "results.json"
VERSION = 1


# ------------------------------------------------------------------------------------------------------------ runs


def _checkpoint_path(cfg: DepthConfig, model: str, seed: int) -> Path:
    return cfg.out / "checkpoints" / f"pretrain-{model}-seed{seed}.pt"


def _pretrained(cfg: DepthConfig, name: str, seed: int, data: Data, results: dict[str, Any], reporter: Reporter):
    """The plain checkpoint on digits 0-4 for (``name``, ``seed``): trained and saved the first time, read after."""
    path = _checkpoint_path(cfg, name, seed)
    key = f"{name}/seed{seed}"
    if not path.exists():
        torch.manual_seed(seed)
        model = build(name, "plain", PRETRAIN_CLASSES).to(data.x_train.device)
        label = f"{name} pretrain 0-{PRETRAIN_CLASSES - 1}"
        reporter.run_start(label, seed, cfg.sizing.pretrain_epochs)
        res = fit(model, only_classes(data, PRETRAIN_CLASSES), cfg.recipes["scratch"], cfg.sizing.pretrain_epochs,
                  seed=seed, on_epoch=lambda log: reporter.epoch(label, seed, log))  # fmt: skip
        if res["diverged"]:
            raise RuntimeError(f"the plain {name} checkpoint (seed {seed}) diverged; the finetune regime needs it")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        atomic_save({"state_dict": state, "model": name, "seed": seed, "classes": PRETRAIN_CLASSES,
                     "setup": cfg.setup()}, path)  # fmt: skip
        results.setdefault("pretrain", {})[key] = {"path": str(path), **res}
        reporter.run_end(label, seed, res)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("setup") != cfg.setup():
        raise StudyError(f"{path} was made with another setup; remove it or use another --out")
    return ckpt["state_dict"]


def run_one(cfg: DepthConfig, name: str, regime: str, variant: str, seed: int, data: Data,
            results: dict[str, Any], reporter: Reporter) -> dict[str, Any]:  # fmt: skip
    """Train one (model, regime, variant, seed) and return its run record."""
    device = data.x_train.device
    if regime == "scratch":
        torch.manual_seed(seed)
        model = build(name, variant)
    else:
        state = _pretrained(cfg, name, seed, data, results, reporter)
        model = build(name, variant, PRETRAIN_CLASSES)
        load_state_dict_strict(model, state)
        torch.manual_seed(seed)
        model.reset_classifier(10)  # the new 10-way head: the same initial weights for every variant of a seed
    model = patch_variant(model.to(device), variant)
    probe = None
    if variant in GAAF_VARIANTS:
        xb, yb = data.x_train[: cfg.sizing.probe_batch], data.y_train[: cfg.sizing.probe_batch]
        probe = lambda: stage_ratios(model, xb, yb)  # noqa: E731
    label = f"{name} {regime} {variant}"
    reporter.run_start(label, seed, cfg.sizing.epochs(regime))
    res = fit(model, data, cfg.recipes[regime], cfg.sizing.epochs(regime), seed=seed, probe=probe,
              on_epoch=lambda log: reporter.epoch(label, seed, log))  # fmt: skip
    return {"model": name, "regime": regime, "variant": variant, "seed": seed, **res}


def _warm_up(models: list[str], x: Tensor, y: Tensor) -> None:
    """One untimed training step per model, plain and patched: the first step of a process pays for kernel loads
    and allocator growth, which would otherwise be billed to whichever run comes first (plain)."""
    for name in models:
        model = build(name, "plain").to(x.device)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(patch(model)(x), y).backward()


def _key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return r["model"], r["regime"], r["variant"], r["seed"]


def run_study(cfg: DepthConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run every (model, regime, variant, seed) not yet in ``cfg.out/results.json``; returns the results."""
    import timm

    path = cfg.out / RESULTS
    if not path.exists():
        results = {"study": "depth", "version": VERSION, "setup": cfg.setup(), "runs": [], "pretrain": {}}
    elif cfg.resume:  # checked before the data load: a refused resume fails at once
        results = study.load_resumable(path, "depth", VERSION, cfg.setup())
    else:
        raise StudyError(f"{path} exists; pass --resume to continue that study, or choose another --out")
    reporter = reporter or Reporter()
    for k, chosen in (("models", cfg.models), ("regimes", cfg.regimes), ("variants", cfg.variants)):
        results[k] = list(dict.fromkeys([*results.get(k, []), *chosen]))
    device = study.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = {
        **study.environment(device),
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "git_commit": study.git_commit(),
    }
    results.setdefault("environment", env)  # the first invocation's; every run records the one it ran in
    done = {_key(r) for r in results["runs"]}
    # Seed-major, plain first: after k seeds every cell has k runs, and each variant has its plain reference.
    todo = [(m, g, v, s) for s in range(cfg.seeds) for m in cfg.models for g in cfg.regimes
            for v in sorted(cfg.variants, key=VARIANTS.index) if (m, g, v, s) not in done]  # fmt: skip
    if todo:
        data, norm = load_data(cfg.sizing, cfg.data_dir)
        data = data.to(device)
        results["data"] = {**data.sizes(), "source": cfg.sizing.data, "size": cfg.sizing.size, "normalize": norm}
        reporter.start([f"{m} {g} {v} seed {s}" for m, g, v, s in todo], sorted(done), results["data"], str(device))
        batch = cfg.recipes["scratch"].batch_size
        _warm_up(list(dict.fromkeys(t[0] for t in todo)), data.x_train[:batch], data.y_train[:batch])
    cfg.out.mkdir(parents=True, exist_ok=True)  # after what may fail on the options or the data: nothing left behind
    for m, g, v, s in todo:
        run = run_one(cfg, m, g, v, s, data, results, reporter)
        run["environment"] = env
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results["runs"].append(run)
        reach_plain_best(results["runs"])
        results["summary"] = summarize(results["runs"])
        study.save(results, path)
        reporter.run_end(f"{m} {g} {v}", s, run)
    reach_plain_best(results["runs"])
    results["summary"] = summarize(results["runs"])
    study.save(results, path)
    try:
        results["figures"] = [str(p) for p in write_figures(results, cfg.out)]
    except ImportError as e:
        results["figures"], results["figures_skipped"] = [], str(e)
    reporter.finish(results)
    return results
