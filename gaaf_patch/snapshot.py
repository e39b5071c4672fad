"""What a failed ``gaaf_patch.patch`` puts back: every object a pass may change, as it was.

The passes change a model only through its objects' ``__dict__``: a module's registries of children, parameters,
buffers and hooks (containers kept in ``__dict__``), its instance attributes (``forward``, ``dropout``,
``activation``, noise knobs such as LayerDrop probabilities, ``config`` given a view with a knob off by
:mod:`.passes.noise`, which never writes into the shared config itself), its class (the ``fuse`` pass), the fields
of run-time scopes and of the patch record. None writes into a tensor. So a :class:`Snapshot` is a shallow copy of each reachable object's
``__dict__`` and of the containers in it, and :meth:`Snapshot.restore` refills those same dicts, sets and lists in
place (references held elsewhere stay valid) and resets each class. Cost: one dict copy per module, no tensor copied.

Reachable: every module in the tree, and the modules a GAAF or StrippedDropout keeps as its original (a re-patch
unpatches first, putting those back in the tree, where the passes may then change them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from .modules import original_of
from .passes.context import PatchRecord
from .passes.scope import RuntimeScope

__all__ = ["Snapshot"]

_CONTAINERS = (dict, set, list)


def _reachable(root: nn.Module) -> Iterator[nn.Module]:
    stack, seen = [root], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        stack.extend(c for c in module._modules.values() if c is not None)
        original = original_of(module)
        if isinstance(original, nn.Module):
            stack.append(original)


class Snapshot:
    """The state of ``root``'s objects now; :meth:`restore` puts it back."""

    def __init__(self, root: nn.Module) -> None:
        self._saved: list[tuple[Any, type, dict[str, Any], dict[str, Any]]] = []
        seen: set[int] = set()
        for module in _reachable(root):
            self._keep(module, seen)
            for value in list(module.__dict__.values()):
                if isinstance(value, (RuntimeScope, PatchRecord)):
                    self._keep(value, seen)

    def _keep(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        state = dict(obj.__dict__)
        inner = {k: (dict(v) if isinstance(v, dict) else type(v)(v)) for k, v in state.items() if _container(v)}
        self._saved.append((obj, type(obj), state, inner))

    def restore(self) -> None:
        for obj, cls, state, inner in reversed(self._saved):
            obj.__dict__.clear()
            obj.__dict__.update(state)
            for key, content in inner.items():
                container = state[key]
                if isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    container.update(content)
            if type(obj) is not cls:
                object.__setattr__(obj, "__class__", cls)


def _container(value: Any) -> bool:
    # exactly the builtin containers (and OrderedDict, the hooks' registries): what the passes fill in place
    return isinstance(value, _CONTAINERS) and type(value).__module__ in ("builtins", "collections")
