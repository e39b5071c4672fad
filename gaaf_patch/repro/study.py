"""What the two studies (:mod:`.mnist`, :mod:`.depth`) share: how they report progress, pick the device, record the
environment a run ran in, summarise over seeds, and keep ``results.json`` safe to kill and to resume.

A study rewrites its results file after every finished run, so the writer must be atomic (:func:`save`), and a
resumed study must be the same study with the same setup, or its runs would not compare (:func:`load_resumable`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as _data
from .train import EpochLog, StudyError

__all__ = ["Reporter", "device", "require_mnist", "environment", "git_commit", "stats", "save", "load_resumable"]


class Reporter:
    """Progress callbacks of a study's ``run_study``; this one does nothing (the CLI's rich display overrides them)."""

    def start(self, runs: list[Any], done: list[Any], sizes: dict[str, Any], device: str) -> None: ...
    def run_start(self, model: str, seed: int, max_epochs: int) -> None: ...
    def epoch(self, model: str, seed: int, log: EpochLog) -> None: ...
    def run_end(self, model: str, seed: int, run: dict[str, Any]) -> None: ...
    def finish(self, results: dict[str, Any]) -> None: ...


def device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; asking for CUDA without one is an error, not a silent CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise StudyError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudyError(f"--device {name}: no CUDA device is available; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StudyError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return dev


def require_mnist(data_dir: str | None) -> None:
    """The studies never download MNIST (a run on a machine without network would stall or fail half way, and
    would leave a data folder behind): it must be there, or the study stops here, having created nothing."""
    if not _data.mnist_available(data_dir):
        raise StudyError(
            f"MNIST not found under {_data.data_dir(data_dir) / 'MNIST' / 'raw'} (the studies do not download it); "
            f"pass --data-dir DIR or set {_data.ENV} to a directory holding MNIST/raw/*-ubyte (torchvision layout)"
        )


def environment(dev: torch.device) -> dict[str, Any]:
    """What a run's timings depend on besides the code: torch, device, threads, Python, machine (and GPU name)."""
    env = {"torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
           "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def git_commit(where: Path | None = None, short: bool = False) -> str | None:
    """The commit of the checkout ``where`` (default: this library's), ``+dirty`` when tracked files were changed;
    None outside a git checkout. ``short``: the abbreviated hash."""
    where = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", *(["--short"] if short else []), "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def stats(values: list[float | None]) -> dict[str, float]:
    """Mean, sample std and count over the finite values (``None``: a run that has no such number, e.g. diverged)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON: {type(o).__name__}")


def save(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` to ``path`` atomically: a reader (or a crash) sees the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=_json_default, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_resumable(path: Path, study: str, version: int, setup: dict[str, Any]) -> dict[str, Any]:
    """The results in ``path``, if they are ``study``'s (results format ``version``) and were run with ``setup``;
    else a ValueError that names what differs, so the user can rerun with the same flags or another folder."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"cannot resume from {path}: {e}") from e
    if not isinstance(old, dict) or (old.get("study"), old.get("version")) != (study, version):
        raise StudyError(f"{path} is not a results file of the {study} study (version {version}); use another --out")
    before = old.get("setup")
    before = before if isinstance(before, dict) else {}
    differ = sorted(k for k in {*setup, *before} if before.get(k) != setup.get(k))
    if differ:
        raise StudyError(f"cannot resume {path}: it was run with different {', '.join(differ)}; use the same flags "
                         "or another --out")  # fmt: skip
    return old
