"""The forward a rewritten module runs: :class:`PatchedForward`, the generated code of its traced graphs.

It sits in the module's ``__dict__`` (as ``forward``, or as a helper method's name), so the class and every other
method stay as they were, and ``unpatch`` deletes it. It pickles by source: generated functions are not picklable,
their code is, and the modules in its globals travel by name.
"""

from __future__ import annotations

import importlib
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

__all__ = ["PatchedForward", "python_code", "patched_methods"]


class PatchedForward:
    """The instance-level ``forward`` of a rewritten module (or of a helper method, ``method``, when the forward
    itself cannot be traced): the traced code for the current mode.

    A trace freezes what it saw: which arguments were given, and the plain attributes the code read (timm's
    ``grad_checkpointing``, ``fused_attn``). A call that passes arguments the trace did not see, or finds a plain
    attribute of the module changed since the trace, runs the class's own code under a run-time scope
    (:class:`.scope.RuntimeScope`) instead: still patched, never stale. ``added``: the GAAF children the rewrite
    added, which ``unpatch`` removes.
    """

    def __init__(
        self,
        module: nn.Module,
        fqn: str,
        codes: dict[bool, tuple[str, dict]],
        required: int,
        added,
        method: str = "forward",
        config: Any = None,
        filter_fn: Any = None,
    ):
        self.module, self.fqn, self.required, self.method = module, fqn, required, method
        self.codes = codes
        self.added = list(added)
        self.config, self.filter_fn = config, filter_fn
        self.guards = _plain_attributes(module)
        self._scope = None
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
        if (
            not kwargs
            and len(args) == self.required
            and (_compiling() or _plain_attributes(self.module) == self.guards)
        ):
            # Under Dynamo the traced code is what gets compiled; Dynamo guards the attributes itself (a change
            # recompiles), and a TorchFunctionMode does not belong in its graph.
            return self.fns[self.module.training](self.module, *args)
        if getattr(self, "config", None) is None:  # pickled before run-time scopes existed: the original, said once
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"gaaf-patch: {self.fqn or type(self.module).__name__}"
                    f"{'' if self.method == 'forward' else '.' + self.method} was called with arguments its trace did "
                    "not see; its function-form GAAF sites run unpatched in such calls (patch the model again)",
                    stacklevel=2,
                )
            return getattr(type(self.module), self.method)(self.module, *args, **kwargs)
        return self.scope()(*args, **kwargs)

    @property
    def __signature__(self) -> Any:
        # inspect.signature(model.forward) must see the class's parameters (Hugging Face's Trainer drops the input
        # columns a forward does not name), not this wrapper's (*args, **kwargs).
        return inspect.signature(getattr(type(self.module), self.method).__get__(self.module))

    def scope(self) -> Any:
        """The run-time scope for calls the trace does not cover (made on first need)."""
        if getattr(self, "_scope", None) is None:
            from ..gain import MAX_DELTA
            from ..modules import GAAF
            from .scope import RuntimeScope

            why = "called with arguments or attribute values the trace did not see"
            self._scope = RuntimeScope(self.module, self.fqn, self.config, why, self.method, self.filter_fn)
            deltas = [m.delta for m in self.module.modules() if isinstance(m, GAAF) and m.delta is not None]
            self._scope.delta = deltas[0] if deltas else (MAX_DELTA if self.config.gain == "auto" else None)
        return self._scope

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


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """The module's own plain-valued attributes (bool, int, float, str, None): what a forward may branch on that a
    trace would freeze. ``training`` is not among them: each mode has its own traced code."""
    return {
        k: v
        for k, v in module.__dict__.items()
        if k != "training"
        and (v is None or type(v) in (bool, int, float, str))
        and not k.startswith("_tensor_constant")
    }


@dataclass(frozen=True)
class _ModuleRef:
    name: str

    def load(self) -> types.ModuleType:
        return importlib.import_module(self.name)


def python_code(graph: fx.Graph) -> tuple[str, dict]:
    """The source and globals of ``graph``'s code, as a method of the module (``self``)."""
    code = graph.python_code(root_module="self")
    return code.src, code.globals


def patched_methods(module: nn.Module) -> list[PatchedForward]:
    """The rewritten forward and helper methods of one module."""
    return [v for v in module.__dict__.values() if isinstance(v, PatchedForward)]
