"""Rewrite activations and dropout written as code inside ``forward``: ``F.relu(x)``, ``x.tanh()``, ``F.dropout``.

Each user-defined module is traced on its own with ``torch.fx``, every child a leaf, so a graph holds exactly that
module's code. A module that cannot be traced is a leaf for its parent and gets traced (or not) on its own: the
failure stays local, as with modelopt's RobustTracer, and its source is scanned so that a possible site is reported
as unreached instead of ignored. Rewriting a graph::

    relu = torch.nn.functional.relu(conv, inplace=True)      ->  gaaf_relu = self.gaaf_relu(conv)
    dropout = torch.nn.functional.dropout(x, 0.1, True)      ->  (uses of dropout read x)

The GAAF module is added as a child (it holds no state: ``state_dict`` keys do not change) and the module's
``forward`` becomes the generated code, traced in train and in eval mode when the two differ. Only modules with
something to rewrite are touched; the class, its other methods and attributes stay.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import operator
import textwrap
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .. import activations as _acts
from ..fused import fusable_class
from ..modules import GAAF, Site
from . import targets
from .context import Context

PASS_NAME = "functional"

# Ops a gate's value flows through unchanged in meaning before it multiplies.
_PASSTHROUGH_METHODS = {
    "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "permute", "transpose",
    "contiguous", "to", "type_as", "float", "half", "bfloat16",
}  # fmt: skip
_PASSTHROUGH_FNS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, operator.getitem}
_MUL_FNS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


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


def _default_args(fn: Any) -> tuple[dict[str, Any], int] | None:
    """Concrete values for parameters with defaults, and the count of required positional parameters."""
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


SELF_ATTR = "_gaaf_self"  # a rewritten module's reference to itself: its code calls opaque helpers through it


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


def _trace(
    module: nn.Module, concrete: dict[str, Any], method: str = "forward", opaque: tuple[str, ...] = ()
) -> fx.Graph:
    """The graph of ``type(module).<method>``. Buffers are graph values (``get_attr``), so the rewritten code reads
    them when it runs: ``self.scale.exp()`` folded into a constant at trace time would ignore a later
    ``load_state_dict``. Code that branches on a buffer cannot be traced that way; a second try takes buffers as
    plain tensors (what is computed from them alone is then fixed at trace time, as plain ``fx`` does)."""
    before = set(module.__dict__)
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
                return tracer.trace(module, concrete_args=concrete or None)
            except Exception as e:  # noqa: BLE001 - retried once, then the first error is the one that explains
                first = first or e
            finally:
                for name, value in saved.items():
                    if value is None:
                        del module.__dict__[name]
                    else:
                        module.__dict__[name] = value
        assert first is not None
        raise first
    finally:
        # The tracer parks tensor constants on the module; they are copied back only if the module is rewritten.
        for key in set(module.__dict__) - before:
            if key.startswith("_tensor_constant"):
                module.__dict__.setdefault("_gaaf_constants", {})[key] = module.__dict__.pop(key)


def _reaches_mul(node: fx.Node, depth: int = 0) -> bool:
    for user in node.users:
        if user.op == "call_function" and user.target in _MUL_FNS:
            return True
        if user.op == "call_method" and user.target in _MUL_METHODS:
            return True
        passthrough = (user.op == "call_method" and user.target in _PASSTHROUGH_METHODS) or (
            user.op == "call_function" and user.target in _PASSTHROUGH_FNS
        )
        if passthrough and depth < 8 and _reaches_mul(user, depth + 1):
            return True
    return False


def _input_of(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


_VIEW_METHODS = {
    "view", "view_as", "narrow", "select", "transpose", "permute", "unsqueeze", "squeeze", "expand", "as_strided",
    "t", "chunk", "split", "unflatten", "flatten", "reshape", "diagonal", "unbind", "movedim", "swapaxes", "detach",
    "__getitem__",
}  # fmt: skip
_VIEW_FNS = {
    operator.getitem, torch.narrow, torch.select, torch.transpose, torch.permute, torch.flatten, torch.reshape,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.t, torch.unbind, torch.movedim, torch.diagonal,
}  # fmt: skip


def _may_alias(node: fx.Node) -> bool:
    """Whether an in-place change of ``node`` is visible outside this graph's reads: an input, or a view."""
    return (
        node.op == "placeholder"
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_function" and node.target in _VIEW_FNS)
    )


def _rewire_after(graph: fx.Graph, site: fx.Node, old: fx.Node, new: fx.Node) -> None:
    """An in-place call changed ``old``: code after it that reads ``old`` must read the new value."""
    seen = False
    for n in graph.nodes:
        if n is site:
            seen = True
            continue
        if seen and n is not new and old in n.all_input_nodes:
            n.replace_input_with(old, new)


