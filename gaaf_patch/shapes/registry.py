"""The shape-function registry: ``register``, ``get``, ``available``.

A shape function ``s(x)`` is the extra gradient GAAF adds where the activation saturates: the backward becomes
``phi'(x) + s(x)``. A :class:`ShapeFn` is a pure pointwise function plus named parameters, so a shape can be printed
(``gauss(width=4.0)``), written into a checkpoint's patch config and read back (:func:`get` parses that spelling).
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import GaafError

__all__ = [
    "ShapeFn",
    "ShapeError",
    "FastPath",
    "register",
    "get",
    "available",
    "resolve",
    "add_check",
    "parse_spec",
    "freeze_builtins",
]


@dataclass(frozen=True)
class FastPath:
    """What GAAF's backward (:mod:`gaaf_patch.ops`) may use instead of calling a family's function: facts of the
    family, given with its registration and carried by every shape built on it.

    - ``term(x, owned, params)``: ``(s~, h)`` with ``s = h s~``; ``s~`` a fresh tensor (None where ``s`` is zero),
      computed in place on ``x`` when ``owned`` (``x`` is then a temporary the caller gives up). None: the shape is
      called.
    - ``kernel(params)``: ``(code, a, b, c, h)``, the family's ``shape`` code and constants for the fused CPU kernel
      (``csrc/gaaf_cpu.cpp``); None when the kernel has no such family.
    - ``zero``: ``s`` is 0 everywhere (backward then skips recovering ``x``).
    - ``zero_at_infinity``: ``s(+-inf)`` is exactly 0, so ``x`` may be recovered by an activation's unclamped
      inverse (``Activation.exact_inverse``), which gives +-inf in the saturation.
    """

    term: Callable[[Tensor, bool, Mapping[str, Any]], tuple[Tensor | None, float]] | None = None
    kernel: Callable[[Mapping[str, Any]], tuple[int, float, float, float, float]] | None = None
    zero: bool = False
    zero_at_infinity: bool = False


@dataclass(frozen=True)
class ShapeFn:
    """A differentiable pointwise shape ``s(x)``: ``fn(x, **params)``.

    ``name`` is the registered name; ``family`` the registered function it is built on (equal to ``name`` for a
    family itself, e.g. ``gauss``; ``gauss`` for ``tanh``'s default). Two shapes are equal when they compute the
    same function (same family, same parameters), whatever they are called: ``get(s.spec) == s``.
    """

    name: str = field(compare=False)
    fn: Callable[..., Tensor] = field(compare=False)
    params: Mapping[str, Any] = field(default_factory=dict)
    family: str = ""
    doc: str = field(default="", compare=False)
    fast: FastPath | None = field(default=None, compare=False, repr=False)  # the family's, when it has one

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, **self.params)

    def __reduce__(self):
        if self.name in _REGISTRY and _REGISTRY[self.name] == self:
            return (get, (self.name,))
        if (self.family or self.name) in _REGISTRY:
            return (get, (self.spec,))
        raise TypeError(f"shape {self.name!r} is an unregistered callable and cannot be pickled; register it")

    def with_params(self, **params: Any) -> ShapeFn:
        """The same family with some parameters changed; unknown parameter names are an error."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(
                f"shape {self.name!r} takes no parameter {sorted(unknown)}; it takes {sorted(self.params)}"
            )
        merged = {**self.params, **_floats(params)}
        family = self.family or self.name
        for key, value in params.items():  # a number where the family has a number: finite, not a bool or a string
            if isinstance(self.params[key], float) and not _finite_number(value):
                raise ValueError(f"shape {family}: {key} must be a finite number, got {value!r}")
        for check in _CHECKS.get(family, ()):
            problem = check(merged)
            if problem:
                raise ValueError(f"shape {family}({', '.join(f'{k}={v!r}' for k, v in params.items())}): {problem}")
        return ShapeFn(family, self.fn, merged, family, self.doc, self.fast)

    @property
    def spec(self) -> str:
        """``family(k=v, ...)``: what :func:`get` reads back. Parameters at their neutral value (no offset, unit
        scale and height) are left out, so a spec reads like the formula: ``gauss(width=4.0)``."""
        family = self.family or self.name
        base = _REGISTRY[family].params if family in _REGISTRY else {}
        # left out only where get() puts the same value back: the family's own default must be that neutral value
        args = ", ".join(
            f"{k}={v!r}"
            for k, v in self.params.items()
            if not (_NEUTRAL.get(k, object()) == v and base.get(k, object()) == v)
        )
        return f"{family}({args})"

    def __repr__(self) -> str:
        return self.spec if self.name == (self.family or self.name) else f"{self.name}: {self.spec}"


_REGISTRY: dict[str, ShapeFn] = {}
# family -> checks of a parameter set, each returning what is wrong (a phrase) or None
_CHECKS: dict[str, list[Callable[[Mapping[str, Any]], str | None]]] = {}


