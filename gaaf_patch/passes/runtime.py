"""The forward a rewritten module runs: :class:`PatchedForward`, the generated code of its traced graphs.

It sits in the module's ``__dict__`` (as ``forward``, or as a helper method's name), so the class and every other
method stay as they were, and ``unpatch`` deletes it. It pickles by source: generated functions are not picklable,
their code is, and the modules in its globals travel by name.
"""

from __future__ import annotations

import importlib
import types
import warnings
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

__all__ = ["PatchedForward", "python_code", "patched_methods"]


class PatchedForward:
    """The instance-level ``forward`` of a rewritten module (or of a helper method, ``method``, when the forward
    itself cannot be traced): the traced code for the current mode.

    Calls that pass arguments the trace did not see (a parameter with a default, given) run the original forward,
    with one warning: those calls are not patched, and we say so rather than guess. ``added``: the GAAF children
    the rewrite added, which ``unpatch`` removes.
    """

    def __init__(
        self,
        module: nn.Module,
        fqn: str,
        codes: dict[bool, tuple[str, dict]],
        required: int,
        added,
        method: str = "forward",
    ):
        self.module, self.fqn, self.required, self.method = module, fqn, required, method
        self.codes = codes
        self.added = list(added)
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


def python_code(graph: fx.Graph) -> tuple[str, dict]:
    """The source and globals of ``graph``'s code, as a method of the module (``self``)."""
    code = graph.python_code(root_module="self")
    return code.src, code.globals


def patched_methods(module: nn.Module) -> list[PatchedForward]:
    """The rewritten forward and helper methods of one module."""
    return [v for v in module.__dict__.values() if isinstance(v, PatchedForward)]
