"""The ``budget`` pass: every auto-gain GAAF site of the model gets its energy allowance (gaaf_patch.gain).

``delta = BUDGET^(1/n) - 1`` with ``n`` the GAAF sites in the module tree (a module called several times, like
torchvision's shared ``self.relu``, counts once), so a chain through every site gains at most ``BUDGET`` in
gradient energy. Run after the passes that add sites, and again by every later ``patch`` of the same model.
"""

from __future__ import annotations

from torch import nn

from .. import gain
from ..modules import GAAF
from .context import Context

__all__ = ["run", "assign"]


def assign(root: nn.Module) -> int:
    """Set ``delta`` on ``root``'s auto-gain sites from the number of sites; returns how many were set."""
    sites = [m for m in root.modules() if isinstance(m, GAAF)]
    auto = [m for m in sites if m.delta is not None]
    delta = gain.delta_for(len(sites))
    for m in auto:
        m.delta = delta
    return len(auto)


def run(ctx: Context) -> int:
    return assign(ctx.root)
