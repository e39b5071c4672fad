"""The patch configuration: one frozen, validated value that round-trips through a dict (and a checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor

from . import activations as _acts
from .errors import GaafError, one_line
from .ops import DEFAULT_K, check_mode
from .shapes import ShapeFn, get, resolve

ShapeLike = str | ShapeFn | Callable[[Tensor], Tensor]

__all__ = ["PatchConfig", "PatchError", "build", "GAINS"]

GAINS = ("auto", "paper")  # gaaf_patch.gain: the depth-safe blend; the paper's phi' + s


class PatchError(GaafError, ValueError):
    """A model or an option gaaf-patch cannot work with; the message says what to do."""


@dataclass(frozen=True)
class PatchConfig:
    """What :func:`gaaf_patch.patch` does. ``shapes`` keys are activation names or module-name patterns.

    ``gain``: ``"auto"`` (the depth-safe blend of gaaf_patch.gain) or ``"paper"`` (``phi' + s``). ``mode="sawtooth"``
    is the paper's literal equations and always has the paper's gain.
    """

    activations: str | tuple[str, ...] = "auto"
    shapes: Mapping[str, ShapeLike] = field(default_factory=dict)
    strip_dropout: bool = False
    strip_droppath: bool = False
    mode: str = "exact"
    K: float = DEFAULT_K
    gain: str = "auto"

    def __post_init__(self) -> None:
        if self.gain not in GAINS:
            raise ValueError(f"unknown gain {self.gain!r}; use one of {', '.join(GAINS)}")
        if self.mode == "sawtooth":
            object.__setattr__(self, "gain", "paper")
        acts = self.activations
        if isinstance(acts, str) and acts not in ("auto", "all"):
            acts = tuple(a.strip() for a in acts.split(",") if a.strip())
        if isinstance(acts, Sequence) and not isinstance(acts, str):
            acts = tuple(acts)
            for a in acts:
                _acts.get(a)  # raises with the list of known names
        object.__setattr__(self, "activations", acts)
        check_mode(self.mode, self.K)
        object.__setattr__(self, "K", float(self.K))
        resolved = {}
        for key, value in dict(self.shapes or {}).items():
            resolved[key] = resolve(value)  # raises on unknown shape names
        object.__setattr__(self, "shapes", resolved)

    def wants(self, activation: str, is_gate: bool) -> bool:
        """Whether an ``activation`` site is patched (``is_gate``: its output multiplies a tensor)."""
        if self.activations == "all":
            return True
        if self.activations == "auto":
            return not is_gate
        return activation in self.activations

    def shape_for(self, activation: str, site: str) -> ShapeFn:
        """Per-layer pattern first (the first that matches), then per-activation override, then the default."""
        for key, shape in self.shapes.items():
            if key not in _acts.ACTIVATIONS and fnmatchcase(site, key):
                return shape
        if activation in self.shapes:
            return self.shapes[activation]
        return get(activation)

    def pattern_keys(self) -> list[str]:
        return [k for k in self.shapes if k not in _acts.ACTIVATIONS]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; shapes written as ``family(params)``. A callable shape cannot be replayed from a dict."""
        shapes = {}
        for key, shape in self.shapes.items():
            if shape.family.startswith("<"):
                raise ValueError(
                    f"shape for {key!r} is an unregistered callable; register it with gaaf_patch.shapes.register "
                    "to save the patch configuration"
                )
            shapes[key] = shape.spec
        acts = self.activations if isinstance(self.activations, str) else list(self.activations)
        return {
            "activations": acts,
            "shapes": shapes,
            "strip_dropout": self.strip_dropout,
            "strip_droppath": self.strip_droppath,
            "mode": self.mode,
            "K": self.K,
            "gain": self.gain,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchConfig:
        unknown = set(d) - {"activations", "shapes", "strip_dropout", "strip_droppath", "mode", "K", "gain"}
        if unknown:
            raise ValueError(f"unknown patch config keys {sorted(unknown)}")
        acts = d.get("activations", "auto")
        # a config written before the auto gain existed was patched with the paper's gain: replay that
        gain = d.get("gain", "paper")
        return cls(**{**d, "activations": acts if isinstance(acts, str) else tuple(acts), "gain": gain})


def build(
    activations: str | Sequence[str] = "auto",
    shapes: str | Mapping[str, ShapeLike] | None = None,
    gain: str | None = None,
    **options: Any,
):
    """A :class:`PatchConfig` from the keyword options of ``patch`` / ``compile``; bad options raise PatchError.

    ``shapes`` may be a preset: ``"auto"`` (the default shapes with the auto gain) or ``"paper"`` (the default shapes
    with the paper's gain, as the paper and gaaf-patch 0.1 had them).
    """
    try:
        if isinstance(shapes, str):
            if shapes not in GAINS:
                raise ValueError(
                    f"shapes={shapes!r}: a string names a preset, 'auto' or 'paper'; "
                    "give a shape per activation as shapes={'relu': 'relu_keras'}"
                )
            if gain is not None and gain != shapes:
                raise ValueError(f"shapes={shapes!r} and gain={gain!r} contradict each other; give one")
            gain, shapes = shapes, None
        return PatchConfig(
            activations=activations if isinstance(activations, str) else tuple(activations),
            shapes=dict(shapes or {}),
            gain=gain or "auto",
            **options,
        )
    except (KeyError, ValueError, TypeError) as e:
        raise PatchError(one_line(e)) from None  # a KeyError's message without its quotes; no other text touched
