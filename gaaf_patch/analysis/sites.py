"""Which modules a probe watches, and one pass of a model over a data set.

A probe attaches hooks to *sites*: modules whose input (net values) or output (node values) it records. Sites are
chosen the same way in every probe, so a patched and an unpatched model are measured at the same places:

- ``"activations"`` (the default): GAAF modules and the activation modules gaaf-patch knows (``nn.Tanh``,
  ``nn.ReLU``, ...), that is the sites before a patch and the sites after it;
- ``"gaaf"``: GAAF modules only;
- a module class or a tuple of classes (``nn.Linear``);
- names: a list of qualified module names (``["1", "3"]``), in the model's order;
- a callable ``(name, module) -> bool``.

Activations called as functions (``torch.tanh(x)`` in a ``forward``) are not modules, so hooks cannot see them;
``gaaf_patch.patch`` turns them into GAAF modules, which ``"gaaf"`` then finds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import GAAF

__all__ = ["SiteSpec", "ACTIVATION_MODULES", "select", "forward_over", "Hooks"]

SiteSpec = str | type | tuple | Sequence[str] | Callable[[str, nn.Module], bool] | None

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign, GAAF,
)  # fmt: skip


def select(model: nn.Module, sites: SiteSpec = "activations") -> dict[str, nn.Module]:
    """The modules of ``model`` that ``sites`` names, as ``{qualified name: module}`` in the model's order.

    Raises ``ValueError`` when nothing matches (a probe over no site is a mistake, not an empty result) or when a
    name is not in the model.
    """
    named = dict(model.named_modules())
    if sites is None or sites == "activations":
        found = {n: m for n, m in named.items() if isinstance(m, ACTIVATION_MODULES)}
    elif sites == "gaaf":
        found = {n: m for n, m in named.items() if isinstance(m, GAAF)}
    elif isinstance(sites, type) or (isinstance(sites, tuple) and all(isinstance(t, type) for t in sites)):
        found = {n: m for n, m in named.items() if isinstance(m, sites)}
    elif callable(sites):
        found = {n: m for n, m in named.items() if sites(n, m)}
    elif isinstance(sites, str):
        raise ValueError(f"sites={sites!r}: expected 'activations', 'gaaf', a module class, names or a callable")
    else:
        names = list(sites)
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"no module named {missing} in the model")
        order = {n: i for i, n in enumerate(named)}
        found = {n: named[n] for n in sorted(names, key=order.__getitem__)}
    if not found:
        raise ValueError(f"sites={sites!r} matches no module of {type(model).__name__}")
    return found


class Hooks:
    """Hook handles that are removed together; a probe owns one, so leaving its ``with`` block leaves no hook."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)


@contextmanager
def _eval(model: nn.Module, train: bool) -> Iterator[None]:
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def forward_over(
    model: nn.Module,
    inputs: Tensor | Iterable[Any],
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    train: bool = False,
) -> int:
    """Run ``model`` over a data set without gradients, in eval mode unless ``train`` (restored afterwards), so that
    attached probes see every sample once. ``inputs``: one tensor (batched here) or an iterable of batches (tensors,
    or tuples whose first item is the input). Returns the number of samples."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(inputs, Tensor):
        batches: Iterable[Any] = inputs.split(batch_size)
    else:
        batches = inputs
    n = 0
    with _eval(model, train):
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device, non_blocking=True))
            n += len(x)
    return n
