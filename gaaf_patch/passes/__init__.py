"""The passes of ``gaaf_patch.patch``, run in order by :func:`run`.

1. ``dropout``: dropout (and DropPath, if asked) modules become StrippedDropout; ``p`` reads 0 afterwards, so code
   that passes ``self.attn_drop.p`` on to attention stops dropping too.
2. ``functional``: each user module's own code is traced; function and method activations (and functional dropout)
   are rewritten. Also learns which sigmoid-like modules act as gates.
3. ``modules``: activation modules become GAAF, gates left alone in ``activations="auto"``.
4. ``budget``: the auto-gain sites get their per-site energy allowance from the number of sites (gaaf_patch.gain).
5. ``fuse``: a plain BatchNorm feeding an exact-mode GAAF ReLU becomes its recomputing twin (same state), so the
   ReLU saves no extra tensor for backward.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import budget, functional, fuse, swap
from .context import RECORD_ATTR, Context, PatchRecord

PASSES: list[tuple[str, Callable[[Context], int]]] = [
    ("dropout", swap.run_dropout),
    ("functional", functional.run),
    ("modules", swap.run_activations),
    ("budget", budget.run),
    ("fuse", fuse.run),
]

__all__ = ["PASSES", "run", "Context", "PatchRecord", "RECORD_ATTR", "undo"]


def run(ctx: Context) -> dict[str, int]:
    """Run every pass; returns the number of sites each changed."""
    return {name: fn(ctx) for name, fn in PASSES}


def undo(root: nn.Module, record: PatchRecord | None) -> None:
    for module in root.modules():
        functional.unpatch(module)
    swap.unpatch_modules(root)
    if record is not None:
        swap.undo_attributes(record.attributes)
