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

``results.json`` is rewritten atomically after every run (:func:`.mnist.save`); ``resume=True`` skips finished runs
and refuses a study whose setup (sizing, recipes, variants' definitions) differs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as _data
from ..api import patch, unpatch
from ..finetune.checkpoint import atomic_save
from ..gradscale import _ratio
from ..models import load_state_dict_strict
from .mnist import Reporter, _device, _environment, _stats, save
from .train import Data, EpochLog, evaluate

__all__ = [
    "MODELS",
    "VARIANTS",
    "REGIMES",
    "STAGES",
    "DROPOUT",
    "RECIPES",
    "FULL",
    "QUICK",
    "Recipe",
    "Sizing",
    "DepthConfig",
    "build",
    "load_data",
    "fit",
    "stage_ratios",
    "run_study",
    "summarize",
    "write_figures",
    "RESULTS",
]

RESULTS = "results.json"
VERSION = 1
STAGES = ("layer1", "layer2", "layer3", "layer4")
CHANNELS = (16, 32, 64, 128)
STEM_WIDTH = 16
MODELS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
DEFAULT_MODELS = ("resnet18", "resnet34")
VARIANTS = ("plain", "dropout", "gaaf-paper", "gaaf-auto")
GAAF_VARIANTS = ("gaaf-paper", "gaaf-auto")
REGIMES = ("scratch", "finetune")
# timm's regularisation knobs as its ResNet recipes use them: dropout before the classifier, stochastic depth in
# the residual branches (the "ResNet strikes back" recipes use drop_path 0.05 for ResNet-50).
DROPOUT = {"drop_rate": 0.2, "drop_path_rate": 0.05}
PRETRAIN_CLASSES = 5  # the finetune regime's checkpoint knows digits 0-4


@dataclass(frozen=True)
class Recipe:
    """One regime's optimisation: SGD with momentum and weight decay, the learning rate annealed to 0 over every step
    of the run by a cosine (no warm-up), the last incomplete batch of each epoch dropped."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"


RECIPES = {"scratch": Recipe(lr=0.1), "finetune": Recipe(lr=0.01)}


@dataclass(frozen=True)
class Sizing:
    """How big the study is: the data subsets, the input side, the epochs per regime and for the checkpoint."""

    data: str  # "mnist" or "digits" (scikit-learn's 8x8 digits, upsampled)
    train: int
    val: int
    test: int
    size: int  # input side in pixels
    scratch_epochs: int
    finetune_epochs: int
    pretrain_epochs: int
    probe_batch: int = 256  # the fixed training batch the gradient ratios are measured on

    def epochs(self, regime: str) -> int:
        return self.scratch_epochs if regime == "scratch" else self.finetune_epochs


# The full study, sized for about an hour on two (shared) CPU cores (docs/depth-study.md): MNIST's first 4k training
# images, the last 1k of its training set for validation, the first 5k of its test set, 28x28.
FULL = Sizing("mnist", train=4_000, val=1_000, test=5_000, size=28, scratch_epochs=6, finetune_epochs=3,
              pretrain_epochs=3)  # fmt: skip
# --quick: scikit-learn's digits upsampled to 16x16, a few hundred images, one epoch per stage; for CI.
QUICK = Sizing("digits", train=512, val=256, test=256, size=16, scratch_epochs=1, finetune_epochs=1,
               pretrain_epochs=1, probe_batch=128)  # fmt: skip


@dataclass
class DepthConfig:
    out: Path
    models: tuple[str, ...] = DEFAULT_MODELS
    variants: tuple[str, ...] = VARIANTS
    regimes: tuple[str, ...] = REGIMES
    seeds: int = 1
    sizing: Sizing = FULL
    recipes: dict[str, Recipe] = field(default_factory=lambda: dict(RECIPES))
    quick: bool = False  # recorded in the setup; the sizing says what --quick means
    data_dir: str | None = None
    resume: bool = False
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for what, given, known in (("model", self.models, MODELS), ("variant", self.variants, VARIANTS),
                                   ("regime", self.regimes, REGIMES)):  # fmt: skip
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise ValueError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(known)}")  # fmt: skip
        if self.seeds < 1:
            raise ValueError("--seeds must be at least 1")

    def setup(self) -> dict[str, Any]:
        """What a result depends on besides (model, regime, variant, seed): a resumed study must have the same."""
        return {"sizing": asdict(self.sizing), "recipes": {k: asdict(v) for k, v in self.recipes.items()},
                "dropout": DROPOUT, "channels": list(CHANNELS), "stem_width": STEM_WIDTH,
                "pretrain_classes": PRETRAIN_CLASSES, "quick": self.quick}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- models, data


def build(name: str, variant: str, num_classes: int = 10) -> nn.Module:
    """The unpatched network of ``variant`` (GAAF variants are patched by the caller, after any checkpoint load)."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    block, layers = MODELS[name]
    extra = DROPOUT if variant == "dropout" else {}
    return ResNet(BasicBlock if block == "basic" else Bottleneck, layers, num_classes=num_classes, in_chans=1,
                  channels=CHANNELS, stem_width=STEM_WIDTH, **extra)  # fmt: skip


def _patched(model: nn.Module, variant: str) -> nn.Module:
    if variant == "gaaf-paper":
        return patch(model, shapes="paper")
    if variant == "gaaf-auto":
        return patch(model)
    return model


def load_data(sizing: Sizing, data_dir: str | None = None) -> tuple[Data, dict[str, Any]]:
    """The three splits as ``N x 1 x size x size`` tensors, standardised with the training subset's mean and std.

    MNIST: training = its first ``train`` images, validation = the last ``val`` of its training set, test = the first
    ``test`` of its test set. Digits: :func:`gaaf_patch.data.holdout` twice (test 20%, then validation 20% of the
    rest), each capped at the sizing, bilinearly upsampled from 8x8.
    """
    if sizing.data == "mnist":
        tr, te = _data.mnist(data_dir, train=True), _data.mnist(data_dir, train=False)
        if sizing.train + sizing.val > len(tr):
            raise ValueError(f"train {sizing.train} + validation {sizing.val} exceed MNIST's {len(tr)} images")
        parts = [tr.images[: sizing.train], tr.labels[: sizing.train], tr.images[-sizing.val :],
                 tr.labels[-sizing.val :], te.images[: sizing.test], te.labels[: sizing.test]]  # fmt: skip
    else:
        rest, test = _data.holdout(_data.digits(), 0.2, seed=0)
        train, val = _data.holdout(rest, 0.2, seed=1)
        parts = [train.images[: sizing.train], train.labels[: sizing.train], val.images[: sizing.val],
                 val.labels[: sizing.val], test.images[: sizing.test], test.labels[: sizing.test]]  # fmt: skip
    for i in (0, 2, 4):
        if parts[i].shape[-1] != sizing.size:
            parts[i] = F.interpolate(parts[i], size=(sizing.size, sizing.size), mode="bilinear", align_corners=False)
    mean, std = parts[0].mean().item(), parts[0].std().item()
    for i in (0, 2, 4):
        parts[i] = (parts[i] - mean) / std
    return Data(*(p.contiguous() for p in parts)), {"mean": mean, "std": std}


def _classes(data: Data, n: int) -> Data:
    """The splits restricted to labels ``< n`` (the checkpoint's task)."""
    keep = [y < n for y in (data.y_train, data.y_val, data.y_test)]
    return Data(data.x_train[keep[0]], data.y_train[keep[0]], data.x_val[keep[1]], data.y_val[keep[1]],
                data.x_test[keep[2]], data.y_test[keep[2]])  # fmt: skip


# ------------------------------------------------------------------------------------------------- gradient probe


def _stage_norms(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    outputs: dict[str, Tensor] = {}
    hooks = [getattr(model, s).register_forward_hook(lambda m, i, o, s=s: outputs.__setitem__(s, o)) for s in STAGES]
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss = F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [outputs[s] for s in STAGES] + params, allow_unused=True)
    norms = {s: g.double().norm().item() for s, g in zip(STAGES, grads, strict=False)}
    norms["params"] = math.sqrt(sum(g.double().square().sum().item() for g in grads[len(STAGES) :] if g is not None))
    return norms


def stage_ratios(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Patched / unpatched gradient-norm ratios of the cross-entropy on ``(x, y)`` at the output of each stage and
    over all parameters, for ``model``'s current weights. Train mode (batch statistics), on copies: the model's
    BatchNorm statistics and gradients stay as they were."""
    a = _stage_norms(copy.deepcopy(model), x, y)
    b = _stage_norms(unpatch(copy.deepcopy(model)), x, y)
    return {k: _ratio(a[k], b[k]) for k in a}


# -------------------------------------------------------------------------------------------------------- training


def fit(
    model: nn.Module,
    data: Data,
    recipe: Recipe,
    epochs: int,
    *,
    seed: int,
    probe: Callable[[], dict[str, float]] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` with ``recipe``; it ends at the weights of its best validation accuracy.

    A non-finite training loss ends the run at that step (``diverged``). ``probe()`` runs before the first epoch and
    after each one; its time is not in ``wall_s``.
    """
    device = data.x_train.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)  # fmt: skip
    n, bs = len(data.y_train), recipe.batch_size
    per_epoch = max(n // bs, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / (epochs * per_epoch))))
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": [], "seconds": []}
    probes = [probe()] if probe else []
    best_acc, best_epoch, best_state, diverged_epoch = -1.0, 0, None, None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen, device=device)[: per_epoch * bs].view(per_epoch, -1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for idx in order:
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                diverged_epoch = epoch
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().double()
        if diverged_epoch is None:
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
            if not math.isfinite(val_loss):
                diverged_epoch = epoch
        if diverged_epoch is not None:
            history["seconds"].append(time.perf_counter() - t0)  # the epoch's time until the loss went non-finite
            break
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seconds = time.perf_counter() - t0
        for k, v in zip(history, (loss_sum.item() / per_epoch, val_loss, val_acc, seconds), strict=True):
            history[k].append(v)
        if probe:
            probes.append(probe())
        if on_epoch is not None:
            on_epoch(EpochLog(epoch, history["train_loss"][-1], val_loss, val_acc, best_epoch, seconds))
    if best_state is not None:
        model.load_state_dict(best_state)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    else:  # diverged in the first epoch: nothing to test
        test_loss = test_acc = None
    wall = sum(history["seconds"])
    res = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "best_epoch": best_epoch,
        "best_val_acc": best_acc if best_state is not None else None,
        "epochs_run": len(history["val_acc"]),
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "wall_s": wall,
        "s_per_epoch": wall / max(len(history["seconds"]), 1),
        "history": history,
    }
    if probe:  # per key, one value per probe: epoch 0 (start), 1, 2, ...
        res["grad_ratio"] = {k: [p[k] for p in probes] for k in probes[0]}
    return res


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
        res = fit(model, _classes(data, PRETRAIN_CLASSES), cfg.recipes["scratch"], cfg.sizing.pretrain_epochs,
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
        raise ValueError(f"{path} was made with another setup; remove it or use another --out")
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
    model = _patched(model.to(device), variant)
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


def _reach(runs: list[dict[str, Any]]) -> None:
    """Each run's epochs and seconds to the plain model's best validation accuracy (same model, regime, seed)."""
    plain = {(r["model"], r["regime"], r["seed"]): r for r in runs if r["variant"] == "plain"}
    for r in runs:
        p = plain.get((r["model"], r["regime"], r["seed"]))
        if p is None or p["best_val_acc"] is None:
            r["reach_plain_best"] = None
            continue
        target = p["best_val_acc"]
        h = r["history"]
        epoch = next((e for e, acc in enumerate(h["val_acc"], 1) if acc >= target), None)
        seconds = sum(h["seconds"][:epoch]) if epoch else None
        r["reach_plain_best"] = {"target": target, "epoch": epoch, "seconds": seconds}


# ------------------------------------------------------------------------------------------------------- results


def _key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return r["model"], r["regime"], r["variant"], r["seed"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``summary[model][regime][variant]``: mean and (sample) std over seeds of test accuracy, best epoch, wall time,
    epochs/seconds to the plain best (over the runs that reached it), the number of diverged runs and of runs that
    reached the plain best, and for GAAF variants the gradient ratio per stage at epoch 0 and at the last epoch."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for m, g, v in dict.fromkeys((r["model"], r["regime"], r["variant"]) for r in runs):
        rs = [r for r in runs if (r["model"], r["regime"], r["variant"]) == (m, g, v)]
        reach = [r.get("reach_plain_best") or {} for r in rs]
        s: dict[str, Any] = {k: _stats([r[k] for r in rs]) for k in ("test_acc", "best_epoch", "wall_s", "s_per_epoch")}
        s["seeds"] = sorted(r["seed"] for r in rs)
        s["diverged"] = sum(bool(r["diverged"]) for r in rs)
        s["reached_plain_best"] = sum(x.get("epoch") is not None for x in reach)
        s["epochs_to_plain_best"] = _stats([x.get("epoch") for x in reach])
        s["seconds_to_plain_best"] = _stats([x.get("seconds") for x in reach])
        if all("grad_ratio" in r for r in rs):
            s["grad_ratio_start"] = {k: _stats([r["grad_ratio"][k][0] for r in rs]) for k in rs[0]["grad_ratio"]}
            s["grad_ratio_final"] = {k: _stats([r["grad_ratio"][k][-1] for r in rs]) for k in rs[0]["grad_ratio"]}
        out.setdefault(m, {}).setdefault(g, {})[v] = s
    return out


def _resumed(path: Path, setup: dict[str, Any]) -> dict[str, Any]:
    """The results in ``path``, if they are this study's with this ``setup``; a ValueError naming what differs."""
    try:
        old = json.loads(path.read_text())
        ours = (old["study"], old["version"]) == ("depth", VERSION)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume from {path}: {e}") from e
    if not ours:
        raise ValueError(f"{path} is not a results file of the depth study (version {VERSION}); use another --out")
    differ = sorted(k for k in setup if old.get("setup", {}).get(k) != setup[k])
    if differ:
        raise ValueError(f"cannot resume {path}: it was run with different {', '.join(differ)}; use the same flags "
                         "or another --out")  # fmt: skip
    return old


def _git_commit() -> str | None:
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_study(cfg: DepthConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run every (model, regime, variant, seed) not yet in ``cfg.out/results.json``; returns the results."""
    import timm

    path = cfg.out / RESULTS
    if not path.exists():
        results = {"study": "depth", "version": VERSION, "setup": cfg.setup(), "runs": [], "pretrain": {}}
    elif cfg.resume:  # checked before the data load: a refused resume fails at once
        results = _resumed(path, cfg.setup())
    else:
        raise ValueError(f"{path} exists; pass --resume to continue that study, or choose another --out")
    reporter = reporter or Reporter()
    for k, chosen in (("models", cfg.models), ("regimes", cfg.regimes), ("variants", cfg.variants)):
        results[k] = list(dict.fromkeys([*results.get(k, []), *chosen]))
    device = _device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    env = {**_environment(device), "timm": timm.__version__, "cpus": os.cpu_count(), "git_commit": _git_commit()}
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
    for m, g, v, s in todo:
        run = run_one(cfg, m, g, v, s, data, results, reporter)
        run["environment"] = env
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results["runs"].append(run)
        _reach(results["runs"])
        results["summary"] = summarize(results["runs"])
        save(results, path)
        reporter.run_end(f"{m} {g} {v}", s, run)
    _reach(results["runs"])
    results["summary"] = summarize(results["runs"])
    save(results, path)
    try:
        results["figures"] = [str(p) for p in write_figures(results, cfg.out)]
    except ImportError as e:
        results["figures"], results["figures_skipped"] = [], str(e)
    reporter.finish(results)
    return results


# ------------------------------------------------------------------------------------------------------- figures

COLORS = {"plain": "tab:blue", "dropout": "tab:orange", "gaaf-paper": "tab:red", "gaaf-auto": "tab:green"}


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per epoch the mean, min and max over the runs that got that far (a diverged run's curve ends early)."""
    n = max((len(c) for c in curves), default=0)
    cols = [[c[i] for c in curves if i < len(c) and math.isfinite(c[i])] for i in range(n)]
    cols = [c for c in cols if c]
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _tag(results: dict[str, Any]) -> str:
    seeds = max((len(r) for r in _cells(results).values()), default=0)
    d = results.get("data", {})
    return (f"{d.get('source', '?')} {d.get('train', '?')} train / {d.get('val', '?')} val, {seeds} seed(s)"
            + (" (quick)" if results["setup"].get("quick") else ""))  # fmt: skip


def _cells(results: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results["runs"]:
        cells.setdefault((r["model"], r["regime"], r["variant"]), []).append(r)
    return cells


def write_figures(results: dict[str, Any], out: Path, prefix: str = "depth_") -> list[Path]:
    """Validation error (100 - accuracy, log scale) and training loss per epoch (rows: regimes, columns: models, one line per variant, the
    mean over seeds, the band min..max), and the GAAF gradient ratio per stage over training (rows: model x regime,
    columns: stages, gaaf-paper dashed vs gaaf-auto solid, the band min..max)."""
    from matplotlib.ticker import MaxNLocator

    from ..analysis.plots import _figure, _save

    cells = _cells(results)
    if not cells:
        return []
    models = [m for m in results["models"] if any(k[0] == m for k in cells)]
    regimes = [g for g in results["regimes"] if any(k[1] == g for k in cells)]
    tag = _tag(results)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ylabel in (("val_error", "validation error % (100 - accuracy)"), ("train_loss", "training loss")):
        fig, axes = _figure(len(regimes), len(models), 4.6, 3.4)
        for i, g in enumerate(regimes):
            for j, m in enumerate(models):
                ax = axes[i][j]
                for v in VARIANTS:
                    curves = [[100.0 - a for a in r["history"]["val_acc"]] if key == "val_error" else r["history"][key]
                              for r in cells.get((m, g, v), [])]  # fmt: skip
                    mean, lo, hi = _mean_curve(curves)
                    div = sum(r["diverged"] for r in cells.get((m, g, v), []))
                    if div:  # a run that diverged in its first epoch has no point to plot: say so
                        ax.annotate(f"{v}: {div}/{len(curves)} diverged", (0.02, 0.02 + 0.08 * VARIANTS.index(v)),
                                    xycoords="axes fraction", fontsize=8, color=COLORS[v])  # fmt: skip
                    if mean:
                        x = range(1, len(mean) + 1)
                        ax.plot(x, mean, marker="o", ms=3, color=COLORS[v], label=v)
                        ax.fill_between(x, lo, hi, color=COLORS[v], alpha=0.15, linewidth=0)
                ax.set_yscale("log")  # a stalled variant (90% error) and the 1% ones on one axis
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{m}, {g}")
                ax.set_xlabel("epoch")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
        fig.suptitle(f"{ylabel} per epoch, log scale\nmean over seeds, band min..max; {tag}")
        paths.append(out / f"{prefix}{key}.png")
        _save(fig, paths[-1])
    rows = [(m, g) for m in models for g in regimes if any((m, g, v) in cells for v in GAAF_VARIANTS)]
    if rows:
        stages = [*STAGES, "params"]
        fig, axes = _figure(len(rows), len(stages), 3.2, 2.6)
        for i, (m, g) in enumerate(rows):
            for j, st in enumerate(stages):
                ax = axes[i][j]
                ax.axhspan(0.5, 2.0, color="0.9", zorder=0)
                ax.axhline(1.0, color="0.6", linewidth=0.8)
                for v, style in (("gaaf-paper", "--"), ("gaaf-auto", "-")):
                    mean, lo, hi = _mean_curve([r["grad_ratio"][st] for r in cells.get((m, g, v), [])])
                    if mean:
                        x = range(len(mean))
                        ax.plot(x, mean, style, marker="o", ms=3, color=COLORS[v], label=v)
                        ax.fill_between(x, lo, hi, color=COLORS[v], alpha=0.15, linewidth=0)
                ax.set_yscale("log")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{m} {g}: {st}", fontsize=9)
                ax.set_xlabel("epoch (0: start)")
                if j == 0:
                    ax.set_ylabel("patched / plain grad norm")
                    ax.legend(fontsize=7)
        fig.suptitle(f"GAAF gradient ratio (patched / unpatched, same weights) at each stage's output, fixed batch; "
                     f"grey: [0.5, 2]\nmean over seeds, band min..max; {tag}")  # fmt: skip
        paths.append(out / f"{prefix}grad_ratio.png")
        _save(fig, paths[-1])
    return paths


def with_overrides(sizing: Sizing, **overrides: int | None) -> Sizing:
    """``sizing`` with the given fields replaced (``None``: kept)."""
    return replace(sizing, **{k: v for k, v in overrides.items() if v is not None})
