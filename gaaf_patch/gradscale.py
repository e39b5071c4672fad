"""How much a patch changes a network's gradient scale, measured: ``gaaf_patch.measure_gradient_scale``.

One train-mode forward and backward of the patched model and of its unpatched twin (a deep copy, unpatched) on the
same inputs, with the same random state (dropout draws the same masks), loss = mean of the squared outputs. The
ratios patched / plain of the input-gradient norm and of the parameter-gradient norm say whether the patch keeps
the network's gradient scale: outside ``SAFE`` a training run at the learning rate that suits the plain model may
diverge (paper gain on a deep network) or stall. The models themselves are not touched: both passes run on copies,
so BatchNorm statistics and gradients stay as they were. The result is kept on the patched model, and
``gaaf_patch.report(model).gradient_scale`` shows it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .models import output_tensors
from .passes.context import RECORD_ATTR

__all__ = ["GradientScale", "measure_gradient_scale", "SAFE"]

SAFE = (0.5, 2.0)  # patched / plain gradient-norm ratios a training run absorbs at its usual learning rate


@dataclass(frozen=True)
class GradientScale:
    """Patched / plain gradient-norm ratios from one train-mode step (``nan`` where the plain norm is 0)."""

    input: float
    params: float

    @property
    def safe(self) -> bool:
        lo, hi = SAFE
        return all(lo <= r <= hi for r in (self.input, self.params) if not math.isnan(r))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "safe": self.safe, "range": list(SAFE)}

    def warning(self) -> str | None:
        """One line with the fix when the scale is outside ``SAFE``; None when it is safe."""
        if self.safe:
            return None
        return (
            f"gaaf-patch: the patch scales this model's gradient norm by x{self.input:.3g} (input) and "
            f"x{self.params:.3g} (parameters), outside [{SAFE[0]}, {SAFE[1]}]: training at the plain model's learning "
            "rate may diverge; use the default gain (gain='auto', no shapes='paper') or lower the learning rate"
        )


def _norms(model: nn.Module, inputs: tuple[Any, ...], seed: int) -> tuple[float, float]:
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, Tensor) else x for x in inputs)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outs = [o for o in output_tensors(model(*xs)) if o.is_floating_point() and o.requires_grad]
    if not outs:
        raise ValueError("the model output has no differentiable tensor to measure gradients on")
    loss = sum(o.float().square().mean() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = [x for x in xs if isinstance(x, Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    sq = [0.0, 0.0]
    for i, g in enumerate(grads):
        if g is not None:
            sq[0 if i < len(leaves) else 1] += g.double().square().sum().item()
    return math.sqrt(sq[0]), math.sqrt(sq[1])


def ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return 1.0 if a == 0 else math.nan


def measure_gradient_scale(model: nn.Module, *inputs: Any, seed: int = 0) -> GradientScale:
    """Measure the gradient-norm ratios patched / plain of a patched ``model`` on ``inputs``; kept on the model.

    ``model`` must have been patched with :func:`gaaf_patch.patch`; it is left as it was (both passes run on copies).
    """
    from .api import unpatch  # the verbs import this module's users, not the other way round

    if model.__dict__.get(RECORD_ATTR) is None:
        raise ValueError("measure_gradient_scale takes a model patched with gaaf_patch.patch; patch it first")
    patched = copy.deepcopy(model)
    plain = unpatch(copy.deepcopy(model))
    pi, pp = _norms(patched, inputs, seed)
    qi, qp = _norms(plain, inputs, seed)
    scale = GradientScale(input=ratio(pi, qi), params=ratio(pp, qp))
    model.__dict__[RECORD_ATTR].gradient_scale = scale.to_dict()
    return scale