def add_check(family: str, check: Callable[[Mapping[str, Any]], str | None]) -> None:
    """Reject parameter sets of ``family`` that make no shape: ``check(params)`` returns what is wrong, or None."""
    _CHECKS.setdefault(family, []).append(check)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NEUTRAL = {"center": 0.0, "scale": 1.0, "height": 1.0}


def _floats(params: Mapping[str, Any]) -> dict[str, Any]:
    """Integers become floats (``gauss(width=3)`` is ``gauss(width=3.0)``); booleans and strings stay as given."""
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in params.items()}


class ShapeError(GaafError, ValueError):
    """A registration the registry refuses (a name already taken); the message says what to do."""


_BUILTIN: frozenset[str] = frozenset()  # the names gaaf_patch registers itself (set by freeze_builtins)


def freeze_builtins() -> None:
    """Mark every name registered so far as built-in: never replaced (called once the library's shapes exist)."""
    global _BUILTIN
    _BUILTIN = frozenset(_REGISTRY)


def register(
    name: str,
    fn: Callable[..., Tensor] | None = None,
    *,
    family: str | None = None,
    fast: FastPath | None = None,
    replace: bool = False,
    **params: Any,
):
    """Register a shape function under ``name``, with default ``params``. Usable as a decorator.

    ``register("gauss", width=4.0)(fn)`` registers a family (``fast``: its :class:`FastPath`, if any);
    ``register("tanh", family="gauss", width=4.0)`` registers a named member of an existing family (no ``fn``).

    A name already registered is refused (a saved patch configuration names its shapes, and a silent overwrite
    would change what it replays), unless ``replace=True``; gaaf_patch's own names are never replaced.
    """
    if name in _BUILTIN:
        raise ShapeError(f"{name!r} is one of gaaf_patch's own shapes and cannot be replaced; register yours under "
                         "another name")  # fmt: skip
    if name in _REGISTRY and not replace:
        raise ShapeError(
            f"a shape named {name!r} is already registered ({_REGISTRY[name].spec}); pass replace=True to replace "
            "it, or choose another name"
        )
    params = _floats(params)

    def add(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _REGISTRY[name] = ShapeFn(name, f, params, family or name, (f.__doc__ or "").strip(), fast)
        return f

    if family is not None:
        if fn is not None or fast is not None:
            raise TypeError(
                f"register({name!r}, family={family!r}) builds on {family!r}'s function; give no fn or fast"
            )
        base = get(family).with_params(**params)  # unknown parameter names are an error here, not at first call
        _REGISTRY[name] = ShapeFn(name, base.fn, base.params, base.family, base.doc, base.fast)
        return _REGISTRY[name]
    return add if fn is None else add(fn)


def available() -> list[str]:
    """Names of every registered shape, sorted."""
    return sorted(_REGISTRY)


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:\((.*)\))?\s*$")


def parse_spec(text: str, what: str = "shape", example: str = "key=number, e.g. gauss(width=3)") -> tuple[str, dict]:
    """``NAME`` or ``NAME(key=value, ...)`` read into ``(NAME, {key: value})``; values are Python literals.

    The one reader of such spellings: shapes (:func:`get`) and activations with parameters
    (``dropout_matched(act='leaky_relu(negative_slope=0.2)')``). ``what`` and ``example`` word the errors.
    """
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"cannot read {what} {text!r}; write NAME or NAME(param=value, ...)")
    arglist = m.group(2)
    if not arglist or not arglist.strip():
        return m.group(1), {}
    try:
        call = ast.parse(f"f({arglist})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args
        assert all(kw.arg is not None for kw in call.keywords)  # no **mapping
        return m.group(1), {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, AssertionError):
        raise ValueError(f"cannot read {what} {text!r}; parameters must be {example}") from None


def get(name: str | ShapeFn, **params: Any) -> ShapeFn:
    """The shape registered as ``name`` (an activation name gives its default shape), with ``params`` overridden.

    ``name`` may carry parameters, as printed by :attr:`ShapeFn.spec`: ``get("gauss(width=3.0)")``.
    """
    if isinstance(name, ShapeFn):
        return name.with_params(**params) if params else name
    key, given = parse_spec(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown shape {key!r}{hint}; known: {', '.join(available())}")
    shape = _REGISTRY[key]
    if given:
        shape = shape.with_params(**given)
    return shape.with_params(**params) if params else shape


def resolve(shape: str | ShapeFn | Callable[[Tensor], Tensor]) -> ShapeFn:
    """A :class:`ShapeFn` from a registered name, a ShapeFn, or any callable ``s(x)`` (wrapped, named after it)."""
    if isinstance(shape, (str, ShapeFn)):
        return get(shape)
    if callable(shape):
        label = getattr(shape, "__name__", type(shape).__name__)
        label = label if label.startswith("<") else f"<{label}>"
        return ShapeFn(label, shape, {}, label)  # fn is the callable itself: patch tells two such shapes apart by it
    raise TypeError(f"a shape must be a registered name, a ShapeFn or a callable s(x), not {type(shape).__name__}")
