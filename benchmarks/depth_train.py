"""The depth benchmark after training (:mod:`benchmarks.depth`): a model trained briefly from scratch on
scikit-learn's digits, its ``state_dict`` saved and loaded into a freshly built model (``strict=True``), and the
reloaded model measured next to the same architecture at its initial weights, on the same held-out batch.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.depth_measure import SEED, measure
from gaaf_patch.errors import one_line
from gaaf_patch.models import build_model

__all__ = ["TrainConfig", "QUICK_TRAIN", "LR", "SIZE", "STEPS", "REFRESH_BATCHES", "digits_at", "accuracy", "train",
           "refresh_norm_stats", "trained_entry"]  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    size: int = 32
    steps: int = 150
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip: float = 5.0  # gradient-norm clipping: a from-scratch ViT under SGD spikes early without it
    measure_batch: int = 8  # held-out digits measured on; BatchNorm over 4 samples of a 1x1 map says little


QUICK_TRAIN = TrainConfig(steps=30, batch=32)
# transformers under SGD: a smaller step; the depthwise nets learn slowly at 0.05 in so few steps
LR = {"vit_tiny_patch16_224": 0.03, "test_vit": 0.03, "mobilenetv3_large_100": 0.1, "efficientnet_b0": 0.1}
SIZE = {"vit_tiny_patch16_224": 64}  # 16x16 patches: 4x4 tokens at 64 (2x2 at 32)
STEPS = {"vit_tiny_patch16_224": 300}  # a ViT from scratch under SGD learns slowest


@functools.cache
def digits_at(size: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's digits (gaaf_patch.data), 80/20 split, upsampled to ``3 x size x size``, normalised."""
    from gaaf_patch import data

    train, held = data.holdout(data.digits(), 0.2, seed=0)

    def up(images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).sub_(0.5).div_(0.5)

    return (up(train.images), train.labels), (up(held.images), held.labels)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def train(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, lr: float, seed: int = SEED) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        losses.append(loss.item())
    refresh_norm_stats(model, x, cfg.batch, gen)
    tail = losses[-10:]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "norm_stats_refresh_batches": REFRESH_BATCHES,
    }


REFRESH_BATCHES = 20


@torch.no_grad()
def refresh_norm_stats(model: nn.Module, x: Tensor, batch: int, gen: torch.Generator) -> None:
    """BatchNorm running statistics re-estimated on the final weights (train-mode forwards, no gradient): after a
    short run at momentum 0.1 they still mix in the first steps' statistics, and eval-mode accuracy reads them."""
    model.train()
    for _ in range(REFRESH_BATCHES):
        model(x[torch.randint(0, len(x), (batch,), generator=gen)])


def trained_entry(spec: str, cfg: TrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    size = SIZE.get(spec, cfg.size)
    (xtr, ytr), (xte, yte) = digits_at(size)
    shape = (3, size, size)
    lr = LR.get(spec, cfg.lr)
    if spec in STEPS and cfg.steps == TrainConfig.steps:  # the defaults' per-model override; --train-steps wins
        cfg = TrainConfig(**{**cfg.__dict__, "steps": STEPS[spec]})
    row: dict[str, Any] = {"model": spec, "input_size": list(shape), "batch": cfg.measure_batch}
    try:
        torch.manual_seed(SEED)
        model = build_model(spec, num_classes=10, input_size=shape)
        row["params"] = sum(p.numel() for p in model.parameters())
        init_state = copy.deepcopy(model.state_dict())
        xm = xte[: cfg.measure_batch]
        row["init"] = measure(model, xm)
        row["train"] = {
            "steps": cfg.steps,
            "batch": cfg.batch,
            "lr": lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "clip_grad_norm": cfg.clip,
            **train(model, xtr, ytr, cfg, lr),
        }
        row["train"]["train_acc"] = accuracy(model, xtr, ytr)
        row["train"]["heldout_acc"] = accuracy(model, xte, yte)
        with tempfile.TemporaryDirectory(prefix="gaaf-depth-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            torch.save(model.state_dict(), path)
            torch.manual_seed(SEED + 1)  # another init, so the load has to bring the trained weights
            fresh = build_model(spec, num_classes=10, input_size=shape)
            state = torch.load(path, weights_only=True)
            fresh.load_state_dict(state, strict=True)
        moved = max(
            float((v.float() - init_state[k].float()).abs().max())
            for k, v in state.items()
            if v.is_floating_point() and v.numel()
        )
        row["checkpoint"] = {"keys": len(state), "strict": True, "max_abs_change_from_init": moved}
        del model, state
        row["trained"] = measure(fresh, xm)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=f"{type(e).__name__}: {one_line(e, 300)}")
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 1)
    return row
