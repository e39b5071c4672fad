"""The data a run trains and evaluates on, and the loaders that batch it so that a resumed run sees what an
uninterrupted one would.

Where randomness enters, and how each is made a function of ``(seed, epoch)`` alone:

- the order of the training samples: a :class:`DistributedSampler` seeded with ``--seed`` and set to the epoch;
- an image folder's augmentation (timm's random-resized crop draws from Python's ``random``, the flip from torch):
  with ``--workers 0`` it runs in this process and draws from its generators, which the run seeds at the start
  (:func:`.checkpoint.seeded`) and the checkpoint saves and restores; with ``--workers N`` it runs in the loader's
  worker processes, which PyTorch seeds (``random``, ``torch`` and NumPy) from a base seed drawn from the loader's
  ``generator``. That generator is re-seeded from ``(seed, epoch, rank)`` at every epoch and the workers are started
  afresh for each epoch (``persistent_workers`` would carry their random state over from the epoch before, which a
  resumed run cannot know). So an epoch's augmentation depends on the seed, the epoch, the rank and the number of
  workers (which is why ``--workers`` cannot change when resuming a run on an image folder), never on what ran before.

digits and MNIST are whole tensors batched by indexing (:class:`gaaf_patch.data.SplitDataset`): no augmentation,
no workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import data as _data
from . import dist
from .inputs import InputAdapter, normalization
from .interrupt import quiet_worker
from .options import EMBEDDED_DATA, FinetuneError, FinetuneOptions

__all__ = ["Data", "Loaders", "datasets", "loaders", "epoch_seed", "worker_message", "DIGITS_HOLDOUT"]

DIGITS_HOLDOUT = 0.2


@dataclass
class Data:
    train: Any
    val: Any
    num_classes: int
    prepare: InputAdapter
    name: str


def datasets(opts: FinetuneOptions, model: nn.Module, input_size: tuple[int, ...]) -> Data:
    """The training and held-out sets ``--data`` names, and how a batch of them becomes the model's input."""
    if opts.data in EMBEDDED_DATA:
        if opts.data == "digits":
            train, val = _data.holdout(_data.digits(), DIGITS_HOLDOUT)
            name = f"digits ({len(train)} train / {len(val)} held out)"
        else:
            train = _data.mnist(opts.data_dir, train=True, download=opts.download)
            val = _data.mnist(opts.data_dir, train=False, download=opts.download)
            name = f"MNIST ({len(train)} train / {len(val)} test)"
        channels = input_size[0] if len(input_size) == 3 else 1
        prepare = InputAdapter(input_size, normalization(model, channels) if len(input_size) == 3 else None)
        n = max(train.num_classes, val.num_classes)
        return Data(_data.SplitDataset(train), _data.SplitDataset(val), n, prepare, name)
    root = Path(opts.data).expanduser()
    if not root.is_dir():
        raise _data.DataError(f"--data {opts.data}: no such folder (or use one of {', '.join(EMBEDDED_DATA)})")
    if len(input_size) != 3:
        raise FinetuneError(f"an image folder needs an image model; --input-size is {','.join(map(str, input_size))}")
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, *input_size[1:])}, model=model)
    train, val, classes = _data.image_folders(
        root, create_transform(**cfg, is_training=True), create_transform(**cfg, is_training=False)
    )
    return Data(train, val, len(classes), InputAdapter(input_size), f"{root} ({len(train)} train / {len(val)} val)")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a function of ``(seed, epoch, rank)`` only, and differs for each (a hash, so that seed
    1 epoch 0 is not seed 0 epoch 1, and the ranks of a job do not draw the same augmentations)."""
    digest = hashlib.sha256(f"gaaf-patch finetune {seed} {epoch} {rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Loaders:
    """The training batches (rank-sharded, shuffled), their sampler, and the held-out batches."""

    train: DataLoader
    sampler: DistributedSampler
    val: DataLoader
    seed: int
    rank: int
    generator: torch.Generator | None

    def set_epoch(self, epoch: int) -> None:
        """Make the coming pass over ``train`` a function of ``(seed, epoch)``: the shuffle, and the seeds PyTorch
        gives the loader's workers (with no workers the augmentation draws from this process's generators, which the
        run seeds and the checkpoint saves)."""
        self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))


def loaders(opts: FinetuneOptions, ds: Data, d: dist.Dist) -> Loaders:
    """Shuffled, rank-sharded training batches (the sampler is seeded: the order depends on seed and epoch only, so
    a resumed run sees the batches the uninterrupted one would), and an unpadded shard of the held-out set."""
    sampler = DistributedSampler(ds.train, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=opts.seed)
    tensors = isinstance(ds.train, _data.SplitDataset)
    kw: dict[str, Any] = {"pin_memory": d.device.type == "cuda"}
    generator = None
    if tensors:
        kw["collate_fn"] = _data.SplitDataset.collate
    else:
        kw.update(num_workers=opts.workers, worker_init_fn=quiet_worker if opts.workers else None)
        generator = torch.Generator()
    # a last batch of one sample breaks BatchNorm in training mode; drop the remainder when there is more than it
    drop_last = len(sampler) > opts.batch_size
    train = DataLoader(
        ds.train, batch_size=opts.batch_size, sampler=sampler, drop_last=drop_last, generator=generator, **kw
    )
    val_indices = list(range(d.rank, len(ds.val), d.world_size))
    if not tensors:
        # the held-out transforms draw nothing, so its workers may live for the whole run; its own generator keeps
        # the iterator's base-seed draw off this process's generator (the first epoch after a resume would draw
        # again what the uninterrupted run drew once)
        kw.update(persistent_workers=opts.workers > 0, generator=torch.Generator().manual_seed(opts.seed))
    val = DataLoader(ds.val, batch_size=opts.batch_size, sampler=val_indices, **kw)
    return Loaders(train, sampler, val, opts.seed, d.rank, generator)


def worker_message(e: BaseException) -> str | None:
    """The message of an exception a loader worker raised (None: ``e`` is not one). PyTorch re-raises it in this
    process as the same type with the worker's whole traceback as its message; the original message is the last
    line, after ``module.Type: ``."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return None
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.endswith(type(e).__name__) else last
