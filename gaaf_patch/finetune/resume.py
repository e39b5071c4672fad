"""Resuming a run (``--resume``): which options must stay as they were, and how a new ``--lr`` or ``--epochs`` acts.

A resumed run continues the saved one: the optimizer state, the learning-rate schedule and the order of the batches
depend on the model, the data, the batch size, the optimizer and its settings, the schedule, the input size and the
seed, so a change to any of them is refused (:func:`check_resumable`), naming each, rather than silently mixing two
runs (an optimizer of another kind does not even load: its state has other keys).

``--lr`` and ``--epochs`` may change (:func:`restore_training`): ``--epochs`` is the new total and ``--lr`` the new
base learning rate. Unchanged, the saved schedule continues where it stopped, so the result is bit-identical to an
uninterrupted run. Changed (or the number of steps per epoch changed, with another number of processes), the
schedule is rebuilt as if the run had been started with the new values: at the resumed step ``t`` the cosine
schedule's learning rate is ``lr * (1 + cos(pi * t / T)) / 2`` with ``T = epochs * steps per epoch``, and it goes on
along that curve to 0 at the new last step; with ``--sched constant`` the new ``lr`` applies from the next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import one_line
from ..models import CheckpointError
from .options import EMBEDDED_DATA, SCHEDULES, FinetuneError, FinetuneOptions

__all__ = ["FIXED", "data_source", "check_resumable", "make_scheduler", "restore_training"]

# the options a resumed run must share with the run it continues (input_size is compared as the model sees it)
FIXED = ("model", "data", "batch_size", "opt", "momentum", "weight_decay", "sched", "seed")
NEEDED = ("optimizer", "epoch", "rng")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def data_source(opts: FinetuneOptions) -> str:
    """What ``--data`` names, independent of the working directory: an embedded data set's name or the folder's
    absolute path (stored in the checkpoint, so a resumed run may spell the same folder another way)."""
    if opts.data in EMBEDDED_DATA:
        return opts.data
    return str(Path(opts.data).expanduser().resolve())


def check_resumable(opts: FinetuneOptions, extra: Mapping[str, Any], input_size: tuple[int, ...]) -> None:
    """Refuse a ``--resume`` file this command did not write, or options that cannot change on resume."""
    missing = [k for k in NEEDED if k not in extra]
    if missing:
        raise CheckpointError(f"--resume {opts.resume}: not a fine-tuning checkpoint (no {', '.join(missing)})")
    saved = extra.get("args") if isinstance(extra.get("args"), Mapping) else {}
    fixed = [*FIXED, *(("workers",) if opts.data not in EMBEDDED_DATA else ())]  # a folder's augmentation draws
    changed = []
    for name in fixed:
        if name not in saved:
            continue
        old, new = saved[name], getattr(opts, name)
        if name == "data" and "data_source" in extra:
            old, new = extra["data_source"], data_source(opts)
        if old != new:
            changed.append(f"{_flag(name)} {old} (now {new})")
    old_size = extra.get("input_size")
    if isinstance(old_size, (list, tuple)) and [int(v) for v in old_size] != list(input_size):
        changed.append(f"--input-size {','.join(map(str, old_size))} (now {','.join(map(str, input_size))})")
    if changed:
        raise FinetuneError(
            f"--resume {opts.resume}: the run was started with {'; '.join(changed)}; these cannot change on resume: "
            "pass the run's values again (only --lr and --epochs may change), or start a new run without --resume"
        )


def make_scheduler(opts: FinetuneOptions, optimizer: torch.optim.Optimizer, steps: int, start_step: int = 0):
    """The per-step schedule (None for ``constant``): cosine from ``opts.lr`` to 0 over ``opts.epochs * steps``.

    ``start_step`` > 0 places it at that step of the curve (a resumed run whose ``--lr``/``--epochs`` changed): the
    groups' base and current learning rates are set here and the scheduler is built with ``last_epoch`` (PyTorch's
    way to resume a scheduler), so it goes on from the value set.
    """
    if opts.sched not in SCHEDULES:
        raise FinetuneError(f"--sched {opts.sched}: use one of {', '.join(SCHEDULES)}")
    total = max(1, opts.epochs * steps)
    if start_step:
        lr = opts.lr if opts.sched == "constant" else opts.lr * (1 + math.cos(math.pi * start_step / total)) / 2
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = opts.lr, lr
    if opts.sched == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, last_epoch=start_step - 1)


def restore_training(
    opts: FinetuneOptions,
    extra: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    steps: int,
    load_optimizer: Callable[[], None] | None = None,
) -> tuple[int, list[dict[str, Any]], Any, bool]:
    """Load the saved optimizer, schedule and loss-scaler states into the run's; returns ``(epochs done, history,
    scheduler, whether the schedule was rebuilt for a new --lr/--epochs)``. ``load_optimizer`` replaces loading
    ``extra["optimizer"]`` (a sharded checkpoint loads the optimizer's shards with the model's), at the same point:
    after the scheduler is built (which resets the learning rates) and before a rebuilt one places them."""
    saved = extra.get("args") if isinstance(extra.get("args"), Mapping) else {}
    start = int(extra["epoch"])
    same = (
        saved.get("lr", opts.lr) == opts.lr
        and saved.get("epochs", opts.epochs) == opts.epochs
        and int(extra.get("steps_per_epoch") or steps) == steps
    )
    scheduler = make_scheduler(opts, optimizer, steps) if same else None
    if load_optimizer is not None:  # its errors are its own (ShardError) or a lost rank's, told as such upstream
        load_optimizer()
    else:
        try:
            optimizer.load_state_dict(extra["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"--resume {opts.resume}: its optimizer state does not fit --opt {opts.opt} on this model "
                f"({type(e).__name__}: {one_line(e, 120)}); resume with the options the run was started with"
            ) from None
    if same:
        if scheduler is not None and extra.get("scheduler"):
            scheduler.load_state_dict(extra["scheduler"])
    else:
        scheduler = make_scheduler(opts, optimizer, steps, start * steps)
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    return start, list(extra.get("history") or []), scheduler, not same
