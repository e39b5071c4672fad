"""What a fine-tuning run is asked to do (:class:`FinetuneOptions`), and the checks it passes before any work.

Kept apart from the run so that every part of :mod:`gaaf_patch.finetune` (the device choice, the input adapter, the
loop) can raise :class:`FinetuneError` without importing the trainer.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GaafError
from ..models import CheckpointError

__all__ = ["FinetuneOptions", "FinetuneError", "check_options", "EMBEDDED_DATA", "AMP_CHOICES", "SCHEDULES"]

EMBEDDED_DATA = ("digits", "mnist")
AMP_CHOICES = ("auto", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


class FinetuneError(GaafError, ValueError):
    """An option or input the fine-tuning cannot work with; the message says what to do."""


@dataclass
class FinetuneOptions:
    """Everything one fine-tuning run needs; the CLI's flags map one to one onto these fields.

    ``patch`` holds the keyword arguments of :func:`gaaf_patch.patch` (None trains the model unpatched: the baseline
    to compare GAAF with). ``batch_size`` is per process. ``epochs`` is the total, also when resuming.
    """

    model: str
    data: str = "digits"
    checkpoint: str | None = None
    num_classes: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    sched: str = "cosine"
    input_size: tuple[int, ...] | None = None
    data_dir: str | None = None
    download: bool = False
    workers: int = 0
    amp: str | None = None
    compile: bool = False
    patch: dict[str, Any] | None = field(default_factory=dict)
    out: str | None = None
    resume: str | None = None
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (stored as ``args`` in the checkpoint)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path(f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.model).strip('_') or 'model'}-gaaf.pt")


def check_options(opts: FinetuneOptions) -> None:
    """The checks that need no model and no data: they fail at once, not after an epoch."""
    if opts.epochs < 1 or opts.batch_size < 1:
        raise FinetuneError("--epochs and --batch-size must be positive")
    if not opts.lr > 0:
        raise FinetuneError(f"--lr must be positive, got {opts.lr}")
    parent = opts.out_path.resolve().parent
    if not parent.is_dir():
        raise FinetuneError(f"--out {opts.out_path}: no such directory {parent}")
    for flag, path in (("--checkpoint", opts.checkpoint), ("--resume", opts.resume)):
        if path and not Path(path).is_file():
            raise CheckpointError(f"{flag} {path}: no such checkpoint file")
