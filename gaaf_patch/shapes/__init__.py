"""Shape functions ``s(x)``: the gradient GAAF adds to an activation. See docs/shapes.md."""

from . import library
from .registry import ShapeFn, available, get, register, resolve

__all__ = ["ShapeFn", "available", "get", "register", "resolve", "library"]
