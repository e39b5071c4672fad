"""``gaaf_patch.report``: what a patch changed, read off the model itself.

Two public sources only: the GAAF and StrippedDropout modules in the tree (each describes its site) and the patch
record ``patch`` leaves on the model (:class:`gaaf_patch.passes.PatchRecord`: unreached and skipped sites,
dropout removed from code or attributes, fused BatchNorms, each pass's result). No pass's internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PatchError
from .modules import GAAF, StrippedDropout
from .passes.context import RECORD_ATTR
from .passes.result import combine
from .passes.scope import scopes

__all__ = ["Report", "report"]


@dataclass
class Report:
    """One entry per site. ``replaced``: GAAF activations; ``stripped``: dropout removed (and training-time noise
    turned off through its knob, :mod:`gaaf_patch.passes.noise`: such an entry names its ``kind``, e.g. LayerDrop,
    and its ``knob``); ``kept``: randomness left on purpose, each with its reason (DropPath without ``strip_droppath``;
    noise with a ``kind``: SpecAugment, sampling by design); ``unreached``: sites the
    passes could not rewrite (each with a reason); ``skipped``: gates left alone on purpose; ``fused``: BatchNorms
    switched to their recomputing twin (same state) so the GAAF ReLU they feed keeps no extra tensor; ``passes``: what
    each pass changed, one entry per pass (name, modified, changed, counts), added up over every ``patch`` call."""

    replaced: list[dict[str, Any]] = field(default_factory=list)
    stripped: list[dict[str, Any]] = field(default_factory=list)
    unreached: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fused: list[dict[str, Any]] = field(default_factory=list)  # BatchNorms a ReLU site recomputes from (passes/fuse)
    # code fx cannot trace, rewritten as it runs (passes/scope.py): its sites join replaced/stripped once they ran
    runtime: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)  # randomness left on purpose: DropPath, SpecAugment
    config: dict[str, Any] | None = None
    gradient_scale: dict[str, Any] | None = None  # patched / plain gradient norms, when measured (gradscale.py)
    passes: list[dict[str, Any]] = field(default_factory=list)  # PatchPassResult.to_dict() per pass (passes/result)

    def __bool__(self) -> bool:
        return bool(self.replaced or self.stripped or self.unreached)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replaced": self.replaced,
            "stripped": self.stripped,
            "unreached": self.unreached,
            "skipped": self.skipped,
            "fused": self.fused,
            "runtime": self.runtime,
            "kept": self.kept,
            "config": self.config,
            "gradient_scale": self.gradient_scale,
            "passes": self.passes,
            "summary": self.summary(),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary(self) -> dict[str, Any]:
        by_act: dict[str, int] = {}
        for r in self.replaced:
            by_act[r["activation"]] = by_act.get(r["activation"], 0) + 1
        noise: dict[str, int] = {}  # stripped noise by kind (LayerDrop, router jitter, ...), part of ``stripped``
        for r in self.stripped:
            if r.get("kind"):
                noise[r["kind"]] = noise.get(r["kind"], 0) + 1
        return {
            "replaced": len(self.replaced),
            "stripped": len(self.stripped),
            "unreached": len(self.unreached),
            "skipped": len(self.skipped),
            "fused": len(self.fused),
            "runtime": len(self.runtime),
            "kept": len(self.kept),
            "by_activation": by_act,
            "noise": noise,
        }


def report(model: nn.Module) -> Report:
    """The report of a patched model; empty for a model that was never patched."""
    if not isinstance(model, nn.Module):
        raise PatchError(f"gaaf_patch.report takes an nn.Module, not {type(model).__name__}")
    backend = model.__dict__.get("_gaaf_backend")  # gaaf.compile's module: the graphs its backend rewrote
    if backend is not None:
        return _compiled_report(backend)
    rep = Report()
    for module in model.modules():
        if isinstance(module, GAAF):
            rep.replaced.append(module.describe())
        elif isinstance(module, StrippedDropout):
            rep.stripped.append(module.describe())
        for scope in scopes(module):
            rep.runtime.append(scope.describe())
            rep.stripped.extend(scope.stripped.values())
            rep.skipped.extend(scope.skipped.values())
            rep.unreached.extend(getattr(scope, "unreached", {}).values())
    record = model.__dict__.get(RECORD_ATTR)
    if record is not None:
        rep.stripped.extend(record.stripped)
        rep.stripped.extend(e for _m, _a, _old, e in record.attributes if "name" in e)
        rep.fused.extend(
            {"name": e["fused_batchnorm"], "into": e["into"]}
            for _m, _a, _old, e in record.attributes
            if "fused_batchnorm" in e
        )
        rep.unreached.extend(record.unreached)
        rep.skipped.extend(record.skipped)
        rep.kept.extend(record.kept)
        rep.config = record.config
        rep.gradient_scale = record.gradient_scale
        rep.passes = [r.to_dict() for r in combine(record.passes)]
    rep.replaced.sort(key=lambda r: r["name"])
    return rep


def _compiled_report(backend: Any) -> Report:
    """What :func:`gaaf_patch.compile`'s backend rewrote, over every graph compiled so far (empty before the first
    call compiles anything). Site names are Dynamo's; a site rewritten in several graphs (a recompile) counts once."""
    rep = Report(config=backend.config.to_dict() if backend.config else None)
    seen: set[str] = set()
    for sites, record in backend.graph_pass.graphs:
        for site in sites:
            if site["name"] not in seen:
                seen.add(site["name"])
                rep.replaced.append(site)
        for field_name in ("stripped", "unreached", "skipped"):
            have = {e["name"] for e in getattr(rep, field_name)}
            getattr(rep, field_name).extend(e for e in getattr(record, field_name) if e["name"] not in have)
    rep.replaced.sort(key=lambda r: r["name"])
    return rep
