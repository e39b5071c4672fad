"""The depth study's training loop (:mod:`.depth`): a ResNet recipe run to its end, stopped by a non-finite loss.

Unlike :func:`.train.train` (the MNIST study's early stopping), every run here lasts the recipe's epochs, since the
cosine schedule is laid out over all of them, and the question is whether the loss stays finite at the usual learning
rate: the first non-finite training or validation loss ends the run and is recorded (``diverged``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .depth_setup import Recipe
from .train import Data, EpochLog, evaluate

__all__ = ["fit"]


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
