"""One training epoch and one evaluation pass, with a rich progress bar (loss, accuracy, images per second).

Both return :class:`Totals` summed over every process, so the numbers printed and stored in the checkpoint are the
whole data set's, not rank 0's share of it. A training loss that is not finite stops the epoch with
:class:`NonFiniteLoss`: the weights have diverged and must not be saved over the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dist import Dist, all_sum
from .options import FinetuneError

__all__ = ["Totals", "Precision", "NonFiniteLoss", "train_epoch", "evaluate", "progress_bar", "logits_of"]


class NonFiniteLoss(FinetuneError):
    """The training loss became NaN or infinite: the run diverged (a learning rate too high, bad data).

    Checked where the loop reads the loss anyway (a few times a second; reading it every step would synchronise the
    GPU every step) and on the epoch's total, which every process of a DistributedDataParallel job holds alike, so
    all of them stop together. ``step`` is the step at which it was seen, not necessarily the first bad one.
    """

    def __init__(self, value: float, step: int, steps: int, description: str) -> None:
        super().__init__(f"the training loss is {value} at step {step} of {steps} in {description}")
        self.value, self.step, self.steps, self.description = value, step, steps, description


@dataclass
class Totals:
    """Summed loss, correct predictions and samples, and the wall time they took."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def reduced(self, d: Dist) -> Totals:
        """Summed over every process; ``seconds`` stays this process's (all step together under DDP), so
        ``images_per_second`` is the whole job's rate."""
        loss_sum, correct, count = all_sum(d, self.loss_sum, self.correct, self.count)
        return Totals(loss_sum, correct, count, self.seconds)


@dataclass(frozen=True)
class Precision:
    """Mixed precision: ``dtype`` None is float32; float16 on CUDA also scales the loss (GradScaler)."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        if self.dtype == torch.float16 and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def logits_of(out: Any) -> Tensor:
    """A classifier's scores: the tensor itself, or the first of a tuple (torchvision's aux-logit models)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise FinetuneError(f"the model returned {type(out).__name__}; expected a tensor of class scores")


def progress_bar(console: Any, enabled: bool):
    """A rich Progress with the training fields; disabled (prints nothing) on every rank but the first."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}  {task.fields[ips]:,.0f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    n_batches: int,
    prepare: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    scaler: torch.amp.GradScaler | None,
    d: Dist,
    progress: Any,
    description: str,
    scheduler: Any = None,
) -> Totals:
    """One pass over ``batches``: forward under autocast, cross-entropy in float32, backward, step (and the
    learning-rate ``scheduler``'s step, which is per batch)."""
    model.train()
    task = progress.add_task(description, total=n_batches, loss=float("nan"), acc=0.0, ips=0.0)
    # running sums stay on the device: reading them every step would synchronise the GPU every step
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    correct = torch.zeros((), dtype=torch.int64, device=d.device)
    count, shown, step = 0, 0.0, 0
    _sync(d.device)
    start = time.perf_counter()
    for images, labels in batches:
        step += 1
        images = prepare(images.to(d.device, non_blocking=True))
        labels = labels.to(d.device, non_blocking=True)
        with precision.autocast():
            logits = logits_of(model(images))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.numel()
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        count += n
        now = time.perf_counter()
        if now - shown > 0.2 or count == n:  # the fields cost a device sync: a few times a second is enough
            shown = now
            running = loss_sum.item() / count
            if not d.enabled and not math.isfinite(running):  # under DDP: at the epoch's end, on every rank at once
                raise NonFiniteLoss(running, step, n_batches, description)
            progress.update(task, advance=1, loss=running, acc=correct.item() / count, ips=count / (now - start))
        else:
            progress.advance(task)
    _sync(d.device)
    seconds = time.perf_counter() - start
    totals = Totals(loss_sum.item(), float(correct.item()), float(count), seconds)
    progress.update(task, loss=totals.loss, acc=totals.acc, ips=totals.images_per_second)
    totals = totals.reduced(d)
    if not math.isfinite(totals.loss_sum):
        raise NonFiniteLoss(totals.loss, step, n_batches, description)
    return totals


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    prepare: Callable[[Tensor], Tensor],
    precision: Precision,
    d: Dist,
) -> Totals:
    """Loss and accuracy on held-out batches, in eval mode (GAAF sites are then the plain activations)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for images, labels in batches:
        images = prepare(images.to(d.device, non_blocking=True))
        labels = labels.to(d.device, non_blocking=True)
        with precision.autocast():
            logits = logits_of(model(images)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
        count += int((labels >= 0).sum())  # an evening-out sample of --fsdp (label -100) is not counted
    return Totals(loss_sum, float(correct), float(count), time.perf_counter() - start).reduced(d)
