"""The public verbs: ``patch``, ``unpatch``, ``report`` (in report.py)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from . import passes
from .config import PatchError, ShapeLike, build
from .ops import DEFAULT_K
from .passes.context import RECORD_ATTR, Context, PatchRecord

__all__ = ["patch", "unpatch", "PatchError"]


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise PatchError(f"gaaf_patch.patch takes an nn.Module, not {type(model).__name__}")
    wrapped = None
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        wrapped = f"{type(model).__name__}; patch model.module before wrapping it"
    elif type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
        wrapped = "torch.compile'd; patch the model before torch.compile, or use gaaf_patch.compile(model)"
    if wrapped:
        raise PatchError(f"the model is {wrapped}")


def patch(
    model: nn.Module,
    *,
    activations: str | Sequence[str] = "auto",
    shapes: str | Mapping[str, ShapeLike] | None = None,
    gain: str | None = None,
    strip_dropout: bool = False,
    strip_droppath: bool = False,
    mode: str = "exact",
    K: float = DEFAULT_K,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace ``model``'s activations by GAAF activations, in place; returns ``model``.

    The model keeps its class, methods, attributes and ``state_dict`` keys. ``activations``: ``"auto"`` (every
    activation but gates), ``"all"``, or names. ``shapes``: overrides keyed by activation name or module-name pattern
    (``{"relu": "relu_keras", "layer4.*": my_fn}``), or a preset: ``"auto"`` (default) or ``"paper"``. ``gain``:
    ``"auto"`` (default: the depth-safe blend of :mod:`gaaf_patch.gain`, which keeps a deep network's gradient scale)
    or ``"paper"`` (``phi' + s``, whose gain compounds with depth); ``shapes="paper"`` is ``gain="paper"``.
    ``filter_fn(module, name)`` picks sites. Patching twice changes nothing more; ``unpatch`` undoes it. Sites that
    could not be rewritten are in ``report(model).unreached`` and produce one warning; what each pass did is in
    ``report(model).passes``.
    """
    _check_model(model)
    config = build(
        activations, shapes, gain, strip_dropout=strip_dropout, strip_droppath=strip_droppath, mode=mode, K=K
    )
    record: PatchRecord | None = model.__dict__.get(RECORD_ATTR)
    if record is None:
        record = PatchRecord.for_config(config)
    ctx = Context(
        model, config, filter_fn, gates=set(record.gates), traced=set(record.traced), calls=dict(record.calls)
    )
    results = passes.run(ctx)
    _check_patterns(ctx)
    model.__dict__[RECORD_ATTR] = record
    record.absorb(ctx, results)
    if ctx.unreached:
        names = ", ".join(u["name"] for u in ctx.unreached[:4]) + (" ..." if len(ctx.unreached) > 4 else "")
        warnings.warn(
            f"gaaf-patch: {len(ctx.unreached)} activation/dropout site(s) could not be patched ({names}); "
            "see gaaf_patch.report(model).unreached",
            stacklevel=2,
        )
    return model


def _check_patterns(ctx: Context) -> None:
    """A per-layer shape pattern that matched nothing is a typo, not a choice."""
    from fnmatch import fnmatchcase

    names = [m.site.name for m in ctx.root.modules() if getattr(m, "site", None) is not None]
    for key in ctx.config.pattern_keys():
        if not any(fnmatchcase(n, key) for n in names):
            raise PatchError(
                f"shapes key {key!r} is neither an activation name nor a pattern matching a patched site; "
                f"site names look like {names[0] if names else '<none patched>'!r}"
            )


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original activations and dropout in place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise PatchError(f"gaaf_patch.unpatch takes an nn.Module, not {type(model).__name__}")
    record = model.__dict__.pop(RECORD_ATTR, None)
    passes.undo(model, record)
    return model
