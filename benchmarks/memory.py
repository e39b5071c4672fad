"""Memory probes for the benchmarks, deterministic where timing is not: the peak of one training step and the bytes
autograd keeps for backward.

- :func:`peak_step_bytes`: glibc ``mallinfo2()`` (bytes in use, heap + mmap) sampled before and after every ATen op
  of the step by a ``TorchDispatchMode``, minus the bytes in use when the step starts, plus the bytes of the
  parameters, buffers and optimizer state. ``None`` where mallinfo2 is missing (not glibc).
- :func:`saved_storages` / :func:`saved_bytes`: the distinct non-parameter storages that
  ``torch.autograd.graph.saved_tensors_hooks`` sees packed in a forward: the activation memory. The tests use the
  same probe to check that a patch keeps no more than the plain model.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from benchmarks.workloads import Runner

__all__ = ["saved_storages", "saved_bytes", "static_bytes", "peak_step_bytes"]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


_IN_USE = _mallinfo()


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def saved_storages(model: nn.Module, forward: Callable[[], Any]) -> dict[int, int]:
    """data_ptr -> bytes of every distinct non-parameter storage autograd keeps for backward while ``forward()``
    runs ``model`` (parameters and buffers are excluded: they are kept whatever the patch does)."""
    params = _storages([*model.parameters(), *model.buffers()])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return seen


def saved_bytes(runner: Runner) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one training forward."""
    return sum(saved_storages(runner.model, runner.fwd).values())


def static_bytes(runner: Runner) -> int:
    """Bytes of the parameters, buffers and optimizer state: what a step holds besides its activations."""
    m = runner.model
    tensors = [*m.parameters(), *m.buffers()]
    for state in runner.opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(_storages(tensors).values())


def peak_step_bytes(runner: Runner) -> int | None:
    """Peak bytes in use during one training step (see the module docstring), or None without mallinfo2."""
    if _IN_USE is None:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    in_use = _IN_USE

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.peak = max(self.peak, in_use())
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    runner.opt.zero_grad(set_to_none=True)
    gc.collect()
    start = in_use()
    mode = Peak()
    mode.peak = start
    with mode:
        runner.step()
    return mode.peak - start + static_bytes(runner)
