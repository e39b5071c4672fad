"""What a benchmark's numbers were measured on, recorded next to them: the machine, the library versions and the
code (commit, and the tracked files changed since, which the commit hash does not show)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import gaaf_patch
from gaaf_patch.repro.study import git_commit as _git_commit

__all__ = ["ROOT", "machine_info", "git_commit", "worktree_changes", "loadavg"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout the benchmarks run from


def git_commit() -> str:
    """The checkout's short commit hash, ``+dirty`` when tracked files were changed; ``""`` outside a checkout."""
    return _git_commit(ROOT, short=True) or ""


def worktree_changes() -> list[str]:
    """``git status --porcelain`` of the tracked files: what the commit hash does not say about the code measured."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return out.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none): how busy the machine was."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, thread counts, versions, commit and load at the start of a run, as ``benchmarks.run`` records them."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import timm
    import torchvision

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "gaaf_patch": gaaf_patch.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "clock": "wall, time.perf_counter",
    }
