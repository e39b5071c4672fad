"""``gaaf-patch finetune --fsdp``: the fine-tuning run with the model sharded by FSDP2 instead of replicated by DDP.

The run is the one :mod:`.run` describes, with these differences (the pieces are here, the order is in ``run``):

- after the patch, :func:`.fsdp.shard` wraps each block (:func:`.fsdp.default_blocks`: timm's blocks and stages,
  transformers' layers), then the root; the optimizer is built on the sharded parameters;
- ``--amp`` becomes FSDP2's ``MixedPrecisionPolicy`` (parameters gathered in bf16, gradients reduced in float32)
  rather than autocast; fp16 is refused (it would need a sharded loss scaler);
- ``--out DIR`` is a folder of shards written with ``torch.distributed.checkpoint`` after every epoch, atomically
  (:func:`.fsdp.save_sharded`); ``--resume DIR`` loads it (model, optimizer, schedule, epoch, each rank's random
  state): with the same number of processes the resumed run is bit-identical to an uninterrupted one;
- the run ends by gathering one plain ``state_dict`` (:func:`.fsdp.export_state_dict`) that rank 0 writes,
  atomically, to ``DIR.pt``; the deployment check (:mod:`.deploy`) runs on it;
- every rank must run the same number of forwards (each one gathers parameters from all), so the held-out shards
  are evened out with batches whose labels are ignored (:func:`even_batches`).

``--fsdp`` needs ``torchrun`` with 2 processes or more: sharding over one process is plain training with extra steps,
and it is refused with a line that says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GaafError, one_line
from ..models import CheckpointError
from . import fsdp
from .checkpoint import atomic_save, check_writable
from .deploy import deploy_check
from .dist import is_lost_peer
from .loop import Precision, logits_of
from .options import FinetuneError, FinetuneOptions

__all__ = [
    "check_sharded_options",
    "read_checkpoint",
    "mixed_precision",
    "shard_model",
    "meshes_made",
    "even_batches",
    "save",
    "export",
    "IGNORED",
]

IGNORED = -100  # cross_entropy's ignore_index: the label of an evening-out sample (not counted by evaluate)


def check_sharded_options(opts: FinetuneOptions) -> None:
    """The checks of :func:`.options.check_options` for ``--fsdp`` (and for a ``--resume`` folder without it)."""
    if not opts.fsdp:
        raise FinetuneError(
            f"--resume {opts.resume} is a folder of shards written by an --fsdp run; add --fsdp (under torchrun), "
            "or resume from a checkpoint file"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise FinetuneError(
            "--fsdp shards the model over processes: run under 'torchrun --nproc-per-node N' with N >= 2 "
            "(see docs/distributed.md); in one process leave --fsdp out"
        )
    if opts.compile:
        raise FinetuneError("--fsdp with --compile is not supported yet; leave one of them out")
    if opts.amp == "fp16":
        raise FinetuneError("--fsdp --amp fp16 is not supported (it needs a sharded loss scaler); use --amp bf16")
    out, export = opts.out_path, opts.export_path
    if out.suffix == ".pt":
        raise FinetuneError(
            f"--fsdp --out {out}: name a folder for the sharded checkpoint, e.g. --out {out.with_suffix('')} "
            f"(the exported state_dict goes next to it, {out.with_suffix('')}.pt)"
        )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise FinetuneError(f"--out {out}: no such directory {parent}")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--fsdp --out {out} is a file; --out names the folder the shards go to")
    if opts.resume:
        resume = Path(opts.resume)
        if resume.is_file():
            raise CheckpointError(
                f"--resume {resume} is a file; with --fsdp resume from the folder an --fsdp run wrote (its --out)"
            )
        found = fsdp._resolve(resume.absolute())
        if found is None:
            raise CheckpointError(f"--resume {resume}: no sharded checkpoint there (no .metadata)")
        saved = (read_checkpoint(found).extra.get("replicas") or {}).get("world_size")
        if saved is not None and saved != world:
            raise FinetuneError(
                f"--resume {resume} was written by {saved} processes, this job has {world}: resume with "
                f"--nproc-per-node/--nnodes giving {saved} (each rank restores its own random state)"
            )
    same = bool(opts.resume) and out.absolute() == Path(opts.resume).absolute()
    if export.is_dir():
        raise FinetuneError(f"--out {out}: {export}, where the exported state_dict goes, is a folder")
    for path in (out, export):
        if path.exists() and not opts.overwrite and not same:
            how = f"continue that run with --resume {out}, " if not opts.resume else ""
            raise FinetuneError(
                f"{path} already exists{' and is not the --resume checkpoint' if opts.resume else ''}; {how}"
                "replace it with --overwrite, or choose another --out"
            )
    try:
        check_writable(export)
    except OSError as e:
        raise FinetuneError(f"--out {out}: cannot write in {parent} ({one_line(e)}); choose another --out") from e


@dataclass
class ShardedCheckpoint:
    """What ``--resume DIR`` holds besides the shards: the run's state (``extra``), as a checkpoint file has it."""

    extra: dict[str, Any]
    path: Path
    state_dict: None = None


