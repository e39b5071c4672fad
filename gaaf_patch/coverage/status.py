"""What every coverage check shares: the three outcomes of one model, and DropPath held still while the train-mode
forwards are compared."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..passes import targets

__all__ = ["PASS", "FAIL", "SKIP", "droppath_held"]

PASS, FAIL, SKIP = "pass", "fail", "skip"


@contextlib.contextmanager
def droppath_held(model: nn.Module) -> Iterator[None]:
    """Drop-path (stochastic depth) modules in eval mode: ``strip_dropout`` leaves them (``strip_droppath`` is its
    own option, and the report lists them as kept), so their randomness is not the patch's; any other randomness
    left fails the determinism check."""
    held = [m for m in model.modules() if targets.is_droppath(m) and m.training]
    for m in held:
        m.training = False
    try:
        yield
    finally:
        for m in held:
            m.training = True
