"""``torch.compile`` integration: a Dynamo backend ``"gaaf"`` that patches each captured graph, then runs Inductor.

``torch.compile(model, backend="gaaf")`` (registered through the ``torch_dynamo_backends`` entry point) or
``gaaf_patch.compile(model, mode="sawtooth", strip_dropout=True)`` (options bound) compiles an *unpatched* model:
every graph Dynamo captures is rewritten by the functional pass's :class:`~gaaf_patch.passes.rewriter.Rewriter`
(the very matcher ``gaaf_patch.patch`` uses) **before** AOTAutograd, so AOTAutograd traces the GAAF
``autograd.Function`` forward *and* backward, and Inductor fuses ``phi'(x) + s(x)`` into the surrounding kernels.
Dynamo has already inlined every module, so activations arrive as functions and methods, in place or not::

    %input_3 = call_function[target=F.relu](args=(%input_2,), kwargs={inplace: True})   # nn.ReLU(inplace=True)
    %y       = call_method[target=relu_](args=(%x_1,))                                   # x.relu_(); x_1 read later
    %x_3     = call_function[target=F.dropout](args=(%x_2, 0.2, True))                   # F.dropout / nn.Dropout
    %linear  = call_function[target=torch._C._nn.linear](args=(%x_1, ...))

becomes (``strip_dropout=True``)::

    %gaaf_input_3 = call_module[target=gaaf_input_3](args=(%input_2,))    # GAAF(relu): a child of the graph module
    %gaaf_y       = call_module[target=gaaf_y](args=(%x_1,))
    %linear       = call_function[target=torch._C._nn.linear](args=(%gaaf_y, ...))   # rewired: read the new value
    (the dropout node is gone: its users read %x_2)

An in-place site whose input is a graph input or a view keeps its mutation visible to the caller (or to the view's
base): GAAF reads ``input.clone()`` (it may save it for backward) and ``input.copy_(new)`` writes the result back;
functionalization turns both into plain data flow. Graph breaks need nothing special: Dynamo hands each subgraph to
the backend on its own. Bodies of activation checkpointing are rewritten like the graph itself. A model already
``gaaf_patch.patch``-ed is not patched twice: its GAAF sites reach the graph as ``autograd_function_apply`` (whose
bodies are left alone) or, without grad, as the plain ops of ``gaaf_patch/ops.py`` (recognised by their stack trace
and skipped).

Caching: AOTAutograd's cache keys on the rewritten graph, where GAAF children are pickled by reference (function
names, not code). So the backend hands Inductor a no-op custom pass whose ``uuid()`` is :meth:`GAAFPass.uuid`, a
digest of the GAAF source files (:func:`uuid`) and the options: Inductor folds it into both caches' keys, and a
compiled graph is rebuilt when GAAF's code or options change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import ops
from .config import PatchConfig, PatchError, ShapeLike, build
from .modules import GAAF
from .ops import DEFAULT_K
from .passes import budget, functional, targets
from .passes.context import Context, PatchRecord
from .passes.result import PatchPassResult, combine
from .passes.rewriter import Rewriter

__all__ = ["GAAFPass", "GAAFBackend", "gaaf_backend", "compile", "uuid"]

# Files whose code decides what a compiled GAAF graph computes: a change to any of them must miss the cache.
_HASHED = (
    "ops.py",
    "activations.py",
    "modules.py",
    "config.py",
    "backend.py",
    "shapes/*.py",
    "passes/rewriter.py",
    "passes/gates.py",
    "passes/budget.py",
    "passes/targets.py",
    "passes/context.py",
)
_OPS_FILE = f'File "{ops.__file__}"'
# Dynamo spells module paths ``L['self'].layer1[0].act``; the report and per-layer shape patterns use ``layer1.0.act``.
_ROOT = re.compile(r"^[LG]\['[^']*'\]\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


@functools.cache
def uuid() -> str:
    """A digest of the package source that defines GAAF and this rewrite: stable across runs, new when they change."""
    from .version import __version__

    root = Path(__file__).parent
    h = hashlib.sha256(f"gaaf-patch {__version__}".encode())
    for pattern in _HASHED:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _module_path(node: fx.Node) -> tuple[str, type | str | None]:
    """The qualified name and class of the innermost module ``node`` was traced in (``""`` at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1][:2]
    path = _INDEX.sub(r".\1", _ROOT.sub("", str(path)))
    return path, cls


