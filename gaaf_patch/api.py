"""The public verbs: ``patch``, ``unpatch``, ``report`` (in report.py)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from . import passes
from .config import PatchConfig, PatchError, ShapeLike, build
from .ops import DEFAULT_K
from .passes.context import RECORD_ATTR, Context, PatchRecord
from .snapshot import Snapshot

__all__ = ["patch", "unpatch", "PatchError"]

OPTIONS_ATTR = "_gaaf_options"  # the last patch call's options (see _Options)


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
    from .finetune.fsdp import check_not_sharded  # lazy: gaaf_patch.finetune imports this module

    check_not_sharded(model)


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
    ``filter_fn(module, name)`` picks sites. ``unpatch`` undoes it. Sites that could not be rewritten are in
    ``report(model).unreached`` and produce one warning; what each pass did is in ``report(model).passes``.

    All or nothing: options are checked before anything changes, and if a pass raises anyway (a ``filter_fn`` that
    throws, a ``shapes`` pattern that matches no site) the model is put back exactly as it was (modules, instance
    attributes, classes, the patch record) before the error propagates.

    Patching an already patched model with the same options (the same ``filter_fn`` object too) patches only what
    is new, so a second identical call changes nothing. With other options it re-patches: the model is unpatched,
    then patched with the new options, and ``report(model).config`` always describes the model as it is. A model
    copied by pickling does not know its ``filter_fn`` any more, and is always re-patched.
    """
    _check_model(model)
    if filter_fn is not None and not callable(filter_fn):
        raise PatchError(
            f"filter_fn must be a callable filter_fn(module, name) -> bool, not {type(filter_fn).__name__}"
        )
    config = build(
        activations, shapes, gain, strip_dropout=strip_dropout, strip_droppath=strip_droppath, mode=mode, K=K
    )
    snapshot = Snapshot(model)
    try:
        ctx = _apply(model, config, filter_fn)
    except BaseException:  # an interrupt too: never leave a half-patched model
        snapshot.restore()
        raise
    if ctx.unreached:
        names = ", ".join(u["name"] for u in ctx.unreached[:4]) + (" ..." if len(ctx.unreached) > 4 else "")
        warnings.warn(
            f"gaaf-patch: {len(ctx.unreached)} activation/dropout site(s) could not be patched ({names}); "
            "see gaaf_patch.report(model).unreached",
            stacklevel=2,
        )
    return model


def _apply(model: nn.Module, config: PatchConfig, filter_fn: Callable[[nn.Module, str], bool] | None) -> Context:
    """Run the passes (after unpatching, when the model was patched with other options); record what they did."""
    record: PatchRecord | None = model.__dict__.get(RECORD_ATTR)
    if record is not None and not _same_options(model, config, filter_fn):
        unpatch(model)
        record = None
    if record is None:
        record = PatchRecord.for_config(config)
    ctx = Context(
        model, config, filter_fn, gates=set(record.gates), traced=set(record.traced), calls=dict(record.calls)
    )
    results = passes.run(ctx)
    _check_patterns(ctx)
    record.absorb(ctx, results)
    model.__dict__[RECORD_ATTR] = record
    model.__dict__[OPTIONS_ATTR] = _Options(config, filter_fn)
    return ctx


class _Options:
    """The options of a model's last ``patch`` call, kept on the model to tell a repeat from a change.

    A ``filter_fn`` (often a lambda) cannot be pickled, and its identity means nothing after a copy by pickling: a
    pickled ``_Options`` comes back empty ("unknown", so the next ``patch`` re-patches). ``copy.deepcopy`` keeps it.
    """

    def __init__(self, config: PatchConfig | None = None, filter_fn: Any = None) -> None:
        self.config, self.filter_fn = config, filter_fn

    def __reduce__(self):
        return (_Options, ())

    def __deepcopy__(self, memo: dict) -> _Options:
        return self


def _same_options(model: nn.Module, config: PatchConfig, filter_fn: Any) -> bool:
    options = model.__dict__.get(OPTIONS_ATTR)
    if not isinstance(options, _Options) or options.config is None:
        return False
    old = options.config
    if old != config or list(old.shapes) != list(config.shapes):  # the first matching pattern wins: order counts
        return False
    # an unregistered callable shape is named after the function: two different functions can share that name
    if any(old.shapes[k].fn is not config.shapes[k].fn for k in old.shapes if old.shapes[k].family.startswith("<")):
        return False
    return options.filter_fn is filter_fn


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
    model.__dict__.pop(OPTIONS_ATTR, None)
    passes.undo(model, record)
    return model
