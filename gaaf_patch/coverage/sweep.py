"""Run :func:`.check.check` over many models, each under a time limit, and total the results by family.

With a ``timeout`` each model runs in a worker process (``spawn``: torch's thread pools do not survive ``fork``),
reused from model to model; a model that runs past the limit, or kills its worker (out of memory, a crash in native
code), is a failure with that reason and the worker is replaced. ``jobs`` workers run side by side. Without a
timeout the models run in this process, one after another (what the tests do).

A family is *fully patched and verified* when every model of it that was checked passed; families whose models
were all skipped (too large, or not running unpatched) are left out of the rate. The target is
:data:`TARGET` of the families.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .check import DEFAULT_MAX_PARAMS, FAIL, PASS, SKIP, Result, check
from .zoo import Entry

__all__ = ["sweep", "Summary", "summarize", "TARGET", "DEFAULT_MAX_PARAMS"]

TARGET = 0.98
_STARTUP_S = 180.0  # a fresh worker imports torch, torchvision and timm


def _worker(conn: Connection, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        entry, size, max_params = job
        conn.send(check(Entry(*entry), size, max_params).to_dict())


@dataclass
class _Slot:
    proc: Any
    conn: Connection
    entry: Entry | None = None
    deadline: float = 0.0
    index: int = -1


def _start(ctx: Any, threads: int | None) -> _Slot:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, threads), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(_STARTUP_S):
        proc.kill()
        raise RuntimeError("a coverage worker did not start")
    parent.recv()
    return _Slot(proc, parent)


def _stop(slot: _Slot) -> None:
    if slot.proc.is_alive():
        slot.proc.kill()
    slot.proc.join(5)
    slot.conn.close()


def sweep(
    models: Sequence[Entry],
    *,
    size: int | None = 64,
    max_params: int | None = None,
    timeout: float | None = 300.0,
    jobs: int = 1,
    threads: int | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Check every model of ``models``; results in the same order. ``on_result`` sees each one as it finishes."""
    done: list[Result | None] = [None] * len(models)

    def finish(i: int, r: Result) -> None:
        done[i] = r
        if on_result is not None:
            on_result(r)

    if timeout is None:
        for i, e in enumerate(models):
            finish(i, check(e, size, max_params))
        return [r for r in done if r is not None]

    ctx = mp.get_context("spawn")
    todo = deque(enumerate(models))
    slots: list[_Slot] = []
    try:
        # Start the workers before handing out work: a limit must not count another worker's start-up.
        slots += [_start(ctx, threads) for _ in range(min(jobs, len(models)))]
        while todo or any(s.entry for s in slots):
            while todo and (len(slots) < jobs or any(s.entry is None for s in slots)):
                slot = next((s for s in slots if s.entry is None), None)
                if slot is None:
                    slot = _start(ctx, threads)
                    slots.append(slot)
                slot.index, slot.entry = todo.popleft()
                slot.deadline = time.monotonic() + timeout
                slot.conn.send(((slot.entry.source, slot.entry.family, slot.entry.name), size, max_params))
            busy = [s for s in slots if s.entry is not None]
            left = max(0.0, min(s.deadline for s in busy) - time.monotonic())
            ready = wait([s.conn for s in busy], timeout=left)
            for s in busy:
                assert s.entry is not None
                if s.conn in ready:
                    try:
                        finish(s.index, Result.from_dict(s.conn.recv()))
                        s.entry = None
                        continue
                    except (EOFError, OSError):
                        s.proc.join(5)
                        why = f"the worker died (exit code {s.proc.exitcode}; out of memory or a native crash)"
                elif time.monotonic() >= s.deadline:
                    why = f"time limit: over {timeout:g} s"
                else:
                    continue
                finish(s.index, Result(s.entry.source, s.entry.family, s.entry.name, FAIL, why, seconds=timeout))
                _stop(s)
                slots.remove(s)
    finally:
        for s in slots:
            try:
                s.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            _stop(s)
    return [r for r in done if r is not None]


@dataclass
class Summary:
    """Totals by family and by model; ``met``: the share of fully patched families reaches the target."""

    families: dict[str, str] = field(default_factory=dict)  # family id -> pass / fail / skip
    models: dict[str, int] = field(default_factory=dict)  # status -> count
    target: float = TARGET

    @property
    def checked(self) -> int:
        return sum(s != SKIP for s in self.families.values())

    @property
    def passed(self) -> int:
        return sum(s == PASS for s in self.families.values())

    @property
    def rate(self) -> float:
        return self.passed / self.checked if self.checked else 0.0

    @property
    def met(self) -> bool:
        return self.checked > 0 and self.rate >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {
            "families": self.families,
            "models": self.models,
            "families_checked": self.checked,
            "families_passed": self.passed,
            "rate": self.rate,
            "target": self.target,
            "met": self.met,
        }


def summarize(results: Sequence[Result], target: float = TARGET) -> Summary:
    """A family fails if any of its checked models fails, passes if one passed and none failed, else is skipped."""
    s = Summary(target=target)
    for r in results:
        s.models[r.status] = s.models.get(r.status, 0) + 1
        old = s.families.get(r.family_id, SKIP)
        s.families[r.family_id] = FAIL if FAIL in (old, r.status) else PASS if PASS in (old, r.status) else SKIP
    return s
