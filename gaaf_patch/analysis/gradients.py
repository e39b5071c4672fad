"""Gradient information per layer, the paper's eq. 5.

Hahn & Choi measure how much gradient reaches each layer as the mean, over training steps, of the mean absolute
gradient of the layer's weights::

    G_l = 1/T * sum_t  1/|W_l| * sum_{w in W_l} |dL_t / dw|

(their Table 2: about 1e-4 per layer for the tanh MLP without dropout, several times more with dropout or GAAF).
:class:`GradientInfo` computes it while training: a post-accumulate-grad hook on each weight adds
``grad.abs().mean()`` to a running sum on the weight's device, so a step costs one reduction per layer and no
host-device sync; the sum is read only when :meth:`GradientInfo.result` is called. One step is one backward that
reaches the weight (with gradient accumulation over micro-batches, each micro-batch counts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .sites import Hooks, SiteSpec, select

__all__ = ["GradientInfo", "DEFAULT_LAYERS", "weight_layers"]

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module, layers: SiteSpec = None) -> dict[str, Tensor]:
    """``{module name: weight}`` for the chosen layers (default: every Linear and Conv), skipping frozen weights."""
    mods = select(model, DEFAULT_LAYERS if layers is None else layers)
    out = {}
    for name, m in mods.items():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.requires_grad:
            out[name] = w
    if not out:
        raise ValueError(f"layers={layers!r}: none of the chosen modules has a trainable weight")
    return out


class GradientInfo:
    """Eq. 5 per layer, accumulated over the backward passes made while attached.

    >>> with GradientInfo(model) as gi:
    ...     for x, y in batches:
    ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    >>> gi.result()   # {"0": 1.1e-4, "2": 9.0e-5, ...}: layer name -> G_l

    Attach with ``with`` (or :meth:`attach` / :meth:`detach`); detached, it costs nothing. :meth:`reset` starts a
    new average (per epoch, say) while attached.
    """

    def __init__(self, model: nn.Module, layers: SiteSpec = None) -> None:
        self.weights = weight_layers(model, layers)
        self._hooks = Hooks()
        self._sums: dict[str, Tensor] = {}
        self._steps: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self._sums = {n: torch.zeros((), dtype=torch.float64, device=w.device) for n, w in self.weights.items()}
        self._steps = dict.fromkeys(self.weights, 0)

    def _hook(self, name: str):
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self._sums[name] += p.grad.detach().abs().mean()
                self._steps[name] += 1

        return hook

    def attach(self) -> GradientInfo:
        if not len(self._hooks):
            for name, w in self.weights.items():
                self._hooks.add(w.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> GradientInfo:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @property
    def steps(self) -> int:
        """Backward passes seen (the largest count over layers; a layer a step did not reach is not counted)."""
        return max(self._steps.values(), default=0)

    def result(self) -> dict[str, float]:
        """``{layer name: G_l}`` in model order; NaN for a layer no backward reached."""
        return {n: (self._sums[n].item() / k if k else float("nan")) for n, k in self._steps.items()}
