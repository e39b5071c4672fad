"""One training run on whole-tensor data: SGD with momentum, early stopping on validation loss.

The paper gives neither its optimizer nor its stopping rule; these are our choices, all flags of the CLI:
SGD (lr 0.01, momentum 0.9), batch 128, cross-entropy; after each epoch the validation loss on a held-out part of the
training set; stop when it has not improved for ``patience`` epochs (or at ``max_epochs``), restore the best epoch's
weights, and report test accuracy there. The epoch count reported is the best epoch, the paper's "epochs" being the
epochs a model needed.

Batches are drawn by indexing a per-epoch permutation of tensors already on the device: no DataLoader, no copies per
sample, which is what keeps an MLP epoch fast on two CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis import GradientInfo
from ..errors import GaafError

__all__ = ["TrainConfig", "Data", "train", "evaluate", "EpochLog", "StudyError"]


class StudyError(GaafError, ValueError):
    """A study option, data size, ``--out`` or ``--resume`` the user has to change; the message says how."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 10
    min_delta: float = 0.0  # an epoch improves when val loss < best - min_delta

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.momentum < 1:
            raise StudyError(f"need lr > 0 and 0 <= momentum < 1, got lr={self.lr}, momentum={self.momentum}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise StudyError("batch size, max epochs and patience must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Data:
    """Flattened images and labels of the three splits, on one device."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> Data:
        return Data(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test,
                                             self.y_test)))  # fmt: skip

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    best_epoch: int
    seconds: float


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 5000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) in eval mode."""
    was = model.training
    model.eval()
    loss = x.new_zeros((), dtype=torch.float64)
    correct = x.new_zeros((), dtype=torch.int64)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was)
    return loss.item() / len(y), 100.0 * correct.item() / len(y)


def train(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    *,
    seed: int,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (already on the data's device) and return the run's numbers; the model ends at its best epoch.

    Gradient information (eq. 5) is measured over every training step of the run.
    """
    device = data.x_train.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    n = len(data.y_train)
    best_loss, best_epoch, best_state, bad = float("inf"), 0, None, 0
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": [], "seconds": []}
    start = time.perf_counter()
    gi = GradientInfo(model)
    with gi:
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=gen, device=device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for idx in perm.split(cfg.batch_size):
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double() * len(idx)
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
            train_loss = total.item() / n
            if val_loss < best_loss - cfg.min_delta:
                best_loss, best_epoch, bad = val_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            seconds = time.perf_counter() - t0
            for k, v in zip(history, (train_loss, val_loss, val_acc, seconds), strict=True):
                history[k].append(v)
            if on_epoch is not None:
                on_epoch(EpochLog(epoch, train_loss, val_loss, val_acc, best_epoch, seconds))
            if not torch.isfinite(torch.tensor(train_loss)) or bad >= cfg.patience:
                break
    wall = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    epochs_run = len(history["val_loss"])
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "best_val_loss": best_loss,
        "best_val_acc": history["val_acc"][best_epoch - 1] if best_epoch else float("nan"),
        "wall_s": wall,
        "s_per_epoch": sum(history["seconds"]) / max(epochs_run, 1),
        "steps": gi.steps,
        "gradient_info": gi.result(),
        "history": history,
    }
