"""State shared by the passes of one ``patch`` call, and the record a patch leaves on the model.

The passes read and fill a :class:`Context`; ``patch`` then folds it, and each pass's result, into the
:class:`PatchRecord` on the model, which is all ``gaaf_patch.report`` reads besides the GAAF and StrippedDropout
modules themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from torch import fx, nn

from .. import activations as _acts
from ..config import PatchConfig
from ..gain import MAX_DELTA
from ..modules import GAAF, Site
from . import probe
from .result import PatchPassResult

RECORD_ATTR = "_gaaf_record"


@dataclass
class PatchRecord:
    """Kept on the patched model (a plain attribute, not state): what the report cannot read off the modules."""

    config: dict[str, Any]
    unreached: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, str, Any, dict[str, Any]]] = field(
        default_factory=list
    )  # (module, attr, old, entry)
    gates: set[str] = field(default_factory=set)  # learned from traces: a later patch call re-uses them
    traced: set[str] = field(default_factory=set)
    gradient_scale: dict[str, Any] | None = None  # gaaf_patch.measure_gradient_scale's last result
    calls: dict[str, int] = field(default_factory=dict)  # child module -> calls per parent forward, from traces
    stripped: list[dict[str, Any]] = field(default_factory=list)  # dropout removed from traced code (functional)
    passes: list[PatchPassResult] = field(default_factory=list)  # every pass run, in order, over all patch calls
    kept: list[dict[str, Any]] = field(default_factory=list)  # random modules left on purpose (DropPath)

    @classmethod
    def for_config(cls, config: PatchConfig) -> PatchRecord:
        try:
            return cls(config=config.to_dict())
        except ValueError as e:  # a callable shape: the patch works, it just cannot be replayed from the record
            return cls(config={"replayable": False, "why": str(e)})

    def absorb(self, ctx: Context, results: list[PatchPassResult]) -> None:
        """Add what one ``patch`` call's passes found and did (entries already recorded are not repeated)."""
        self.gates |= ctx.gates
        self.traced |= ctx.traced
        self.calls.update(ctx.calls)
        _merge(self.unreached, ctx.unreached)
        _merge(self.skipped, ctx.skipped)
        _merge(self.stripped, ctx.stripped)
        _merge(self.kept, ctx.kept)
        self.attributes.extend(ctx.attributes)
        self.passes.extend(r.detached() for r in results)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A record pickled by an older version lacks the newer fields: they start empty.
        for f in fields(self):
            if f.name not in state and f.default_factory is not MISSING:
                state[f.name] = f.default_factory()
        self.__dict__.update(state)


def _merge(into: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    seen = {e["name"] for e in into}
    into.extend(e for e in new if e["name"] not in seen)


# Class names that look like an activation: if such a module is neither replaced nor patched inside, say so.
_ACTIVATION_CLASS = _acts.class_name_pattern()  # each activation's class_names
_GATE_PARENT = re.compile(r"(Squeeze|Excit|^SE(?![a-z])|SE$|Gate|Gating|^Eca|^ECA|Cbam|CBAM)")


@dataclass
class Context:
    root: nn.Module
    config: PatchConfig
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    gates: set[str] = field(default_factory=set)  # qualified names of sigmoid-like child modules seen used as gates
    traced: set[str] = field(default_factory=set)  # modules whose own forward was traced
    unreached: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, str, Any, dict[str, Any]]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # child module -> calls per parent forward, from traces
    stripped: list[dict[str, Any]] = field(default_factory=list)  # dropout removed from traced code
    # (qualified name, module, training-mode graph) of each method the functional pass traced, after its rewrite:
    # later passes analyse them (fuse), nothing runs them.
    graphs: list[tuple[str, nn.Module, fx.Graph]] = field(default_factory=list)
    scopes: int = 0  # methods given a run-time scope (code fx cannot trace; passes/scope.py)
    kept: list[dict[str, Any]] = field(default_factory=list)  # random modules left on purpose (DropPath)

    def allowed(self, module: nn.Module, name: str) -> bool:
        return self.filter_fn is None or bool(self.filter_fn(module, name))

    def decide(self, activation: str, name: str, is_gate: bool, module: nn.Module) -> bool:
        """Whether to patch an activation site; a gate left alone is recorded in ``skipped``."""
        if not self.config.wants(activation, is_gate):
            if is_gate and activation in _acts.ACTIVATIONS:
                self.skip({"name": name, "activation": activation, "reason": "gate (output multiplies)"})
            return False
        return self.allowed(module, name)

    def skip(self, entry: dict[str, Any]) -> None:
        """Record a site left alone on purpose, once (a module's train and eval graphs both hold it)."""
        if all(s["name"] != entry["name"] for s in self.skipped):
            self.skipped.append(entry)

    def make_gaaf(self, activation: str, params: dict[str, Any], site: Site, original: Any = None, phi=None) -> GAAF:
        cfg = self.config
        shape = cfg.shape_for(activation, site.name)
        delta = MAX_DELTA if cfg.gain == "auto" else None  # the budget pass sets the real value once all are known
        return GAAF(
            activation, shape, mode=cfg.mode, K=cfg.K, site=site, original=original, phi=phi, delta=delta, **params
        )

    def unreach(self, name: str, form: str, target: str, reason: str) -> None:
        self.unreached.append({"name": name, "form": form, "target": target, "reason": reason})

    def is_gate_by_name(self, name: str) -> bool:
        """Fallback when the parent could not be traced: the attribute or the parent's class says gate."""
        leaf = name.rsplit(".", 1)[-1]
        parent = self.root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.root
        return "gate" in leaf.lower() or "scale" in leaf.lower() or bool(_GATE_PARENT.search(type(parent).__name__))


looks_like_activation = probe.looks_like_activation
