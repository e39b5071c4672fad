"""The draws :func:`gaaf_patch.audit.audit` follows: which tensors hold the values of a uniform draw, so that
comparing them (``torch.rand(n) < p``: a keep/drop mask, a custom dropout) turns the draw from a sample into a
``random`` finding. The rule itself is stated in :mod:`gaaf_patch.audit`'s docstring."""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves

__all__ = ["SAMPLING", "UNIFORM", "Token", "Draws"]

# Seeded ops that sample values (not a keep/drop mask): a ``draw`` unless compared into a mask (gaaf_patch.audit).
SAMPLING: frozenset[str] = frozenset(
    {
        "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal", "uniform",
        "exponential", "geometric", "log_normal", "cauchy", "random", "multinomial", "poisson", "_standard_gamma",
        "_sample_dirichlet", "binomial",
    }
)  # fmt: skip
# Uniform draws: compared with a probability, they make a Bernoulli mask.
UNIFORM: frozenset[str] = frozenset({"rand", "rand_like", "uniform"})
_COMPARE = frozenset({"lt", "le", "gt", "ge", "less", "greater", "less_equal", "greater_equal"})


class Token:
    """One draw op's call: counted as a ``draw`` until its values are compared, then once as ``random``."""

    __slots__ = ("key", "masked")

    def __init__(self, key: tuple[str, str, str, str]) -> None:
        self.key, self.masked = key, False


class Draws:
    """The tensors that hold a draw's values (the draw's output, and what ops on that tensor alone make of it), so
    a comparison of them is found: ``torch.rand(n) < p`` is a mask, not a sample."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[Any, list[Token]]] = {}

    def __bool__(self) -> bool:
        return bool(self.live)

    def tokens(self, t: Tensor) -> list[Token] | None:
        entry = self.live.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def mark(self, out: Any, tokens: list[Token]) -> None:
        for t in _tensors(out):
            old = self.tokens(t)
            if old is not None:  # an in-place op on a draw (rand_like(x).uniform_()): both draws are its values
                old.extend(tok for tok in tokens if tok not in old)
                continue
            key = id(t)

            def forget(ref: Any, key: int = key) -> None:
                entry = self.live.get(key)
                if entry is not None and entry[0] is ref:
                    del self.live[key]

            self.live[key] = (weakref.ref(t, forget), list(tokens))

    def follow(self, func: Any, args: tuple, kwargs: dict, out: Any, counts: Counter) -> None:
        tensors = _tensors((args, kwargs))
        held = [(t, self.tokens(t)) for t in tensors]
        drawn = [tok for _t, toks in held if toks for tok in toks]
        if not drawn:
            return
        name = func.overloadpacket.__name__
        if name.rstrip("_") in _COMPARE:
            for tok in drawn:
                if not tok.masked:
                    tok.masked = True
                    counts[tok.key] -= 1
                    if not counts[tok.key]:
                        del counts[tok.key]
                    where, _kind, op, phase = tok.key
                    counts[(where, "random", op, phase)] += 1
        elif all(toks is not None or t.dim() == 0 for t, toks in held):  # ops on the draw alone (and constants)
            self.mark(out, drawn)


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]
