"""The ``functional`` pass: activations and dropout written as code inside ``forward`` (``F.relu(x)``,
``x.tanh()``, ``F.dropout``) become GAAF children.

Each user-defined module is traced on its own (:mod:`.tracer`), every child a leaf, so a graph holds exactly that
module's code. A module that cannot be traced is a leaf for its parent and gets traced (or not) on its own: the
failure stays local, as with modelopt's RobustTracer, and its source is scanned so that a possible site is reported
as unreached instead of ignored. The graphs are rewritten by :class:`.rewriter.Rewriter`; a module with something
rewritten gets a :class:`.runtime.PatchedForward` (the generated code, traced in train and in eval mode when the
two differ) as its instance ``forward``. The class, its other methods and attributes stay. A module with nothing to
rewrite in its trace gets one too when its source holds a site no graph does (a branch the trace froze shut at an
optional argument's default): calls the trace did not see then run under a run-time scope.

Besides rewriting, the pass leaves what the traces showed in the context: the gates (for the ``modules`` pass),
how often each child is called (for ``budget``), and the training graphs (for ``fuse``).
"""

from __future__ import annotations

from torch import fx, nn

from ..modules import GAAF, refuse_script
from . import probe, targets, tracer
from .context import Context
from .gates import GLU_MODULES, glu_skip
from .result import PatchPassResult
from .rewriter import Rewriter
from .runtime import PatchedForward, _ModuleRef, patched_methods, python_code
from .scope import EXTRA_SUSPECTS, RuntimeScope, needs_scope, scopes
from .tracer import CONSTANTS_ATTR, SELF_ATTR, is_builtin

# PatchedForward and _ModuleRef are named here too: models pickled before the runtime forward had its own module
# refer to them as gaaf_patch.passes.functional.<name>.
__all__ = ["PASS_NAME", "run", "unpatch", "is_builtin", "PatchedForward", "_ModuleRef", "patched_methods"]

PASS_NAME = "functional"
_HELPER_DEPTH = 2  # helper methods of an untraceable forward are traced on their own, down to this depth


def run(ctx: Context) -> PatchPassResult:
    """Trace every user module's own forward; rewrite those holding sites.

    Counts: ``activations`` (GAAF children added), ``dropout`` (dropout calls removed), ``methods`` (forwards and
    helper methods rewritten); ``changed`` is activations + dropout.
    """
    totals = {"activations": 0, "dropout": 0, "methods": 0}
    before = ctx.scopes
    for fqn, module in list(ctx.root.named_modules()):
        if isinstance(module, GLU_MODULES):  # a gate with no GAAF form: said so, for the audit to explain
            ctx.skip(glu_skip(fqn))
            continue
        if is_builtin(module) or targets.module_form(module) is not None or "forward" in module.__dict__:
            continue
        if probe.looks_like_activation(module) and not list(module.children()):
            continue  # an activation no table maps: never patched inside (the modules pass reports it)
        for key, n in _patch_module(ctx, module, fqn).items():
            totals[key] += n
    totals["runtime_scopes"] = ctx.scopes - before
    return PatchPassResult(
        PASS_NAME, totals["activations"] + totals["dropout"] + totals["runtime_scopes"], totals, ctx.root
    )


