"""Activation modules no table names, identified by their values: a rule, not a list that is always one class short.

A module whose class is called like an activation (any ``class_names`` ending of the activation table, or a name
ending in ``Activation`` on a module without children, as Hugging Face's ``NewGELUActivation``, ``QuickGELUActivation``,
``ReLUSquaredActivation`` are) and that holds no parameters, buffers or children is run on a grid of inputs
(float64, [-8, 8]). If its values are those of an activation of the table (with its default parameters, or GELU's
tanh approximation) to 1e-6, it *is* that activation: the ``modules`` pass replaces the whole module by a GAAF of that
family that forwards the original module (bit-identical outputs) and takes ``phi'`` from the family. This maps
composites to their family instead of patching an op inside them (GAAF on ``NewGELU``'s inner ``tanh`` would give
the wrong sign of the added gradient for x < 0). The identity (``LinearActivation``) is no site. Anything else is
reported unreached by the ``modules`` pass ("no GAAF form"), never patched inside.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from torch import nn

from .. import activations as _acts

__all__ = ["looks_like_activation", "identify", "why_not", "IDENTITY"]

IDENTITY = ("identity", {})
_NAME = _acts.class_name_pattern()
_GENERIC = re.compile(r"Activation$")
_GRID = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)
_TOL = 1e-6
_CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    *((name, dict(a.defaults)) for name, a in _acts.ACTIVATIONS.items()),
    ("gelu", {"approximate": "tanh"}),
]
_seen: weakref.WeakKeyDictionary[nn.Module, tuple[str, dict[str, Any]] | None] = weakref.WeakKeyDictionary()


def looks_like_activation(module: nn.Module) -> bool:
    """Called like an activation: an ending from the table, or ``...Activation`` on a leaf (torchvision's
    ``Conv2dNormActivation`` is a block with children, not an activation)."""
    name = type(module).__name__
    return bool(_NAME.search(name) or (_GENERIC.search(name) and not list(module.children())))


def _values(module: nn.Module) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            y = module(_GRID.clone())
    except Exception:  # noqa: BLE001 - a module that does not take a 1-d float64 tensor is no pointwise activation
        return None
    return y if isinstance(y, torch.Tensor) and y.shape == _GRID.shape else None


def identify(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(activation, params)`` the module computes, :data:`IDENTITY`, or None (not a pointwise activation of the
    table, or it holds state). Only for modules that look like activations; the answer is cached per module."""
    if module in _seen:
        return _seen[module]
    found = None
    stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    if looks_like_activation(module) and stateless and not list(module.children()):
        y = _values(module)
        if y is not None:
            y = y.to(torch.float64)
            if torch.equal(y, _GRID):
                found = IDENTITY
            for name, params in _CANDIDATES:
                ref = _acts.get(name).phi(_GRID, **params)
                if ((y - ref).abs() <= _TOL * (1 + ref.abs())).all():
                    found = (name, params)
                    break
    _seen[module] = found
    return found


def why_not(module: nn.Module) -> str | None:
    """Why an activation-looking module gets no GAAF form (the report's reason), or None when it needs none."""
    if identify(module) == IDENTITY:
        return None
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return "no GAAF form: a learned activation (it holds parameters or buffers)"
    if list(module.children()):
        return "no GAAF form for this class"
    return "no GAAF form: its values match no activation gaaf-patch knows (probed on [-8, 8])"
