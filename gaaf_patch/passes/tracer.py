"""Trace one module's own code with ``torch.fx``: every child a leaf, so a graph holds exactly that module's code.

Used by the ``functional`` pass. A method that cannot be traced whole may still be traced with its helper methods
*opaque* (:class:`_Opaque`): each ``self.helper(...)`` call becomes one node that runs the helper for real. When
nothing traces, :func:`suspects` scans the source so that a possible site is reported as unreached, not ignored.

A trace runs the method's Python code: what it writes into the module (``self.state = ...``, a buffer re-assigned)
is undone, and such a method counts as untraceable (the graph would drop the write). :func:`untraced_sites` names
the sites of the source that no graph holds (a branch frozen shut at an optional argument's default).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import types
from typing import Any

import torch
from torch import fx, nn

from . import targets

__all__ = [
    "SELF_ATTR",
    "is_builtin",
    "default_args",
    "trace",
    "trace_modes",
    "helpers",
    "suspects",
    "untraced_sites",
]

SELF_ATTR = "_gaaf_self"  # a rewritten module's reference to itself: its code calls opaque helpers through it
CONSTANTS_ATTR = "_gaaf_constants"  # tensor constants parked by a trace, until the module is known to be rewritten


def _notrace_functions() -> tuple:
    try:
        from timm.layers._fx import get_notrace_functions

        return tuple(get_notrace_functions())
    except ImportError:
        return ()


class _OwnCodeTracer(fx.Tracer):
    """Traces one module's own code: every submodule it calls is a leaf."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=_notrace_functions())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def is_builtin(module: nn.Module) -> bool:
    """torch.nn's own classes (and our modules): their forward holds no user activation code."""
    fwd = type(module).forward
    mod = getattr(fwd, "__module__", "") or ""
    return mod.startswith("torch.nn.") or mod.startswith("gaaf_patch.") or fwd is nn.Module.forward


