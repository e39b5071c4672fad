"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel, gloo or nccl.

``torchrun --nproc-per-node N -m gaaf_patch.cli finetune ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them and joins the process group (nccl when the processes have GPUs, gloo on the CPU). Without
them (or with ``WORLD_SIZE=1``) everything here degrades to the single-process case, so the trainer has one code
path. The model is patched *before* it is wrapped: DDP registers its gradient hooks on the parameters, which the
patch leaves as they are, and the GAAF gradient then flows into the all-reduce like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import state_digest
from .options import FinetuneError

__all__ = ["Dist", "setup", "teardown", "all_sum", "replica_digests"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICE_HINT = "use auto, cpu, cuda or cuda:N"


def _device(requested: str, local_rank: int) -> torch.device:
    """The device ``--device`` names, checked to exist here (a name torch does not know, or a device this machine
    lacks, is one line saying what to use instead)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ... device type at start of device string"
        raise FinetuneError(f"--device {requested}: not a device name; {DEVICE_HINT}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {requested}: no CUDA device is visible; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is None:
            return torch.device("cuda", local_rank % count)
        if dev.index >= count:
            raise FinetuneError(f"--device {requested}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not (callable(available) and available()):
            raise FinetuneError(f"--device {requested}: not available on this machine; {DEVICE_HINT}")
    return dev


def setup(device: str = "auto") -> Dist:
    """Join the process group ``torchrun`` describes in the environment, if any, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, *values: float) -> list[float]:
    """Sum numbers over all processes (float64, so counts up to 2^53 stay exact)."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def replica_digests(d: Dist, model: torch.nn.Module) -> list[str]:
    """Every rank's :func:`~.checkpoint.state_digest` of its own weights, gathered. DDP keeps replicas identical
    by construction; this checks it, because a rank that diverged (a non-deterministic op, a buffer updated on one
    rank only) would otherwise go unnoticed until the checkpoint of rank 0 turns out not to be what was trained."""
    mine = state_digest(model.state_dict())
    if not d.enabled:
        return [mine]
    out: list[str] = [""] * d.world_size
    dist.all_gather_object(out, mine)
    return out


def sync_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the *start* of each forward, so after the last training step each rank holds running
    statistics updated by its own last batch. Syncing them at the end of an epoch makes every rank evaluate, and
    agree on, the model rank 0 saves.
    """
    if not d.enabled:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)
