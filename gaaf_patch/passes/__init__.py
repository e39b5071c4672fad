"""The passes of ``gaaf_patch.patch``, run in order by :func:`run`.

1. ``dropout``: dropout (and DropPath, if asked) modules become StrippedDropout; ``p`` reads 0 afterwards, so code
   that passes ``self.attn_drop.p`` on to attention stops dropping too.
2. ``functional``: each user module's own code is traced; function and method activations (and functional dropout)
   are rewritten. Also learns which sigmoid-like modules act as gates.
3. ``modules``: activation modules become GAAF, gates left alone in ``activations="auto"``.
4. ``budget``: the auto-gain sites get their per-site energy allowance from the number of sites (gaaf_patch.gain).
5. ``fuse``: a plain BatchNorm feeding an exact-mode GAAF ReLU becomes its recomputing twin (same state), so the
   ReLU saves no extra tensor for backward.

Every pass is a function ``Context -> PatchPassResult`` (:mod:`.result`: PyTorch's ``PassResult`` contract plus
the pass's counts); ``patch`` keeps the results in the model's :class:`PatchRecord` and ``report(model).passes``
lists them. Modules: :mod:`.tracer` (fx tracing of one module's code), :mod:`.rewriter` (the graph rewrite the
Dynamo backend shares), :mod:`.runtime` (the forward a rewritten module runs), :mod:`.gates` (gate detection),
:mod:`.targets` (what the passes match).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import budget, functional, fuse, swap
from .context import RECORD_ATTR, Context, PatchRecord
from .gates import reaches_mul
from .result import PatchPassResult, combine

Pass = Callable[[Context], PatchPassResult]

PASSES: list[Pass] = [swap.run_dropout, functional.run, swap.run_activations, budget.run, fuse.run]

__all__ = [
    "PASSES",
    "Pass",
    "run",
    "undo",
    "Context",
    "PatchRecord",
    "PatchPassResult",
    "RECORD_ATTR",
    "combine",
    "reaches_mul",
]


def run(ctx: Context) -> list[PatchPassResult]:
    """Run every pass in order; returns each pass's result."""
    return [p(ctx) for p in PASSES]


def undo(root: nn.Module, record: PatchRecord | None) -> None:
    for module in root.modules():
        functional.unpatch(module)
    swap.unpatch_modules(root)
    if record is not None:
        swap.undo_attributes(record.attributes)