def _is_class(cls: type | str | None, klass: type) -> bool:
    if isinstance(cls, type):
        return issubclass(cls, klass)
    return isinstance(cls, str) and cls.endswith(f"{klass.__module__}.{klass.__qualname__}")


def _inside_gaaf(node: fx.Node) -> bool:
    """The node is GAAF's own computation (an already-patched model run without grad): patching it would apply twice."""
    if _OPS_FILE in (node.meta.get("stack_trace") or ""):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(_is_class(entry[1], GAAF) for entry in stack.values())


class _DynamoRewriter(Rewriter):
    """The functional pass's rewriter, naming sites by the module Dynamo inlined them from and skipping GAAF's own ops."""

    def site_name(self, node: fx.Node) -> str:
        # Same names as gaaf_patch.patch gives: an activation module's qualified name, else ``<module>.<node>``.
        path, cls = _module_path(node)
        if path and isinstance(cls, type) and any(c in targets.MODULES for c in cls.__mro__):
            return path
        return f"{path}.{node.name}" if path else node.name

    def _activation(self, graph: fx.Graph, node: fx.Node) -> int:
        if _inside_gaaf(node):
            return 0
        return super()._activation(graph, node)


def _is_alias(node: Any) -> bool:
    """Whether an in-place op on ``node`` is seen outside the rewired reads: a graph input, or a view of a tensor."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value._is_view()


# Higher-order ops whose body graphs run as ordinary code of the model: rewritten like the top-level graph.
_TRANSPARENT_HOPS = frozenset({"tag_activation_checkpoint", "wrap"})
# Bodies of a custom autograd.Function (GAAF's own among them): its backward is its own, nothing to rewrite.
_OPAQUE_HOPS = frozenset({"autograd_function_apply"})


def _hop_names(node: fx.Node) -> set[str]:
    """Names of the higher-order ops that use the body ``node`` fetches."""
    names = set()
    for user in node.users:
        name = getattr(user.target, "name", None)
        names.add(name() if callable(name) else str(user.target))
    return names


def _sites_in(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if targets.is_activation_node(n)]


class GAAFPass(PassBase):
    """Rewrite the activation (and, if configured, dropout) nodes of one Dynamo graph into GAAF ``call_module`` nodes.

    The contract of ``torch.fx.passes.infra``: returns ``PassResult(gm, modified)``, ``modified`` true only when a
    node changed. Bodies of activation checkpointing (``tag_activation_checkpoint``) are rewritten too; sites in
    other higher-order ops' bodies, and sites the rewriter cannot handle, are in ``last_unreached`` and produce one
    warning per graph. ``last_sites`` describes what the last call patched; ``last_passes`` what its steps did (the
    ``functional`` rewrite and the ``budget``, one :class:`~gaaf_patch.passes.result.PatchPassResult` each, bodies
    included); ``last_record`` holds those results and the unreached and skipped sites in the
    :class:`~gaaf_patch.passes.PatchRecord` form ``patch`` leaves on a model.
    """

    def __init__(self, config: PatchConfig | None = None) -> None:
        self.config = config or PatchConfig()
        self.last_unreached: list[dict[str, Any]] = []
        self.last_sites: list[dict[str, Any]] = []
        self.last_passes: list[PatchPassResult] = []
        self.last_record: PatchRecord | None = None
        # every graph this pass rewrote (a graph break or a recompile adds one): what gaaf_patch.report shows for a
        # model compiled with gaaf.compile, whose own modules stay as they are
        self.graphs: list[tuple[list[dict[str, Any]], PatchRecord]] = []

    def uuid(self) -> str | None:
        """Identity of this pass and its options for compile caches: the package :func:`uuid` and the options.

        ``None`` (no caching) when a shape is an unregistered callable: nothing stable identifies its code.
        """
        try:
            options = json.dumps(self.config.to_dict(), sort_keys=True)
        except ValueError:
            return None
        return hashlib.sha256(f"{uuid()}|{options}".encode()).hexdigest()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        found = Context(root=graph_module, config=self.config)  # unreached and skipped sites of every graph
        self.last_sites = []
        self.last_passes = [replace(r, graph_module=graph_module) for r in combine(self._rewrite(graph_module, found))]
        self.last_unreached = found.unreached
        self.last_record = PatchRecord.for_config(self.config)
        self.last_record.absorb(found, self.last_passes)
        self.graphs.append((list(self.last_sites), self.last_record))
        if self.last_unreached:
            names = ", ".join(u["name"] for u in self.last_unreached[:4])
            warnings.warn(
                f"gaaf-patch (torch.compile): {len(self.last_unreached)} site(s) left unpatched ({names}): "
                + "; ".join(sorted({u["reason"] for u in self.last_unreached})),
                stacklevel=2,
            )
        return PassResult(graph_module, any(r.modified for r in self.last_passes))

    def _rewrite(self, gm: fx.GraphModule, found: Context) -> list[PatchPassResult]:
        """Rewrite ``gm`` and the bodies it runs; returns the result of each step on each graph."""
        results: list[PatchPassResult] = []
        for node in gm.graph.nodes:
            body = getattr(gm, str(node.target), None) if node.op == "get_attr" else None
            if not isinstance(body, fx.GraphModule):
                continue
            hops = _hop_names(node)
            if hops & _TRANSPARENT_HOPS:
                results += self._rewrite(body, found)
            elif not hops <= _OPAQUE_HOPS:
                reason = f"inside the body of {', '.join(sorted(hops))}"
                for site in _sites_in(body):
                    found.unreached.append({"name": f"{node.target}.{site.name}", "form": site.op, "reason": reason})

        graph = gm.graph
        before = {f"gaaf_{n.name}": (n, dict(n.meta)) for n in graph.nodes}
        ctx = Context(root=gm, config=self.config)
        rewriter = _DynamoRewriter(ctx, gm, "")
        n = rewriter.rewrite(graph)
        results.append(PatchPassResult(functional.PASS_NAME, n, rewriter.counts(), gm))
        results.append(budget.run(ctx))  # sites of this graph (a graph break splits the count)
        found.unreached += list(rewriter.unreached.values()) + ctx.unreached
        found.skipped += ctx.skipped
        found.stripped += list(rewriter.stripped.values())
        added = set(rewriter.added)
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target in added:
                old, meta = before[node.target]
                self._finish_site(gm, node, old, meta)
        if n:
            graph.lint()
            gm.recompile()
        return results

    def _finish_site(self, gm: fx.GraphModule, node: fx.Node, old: fx.Node, meta: dict[str, Any]) -> None:
        """Give the new node its predecessor's metadata; keep an in-place mutation that is visible elsewhere."""
        site = gm.get_submodule(str(node.target)).describe()
        self.last_sites.append(site)
        node.meta.update({k: v for k, v in meta.items() if k in ("nn_module_stack", "stack_trace", "example_value")})
        inplace = old.op == "call_method" and str(old.target).endswith("_")
        if old.op == "call_function":
            form = targets.FUNCTIONS.get(old.target)
            inplace = form is not None and targets.read_params(form, tuple(old.args[1:]), dict(old.kwargs))[1]
        inp = node.args[0]
        if inplace:
            value = meta.get("example_value")
            if isinstance(value, torch.Tensor):  # the old value aliased the input; the new one is a fresh tensor
                node.meta["example_value"] = _fresh_like(value)
            if _is_alias(inp):  # GAAF reads a copy (it may save it for backward), then writes its result back
                with gm.graph.inserting_before(node):
                    node.args = (gm.graph.call_method("clone", (inp,)),)
                with gm.graph.inserting_after(node):
                    gm.graph.call_method("copy_", (inp, node))


