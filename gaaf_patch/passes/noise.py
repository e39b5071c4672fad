"""Training-time noise that is not a dropout module: one table, one record per kind of noise.

Dropout modules and ``F.dropout`` calls are found by their type or function (:mod:`.swap`, :mod:`.rewriter`). Other
training-time noise is switched by a *knob*, a number the forward reads, and is turned off through that knob::

    LayerDrop          if self.training and torch.rand([]) < self.config.layerdrop: skip the layer
    router jitter      hidden *= torch.empty_like(hidden).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
    quantizer dropout  n_dropout = int(batch * self.quantizer_dropout)      (DAC: random number of codebooks)
    RoPE augmentation  coords shifted / jittered / rescaled by self.config.pos_embed_{shift,jitter,rescale}

Each :class:`Noise` row says what the noise is, where its knob is read (an attribute of the module itself, or of
the config the module holds, read in the module's code as ``self.config.<knob>``) and the value that turns it off.
``strip=True`` rows are regularizers like dropout: ``strip_dropout`` turns them off and the report lists each under
``stripped`` (``kind``, ``knob``, the old value in ``p``). ``strip=False`` rows are noise a patch leaves on purpose
(turning it off would change more than regularization: SpecAugment is input augmentation, PhiMoE's sparsemixer
samples experts by design); the report lists each under ``kept`` with the reason and the knob, if any.

A knob on a module is set on the module and put back by ``unpatch``. A knob on a config is never written: the config
is shared by the whole model and ``save_pretrained`` saves it, so a checkpoint must not carry ``layerdrop=0``.
Instead each module that reads it gets a :class:`ConfigView` of the same config: every read and write goes through
to the shared config, except the knobs turned off. ``unpatch`` (or a failed patch's snapshot) gives the module its
config back.

Also here, being a float knob too: the attribute a module's own code passes as ``dropout_p`` to
``F.multi_head_attention_forward`` (WavLM's attention), zeroed as ``nn.MultiheadAttention.dropout`` is in
:mod:`.swap`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .context import Context
from .targets import LAYERDROP_ATTRS

__all__ = ["Noise", "NOISE", "ConfigView", "run"]

MODULE, CONFIG = "module", "config"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != 0


@dataclass(frozen=True)
class Noise:
    """One kind of training-time noise, switched by a knob (``attrs``) read on the module or on its config."""

    kind: str  # the name the report uses: "LayerDrop", "router jitter", ...
    description: str
    attrs: tuple[str, ...]  # the knob(s), any of which may be set
    where: str  # MODULE: ``self.<attr>``; CONFIG: ``self.config.<attr>`` in the module's code
    off: Any = 0.0  # the value that turns it off
    strip: bool = True  # False: kept on purpose (listed in report.kept with ``reason``)
    reason: str = ""
    active: Callable[[Any], bool] = _positive  # whether a knob's value turns the noise on
    code: str | None = None  # for knob-less rows: a call in the module's code that draws (kept: nothing to turn off)


NOISE: tuple[Noise, ...] = (
    Noise(
        "LayerDrop",
        "skips a whole layer with probability p in training (torch.rand or random.uniform against p)",
        LAYERDROP_ATTRS,
        MODULE,
    ),
    Noise(
        "LayerDrop",
        "skips a whole layer with probability p in training, p read from the shared config",
        LAYERDROP_ATTRS,
        CONFIG,
    ),
    Noise(
        "router jitter",
        "multiplies the router's input by uniform noise in [1-eps, 1+eps] in training (Switch Transformers)",
        ("jitter_noise",),
        MODULE,
    ),
    Noise(
        "input jitter",
        "multiplies the MoE input by uniform noise in [1-eps, 1+eps] in training (PhiMoE)",
        ("input_jitter_noise",),
        MODULE,
    ),
    Noise(
        "quantizer dropout",
        "trains a random number of codebooks for a fraction p of the batch (DAC)",
        ("quantizer_dropout",),
        MODULE,
    ),
    Noise(
        "RoPE augmentation",
        "shifts, jitters and rescales the patch coordinates of the rotary embedding by random amounts in training",
        ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"),
        CONFIG,
        off=None,
        active=_set,
    ),
    Noise(
        "SpecAugment",
        "masks random time steps / feature channels of the input features in training (numpy random)",
        ("mask_time_prob", "mask_feature_prob"),
        CONFIG,
        strip=False,
        reason="SpecAugment kept: input augmentation, not dropout ({knob}={value}; set it to 0 to turn it off)",
    ),
    Noise(
        "sparsemixer sampling",
        "samples the experts in training (Gumbel-max) and draws Heun's midpoint mask (PhiMoE)",
        (),
        MODULE,
        strip=False,
        reason="PhiMoE sparsemixer kept: it samples experts in training by design (the routing algorithm, not a "
        "regularizer); no knob turns it off",
        code="sparsemixer",
    ),
)


class ConfigView:
    """A module's view of a shared config with some knobs turned off: reads and writes of anything else go to the
    shared config, so the model keeps one config (``save_pretrained`` saves it unchanged). ``isinstance`` sees the
    config's class."""

    def __init__(self, target: Any, overrides: dict[str, Any]) -> None:
        object.__setattr__(self, "_gaaf_target", target)
        object.__setattr__(self, "_gaaf_overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:  # only for names the view itself lacks
        state = object.__getattribute__(self, "__dict__")
        if "_gaaf_target" not in state:
            raise AttributeError(name)
        if name in state["_gaaf_overrides"]:
            return state["_gaaf_overrides"][name]
        return getattr(state["_gaaf_target"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._gaaf_target, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._gaaf_target, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._gaaf_target)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConfigView, (self._gaaf_target, self._gaaf_overrides))

    def __repr__(self) -> str:
        return f"ConfigView({type(self._gaaf_target).__name__}, off: {self._gaaf_overrides})"

    def __eq__(self, other: Any) -> bool:
        return self._gaaf_target == (other._gaaf_target if isinstance(other, ConfigView) else other)

    __hash__ = None  # type: ignore[assignment]


def view_target(config: Any) -> Any:
    """The shared config behind a :class:`ConfigView` (``config`` itself otherwise)."""
    return config.__dict__["_gaaf_target"] if type(config) is ConfigView else config


@functools.cache
def _source(cls: type) -> str:
    """The code of ``cls`` and its bases up to ``nn.Module`` (empty where it cannot be read)."""
    parts = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            parts.append(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


def _reads_config(cls: type, attr: str) -> bool:
    return re.search(rf"\bself\.config\.{re.escape(attr)}\b", _source(cls)) is not None


def _calls(cls: type, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\(", _source(cls)) is not None


_MHA_DROPOUT_INDEX = 10  # F.multi_head_attention_forward(query, key, value, ..., add_zero_attn, dropout_p, ...)


@functools.cache
def mha_dropout_attrs(cls: type) -> tuple[str, ...]:
    """The attributes ``cls``'s code passes as ``dropout_p`` to ``F.multi_head_attention_forward`` (WavLM's attention
    calls it with ``self.dropout``): a float the module holds, zeroed like ``nn.MultiheadAttention.dropout``."""
    src = _source(cls)
    if "multi_head_attention_forward" not in src:
        return ()
    found: list[str] = []
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Call) or getattr(node.func, "attr", getattr(node.func, "id", None)) != (
            "multi_head_attention_forward"
        ):
            continue
        given = {k.arg: k.value for k in node.keywords}
        arg = node.args[_MHA_DROPOUT_INDEX] if len(node.args) > _MHA_DROPOUT_INDEX else given.get("dropout_p")
        if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "self":
            found.append(arg.attr)
    return tuple(dict.fromkeys(found))


def run(ctx: Context) -> int:
    """Turn off every ``strip=True`` noise the model's modules read (with ``strip_dropout``); list the kept ones.
    Returns how many knobs were turned off."""
    n = 0
    views: dict[int, tuple[Any, dict[str, Any], list[tuple[str, nn.Module]]]] = {}
    for fqn, module in ctx.root.named_modules():
        if not ctx.allowed(module, fqn):
            continue
        for row in NOISE:
            if row.code is not None:
                if _calls(type(module), row.code) and not row.strip:
                    _keep(ctx, row, fqn, None, None, fqn)
                continue
            for attr in row.attrs:
                n += _one(ctx, row, fqn, module, attr, views)
        for attr in mha_dropout_attrs(type(module)):
            value = module.__dict__.get(attr)
            if _positive(value) and ctx.config.strip_dropout:
                name = f"{fqn}.{attr}" if fqn else attr
                entry = {
                    "name": name,
                    "form": "attribute",
                    "target": "multi_head_attention_forward(dropout_p)",
                    "p": value,
                }
                ctx.attributes.append((module, attr, value, entry))
                setattr(module, attr, 0.0)
                n += 1
    for config, overrides, readers in views.values():
        view = ConfigView(config, overrides)
        for fqn, module in readers:
            ctx.attributes.append((module, "config", config, {"config_view": fqn}))
            module.__dict__["config"] = view
    return n


def _one(ctx: Context, row: Noise, fqn: str, module: nn.Module, attr: str, views: dict) -> int:
    if row.where == MODULE:
        value = module.__dict__.get(attr)
        if not row.active(value):
            return 0
        name = f"{fqn}.{attr}" if fqn else attr
        if not row.strip:
            _keep(ctx, row, name, attr, value, fqn)
            return 0
        if not ctx.config.strip_dropout:
            return 0
        entry = {
            "name": name,
            "form": "attribute",
            "target": attr,
            "p": value,
            "kind": row.kind,
            "knob": attr,
            "off": row.off,
        }
        ctx.attributes.append((module, attr, value, entry))
        setattr(module, attr, row.off)
        return 1
    config = module.__dict__.get("config")
    if config is None or type(config) is ConfigView or not _reads_config(type(module), attr):
        return 0
    value = getattr(config, attr, None)
    if not row.active(value):
        return 0
    knob = f"config.{attr}"
    if not row.strip:
        _keep(ctx, row, f"{fqn}.{knob}" if fqn else knob, knob, value, fqn)
        return 0
    if not ctx.config.strip_dropout:
        return 0
    _config, overrides, readers = views.setdefault(id(config), (config, {}, []))
    if not readers or readers[-1][1] is not module:
        readers.append((fqn, module))
    if attr in overrides:  # a shared config: turned off once, reported once (at its first reader)
        return 0
    overrides[attr] = row.off
    name = f"{fqn}.{knob}" if fqn else knob
    entry = {
        "name": name,
        "form": "config",
        "target": knob,
        "p": value,
        "kind": row.kind,
        "knob": knob,
        "off": row.off,
        "module": fqn,
    }
    ctx.stripped.append(entry)
    return 1


def _keep(ctx: Context, row: Noise, name: str, knob: str | None, value: Any, module: str | None) -> None:
    if any(k["name"] == name for k in ctx.kept):
        return
    entry = {"name": name, "target": row.kind, "kind": row.kind, "reason": row.reason.format(knob=knob, value=value)}
    entry["module"] = module  # the module whose own code draws: the audit's findings there are explained by this
    if knob is not None:
        entry.update(knob=knob, p=value)
    ctx.kept.append(entry)
