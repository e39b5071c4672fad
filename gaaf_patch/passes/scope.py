"""Code fx cannot trace, patched at run time: :class:`RuntimeScope`.

A forward that takes ``**kwargs`` or keyword-only arguments, branches on tensor values, or calls module-level helpers
that do (Hugging Face attention: ``attention_interface(self, q, k, v, dropout=0.0 if not self.training else
self.attention_dropout)`` reaching ``F.scaled_dot_product_attention(..., dropout_p=p)``) cannot be rewritten ahead of
time. Instead its module gets a ``RuntimeScope`` as instance ``forward`` (or as the helper method's name): each call
runs the class's own code under a ``TorchFunctionMode`` that rewrites, as they happen,

- activation calls (``F.gelu``, ``torch.tanh``, ``x.relu()``, ...) into a GAAF child of the module (created the first
  time a site runs, no state, so ``state_dict`` keys do not change), with the patch's shapes, gain and filter;
- dropout calls (``F.dropout`` and friends) into the identity, and ``dropout_p`` of attention into 0, when the
  patch strips dropout.

Only the module's own code is rewritten: a call is taken when the innermost module running it is the scope's module
(the nearest ``Module._call_impl`` frame), so children, GAAF modules included, and other patched modules are left
as they are. An activation module that is not in the module's tree (made at each call, as transformers'
``ACT2FN[name](x)`` inside Mamba's helpers) is the calling code's: its op is the module's site, or, when the op is not
the module's own family (a composite such as FastGELU's inner tanh), reported unreached. A GLU (``F.glu``) is a gate
with no GAAF form: left alone and listed as skipped. Gate-like activations (sigmoid, hardsigmoid) are left alone in ``activations="auto"``: without a graph
one cannot tell whether the output multiplies; they are recorded as skipped, and the audit sees them run.

Sites are named ``<module>:<file>:<line>`` of the calling code, and appear in ``gaaf_patch.report`` once they ran.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import activations as _acts
from ..config import PatchConfig
from ..modules import GAAF, Site
from . import targets
from .gates import GLU_FUNCTIONS, glu_skip

__all__ = ["RuntimeScope", "scopes"]

_CALL_IMPL = nn.Module._call_impl.__code__
_TORCH_DIR = str(Path(torch.__file__).parent)
_METHOD_FORMS = {getattr(torch.Tensor, name): form for name, form in targets.METHODS.items()}
_ACTIVATIONS: dict[Any, targets.FnForm] = {**targets.FUNCTIONS, **_METHOD_FORMS}


def _caller(frame: Any, scope: RuntimeScope | None = None) -> tuple[Any, Any, Any]:
    """(innermost module running the call, the first frame outside torch, the activation module made on the fly
    that ran it or None) from the frame that made it.

    An activation module that is not in ``scope``'s module tree (transformers' ``ACT2FN["silu"](x)`` makes a new one
    at each call, inside a helper of Mamba's mixer) is code of the module that called it: it is skipped, and the
    site is named after the line that called it."""
    site = made = None
    while frame is not None:
        if site is None and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            site = frame
        if frame.f_code is _CALL_IMPL:
            owner = frame.f_locals.get("self")
            if scope is None or owner is scope.module or scope.foreign_activation(owner) is None:
                return owner, site, made
            made, site = owner, None
        frame = frame.f_back
    return None, site, made


_families: dict[Any, str | None] = {}


def _activation_family(module: nn.Module) -> str | None:
    """``targets.module_form(module).activation``, cached by class and plain attributes: a module made at each call
    would be probed at each call. The probe runs outside every mode (the audit's included): it is no model code."""
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        key: Any = (type(module), tuple(sorted((k, v) for k, v in module.__dict__.items() if not k.startswith("_"))))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _families:
        return _families[key]
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        form = targets.module_form(module)
    family = form.activation if form is not None else None
    if key is not None:
        _families[key] = family
    return family


class _Rewrite(TorchFunctionMode):
    def __init__(self, scope: RuntimeScope) -> None:
        super().__init__()
        self.scope = scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scope = self.scope
        form = _ACTIVATIONS.get(func)
        glu = func in GLU_FUNCTIONS
        dropout = scope.config.strip_dropout and (func in targets.DROPOUT_FUNCTIONS or func is targets.SDPA)
        if form is None and not dropout and not glu:
            return func(*args, **kwargs)
        owner, frame, made = _caller(sys._getframe(1), scope)
        if owner is not scope.module:
            return func(*args, **kwargs)
        where = f"{Path(frame.f_code.co_filename).stem}:{frame.f_lineno}" if frame is not None else "?"
        name = f"{scope.fqn or '<root>'}:{where}"
        label = f"{getattr(func, '__module__', None) or 'torch'}.{getattr(func, '__name__', func)}"
        if glu:  # a gate with no GAAF form: left alone, said so
            scope.skipped.setdefault(name, glu_skip(name))
            return func(*args, **kwargs)
        if made is not None and (form is None or scope.foreign_activation(made) != form.activation):
            # a composite made on the fly (FastGELU's tanh): GAAF on an op inside it would be the wrong family
            if form is not None:
                why = f"an op inside {type(made).__name__}, an activation module made during the call: no GAAF site"
                scope.unreach(name, label, why)
            return func(*args, **kwargs)
        if form is not None:
            return scope.activation(func, form, name, args, kwargs)
        return scope.dropout(func, name, args, kwargs)


class RuntimeScope:
    """The instance ``method`` of a module whose code fx cannot trace: the class's code, rewritten as it runs."""

    def __init__(
        self,
        module: nn.Module,
        fqn: str,
        config: PatchConfig,
        why: str,
        method: str = "forward",
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
    ) -> None:
        self.module, self.fqn, self.config, self.why, self.method = module, fqn, config, why, method
        self.filter_fn = filter_fn
        self.delta: float | None = None  # the budget pass's allowance for auto-gain sites
        self.added: dict[str, str] = {}  # site name -> GAAF child attribute
        self.stripped: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, dict[str, Any]] = {}
        self.unreached: dict[str, dict[str, Any]] = {}  # sites seen that have no GAAF form (GLU)
        self._tree: set[int] = set()  # ids of the module's subtree, refreshed when a lookup misses

    @property
    def __signature__(self) -> Any:
        import inspect  # the class's parameters, for code that reads model.forward's signature (Trainer)

        return inspect.signature(getattr(type(self.module), self.method).__get__(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _Rewrite(self):
            return getattr(type(self.module), self.method)(self.module, *args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("unreached", {})  # pickled before these existed
        state.setdefault("_tree", set())
        self.__dict__.update(state)

    def foreign_activation(self, module: Any) -> str | None:
        """The family of ``module`` when it is an activation module made outside this module's tree (on the fly, by
        the code this scope runs): its op is then this module's site. None for anything else."""
        if not isinstance(module, nn.Module) or isinstance(module, GAAF) or id(module) in self._tree:
            return None
        family = _activation_family(module)
        if family is None:
            return None
        self._tree = {id(m) for m in self.module.modules()}  # a child added since the last look is no stranger
        return None if id(module) in self._tree else family

    def unreach(self, name: str, target: str, reason: str) -> None:
        self.unreached.setdefault(name, {"name": name, "form": "runtime", "target": target, "reason": reason})

    # ------------------------------------------------------------------------------------------- the rewrites
    def _allowed(self, name: str) -> bool:
        return self.filter_fn is None or bool(self.filter_fn(self.module, name))

    def activation(self, func: Any, form: targets.FnForm, name: str, args: tuple, kwargs: dict) -> Any:
        act = _acts.get(form.activation)
        gate = act.gate_like and self.config.activations == "auto"
        if gate:
            self.skipped.setdefault(
                name,
                {
                    "name": name,
                    "activation": form.activation,
                    "reason": "gate-like, in code fx cannot trace: left alone",
                },
            )
        attr = self.added.get(name)
        if attr is None:
            if gate or not self.config.wants(form.activation, False) or not self._allowed(name):
                return func(*args, **kwargs)
            params, _inplace = targets.read_params(form, tuple(args[1:]), dict(kwargs))
            params.pop("input", None)
            if any(isinstance(v, torch.Tensor) for v in params.values()):
                return func(*args, **kwargs)
            label = f"{getattr(func, '__module__', None) or 'torch'}.{getattr(func, '__name__', func)}"
            gaaf = GAAF(
                form.activation,
                self.config.shape_for(form.activation, name),
                mode=self.config.mode,
                K=self.config.K,
                site=Site(name, "runtime", label),
                delta=self.delta if self.config.gain == "auto" else None,
                **act.params(params),
            )
            attr = f"gaaf_rt_{self.method}{len(self.added)}"
            self.module.add_module(attr, gaaf)
            self.added[name] = attr
        # In-place forms return the result rather than writing it into their input: GAAF keeps autograd's view.
        return self.module._modules[attr](args[0])

    def dropout(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        label = f"torch.nn.functional.{getattr(func, '__name__', func)}"
        if func is targets.SDPA:
            i = targets.SDPA_DROPOUT_INDEX
            p = args[i] if len(args) > i else kwargs.get("dropout_p", 0.0)
            if not p or not self._allowed(name):
                return func(*args, **kwargs)
            self.stripped.setdefault(name, {"name": name, "form": "runtime", "target": label + "(dropout_p)", "p": p})
            if len(args) > i:
                args = args[:i] + (0.0,) + args[i + 1 :]
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
            return func(*args, **kwargs)
        if not self._allowed(name):
            return func(*args, **kwargs)
        p = args[1] if len(args) > 1 else kwargs.get("p")
        self.stripped.setdefault(name, {"name": name, "form": "runtime", "target": label, "p": p})
        return args[0] if args else kwargs["input"]

    # --------------------------------------------------------------------------------------------- bookkeeping
    def describe(self) -> dict[str, Any]:
        return {"name": self.fqn or "<root>", "method": self.method, "why": self.why, "sites_seen": len(self.added)}

    def undo(self) -> None:
        """Remove this scope and the GAAF children it added."""
        for attr in self.added.values():
            self.module._modules.pop(attr, None)
        if self.module.__dict__.get(self.method) is self:
            del self.module.__dict__[self.method]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tree"] = set()  # ids: meaningless in another process or copy
        try:  # a lambda filter cannot travel; the sites it allowed so far are already children
            import pickle

            pickle.dumps(state["filter_fn"])
        except Exception:  # noqa: BLE001
            state["filter_fn"] = None
        return state


def scopes(module: nn.Module) -> list[RuntimeScope]:
    """The run-time scopes of one module: installed as methods, or made by a traced method for the calls its trace
    does not cover (``PatchedForward.scope``)."""
    found = [v for v in module.__dict__.values() if isinstance(v, RuntimeScope)]
    found += [v._scope for v in module.__dict__.values() if isinstance(getattr(v, "_scope", None), RuntimeScope)]
    return found


# ----------------------------------------------------------------------------------------- where a scope is needed
# A scope costs a Python call per torch function its module's subtree runs, so a module gets one only when its code
# may hold a site: a call named like an activation or dropout, or a call the scan cannot follow (a function held in
# a variable or a table, as Hugging Face's ``attention_interface``). Module-level helpers are followed to
# ``_SCAN_DEPTH``; in their code only calls named like a site count (a callback they call is their caller's). A site
# the scan misses still shows: gaaf_patch.audit lists it as a silent miss.
_SCAN_DEPTH = 3
EXTRA_SUSPECTS = frozenset(
    {"scaled_dot_product_attention", "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout", "dropout_", "glu"}
)
_scan_cache: dict[Any, bool] = {}  # (method's code, module class) -> needs_scope's answer
_body_cache: dict[Any, list[Any] | None] = {}  # code -> the AST nodes of its body (None: no source)


def needs_scope(module: nn.Module, method: str = "forward") -> bool:
    """Whether ``method``'s code (and the helpers it calls) may run an activation or dropout call of its own.

    The answer depends only on the code and the module's class, so it is cached by both; the scan below it is not
    (a helper reached from two places, or two helpers calling each other, would otherwise keep the answer of
    whichever scan reached it first: a recursion cut short, or a smaller depth)."""
    fn = getattr(type(module), method, None)
    key = (getattr(inspect.unwrap(fn) if callable(fn) else fn, "__code__", None), type(module))
    if key[0] is None:
        return True
    if key not in _scan_cache:
        _scan_cache[key] = _may_hold_sites(fn, module, _SCAN_DEPTH, set())
    return _scan_cache[key]


def _body(fn: Any) -> list[Any] | None:
    """Every AST node in ``fn``'s body (not its decorators), parsed once per code object; None without source."""
    import ast
    import textwrap

    code = fn.__code__
    if code not in _body_cache:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            _body_cache[code] = None
        else:
            top = tree.body[0] if tree.body else tree
            body = top.body if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else [top]
            _body_cache[code] = [n for stmt in body for n in ast.walk(stmt)]
    return _body_cache[code]


def _may_hold_sites(fn: Any, module: nn.Module | None, depth: int, seen: set[Any]) -> bool:
    """One scan: ``seen`` holds the functions on the current path (a cycle adds nothing it has not already)."""
    import ast
    import builtins

    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if code is None:
        return True  # not Python code we can read: assume the worst
    if code in seen:
        return False  # on the current path: what it holds is being scanned already
    nodes = _body(fn)
    if nodes is None:
        return True
    seen = seen | {code}
    suspects = targets.SUSPECT_NAMES | EXTRA_SUSPECTS
    children = _names_bound_to_self(nodes)  # `for layer in self.layers: layer(x)`: a child module, not a site
    for node in nodes:
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        found = False
        if isinstance(f, ast.Attribute):
            if f.attr in suspects:
                found = True
            elif isinstance(f.value, ast.Name) and f.value.id == "self" and module is not None:
                attr = inspect.getattr_static(type(module), f.attr, None)
                if inspect.isfunction(attr) and depth > 0:  # a helper method: its code is this module's too
                    found = _may_hold_sites(attr, module, depth - 1, seen)
        elif isinstance(f, ast.Name):
            if f.id in suspects:
                found = True
            else:
                target = fn.__globals__.get(f.id, getattr(builtins, f.id, None))
                if target is None and f.id in children:
                    continue
                if target is None:  # a local variable holding a function: cannot follow
                    found = module is not None  # in the module's own code; a helper's callbacks are its caller's
                elif inspect.isfunction(target):
                    found = depth > 0 and _may_hold_sites(target, None, depth - 1, seen)
        elif isinstance(f, ast.Subscript) and isinstance(f.value, ast.Name) and f.value.id in fn.__globals__:
            found = True  # a module-level table of functions or classes (transformers' ``ACT2FN[name](x)``)
        else:  # a call on a subscript or a call's result (a table of functions), in the module's own code
            found = module is not None
        if found:
            return True
    return False


def _names_bound_to_self(nodes: list[Any]) -> set[str]:
    """Local names bound to something read off ``self`` (a loop over ``self.layers``, ``block = self.blocks[i]``)."""
    import ast

    def reads_self(expr: Any) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "self" for n in ast.walk(expr))

    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.For) and reads_self(node.iter):
            names |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Attribute, ast.Subscript)):
            if reads_self(node.value):
                names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names
