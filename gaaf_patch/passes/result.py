"""What one pass did: the contract every pass of ``gaaf_patch.patch`` and of the Dynamo backend follows.

PyTorch's ``torch.fx.passes.infra.pass_base.PassResult`` is ``(graph_module, modified)``. A GAAF pass changes a
whole model (modules swapped, forwards rewritten, BatchNorm classes switched), so it answers with the same two
facts plus what it counted: ``changed`` (the sites it changed; ``modified`` is ``changed > 0``, so it stays
honest) and ``counts`` (the same by kind: ``{"activations": 3, "dropout": 1}``). The pass manager (``passes.run``
for ``patch``, :class:`gaaf_patch.backend.GAAFPass` for ``torch.compile``) keeps each result in the patch record,
and ``gaaf_patch.report(model).passes`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["PatchPassResult", "combine"]


@dataclass(frozen=True)
class PatchPassResult:
    """The result of one run of one pass. ``counts`` holds changes only, so results of two runs add up: a second
    ``patch`` of the same model changes nothing more and adds zeros."""

    name: str
    changed: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    # The module the pass ran on, as in PassResult; the patch record keeps results without it (see ``detached``).
    graph_module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def modified(self) -> bool:
        return self.changed > 0

    def pass_result(self) -> PassResult:
        """PyTorch's form, for code that drives passes with ``torch.fx.passes.infra``."""
        return PassResult(self.graph_module, self.modified)

    def detached(self) -> PatchPassResult:
        """The same result without the module: what a record keeps (no reference cycle, nothing heavy to pickle)."""
        return replace(self, graph_module=None)

    def __add__(self, other: PatchPassResult) -> PatchPassResult:
        if other.name != self.name:
            raise ValueError(f"cannot add the results of passes {self.name!r} and {other.name!r}")
        counts = dict(self.counts)
        for key, n in other.counts.items():
            counts[key] = counts.get(key, 0) + n
        return PatchPassResult(self.name, self.changed + other.changed, counts, self.graph_module)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modified": self.modified, "changed": self.changed, "counts": dict(self.counts)}


def combine(results: Iterable[PatchPassResult]) -> list[PatchPassResult]:
    """One result per pass name (in order of first appearance): the runs of each pass added up."""
    totals: dict[str, PatchPassResult] = {}
    for r in results:
        totals[r.name] = totals[r.name] + r if r.name in totals else r
    return list(totals.values())
