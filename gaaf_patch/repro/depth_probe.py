"""The depth study's gradient probe (:mod:`.depth`): how much a GAAF patch scales the gradient at each stage.

On a fixed training batch, the norm of the cross-entropy's gradient at the output of ``layer1`` ... ``layer4`` and
over all parameters, patched over unpatched on the same weights. The whole-network version of this ratio is
:func:`gaaf_patch.measure_gradient_scale`; per stage it shows where along the depth a paper-gain patch compounds.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import unpatch
from ..gradscale import ratio
from .depth_setup import STAGES

__all__ = ["stage_ratios"]


def _stage_norms(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    outputs: dict[str, Tensor] = {}
    hooks = [getattr(model, s).register_forward_hook(lambda m, i, o, s=s: outputs.__setitem__(s, o)) for s in STAGES]
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss = F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [outputs[s] for s in STAGES] + params, allow_unused=True)
    norms = {s: g.double().norm().item() for s, g in zip(STAGES, grads, strict=False)}
    norms["params"] = math.sqrt(sum(g.double().square().sum().item() for g in grads[len(STAGES) :] if g is not None))
    return norms


def stage_ratios(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Patched / unpatched gradient-norm ratios of the cross-entropy on ``(x, y)`` at the output of each stage and
    over all parameters, for ``model``'s current weights. Train mode (batch statistics), on copies: the model's
    BatchNorm statistics and gradients stay as they were."""
    a = _stage_norms(copy.deepcopy(model), x, y)
    b = _stage_norms(unpatch(copy.deepcopy(model)), x, y)
    return {k: ratio(a[k], b[k]) for k in a}
