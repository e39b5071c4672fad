"""Sharded fine-tuning past one machine: FSDP2 (``fully_shard``) per block, distributed checkpoints, one-file export.

The order is *patch, then shard*::

    gaaf_patch.patch(model)          # swaps activation modules / records run-time sites on the plain model
    shard(model)                     # fully_shard per block, then the root (the model becomes an FSDPModule)
    ... train ...
    save_sharded(model, optimizer, {"step": step}, "ckpt")   # every rank writes its shards; atomic directory
    state = export_state_dict(model)  # rank 0: one plain state_dict for the *unpatched* model

Why this order: ``fully_shard`` replaces every parameter by a ``DTensor`` shard and swaps the model's class for a
dynamic ``FSDP<Class>``; the patch's passes read module classes, trace forwards and may swap modules, which must
happen while the modules are the ones the user wrote. GAAF modules hold no parameters, so sharding after the patch
moves nothing of GAAF's, and the report (kept in the root's ``__dict__``) survives the wrap. Patching an already
sharded model is refused by :func:`check_not_sharded` with a message that says to patch first.

Checkpoints use ``torch.distributed.checkpoint`` (DCP): each rank writes its own shards, in parallel, and a resume may
run under the same world size bit for bit (the per-rank random states are saved next to the shards). The directory is
published atomically: written to ``DIR.tmp-<pid>`` (rank 0's pid), then renamed over ``DIR``; a save killed at any
moment leaves the previous checkpoint loadable (see :func:`save_sharded`). Multi-node runs need ``DIR`` on a file
system every node sees.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..config import PatchError
from ..errors import GaafError
from .checkpoint import capture_rng, restore_rng

__all__ = [
    "ShardError",
    "shard",
    "default_blocks",
    "check_not_sharded",
    "save_sharded",
    "load_sharded",
    "export_state_dict",
]

# Containers whose children are the repeated blocks: timm (``blocks``, ``stages``, ResNet's ``layer1..4``, Swin's
# ``layers``) and transformers (Llama ``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``, T5
# ``encoder.block``). The outermost match wins: timm's ``stages.0.blocks`` is sharded as part of ``stages.0``.
BLOCK_CONTAINERS = ("blocks", "stages", "layers", "layer1", "layer2", "layer3", "layer4", "h", "layer", "block")

_TMP, _OLD, _STEP_STATE = ".tmp-", ".old-", "step_state.pt"


class ShardError(GaafError, RuntimeError):
    """Sharding or a sharded checkpoint was asked for in a way that cannot work; the message says what to do."""


def check_not_sharded(model: nn.Module) -> None:
    """Refuse to patch a model ``fully_shard`` has already wrapped (the model or any submodule).

    Its parameters are DTensor shards and its class is a generated ``FSDP<Class>``: the passes would see neither
    the classes nor the forwards the user wrote. Patching first costs nothing, so that is what the message asks.
    """
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            where = "the model" if not name else f"submodule {name!r}"
            raise PatchError(
                f"{where} is already sharded with fully_shard (FSDP2); call gaaf_patch.patch(model) before "
                "fully_shard / gaaf_patch.finetune.fsdp.shard"
            )


def default_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules :func:`shard` wraps one by one: the children (with parameters) of the outermost ``nn.Sequential``
    / ``nn.ModuleList`` named in :data:`BLOCK_CONTAINERS`. A model with none of them gets only the root wrapped,
    which is plain ZeRO-3 over the whole model: correct, with less overlap of communication and compute."""
    found: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(module, (nn.Sequential, nn.ModuleList)):
            taken.append(name)
            for child_name, child in module.named_children():
                if any(True for _ in child.parameters()):
                    found.append((f"{name}.{child_name}", child))
    return found


