"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel, gloo or nccl.

``torchrun --nproc-per-node N -m gaaf_patch.cli finetune ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them and joins the process group (nccl when the processes have GPUs, gloo on the CPU). Without
them (or with ``WORLD_SIZE=1``) everything here degrades to the single-process case, so the trainer has one code
path. The model is patched *before* it is wrapped: DDP registers its gradient hooks on the parameters, which the
patch leaves as they are, and the GAAF gradient then flows into the all-reduce like any other.

A failing process must not leave the others waiting. Two things see to it: the process group's timeout
(``--dist-timeout``, default :data:`DEFAULT_TIMEOUT` seconds, passed to ``init_process_group``) bounds every wait in
a collective, so a rank that hangs or dies without a word fails the others within it; and a rank that raises writes
one line naming itself into the job's store (:func:`record_failure`) before it leaves, which the others read
(:func:`failure_elsewhere`) when their next collective breaks or torchrun stops them, so every process ends with
a line that names the rank that failed first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import one_line
from .checkpoint import state_digest
from .interrupt import Interrupted, Terminated
from .options import FinetuneError

__all__ = [
    "Dist",
    "DEFAULT_TIMEOUT",
    "setup",
    "teardown",
    "all_sum",
    "replica_digests",
    "record_failure",
    "failure_elsewhere",
    "inject_fault",
    "stopped_by_another_rank",
]

# seconds a collective may wait for the other processes: long enough for rank 0 to write a large checkpoint while
# the others wait at the next collective, short enough that a dead job does not hold its machines for torch's 30 min
DEFAULT_TIMEOUT = 600.0
FAULT_ENV = "GAAF_FINETUNE_FAULT"  # tests: "RANK:EPOCH:KIND" makes that rank fail at that epoch (see inject_fault)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout: float = DEFAULT_TIMEOUT

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


def setup(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Dist:
    """Join the process group ``torchrun`` describes in the environment, if any, and pick this process's device;
    a collective that waits more than ``timeout`` seconds for the other processes raises."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, device_id=dev if dev.type == "cuda" else None, timeout=timedelta(seconds=timeout)
        )
    return Dist(rank, world_size, local_rank, dev, timeout)


def teardown(d: Dist, failed: bool = False) -> None:
    """Leave the process group. After a failure it is left as it is: the collective that tears it down would wait
    for the ranks that are gone (nccl), and the process is about to end anyway."""
    if d.enabled and dist.is_initialized() and not failed:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- failures


def _failure_key() -> str:
    return f"gaaf_patch/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # each restart anew


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a torch without it: nothing to share the line through
        return None


def record_failure(d: Dist, message: str) -> None:
    """Tell the other ranks, through the job's store, that this one failed and why (the first failure is kept)."""
    store = _store() if d.enabled else None
    if store is None:
        return
    try:
        store.compare_set(_failure_key(), "", f"rank {d.rank} failed: {message}")
    except Exception:  # noqa: BLE001 - the store is gone too (torchrun stopping): the timeout still ends the job
        pass


def failure_elsewhere(d: Dist, wait: float = 0.0) -> str | None:
    """The line another rank recorded with :func:`record_failure` (None: none did), waiting up to ``wait`` seconds
    for it: a collective can break a moment before the failing rank's line is in the store."""
    store = _store() if d.enabled else None
    if store is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            if store.check([_failure_key()]):
                line = store.get(_failure_key()).decode()
                return None if line.startswith(f"rank {d.rank} failed") else line
        except Exception:  # noqa: BLE001 - the store is gone (torchrun's agent stopped): nothing to read
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def is_lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process is gone or silent (the timeout)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "gloo")
    )


def inject_fault(d: Dist, epoch: int) -> None:
    """Fail on purpose where ``$GAAF_FINETUNE_FAULT`` (``RANK:EPOCH:KIND``, epochs from 1) says: ``oserror`` raises
    an ``OSError`` (as an unreadable file would), ``hang`` sleeps (a rank stuck outside any collective). For the
    tests of what the other ranks do; unset, it does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at, kind = spec.split(":")
    if int(rank) != d.rank or int(at) != epoch:
        return
    if kind == "hang":
        time.sleep(3600)
    raise OSError(f"injected fault on rank {d.rank} at epoch {epoch} (${FAULT_ENV}={spec})")


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


def stopped_by_another_rank(d: Dist, e: BaseException, own: bool) -> None:
    """Under torchrun: when ``e`` is this rank's part in another's failure (a broken collective, the timeout,
    torchrun's SIGTERM after a rank exited), raise one line naming the rank that failed first. ``own``: ``e`` is
    this rank's own failure with a message of its own (an I/O error, a bad option), which it reports itself."""
    lost = is_lost_peer(e) or isinstance(e, Terminated)
    if not d.enabled or isinstance(e, Interrupted) or (own and not lost):
        return
    other = failure_elsewhere(d, wait=2.0 if lost else 0.0)
    where = f"rank {d.rank} of {d.world_size} stopped"
    if other is not None:
        raise FinetuneError(f"{where}: {other}") from None
    if is_lost_peer(e):
        raise FinetuneError(
            f"{where}: no answer from the other processes within --dist-timeout {d.timeout:g} s, or one of them is "
            f"gone ({one_line(e, 200)}); the first failure is in their output or torchrun's summary"
        ) from None
