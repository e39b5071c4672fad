"""Fine-tuning checkpoints: written atomically, readable by :func:`gaaf_patch.models.read_checkpoint`.

A checkpoint is one ``torch.save``-d dict::

    {"state_dict": ...,        # the model's weights, keys of the *unpatched* model (GAAF modules hold no state)
     "optimizer": ..., "scheduler": ..., "scaler": ...,  # to resume
     "epoch": 3,               # epochs completed
     "rng": {...},             # torch CPU (and CUDA) generator states and Python's, to resume bit for bit
     "gaaf_config": {...},     # the patch configuration (None: trained unpatched), as `gaaf-patch --out` writes it
     "model": "resnet50", "num_classes": 10, "input_size": [3, 224, 224],
     "args": {...}, "history": [{"epoch": 1, "train_loss": ..., "val_acc": ...}, ...],
     "replicas": {"world_size": 2, "digests": [...]}}   # per-rank weight digests (DistributedDataParallel)

Everything in it is a tensor or a plain container, so it loads with ``torch.load(weights_only=True)``: a checkpoint
is data, never code. ``"state_dict"`` comes first in the lookup of ``read_checkpoint``, so the file can be given
back to ``--checkpoint`` (to fine-tune again), to ``--resume``, and to ``gaaf-patch patch --checkpoint``.

Atomic: the file is written next to its destination under a temporary name, flushed to disk, then renamed over it
(``os.replace`` is atomic on POSIX and Windows). An interrupted run leaves the previous checkpoint intact and at
most a stray ``.tmp`` file, never a truncated checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "capture_rng", "restore_rng", "state_digest"]


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def capture_rng() -> dict[str, Any]:
    """The random state a training run consumes: torch's CPU and CUDA generators and Python's ``random`` (timm's
    transforms draw from it). Python's state is stored as a tensor so the checkpoint stays ``weights_only``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng` (CUDA states only when the same number of devices is visible)."""
    torch.set_rng_state(state["torch"])
    py = state.get("python")
    if py is not None:
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state_dict's names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
