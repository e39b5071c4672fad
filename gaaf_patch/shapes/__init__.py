"""Shape functions ``s(x)``: the gradient GAAF adds to an activation. See docs/shapes.md."""

from . import dropout, library
from .dropout import dropout_matched
from .registry import ShapeError, ShapeFn, available, freeze_builtins, get, register, resolve

freeze_builtins()  # every name registered above is gaaf_patch's own: shapes.register never replaces it

__all__ = [
    "ShapeFn",
    "ShapeError",
    "available",
    "get",
    "register",
    "resolve",
    "library",
    "dropout",
    "dropout_matched",
]