def read_checkpoint(directory: str | os.PathLike) -> ShardedCheckpoint:
    """The plain part of a sharded checkpoint (epoch, schedule, options, history); the shards load later, collectively,
    once the model is sharded (:func:`loader`)."""
    found = fsdp._resolve(Path(directory).absolute())
    if found is None:
        raise CheckpointError(f"--resume {directory}: no sharded checkpoint there (no .metadata)")
    if not (found / fsdp._STEP_STATE).is_file():
        raise CheckpointError(f"--resume {directory}: no {fsdp._STEP_STATE}; not written by gaaf-patch finetune --fsdp")
    extra = dict(torch.load(found / fsdp._STEP_STATE, weights_only=True))
    # loaded with the shards by load_sharded, not from here: present so that check_resumable finds a full checkpoint
    extra.setdefault("optimizer", "sharded")
    extra.setdefault("rng", "sharded")
    return ShardedCheckpoint(extra, found)


def loader(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> Callable[[], None]:
    """What :func:`.resume.restore_training` calls to load the optimizer: the model and optimizer shards, and this
    rank's random state (collective)."""

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    def load() -> None:
        try:
            fsdp.load_sharded(model, optimizer, directory)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, GaafError) or is_lost_peer(e):  # its own message; another rank's failure
                raise
            raise CheckpointError(
                f"--resume {directory}: its shards do not fit this model and optimizer ({one_line(e, 200)}); "
                "resume with the options the run was started with"
            ) from None

    return load


def mixed_precision(precision: Precision, model: nn.Module) -> tuple[Any, Precision]:
    """``--amp`` as FSDP2 sees it: a ``MixedPrecisionPolicy`` (bf16 parameters in forward and backward, float32
    gradient reduction and master weights), and the loop's precision without autocast (None: float32 throughout).

    A model with BatchNorm is refused: the policy gathers *every* parameter in bf16, and PyTorch's batch norm wants
    its weight in the dtype of its running statistics, which are buffers and stay float32 ("expected scalar type
    BFloat16 but found Float", with or without GAAF)."""
    if precision.dtype is None:
        return None, precision
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine
             and m.track_running_stats]  # fmt: skip
    if norms:
        raise FinetuneError(
            f"--fsdp --amp: the model has BatchNorm ({norms[0]}{f' and {len(norms) - 1} more' if len(norms) > 1 else ''})"
            ", whose weights FSDP would gather in bf16 next to float32 running statistics, which PyTorch's batch norm "
            "refuses; leave out --amp (or --fsdp, to train with autocast under DDP)"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    return policy, Precision(precision.device_type, None)


_meshes: list[bool] = []


def shard_model(opts: FinetuneOptions, model: nn.Module, policy: Any) -> None:
    """``fully_shard`` per block, then the root, on the patched model (before the optimizer is built)."""
    _meshes.append(True)
    fsdp.shard(model, reshard_after_forward=opts.fsdp_reshard_after_forward, mp_policy=policy)


def meshes_made() -> bool:
    """Whether this process sharded a model (so made a ``DeviceMesh``; see :mod:`gaaf_patch.cli.finetune` on why
    the CLI then leaves with ``os._exit``)."""
    return bool(_meshes)


def even_batches(batches: Iterable[tuple[Tensor, Tensor]], dataset_size: int, world_size: int, batch_size: int):
    """``batches`` (this rank's held-out shard), then as many one-sample batches labelled :data:`IGNORED` as it
    takes to reach the largest shard's batch count: the shards are ``range(r, n, world)``, so rank 0's is the
    largest, with ``ceil(ceil(n / world) / batch_size)`` batches."""
    total = math.ceil(math.ceil(dataset_size / world_size) / batch_size)

    def gen() -> Iterator[tuple[Tensor, Tensor]]:
        seen, first = 0, None
        for images, labels in batches:
            seen += 1
            first = images[:1] if first is None else first
            yield images, labels
        for _ in range(total - seen):
            yield first, torch.full((1,), IGNORED, dtype=torch.int64)

    return gen()


def save(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], out: Path, where: str) -> None:
    """Every rank writes its shards to ``out`` (atomic folder); ``state`` holds plain values only."""
    try:
        fsdp.save_sharded(model, optimizer, state, out)
    except (OSError, RuntimeError) as e:
        if is_lost_peer(e):  # another rank is gone: its failure, not this write's (see finetune's handler)
            raise
        raise FinetuneError(
            f"cannot write the sharded checkpoint {out}: {one_line(e)}; {where}; free space or choose another --out"
        ) from e


def export(
    opts: FinetuneOptions,
    model: nn.Module,
    batch: Tensor,
    num_classes: int | None,
    amp_dtype: torch.dtype | None,
    is_main: bool,
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Gather the full ``state_dict`` and the sharded model's eval output on ``batch`` (both collective); on rank 0
    run the deployment check on them: the state loads strictly into a freshly built unpatched model whose output
    must match (bit for bit in exact mode on the CPU, with its parameters in ``amp_dtype`` as FSDP gathered them)."""
    state = fsdp.export_state_dict(model)
    model.eval()
    with torch.no_grad():
        output = logits_of(model(batch)).float()
    if not is_main:
        return state, None
    deploy = deploy_check(
        opts, model, num_classes, batch, Precision(batch.device.type), state_dict=state, output=output,
        param_dtype=amp_dtype,
    )  # fmt: skip
    return state, deploy


def write_export(state: dict[str, Tensor], path: Path, where: str) -> None:
    """Rank 0: the plain ``state_dict``, atomically (a killed write leaves the previous file or none)."""
    try:
        atomic_save(state, path)
    except (OSError, RuntimeError) as e:
        raise FinetuneError(f"cannot write {path}: {one_line(e)}; {where}; free space or choose another --out") from e
