"""The deployment check: the fine-tuned weights load into the *unpatched* model and compute what the patched one does.

This is the promise of fine-tuning with GAAF (the patch changes the backward only), checked on the very file that is
shipped: its ``state_dict`` is loaded with ``strict=True`` into a freshly built unpatched model, and the two models'
eval outputs on a held-out batch are compared with :func:`gaaf_patch.verify.compare_outputs`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import GaafError, one_line
from ..models import build_model, load_state_dict_strict
from ..verify import SAWTOOTH_RTOL, compare_outputs
from .loop import Precision, logits_of
from .options import FinetuneOptions

__all__ = ["deploy_check"]

# exact mode on a GPU: two model instances may get different kernels (cuDNN heuristics) for the same convolution,
# so the outputs agree to float32 round-off, not bit for bit
DEVICE_RTOL = 1e-5


def deploy_check(
    opts: FinetuneOptions,
    model: nn.Module,
    num_classes: int | None,
    batch: torch.Tensor,
    precision: Precision,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    output: torch.Tensor | None = None,
    param_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Load ``model``'s weights into a freshly built unpatched ``opts.model`` (``num_classes`` None: as built by
    default) with ``strict=True`` and compare eval outputs on ``batch``: bit for bit in ``exact`` mode on the CPU,
    within ``DEVICE_RTOL`` on a GPU, within the patch check's ``SAWTOOTH_RTOL`` in ``sawtooth`` mode.

    A sharded model (``--fsdp``) gives its gathered ``state_dict`` and its ``output`` on ``batch`` (both computed
    collectively by every rank); ``param_dtype`` is FSDP's mixed-precision parameter dtype, given to the plain
    model's parameters (not its buffers, as FSDP does) so that both compute in the same precision."""
    try:
        plain = build_model(opts.model, num_classes, opts.input_size)
        load_state_dict_strict(plain, model.state_dict() if state_dict is None else state_dict)
    except GaafError as e:  # the weights do not fit the unpatched model (a CheckpointError, normally)
        return {"ok": False, "strict_load": False, "error": one_line(e)}
    plain.to(batch.device).eval()
    if param_dtype is not None:
        for p in plain.parameters():
            p.data = p.data.to(param_dtype)
    model.eval()
    with torch.no_grad(), precision.autocast():
        a = logits_of(plain(batch.to(param_dtype) if param_dtype is not None else batch)).float()
        b = logits_of(model(batch)).float() if output is None else output
    exact = opts.patch is None or opts.patch.get("mode", "exact") == "exact"
    rtol = 0.0 if exact and batch.device.type == "cpu" else DEVICE_RTOL if exact else SAWTOOTH_RTOL
    c = compare_outputs([a], [b], rtol)
    return {
        "ok": c.ok,
        "strict_load": True,
        "bit_identical": c.bit_identical,
        "max_abs_diff": c.max_abs_diff,
        "tolerance": c.tolerance,
        "batch": list(batch.shape),
    }