class Rewriter:
    """Rewrites the sites of one module's graph, sharing GAAF children between its train and eval graphs.

    Shared by the Dynamo backend (backend.py), which overrides ``site_name`` (Dynamo's module paths) and
    ``_activation`` (to skip GAAF's own ops); keep both signatures stable.
    """

    def __init__(self, ctx: Context, module: nn.Module, fqn: str, method: str = "forward") -> None:
        self.ctx, self.module, self.fqn = ctx, module, fqn
        self.prefix = "" if method == "forward" else f"{method}_"  # a helper method's sites: <fqn>.<method>_<node>
        self.stripped: dict[str, dict[str, Any]] = {}
        self.added: list[str] = []
        self.unreached: dict[str, dict[str, Any]] = {}
        self.changed = 0

    def site_name(self, node: fx.Node) -> str:
        name = self.prefix + node.name
        return f"{self.fqn}.{name}" if self.fqn else name

    def rewrite(self, graph: fx.Graph) -> int:
        n_changed = 0
        for node in list(graph.nodes):
            if node.op == "call_module":
                self._note_gate(node)
            elif node.op in ("call_function", "call_method"):
                n_changed += self._activation(graph, node) or self._dropout(graph, node)
        if n_changed:
            graph.lint()
        return n_changed

    def _note_gate(self, node: fx.Node) -> None:
        """A sigmoid-like module whose output multiplies a tensor is a gate (also the last layer of a Sequential)."""
        target, child = node.target, self.module.get_submodule(node.target)
        while isinstance(child, nn.Sequential) and len(child):
            last = str(len(child) - 1)
            target, child = f"{target}.{last}", child[-1]
        form = targets.module_form(child)
        if form is not None and _acts.get(form.activation).gate_like and _reaches_mul(node):
            self.ctx.gates.add(f"{self.fqn}.{target}" if self.fqn else target)

    def _activation(self, graph: fx.Graph, node: fx.Node) -> int:
        if node.op == "call_function":
            form = targets.FUNCTIONS.get(node.target) if callable(node.target) else None
            label = (
                f"{getattr(node.target, '__module__', None) or 'torch'}.{getattr(node.target, '__name__', node.target)}"
            )
            kind = "function"
        else:
            form, label, kind = targets.METHODS.get(node.target), f".{node.target}", "method"
        if form is None:
            return 0
        name = self.site_name(node)
        act = _acts.get(form.activation)
        is_gate = act.gate_like and _reaches_mul(node)
        if not self.ctx.decide(form.activation, name, is_gate, self.module):
            return 0
        params, inplace = targets.read_params(form, tuple(node.args[1:]), dict(node.kwargs))
        params.pop("input", None)
        if any(isinstance(v, fx.Node) for v in params.values()):
            self.unreached[name] = {
                "name": name,
                "form": kind,
                "target": label,
                "reason": "parameter computed at run time",
            }
            return 0
        attr = f"gaaf_{self.prefix}{node.name}"
        if attr not in self.module._modules:
            gaaf = self.ctx.make_gaaf(form.activation, act.params(params), Site(name, kind, label))
            self.module.add_module(attr, gaaf)
            self.added.append(attr)
        inp = _input_of(node)
        with graph.inserting_before(node):
            new = graph.call_module(attr, (inp,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if inplace and isinstance(inp, fx.Node):
            _rewire_after(graph, new, inp, new)
            if _may_alias(inp):  # the caller, or the view's base, sees the in-place change: write the result back
                with graph.inserting_before(new):
                    new.args = (graph.call_method("clone", (inp,)),)  # GAAF may save its input for backward
                with graph.inserting_after(new):
                    graph.call_method("copy_", (inp, new))
        return 1

    def _dropout(self, graph: fx.Graph, node: fx.Node) -> int:
        cfg = self.ctx.config
        if not cfg.strip_dropout or node.op != "call_function":
            return 0
        name = self.site_name(node)
        label = f"torch.nn.functional.{getattr(node.target, '__name__', node.target)}"
        if node.target in targets.DROPOUT_FUNCTIONS:
            if not self.ctx.allowed(self.module, name):
                return 0
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            self.stripped.setdefault(name, {"name": name, "form": "function", "target": label, "p": p})
            node.replace_all_uses_with(_input_of(node))
            graph.erase_node(node)
            return 1
        if node.target is targets.SDPA:
            i = targets.SDPA_DROPOUT_INDEX
            p = node.args[i] if len(node.args) > i else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, fx.Node):
                self.unreached[name] = {
                    "name": name,
                    "form": "function",
                    "target": label,
                    "reason": "dropout_p computed at run time",
                }
                return 0
            if not p or not self.ctx.allowed(self.module, name):
                return 0
            self.stripped.setdefault(name, {"name": name, "form": "function", "target": label + "(dropout_p)", "p": p})
            if len(node.args) > i:
                node.args = node.args[:i] + (0.0,) + node.args[i + 1 :]
            else:
                node.kwargs = {**node.kwargs, "dropout_p": 0.0}
            return 1
        return 0


class PatchedForward:
    """The instance-level ``forward`` of a rewritten module (or of a helper method, ``method``, when the forward
    itself cannot be traced): the traced code for the current mode.

    Calls that pass arguments the trace did not see (a parameter with a default, given) run the original forward,
    with one warning: those calls are not patched, and we say so rather than guess.
    """

    def __init__(
        self,
        module: nn.Module,
        fqn: str,
        codes: dict[bool, tuple[str, dict]],
        required: int,
        added,
        stripped,
        method: str = "forward",
    ):
        self.module, self.fqn, self.required, self.method = module, fqn, required, method
        self.codes = codes
        self.added, self.stripped = list(added), list(stripped)
        self._compile()
        self._warned = False

    method = "forward"  # instances pickled before helper methods were patched have no attribute of their own

    def _compile(self) -> None:
        from torch.fx.graph_module import _forward_from_src

        self.fns = {mode: _forward_from_src(src, dict(globs)) for mode, (src, globs) in self.codes.items()}

    @property
    def __code__(self) -> types.CodeType:
        # torch.export reads the exported module's ``forward.__code__`` (to name its shape environment).
        return self.fns[self.module.training].__code__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == self.required:
            return self.fns[self.module.training](self.module, *args)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"gaaf-patch: {self.fqn or type(self.module).__name__}"
                f"{'' if self.method == 'forward' else '.' + self.method} was called with arguments its trace did not "
                "see; its function-form GAAF sites run unpatched in such calls",
                stacklevel=2,
            )
        return getattr(type(self.module), self.method)(self.module, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Generated code is not picklable; its source is. Modules in its globals travel by name.
        state = dict(self.__dict__)
        state.pop("fns", None)
        state["codes"] = {
            mode: (src, {k: _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v for k, v in globs.items()})
            for mode, (src, globs) in self.codes.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["codes"] = {
            mode: (src, {k: v.load() if isinstance(v, _ModuleRef) else v for k, v in globs.items()})
            for mode, (src, globs) in state["codes"].items()
        }
        self.__dict__.update(state)
        self._compile()


@dataclass(frozen=True)
class _ModuleRef:
    name: str

    def load(self) -> types.ModuleType:
        return importlib.import_module(self.name)


def _python_code(graph: fx.Graph) -> tuple[str, dict]:
    code = graph.python_code(root_module="self")
    return code.src, code.globals


def _suspects(module: nn.Module, method: str = "forward") -> list[tuple[str, int]]:
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


def _helpers(module: nn.Module, method: str) -> list[str]:
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


def run(ctx: Context) -> int:
    """Trace every user module's own forward; rewrite those holding sites. Returns the number of sites changed."""
    total = 0
    for fqn, module in list(ctx.root.named_modules()):
        if is_builtin(module) or targets.module_form(module) is not None or "forward" in module.__dict__:
            continue
        total += _patch_module(ctx, module, fqn)
    ctx.changed[PASS_NAME] = total
    return total


_HELPER_DEPTH = 2  # helper methods of an untraceable forward are traced on their own, down to this depth


def _patch_module(ctx: Context, module: nn.Module, fqn: str, method: str = "forward", depth: int = 0) -> int:
    """Trace ``method`` of ``module`` (in train and eval mode) and rewrite its sites.

    If it cannot be traced (control flow on traced values, often inside a helper such as timm's
    ``BilinearAttnTransform.resize_mat``), each helper method it calls is traced on its own, then ``method`` is
    traced again with its helpers opaque (called as they are when the code runs). What still cannot be traced is
    reported as unreached."""
    shape = _default_args(getattr(module, method))
    if shape is None:
        _report_untraceable(ctx, module, fqn, f"{method} takes *args/**kwargs or keyword-only arguments", method)
        return 0
    concrete, required = shape
    try:
        graphs = _trace_modes(module, concrete, method)
    except Exception as e:  # noqa: BLE001 - any tracing failure: helpers first, then the method with helpers opaque
        why = f"not traceable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        helpers = _helpers(module, method) if depth < _HELPER_DEPTH else []
        n = sum(
            _patch_module(ctx, module, fqn, h, depth + 1)
            for h in helpers
            if not isinstance(module.__dict__.get(h), PatchedForward)
        )
        try:
            if not helpers:
                raise
            graphs = _trace_modes(module, concrete, method, tuple(helpers))
        except Exception:  # noqa: BLE001
            _report_untraceable(ctx, module, fqn, why, method)
            return n
        return n + _rewrite(ctx, module, fqn, method, graphs, required)
    return _rewrite(ctx, module, fqn, method, graphs, required)


def _trace_modes(
    module: nn.Module, concrete: dict[str, Any], method: str, opaque: tuple[str, ...] = ()
) -> dict[bool, fx.Graph]:
    graphs: dict[bool, fx.Graph] = {}
    was = module.training
    try:
        for mode in (was, not was):
            module.training = mode
            graphs[mode] = _trace(module, concrete, method, opaque)
    finally:
        module.training = was
    return graphs


def _rewrite(
    ctx: Context, module: nn.Module, fqn: str, method: str, graphs: dict[bool, fx.Graph], required: int
) -> int:
    if method == "forward":
        ctx.traced.add(fqn)
    _note_calls(ctx, fqn, graphs[True])
    rewriter = Rewriter(ctx, module, fqn, method)
    changed = {mode: rewriter.rewrite(g) for mode, g in graphs.items()}
    ctx.unreached.extend(rewriter.unreached.values())
    _note_bn_feeds(ctx, module, fqn, graphs[True])
    if not any(changed.values()):
        module.__dict__.pop("_gaaf_constants", None)
        return 0
    for key, value in module.__dict__.pop("_gaaf_constants", {}).items():
        module.__dict__[key] = value
    if any(n.op == "get_attr" and n.target == SELF_ATTR for g in graphs.values() for n in g.nodes):
        module.__dict__[SELF_ATTR] = module  # not a child: the module tree and state_dict do not change
    codes = {mode: _python_code(g) for mode, g in graphs.items()}
    if codes[True][0] == codes[False][0]:
        codes = {True: codes[True], False: codes[True]}
    module.__dict__[method] = PatchedForward(
        module, fqn, codes, required, rewriter.added, rewriter.stripped.values(), method
    )
    return max(changed.values())


def _note_calls(ctx: Context, fqn: str, graph: fx.Graph) -> None:
    """How often the traced code calls each child module (torchvision's blocks call one ``self.relu`` twice): the
    ``budget`` pass counts activation calls, not modules."""
    prefix = f"{fqn}." if fqn else ""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[prefix + str(node.target)] = counts.get(prefix + str(node.target), 0) + 1
    for name, n in counts.items():
        ctx.calls[name] = max(ctx.calls.get(name, 0), n)


_ADD_FNS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _note_bn_feeds(ctx: Context, module: nn.Module, fqn: str, graph: fx.Graph) -> None:
    """(BatchNorm, module) pairs for the ``fuse`` pass: in the training graph, a plain BatchNorm (or a Sequential
    ending in one, like torchvision's ``downsample``) whose output goes to one module call only, directly or through
    one residual add whose result goes to one module call only."""
    prefix = f"{fqn}." if fqn else ""
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        bn_name, child = node.target, module.get_submodule(node.target)
        while isinstance(child, nn.Sequential) and len(child):
            bn_name, child = f"{bn_name}.{len(child) - 1}", child[-1]
        if fusable_class(child) is None:
            continue
        (user,) = node.users
        is_add = (user.op == "call_function" and user.target in _ADD_FNS) or (
            user.op == "call_method" and user.target in _ADD_METHODS
        )
        if is_add and len(user.users) == 1 and len(user.args) == 2 and not user.kwargs:
            (user,) = user.users
        if user.op == "call_module":
            ctx.bn_feeds.append((prefix + bn_name, prefix + user.target))


def _report_untraceable(ctx: Context, module: nn.Module, fqn: str, reason: str, method: str = "forward") -> None:
    relevant = (
        targets.SUSPECT_NAMES if ctx.config.strip_dropout else targets.SUSPECT_NAMES - {"dropout", "alpha_dropout"}
    )
    for name, line in _suspects(module, method):
        if name in relevant:
            ctx.unreach(f"{fqn}:{line}" if fqn else f"<root>:{line}", "function", name, reason)


def patched_methods(module: nn.Module) -> list[PatchedForward]:
    """The rewritten forward and helper methods of one module."""
    return [v for v in module.__dict__.values() if isinstance(v, PatchedForward)]


def unpatch(module: nn.Module) -> bool:
    """Undo :func:`run` on one module. Returns whether there was anything to undo."""
    patched = patched_methods(module)
    if not patched:
        return False
    for fwd in patched:
        del module.__dict__[fwd.method]
        for attr in fwd.added:
            if isinstance(module._modules.get(attr), GAAF):
                del module._modules[attr]
    for key in [k for k in module.__dict__ if k.startswith("_tensor_constant") or k == SELF_ATTR]:
        del module.__dict__[key]
    return True
