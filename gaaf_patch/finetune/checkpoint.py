"""Fine-tuning checkpoints: written atomically, readable by :func:`gaaf_patch.models.read_checkpoint`.

A checkpoint is one ``torch.save``-d dict::

    {"state_dict": ...,        # the model's weights, keys of the *unpatched* model (GAAF modules hold no state)
     "optimizer": ..., "scheduler": ..., "scaler": ...,  # to resume
     "epoch": 3,               # epochs completed
     "steps_per_epoch": 22,    # optimizer steps per epoch (the learning-rate schedule's unit)
     "rng": {...},             # torch CPU (and CUDA) generator states, Python's and NumPy's, to resume bit for bit
     "gaaf_config": {...},     # the patch configuration (None: trained unpatched), as `gaaf-patch --out` writes it
     "model": "resnet50", "num_classes": 10, "input_size": [3, 224, 224], "data_source": "digits",
     "args": {...}, "history": [{"epoch": 1, "train_loss": ..., "val_acc": ...}, ...],
     "replicas": {"world_size": 2, "digests": [...]}}   # per-rank weight digests (DistributedDataParallel)

Everything in it is a tensor or a plain container, so it loads with ``torch.load(weights_only=True)``: a checkpoint
is data, never code. ``"state_dict"`` comes first in the lookup of ``read_checkpoint``, so the file can be given
back to ``--checkpoint`` (to fine-tune again), to ``--resume``, and to ``gaaf-patch patch --checkpoint``.

Atomic: the file is written next to its destination under a temporary name (:func:`temp_path`), flushed and
fsync-ed, then renamed over it (``os.replace`` is atomic on POSIX and Windows). An interrupted write leaves the
previous file intact; only a process killed outright (SIGKILL, a power cut) can leave its temporary file behind,
and :func:`remove_stray_temps` deletes those (and only those: the name pattern is this module's) at the next start.
The temporary file is created with ``os.open(..., 0o666)``, so the umask applies as for any new file (``tempfile``
would make it 0600); a file that is replaced keeps its permissions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save",
    "temp_path",
    "stray_temps",
    "remove_stray_temps",
    "check_writable",
    "capture_rng",
    "restore_rng",
    "seeded",
    "state_digest",
]

_TEMP_SUFFIX = ".tmp"
_TEMP_TOKEN = re.compile(r"[a-z0-9_]{8}")  # ours are 8 hex digits; tempfile's (older versions of this module) match too


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name next to ``path``: ``.NAME.XXXXXXXX.tmp`` (hidden, 8 random hex digits)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def stray_temps(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files :func:`atomic_save` may have left next to ``path`` (nothing else matches)."""
    path = Path(path)
    prefix = f".{path.name}."
    folder = path.parent
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        name = p.name
        if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
            token = name[len(prefix) : -len(_TEMP_SUFFIX)]
            if _TEMP_TOKEN.fullmatch(token) and p.is_file() and not p.is_symlink():
                found.append(p)
    return sorted(found)


def remove_stray_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete what :func:`stray_temps` finds (the leftovers of a killed write); returns what was removed."""
    removed = []
    for p in stray_temps(path):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _create(tmp: Path, mode: int) -> int:
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    """A new temporary file next to ``path``, opened for writing: ``(descriptor, name)``."""
    while True:
        tmp = temp_path(path)
        try:
            return _create(tmp, mode), tmp
        except FileExistsError:  # 2^-32 per try
            continue


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise ``OSError`` unless a file can be created next to ``path`` (what :func:`atomic_save` will need): the
    folder exists, is writable and is not on a read-only file system. Creating a file is the only test that is right
    for root, ACLs and read-only mounts alike; it is removed at once."""
    fd, tmp = _create_temp(Path(path), 0o600)
    os.close(fd)
    tmp.unlink(missing_ok=True)


def _cause(e: BaseException) -> BaseException | None:
    """The interrupt or I/O error behind ``e``: torch's zip writer turns an exception raised in the middle of a
    write (Ctrl-C, ENOSPC) into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, with the
    real one only as its context."""
    seen: set[int] = set()
    cur: BaseException | None = e
    found = None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, KeyboardInterrupt):
            return cur
        if found is None and isinstance(cur, OSError):
            found = cur
        cur = cur.__cause__ or cur.__context__
    return found


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder, fsync and a rename.

    On any failure the temporary file is removed and ``path`` is as it was. An interrupt (``KeyboardInterrupt``) or
    an ``OSError`` in the middle of torch's writer is re-raised as itself, not as torch's ``RuntimeError``.
    """
    path = Path(path)
    try:
        keep: int | None = stat.S_IMODE(path.stat().st_mode)  # replacing a file: keep its permissions, as open() would
    except FileNotFoundError:
        keep = None  # a new file: 0666 less the umask, as open() would
    tmp = None
    try:
        fd, tmp = _create_temp(path, 0o666 if keep is None else keep)
        with os.fdopen(fd, "wb") as f:
            if keep is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), keep)  # the umask must not narrow the permissions of a file being replaced
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = _cause(e)
        if cause is not None and cause is not e:
            raise cause from None
        raise
    _fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------------------------------- random state


def capture_rng() -> dict[str, Any]:
    """The random state a training run consumes: torch's CPU and CUDA generators, Python's ``random`` (timm's
    transforms draw from it) and NumPy's global generator. Python's and NumPy's states are stored as tensors so the
    checkpoint stays ``weights_only``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
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
    npst, np = state.get("numpy"), _numpy()
    if npst is not None and np is not None:
        keys = npst["keys"].numpy().astype("uint32")
        np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def seeded(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Seed torch (CPU and ``devices``), Python's ``random`` and NumPy with ``seed`` for the block, and give the
    caller's states back after it: two runs with the same seed draw the same numbers, whatever ran before."""
    np = _numpy()
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    with torch.random.fork_rng(devices=[dev for dev in devices if dev.type == "cuda"]):
        torch.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def _numpy():
    try:
        import numpy
    except ImportError:  # torch runs without NumPy; nothing of ours then draws from it
        return None
    return numpy


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state_dict's names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
