"""Swap modules: activation modules for :class:`GAAF`, dropout (and, if asked, DropPath) for :class:`StrippedDropout`.

::

    (act): ReLU(inplace=True)      ->  (act): GAAF(relu, shape=relu=shifted_sigmoid(...), mode=exact)
    (drop): Dropout(p=0.1)         ->  (drop): StrippedDropout(was Dropout(p=0.1))

Walks every name a module is registered under, so a module shared by two parents is replaced at both, by one
replacement. Also handles the attribute forms of torch's own layers: ``nn.MultiheadAttention.dropout`` (a float)
and ``nn.TransformerEncoderLayer.activation`` (a function). A dropout module of another library is recognised by its
class name (SEW-D's ``StableDropout``: :func:`.targets.is_named_dropout`); noise switched by a knob (LayerDrop,
router jitter, ...) is :mod:`.noise`'s.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import nn

from .. import activations as _acts
from ..modules import GAAF, Site, StrippedDropout, original_of
from . import noise, probe, targets
from .context import Context, looks_like_activation
from .result import PatchPassResult

DROPOUT_PASS = "dropout"
PASS_NAME = "modules"


def _entries(root: nn.Module):
    """(parent, attribute, fqn, child) for every registration, GAAF subtrees excluded."""
    stack = [("", root)]
    seen: set[int] = set()
    while stack:
        prefix, parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for attr, child in list(parent._modules.items()):
            if child is None:
                continue
            fqn = f"{prefix}.{attr}" if prefix else attr
            yield parent, attr, fqn, child
            if not isinstance(child, (GAAF, StrippedDropout)):
                stack.append((fqn, child))


def run_dropout(ctx: Context) -> PatchPassResult:
    """The ``dropout`` pass: replace dropout modules (and DropPath when ``strip_droppath``); zero
    ``MultiheadAttention.dropout`` and the noise knobs of :mod:`.noise`. Counts ``modules`` (a module registered
    twice counts once) and ``attributes`` (knobs included)."""
    cfg = ctx.config
    done: dict[int, nn.Module] = {}
    n_attrs = noise.run(ctx)  # LayerDrop, router jitter, ...: knobs turned off, or listed as kept
    kept: set[int] = set()
    for parent, attr, fqn, child in list(_entries(ctx.root)):
        if isinstance(child, nn.RNNBase) and cfg.strip_dropout and child.dropout:  # between stacked layers
            if ctx.allowed(child, fqn):
                entry = {"name": f"{fqn}.dropout", "form": "attribute", "target": f"{type(child).__name__}.dropout"}
                ctx.attributes.append((child, "dropout", child.dropout, {**entry, "p": child.dropout}))
                child.dropout = 0.0
                n_attrs += 1
            continue
        if isinstance(child, nn.MultiheadAttention) and cfg.strip_dropout and child.dropout:
            if ctx.allowed(child, fqn):
                entry = {
                    "name": f"{fqn}.dropout",
                    "form": "attribute",
                    "target": "MultiheadAttention.dropout",
                    "p": child.dropout,
                }
                ctx.attributes.append((child, "dropout", child.dropout, entry))
                child.dropout = 0.0
                n_attrs += 1
            continue
        droppath = targets.is_droppath(child)
        wanted = (cfg.strip_droppath and droppath) or (
            cfg.strip_dropout
            and not droppath
            and (isinstance(child, targets.DROPOUT_MODULES) or targets.is_named_dropout(child))
        )
        p = targets.drop_rate(child)
        if droppath and not cfg.strip_droppath and p and id(child) not in kept:
            kept.add(id(child))  # left on purpose: the report says so, and how to remove it
            ctx.kept.append(
                {"name": fqn, "target": type(child).__name__, "p": p, "reason": "DropPath kept (strip_droppath=True)"}
            )
        if not wanted or p == 0:  # Dropout(p=0) is already the identity: nothing to strip, nothing to count
            continue
        if id(child) not in done:
            if not ctx.allowed(child, fqn):
                continue
            done[id(child)] = StrippedDropout(Site(fqn, "module", type(child).__name__), child, p)
        setattr(parent, attr, done[id(child)])
    counts = {"modules": len(done), "attributes": n_attrs}
    return PatchPassResult(DROPOUT_PASS, len(done) + n_attrs, counts, ctx.root)


def run_activations(ctx: Context) -> PatchPassResult:
    """The ``modules`` pass: replace activation modules by GAAF; report activation-looking classes that nothing
    reached. Counts ``modules`` (a module registered twice counts once) and ``attributes`` (the activation function
    of torch's transformer layers)."""
    done: dict[int, nn.Module | None] = {}
    n = 0
    n_attrs = sum(
        _transformer_activation(ctx, m, fqn)
        for fqn, m in ctx.root.named_modules()
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
    )
    lookalikes: list[tuple[str, nn.Module]] = []
    for parent, attr, fqn, child in list(_entries(ctx.root)):
        if id(child) in done:
            if done[id(child)] is not None:
                setattr(parent, attr, done[id(child)])
            continue
        form = targets.module_form(child)
        done[id(child)] = None
        if isinstance(child, (nn.RNNBase, nn.RNNCellBase)):
            ctx.unreach(fqn, "module", type(child).__name__, _RECURRENT)
            continue
        if form is None:
            if looks_like_activation(child):
                lookalikes.append((fqn, child))
            continue
        act = _acts.get(form.activation)
        is_gate = act.gate_like and (
            fqn in ctx.gates or (_parent_name(fqn) not in ctx.traced and ctx.is_gate_by_name(fqn))
        )
        if not ctx.decide(form.activation, fqn, is_gate, child):
            continue
        phi = None
        if form.own_phi:
            phi = copy.copy(child)
            if hasattr(phi, "inplace"):
                phi.inplace = False
        gaaf = ctx.make_gaaf(
            form.activation, act.params(form.params(child)), Site(fqn, "module", type(child).__name__), child, phi
        )
        done[id(child)] = gaaf
        setattr(parent, attr, gaaf)
        n += 1
    # An activation-looking class (QuickGELU, HardMish, PReLU) that nothing was patched inside: say so. Checked
    # after the walk, which reaches a parent before its children (metaformer's StarReLU holds an nn.ReLU).
    for fqn, child in lookalikes:
        why = probe.why_not(child)
        if why is not None and not any(isinstance(m, GAAF) for m in child.modules()):
            ctx.unreach(fqn, "module", type(child).__name__, why)
    return PatchPassResult(PASS_NAME, n + n_attrs, {"modules": n, "attributes": n_attrs}, ctx.root)


_RECURRENT = (
    "no GAAF form: the recurrent tanh/sigmoid run inside PyTorch's RNN kernel (its inter-layer dropout is stripped "
    "with strip_dropout)"
)


def _parent_name(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


_TRANSFORMER_ACTS = {F.relu: "relu", F.gelu: "gelu"}


def _transformer_activation(ctx: Context, layer: nn.Module, fqn: str) -> int:
    fn = layer.__dict__.get("activation")
    name = _TRANSFORMER_ACTS.get(fn)
    if name is None:
        return 0  # a module activation is a child: replaced as a module
    site = f"{fqn}.activation" if fqn else "activation"
    if not ctx.decide(name, site, False, layer):
        return 0
    gaaf = ctx.make_gaaf(name, {}, Site(site, "attribute", f"torch.nn.functional.{name}"), fn)
    entry: dict[str, Any] = {"activation_attr": True}
    del layer.__dict__["activation"]
    layer.activation = gaaf  # registered as a child: it holds no state
    ctx.attributes.append((layer, "activation", fn, entry))
    return 1


def undo_attributes(attributes) -> None:
    for module, attr, old, _entry in reversed(attributes):
        if attr in module._modules:
            del module._modules[attr]
        setattr(module, attr, old)


def unpatch_modules(root: nn.Module) -> int:
    """Put back every module a swap replaced; drop GAAF children the functional pass added."""
    n = 0
    for parent, attr, _fqn, child in list(_entries(root)):
        if not isinstance(child, (GAAF, StrippedDropout)):
            continue
        original = original_of(child)
        if isinstance(original, nn.Module):
            setattr(parent, attr, original)
            n += 1
    return n
