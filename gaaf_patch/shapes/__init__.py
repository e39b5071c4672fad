"""Shape functions ``s(x)``: the gradient GAAF adds to an activation. See docs/shapes.md."""

from . import dropout, library
from .dropout import dropout_matched
from .registry import ShapeFn, available, get, register, resolve

__all__ = ["ShapeFn", "available", "get", "register", "resolve", "library", "dropout", "dropout_matched"]
