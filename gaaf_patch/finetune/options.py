"""What a fine-tuning run is asked to do (:class:`FinetuneOptions`), and the checks it passes before any work.

Kept apart from the run so that every part of :mod:`gaaf_patch.finetune` (the device choice, the input adapter, the
loop) can raise :class:`FinetuneError` without importing the trainer.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GaafError, one_line
from ..models import CheckpointError
from .checkpoint import check_writable

__all__ = [
    "FinetuneOptions",
    "FinetuneError",
    "check_options",
    "is_sharded",
    "EMBEDDED_DATA",
    "AMP_CHOICES",
    "SCHEDULES",
]

EMBEDDED_DATA = ("digits", "mnist")
AMP_CHOICES = ("auto", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
# values per sample above which --input-size is a typo, not a model input (2^27 float32 values: 512 MiB a sample);
# the model's input is checked with a forward of two zero samples, which must not take the machine's memory
MAX_INPUT_VALUES = 2**27


class FinetuneError(GaafError, ValueError):
    """An option or input the fine-tuning cannot work with; the message says what to do."""


@dataclass
class FinetuneOptions:
    """Everything one fine-tuning run needs; the CLI's flags map one to one onto these fields.

    ``patch`` holds the keyword arguments of :func:`gaaf_patch.patch` (None trains the model unpatched: the baseline
    to compare GAAF with). ``batch_size`` is per process. ``epochs`` is the total, also when resuming. An existing
    ``out`` is replaced only when it is the ``resume`` file or ``overwrite`` is set.
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
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True
    dist_timeout: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (stored as ``args`` in the checkpoint)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def out_path(self) -> Path:
        """The checkpoint: a file, or with ``fsdp`` a folder of shards (default ``MODEL-gaaf.pt`` / ``MODEL-gaaf``)."""
        if self.out:
            return Path(self.out)
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.model).strip('_') or 'model'}-gaaf"
        return Path(stem if self.fsdp else stem + ".pt")

    @property
    def export_path(self) -> Path:
        """With ``fsdp``: the one-file ``state_dict`` the run ends by writing, next to the folder (``DIR.pt``)."""
        out = self.out_path
        return out.with_name(out.name + ".pt")


def is_sharded(opts: FinetuneOptions) -> bool:
    """Whether the run is (or is asked to resume) an ``--fsdp`` one: ``--resume`` then names a folder."""
    return opts.fsdp or bool(opts.resume and Path(opts.resume).is_dir())


def check_options(opts: FinetuneOptions) -> None:
    """The checks that need no model and no data: they fail at once, not after an epoch."""
    if opts.epochs < 1 or opts.batch_size < 1:
        raise FinetuneError("--epochs and --batch-size must be positive")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise FinetuneError(f"--lr must be a positive finite number, got {opts.lr}")
    if opts.workers < 0:
        raise FinetuneError(f"--workers must be 0 (load in this process) or more, got {opts.workers}")
    if opts.input_size and math.prod(opts.input_size) > MAX_INPUT_VALUES:
        raise FinetuneError(
            f"--input-size {','.join(map(str, opts.input_size))} is {math.prod(opts.input_size):,} values per sample; "
            "give the size the model takes, e.g. 3,224,224"
        )
    if not (opts.dist_timeout > 0 and math.isfinite(opts.dist_timeout)):
        raise FinetuneError(f"--dist-timeout must be a positive number of seconds, got {opts.dist_timeout}")
    if opts.checkpoint and not Path(opts.checkpoint).is_file():
        raise CheckpointError(f"--checkpoint {opts.checkpoint}: no such checkpoint file")
    if is_sharded(opts):  # --resume and --out are checked by .sharded.check_sharded_options, which the run calls
        return
    if opts.resume and not Path(opts.resume).is_file():
        raise CheckpointError(f"--resume {opts.resume}: no such checkpoint file")
    check_output(opts)


def _same_file(a: Path, b: str | None) -> bool:
    if not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == Path(b).resolve()


def check_output(opts: FinetuneOptions) -> None:
    """``--out`` is a file this run may write: in a writable folder, not the ``--checkpoint`` it starts from, and not
    an existing file unless it is the ``--resume`` file or ``--overwrite`` says to replace it."""
    out = opts.out_path
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FinetuneError(f"--out {out}: no such directory {parent}")
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'model-gaaf.pt'}")
    if _same_file(out, opts.checkpoint):
        raise FinetuneError(f"--out {out} is the --checkpoint the run starts from; choose another --out")
    if out.exists() and not opts.overwrite and not _same_file(out, opts.resume):
        how = f"continue that run with --resume {out}, " if not opts.resume else ""
        raise FinetuneError(
            f"--out {out} already exists{' and is not the --resume file' if opts.resume else ''}; {how}"
            "replace it with --overwrite, or choose another --out"
        )
    try:
        check_writable(out)
    except OSError as e:
        raise FinetuneError(f"--out {out}: cannot write in {parent} ({one_line(e)}); choose another --out") from e
