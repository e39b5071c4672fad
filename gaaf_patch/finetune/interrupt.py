"""Stopping a run from outside: Ctrl-C (SIGINT) and SIGTERM take the same path, and say where to resume from.

Python turns SIGINT into ``KeyboardInterrupt``; SIGTERM (``kill``, a batch scheduler's time limit, ``docker stop``)
ends the process at once by default, with no message and possibly in the middle of a checkpoint write. Within
:func:`handle_interrupts` SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so every cleanup that handles
Ctrl-C (the atomic write removing its temporary file, the loader stopping its workers) handles it too.
:func:`gaaf_patch.finetune.finetune` re-raises either as :class:`Interrupted`, which knows the last checkpoint.

Two details make this hold when the signal goes to the whole process group (a terminal's Ctrl-C, ``docker stop``,
a scheduler), loader workers included:

- a worker stops on SIGTERM as on SIGINT, quietly (:func:`quiet_worker`, the loaders' ``worker_init_fn``): PyTorch's
  own SIGTERM handler kills it, and the main process then sees a crashed worker (``RuntimeError: DataLoader worker
  ... is killed by signal``) instead of the termination;
- the handler records the signal (:func:`received`), because an exception raised where Python cannot propagate it
  (a ``__del__``, the after-fork hooks that run while the loader starts its workers) is printed and dropped: the
  run then still ends as interrupted (:func:`raise_if_received`, and the error that follows is read as the
  interrupt's), and after an interrupt such dropped exceptions, and those of threads that served the stopped
  workers (``multiprocessing``'s resource sharer), are not printed either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Terminated", "Interrupted", "handle_interrupts", "received", "raise_if_received", "quiet_worker"]

_received: list[int] = []  # the signals the handler saw since handle_interrupts was entered
_owner = [0]  # the process that entered handle_interrupts (its forked children inherit the handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (see :func:`handle_interrupts`)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM. ``checkpoint`` is the last good checkpoint to ``--resume`` from (None:
    none was written yet), ``epoch`` the epochs it holds; ``signum`` is the signal, ``exit_code`` the shell's
    ``128 + signum`` (130, 143)."""

    def __init__(self, signum: int, checkpoint: Path | None, epoch: int, epochs: int) -> None:
        super().__init__(signum, checkpoint, epoch, epochs)
        self.signum, self.checkpoint, self.epoch, self.epochs = signum, checkpoint, epoch, epochs

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        what = "interrupted" if self.signum == signal.SIGINT else f"terminated ({signal.Signals(self.signum).name})"
        if self.checkpoint is None:
            return f"{what}; no checkpoint was written (none is written before the first epoch ends)"
        return (
            f"{what}; the last checkpoint is {self.checkpoint}: continue with --resume {self.checkpoint} "
            f"(it holds epoch {self.epoch} of {self.epochs})"
        )


def _on_signal(signum: int, frame) -> None:
    if os.getpid() != _owner[0]:  # a forked child (a loader worker starting up) inherited this: leave quietly
        os._exit(128 + signum)
    _received.append(signum)
    raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt


def received() -> int | None:
    """The first SIGINT or SIGTERM that arrived in the current :func:`handle_interrupts` block (None: none), also when
    the exception it raised was dropped."""
    return _received[0] if _received else None


def raise_if_received() -> None:
    """Raise the interrupt a signal asked for, if Python dropped its exception (see the module docstring)."""
    signum = received()
    if signum is not None:
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt


def quiet_worker(worker_id: int) -> None:
    """A loader's ``worker_init_fn``: SIGTERM ends the worker as Ctrl-C does (PyTorch's workers leave quietly on
    ``KeyboardInterrupt``), and the main process takes the termination from its own SIGTERM. (Before this runs, a
    worker has the handler it was forked with, which ends a child at once and silently.)"""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt``, both recorded for
    :func:`received`. Only in the main thread (elsewhere signal handlers cannot be set, and the block runs as it
    would without this); SIGINT only where Python's own handler is in place (an ignored SIGINT, as in a background
    job, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    _owner[0] = os.getpid()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    hooks = (sys.unraisablehook, sys.excepthook, threading.excepthook)

    def quiet(hook):
        def quiet_after_interrupt(*args) -> None:
            if not _received:  # after an interrupt: the loader's teardown racing its stopped workers, no news
                hook(*args)

        return quiet_after_interrupt

    sys.unraisablehook, sys.excepthook, threading.excepthook = (quiet(h) for h in hooks)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook, sys.excepthook, threading.excepthook = hooks
        _received.clear()