def shard(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    blocks: Iterable[nn.Module] | None = None,
    mesh: Any = None,
) -> nn.Module:
    """``fully_shard`` each block (``blocks``, default :func:`default_blocks`), then the root; returns ``model``.

    Call it on every rank after ``init_process_group`` and after ``gaaf_patch.patch``, before building the optimizer
    (which must see the sharded parameters). ``reshard_after_forward=False`` keeps the gathered weights from forward
    to backward: one all-gather less per block, a whole unsharded model's memory more. ``mesh`` defaults to a 1-D
    mesh over all ranks on the device type of the model's parameters (gloo on CPU, nccl on CUDA).
    """
    if not _initialized():
        raise ShardError("shard needs a process group: run under torchrun and call dist.init_process_group first")
    if isinstance(model, FSDPModule):
        raise ShardError("the model is already sharded; call shard once, on the plain (patched) model")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    chosen = [m for _, m in default_blocks(model)] if blocks is None else list(blocks)
    for block in chosen:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ----------------------------------------------------------------------------------------------------- checkpoints


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(fn: Any, state: dict[str, Any], path: Path) -> None:
    """``dcp.save`` / ``dcp.load``; in one process without a process group too (DCP's warning about it is noise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path, no_dist=not _initialized())


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _distributed() -> bool:
    return _initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resolve(directory: Path) -> Path | None:
    """The complete checkpoint at ``directory``: itself, or the previous one a save killed between its two renames
    left at ``DIR.old-<pid>`` (the newest such, if several)."""
    if (directory / ".metadata").is_file():
        return directory
    olds = sorted(directory.parent.glob(directory.name + _OLD + "*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if (p / ".metadata").is_file()]
    return olds[-1] if olds else None


def _move(src: Path, dst: Path) -> None:
    os.rename(src, dst)  # one place, so a test can stop a save between the two renames of _publish


def _publish(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by ``tmp``. ``rename`` cannot replace a non-empty directory, so the old one steps aside
    first; a kill between the two renames leaves it complete at ``DIR.old-<pid>``, which :func:`load_sharded`
    finds. Stale ``.tmp-``/``.old-`` leftovers of killed saves are removed once the new checkpoint is in place."""
    old = None
    if directory.exists():
        old = directory.with_name(directory.name + _OLD + str(os.getpid()))
        _move(directory, old)
    _move(tmp, directory)
    for stale in directory.parent.glob(directory.name + ".*-*"):
        if stale.name.startswith(directory.name + _TMP) or stale.name.startswith(directory.name + _OLD):
            shutil.rmtree(stale, ignore_errors=True)


def save_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step_state: Mapping[str, Any],
    directory: str | os.PathLike,
) -> Path:
    """Write model and optimizer shards (DCP), ``step_state`` (rank 0) and each rank's random state to ``directory``.

    Collective: every rank calls it. The files go to ``DIR.tmp-<pid of rank 0>`` first; after every rank has
    written, rank 0 renames it over ``DIR``. Until then ``DIR`` is the previous checkpoint, untouched. ``step_state``
    holds plain values (``{"step": 12, "epoch": 3}``) and is read back with ``torch.load(weights_only=True)``.
    """
    directory = Path(directory).absolute()
    tmp = Path(_broadcast(str(directory.with_name(directory.name + _TMP + str(os.getpid())))))
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    _dcp(dcp.save, state, tmp)
    torch.save({"rng": capture_rng()}, tmp / f"rng-rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(dict(step_state), tmp / _STEP_STATE)
    _barrier()  # every rank's files are in tmp
    if _rank() == 0:
        _publish(tmp, directory)
    _barrier()  # nobody returns (and maybe loads) before DIR is the new checkpoint
    return directory


def load_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: str | os.PathLike,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Load what :func:`save_sharded` wrote into ``model`` (sharded or not) and ``optimizer``, in place; returns the
    ``step_state``. Collective. With ``rng`` each rank's random state is restored too (same world size required for
    a bit-exact resume; shards themselves re-shard to any world size)."""
    requested = Path(directory).absolute()
    found = _resolve(requested)
    if found is None:
        raise ShardError(f"no sharded checkpoint at {requested} (no .metadata; was it written by save_sharded?)")
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        _dcp(dcp.load, state, found)
        set_model_state_dict(model, state["model"])
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
        _dcp(dcp.load, state, found)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if rng:
        mine = found / f"rng-rank{_rank()}.pt"
        if not mine.is_file():
            raise ShardError(f"{found} has no random state for rank {_rank()}: resume with the world size it was saved "
                             "with, or pass rng=False")  # fmt: skip
        restore_rng(torch.load(mine, weights_only=True)["rng"])
    return torch.load(found / _STEP_STATE, weights_only=True)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """One full, unsharded ``state_dict`` on the CPU with the plain model's keys, on rank 0 (other ranks get ``{}``).

    Collective (it all-gathers the shards). GAAF modules hold no state and ``fully_shard`` keeps the names, so the
    result loads with ``strict=True`` into the model built without gaaf-patch and without FSDP.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