def _patch_module(ctx: Context, module: nn.Module, fqn: str, method: str = "forward", depth: int = 0) -> dict[str, int]:
    """Trace ``method`` of ``module`` (in train and eval mode) and rewrite its sites; returns what changed.

    If it cannot be traced (control flow on traced values, often inside a helper such as timm's
    ``BilinearAttnTransform.resize_mat``), each helper method it calls is traced on its own, then ``method`` is
    traced again with its helpers opaque (called as they are when the code runs). What still cannot be traced is
    reported as unreached."""
    shape = tracer.default_args(getattr(module, method))
    if shape is None:
        _report_untraceable(ctx, module, fqn, f"{method} takes *args/**kwargs or keyword-only arguments", method)
        return {}
    concrete, required = shape
    try:
        graphs = tracer.trace_modes(module, concrete, method)
    except Exception as e:  # noqa: BLE001 - any tracing failure: helpers first, then the method with helpers opaque
        why = f"not traceable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        helpers = tracer.helpers(module, method) if depth < _HELPER_DEPTH else []
        done: dict[str, int] = {}
        for h in helpers:
            if not isinstance(module.__dict__.get(h), PatchedForward):
                for key, n in _patch_module(ctx, module, fqn, h, depth + 1).items():
                    done[key] = done.get(key, 0) + n
        try:
            if not helpers:
                raise
            graphs = tracer.trace_modes(module, concrete, method, tuple(helpers))
        except Exception:  # noqa: BLE001
            _report_untraceable(ctx, module, fqn, why, method)
            return done
        mine = _rewrite(ctx, module, fqn, method, graphs, required)
        return {key: done.get(key, 0) + mine.get(key, 0) for key in {*done, *mine}}
    return _rewrite(ctx, module, fqn, method, graphs, required)


def _rewrite(
    ctx: Context, module: nn.Module, fqn: str, method: str, graphs: dict[bool, fx.Graph], required: int
) -> dict[str, int]:
    if method == "forward":
        ctx.traced.add(fqn)
    _note_calls(ctx, fqn, graphs[True])
    rewriter = Rewriter(ctx, module, fqn, method)
    changed = {mode: rewriter.rewrite(g) for mode, g in graphs.items()}
    ctx.unreached.extend(rewriter.unreached.values())
    ctx.graphs.append((fqn, module, graphs[True]))
    # Nothing to rewrite in the code the trace saw; but calls the trace did not see (other arguments, other attribute
    # values) may run sites it did not (a branch on an optional argument): the module keeps its traced code for
    # the calls it saw, and gets a run-time scope for the others (PatchedForward does both).
    hidden = [] if any(changed.values()) else tracer.untraced_sites(module, method, graphs, EXTRA_SUSPECTS)
    if not any(changed.values()) and not hidden:
        module.__dict__.pop(CONSTANTS_ATTR, None)
        return {}
    for key, value in module.__dict__.pop(CONSTANTS_ATTR, {}).items():
        module.__dict__[key] = value
    if any(n.op == "get_attr" and n.target == SELF_ATTR for g in graphs.values() for n in g.nodes):
        module.__dict__[SELF_ATTR] = module  # not a child: the module tree and state_dict do not change
    codes = {mode: python_code(g) for mode, g in graphs.items()}
    if codes[True][0] == codes[False][0]:
        codes = {True: codes[True], False: codes[True]}
    module.__dict__["__prepare_scriptable__"] = refuse_script  # a rewritten forward: TorchScript cannot
    module.__dict__[method] = PatchedForward(
        module, fqn, codes, required, rewriter.added, method, ctx.config, ctx.filter_fn
    )
    ctx.stripped.extend(rewriter.stripped.values())
    return {**rewriter.counts(), "methods": 0 if hidden else 1}


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


def _report_untraceable(ctx: Context, module: nn.Module, fqn: str, reason: str, method: str = "forward") -> None:
    """Code fx cannot trace is rewritten as it runs instead (:mod:`.scope`): the method gets a RuntimeScope."""
    if isinstance(module.__dict__.get(method), (PatchedForward, RuntimeScope)) or not needs_scope(module, method):
        return
    module.__dict__["__prepare_scriptable__"] = refuse_script  # a rewritten forward: TorchScript cannot
    module.__dict__[method] = RuntimeScope(module, fqn, ctx.config, reason, method, ctx.filter_fn)
    ctx.scopes += 1


def unpatch(module: nn.Module) -> bool:
    """Undo :func:`run` on one module. Returns whether there was anything to undo."""
    for scope in scopes(module):
        scope.undo()
    module.__dict__.pop("__prepare_scriptable__", None)
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
