"""The ``budget`` pass: every auto-gain GAAF site of the model gets its energy allowance (gaaf_patch.gain).

``delta = BUDGET^(1/n) - 1`` with ``n`` the calls of GAAF sites in one forward (a module called several times, like
torchvision's shared ``self.relu``, counts once per call its parent's traced code makes; one where no trace saw it),
so that a chain through every site would gain at most ``BUDGET`` in gradient energy if the sites' extra gains were
independent (a design rule; docs/depth.md measures it). Run after the passes that add sites, and again by every
later ``patch`` of the same model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .. import gain
from ..modules import GAAF
from .context import Context
from .result import PatchPassResult
from .scope import scopes

__all__ = ["PASS_NAME", "run", "assign"]

PASS_NAME = "budget"


def assign(root: nn.Module, calls: Mapping[str, int] | None = None) -> int:
    """Set ``delta`` on ``root``'s auto-gain sites from the number of site calls; returns how many sites' ``delta``
    changed (a GAAF module shared by several parents counts once)."""
    calls = calls or {}
    named = [(n, m) for n, m in root.named_modules(remove_duplicate=False) if isinstance(m, GAAF)]
    auto = {id(m): m for _n, m in named if m.delta is not None}
    delta = gain.delta_for(sum(max(1, calls.get(n, 1)) for n, _m in named))
    changed = 0
    for m in auto.values():
        changed += m.delta != delta
        m.delta = delta
    for module in root.modules():  # sites of code patched at run time get the same allowance when they first run
        for scope in scopes(module):
            scope.delta = delta
    return changed


def run(ctx: Context) -> PatchPassResult:
    """Counts ``sites``: auto-gain sites whose allowance changed (none when a second ``patch`` added no site)."""
    n = assign(ctx.root, ctx.calls)
    return PatchPassResult(PASS_NAME, n, {"sites": n}, ctx.root)