def _fresh_like(value: torch.Tensor) -> torch.Tensor:
    """A tensor of ``value``'s metadata that aliases nothing (``value`` is a fake tensor in Dynamo graphs)."""
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return torch.empty_like(value)
    with mode:
        return torch.empty_like(value)


class _CacheKey(CustomGraphPass):
    """Carries :meth:`GAAFPass.uuid` into the keys of Inductor's FX graph cache and AOTAutograd's cache.

    The rewrite itself must run before AOTAutograd (which traces GAAF's backward), so it cannot be one of
    Inductor's custom passes; Inductor keys its caches on the ``uuid()`` of those passes, so this post-grad one
    changes nothing and only says which GAAF code and options produced the graph. A ``None`` uuid turns the caches
    off for that compile, as documented for ``CustomPassBase.uuid``.
    """

    def __init__(self, key: str | None) -> None:
        self.key = key

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str | None:
        return self.key


def _inductor_patches(
    mode: str | None, options: Mapping[str, Any] | None, dynamic: bool | None, key: _CacheKey
) -> dict[str, Any]:
    """What ``torch.compile(mode=..., options=...)`` would give Inductor for backend ``"inductor"``, plus ``key``."""
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    patches: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode, dynamic))
    patches.update({k.replace("-", "_"): v for k, v in (options or {}).items()})
    theirs = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    patches["post_grad_custom_pre_pass"] = [key, *get_custom_graph_passes(theirs)]
    return patches