def default_args(fn: Any) -> tuple[dict[str, Any], int] | None:
    """Concrete values for parameters with defaults, and the count of required positional parameters; ``None`` when
    the signature cannot be traced that way (``*args``, ``**kwargs``, required keyword-only parameters)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    concrete, required = {}, 0
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None
        if p.default is p.empty:
            if p.kind == p.KEYWORD_ONLY:
                return None
            required += 1
        else:
            concrete[p.name] = p.default
    return concrete, required


class _Opaque:
    """Stands for a helper method while its caller is traced: a call with traced arguments becomes one node,
    ``self._gaaf_self.<name>(...)``, that runs the helper for real (its own control flow included) when the
    rewritten code runs; a call with plain values runs it at once."""

    def __init__(self, tracer: fx.Tracer, module: nn.Module, name: str, real: Any) -> None:
        self.tracer, self.module, self.name, self.real = tracer, module, name, real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not any(isinstance(a, fx.Proxy) for a in leaves):
            return self.real(*args, **kwargs)
        me = self.tracer.create_proxy("get_attr", SELF_ATTR, (), {})
        return self.tracer.create_proxy("call_method", self.name, (me, *args), kwargs)


def trace(
    module: nn.Module, concrete: dict[str, Any], method: str = "forward", opaque: tuple[str, ...] = ()
) -> fx.Graph:
    """The graph of ``type(module).<method>``. Buffers are graph values (``get_attr``), so the rewritten code reads
    them when it runs: ``self.scale.exp()`` folded into a constant at trace time would ignore a later
    ``load_state_dict``. Code that branches on a buffer cannot be traced that way; a second try takes buffers as
    plain tensors (what is computed from them alone is then fixed at trace time, as plain ``fx`` does)."""
    before = {**module.__dict__, **{f"{_STATE}{k}": dict(module.__dict__[k]) for k in _STATE_DICTS}}
    try:
        first: Exception | None = None
        for proxy_buffers in (True, False):
            tracer = _OwnCodeTracer()
            tracer.traced_func_name = method  # fx traces type(module).<method> with the module as self
            tracer.proxy_buffer_attributes = proxy_buffers
            saved = {name: module.__dict__.get(name) for name in opaque}
            for name in opaque:
                module.__dict__[name] = _Opaque(tracer, module, name, getattr(module, name))
            try:
                graph = tracer.trace(module, concrete_args=concrete or None)
            except Exception as e:  # noqa: BLE001 - retried once, then the first error is the one that explains
                first = first or e
                continue
            finally:
                for name, value in saved.items():
                    if value is None:
                        del module.__dict__[name]
                    else:
                        module.__dict__[name] = value
                assigned = _restore(module, before)
            if assigned:  # the graph holds no attribute writes: the rewritten code would drop them
                raise fx.proxy.TraceError(f"{method} assigns self.{assigned[0]}, which a trace does not keep")
            return graph
        assert first is not None
        raise first
    finally:
        # The tracer parks tensor constants on the module; they are copied back only if the module is rewritten.
        for key in set(module.__dict__) - set(before):
            if key.startswith("_tensor_constant"):
                module.__dict__.setdefault(CONSTANTS_ATTR, {})[key] = module.__dict__.pop(key)


_STATE = "\0state:"
_STATE_DICTS = ("_buffers", "_parameters", "_modules")


def _restore(module: nn.Module, before: dict[str, Any]) -> list[str]:
    """Undo what running ``method`` under the tracer wrote into the module (``self.state = proxy``, recurrent
    Gemma's ``rg_lru``): a Proxy left there breaks the next trace and the model. Returns the names written."""
    written = []
    for d in _STATE_DICTS:  # ``self.pe = proxy`` on a buffer lands in _buffers (wav2vec2-conformer's extend_pe)
        state, old = module.__dict__[d], before[f"{_STATE}{d}"]
        if state.keys() != old.keys() or any(state[k] is not old[k] for k in old):
            written.extend(k for k in state.keys() | old.keys() if state.get(k) is not old.get(k))
            state.clear()
            state.update(old)
    for key in list(module.__dict__):
        if key.startswith("_tensor_constant"):
            continue
        if key not in before:
            written.append(key)
            del module.__dict__[key]
        elif module.__dict__[key] is not before[key]:
            written.append(key)
            module.__dict__[key] = before[key]
    return written


def trace_modes(
    module: nn.Module, concrete: dict[str, Any], method: str, opaque: tuple[str, ...] = ()
) -> dict[bool, fx.Graph]:
    """The graphs of ``method`` in the module's current mode and in the other one, keyed by ``training``."""
    graphs: dict[bool, fx.Graph] = {}
    was = module.training
    try:
        for mode in (was, not was):
            module.training = mode
            graphs[mode] = trace(module, concrete, method, opaque)
    finally:
        module.training = was
    return graphs


def suspects(module: nn.Module, method: str = "forward") -> list[tuple[str, int]]:
    """(name, line) of calls in the method's source that may be activations or dropout."""
    try:
        fn = getattr(type(module), method)
        src = textwrap.dedent(inspect.getsource(fn))
        lineno = inspect.getsourcelines(fn)[1]
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, AttributeError):
        return []
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in targets.SUSPECT_NAMES:
                found.append((name, lineno + n.lineno - 1))
    return found


def helpers(module: nn.Module, method: str) -> list[str]:
    """The methods of the module's class that ``method`` calls as ``self.NAME(...)``, in order of appearance."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(type(module), method))))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return []
    names: list[str] = []
    for n in ast.walk(tree):
        f = getattr(n, "func", None) if isinstance(n, ast.Call) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self":
            name = f.attr
            is_method = isinstance(inspect.getattr_static(type(module), name, None), types.FunctionType)
            if is_method and name not in names and name not in (method, "forward") and name not in module._modules:
                names.append(name)
    return names


def untraced_sites(module: nn.Module, method: str, graphs: dict[bool, fx.Graph], extra: frozenset[str]) -> list[str]:
    """Names of activation or dropout calls in the method's own source that no graph holds: a branch the trace did
    not take, because an optional argument was frozen at its default (DAB-DETR's cross-attention drops out only
    ``if encoder_hidden_states is not None``) or a plain attribute at its value. Calls on child modules
    (``self.dropout(x)``) are the modules pass's, not sites of this code."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(type(module), method))))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return []
    names = targets.SUSPECT_NAMES | extra
    wanted = set()
    for n in ast.walk(tree):
        f = getattr(n, "func", None) if isinstance(n, ast.Call) else None
        if isinstance(f, ast.Attribute):
            on_self = isinstance(f.value, ast.Name) and f.value.id == "self"
            if f.attr in names and not (on_self and f.attr in module._modules):
                wanted.add(f.attr)
        elif isinstance(f, ast.Name) and f.id in names:
            wanted.add(f.id)
    seen = set()
    for graph in graphs.values():
        for node in graph.nodes:
            if node.op == "call_function":
                seen.add(getattr(node.target, "__name__", None))
            elif node.op == "call_method":
                seen.add(node.target)
    return sorted(wanted - seen)