BACKEND_ATTR = "_gaaf_backend"


class GAAFBackend:
    """A Dynamo backend: :class:`GAAFPass` with fixed options, then Inductor (or ``inner``, another backend).

    ``torch.compile`` passes its own ``mode`` (``"max-autotune"``, ...) and ``options`` on to a custom backend as
    keyword arguments; they are Inductor's and go to Inductor unchanged. GAAF's own mode is ``config.mode``.
    """

    def __init__(self, config: PatchConfig | None = None, inner: str | Callable[..., Any] = "inductor") -> None:
        self.graph_pass = GAAFPass(config)
        self.inner = inner
        self.__name__ = "gaaf"  # what torch.compile names the compiler in logs and errors

    @property
    def config(self) -> PatchConfig:
        return self.graph_pass.config

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        self.graph_pass(gm)
        if self.inner != "inductor":  # another backend after the rewrite ("aot_eager" to debug): no Inductor options
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend(self.inner)(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        key = _CacheKey(self.graph_pass.uuid())
        return compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, options, None, key))

    def uuid(self) -> str | None:
        return self.graph_pass.uuid()

    def __eq__(self, other: object) -> bool:
        # Same GAAF code and options compile the same graphs; without a uuid (a callable shape) only itself does.
        if not isinstance(other, GAAFBackend):
            return NotImplemented
        key = self.uuid()
        return self is other or (key is not None and key == other.uuid() and self.inner == other.inner)

    def __hash__(self) -> int:
        key = self.uuid()
        return hash(key) if key is not None else id(self)

    def __repr__(self) -> str:
        return f"GAAFBackend({self.config!r})"


_DEFAULT = GAAFBackend()


def gaaf_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    """The ``"gaaf"`` backend of ``torch.compile``, with default options (exact mode, every non-gate activation)."""
    return _DEFAULT(gm, example_inputs, **kwargs)


def compile(
    model: nn.Module,
    *,
    strip_dropout: bool = False,
    activations: str | Sequence[str] = "auto",
    shapes: str | Mapping[str, ShapeLike] | None = None,
    mode: str = "exact",
    K: float = DEFAULT_K,
    gain: str | None = None,
    compile_mode: str | None = None,
    **torch_compile_kwargs: Any,
) -> Any:
    """``torch.compile(model)`` with GAAF activations: the model itself is left as it is.

    ``strip_dropout``, ``activations``, ``shapes``, ``gain``, ``mode`` and ``K`` mean what they mean for
    :func:`gaaf_patch.patch` (``shapes`` patterns match Dynamo's module paths, e.g. ``"layer1.0.act1"``).
    ``mode`` is GAAF's, so torch.compile's own ``mode`` is spelled ``compile_mode``; every other keyword
    (``dynamic``, ``fullgraph``, ``options``, ...) goes to ``torch.compile`` as is. DropPath reaches Dynamo's graph
    as plain arithmetic and cannot be told apart there: to strip it, ``gaaf_patch.patch(model,
    strip_droppath=True)`` first, then compile with ``backend="gaaf"`` (patched sites are not patched again).
    """
    if "backend" in torch_compile_kwargs:
        raise PatchError("gaaf_patch.compile picks the backend itself; call torch.compile(model, backend=...) instead")
    config = build(activations, shapes, gain, strip_dropout=strip_dropout, mode=mode, K=K)
    backend = GAAFBackend(config)
    compiled = torch.compile(model, backend=backend, mode=compile_mode, **torch_compile_kwargs)
    if isinstance(compiled, nn.Module):
        compiled.__dict__[BACKEND_ATTR] = backend  # gaaf_patch.report(compiled) reads the graphs it rewrote
    return compiled
