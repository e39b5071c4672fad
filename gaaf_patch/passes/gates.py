"""Gate detection: does an activation's output multiply a tensor?

A sigmoid-like activation whose value scales another tensor (squeeze-excite's ``x * self.gate(s)``, a GLU's
``a * b.sigmoid()``) is a gate, not a nonlinearity in the signal path; ``activations="auto"`` leaves gates alone.
The rule, on a ``torch.fx`` graph: the node's value **reaches a multiplication** (``operator.mul``/``imul``,
``torch.mul``, ``.mul``/``.mul_``) directly or through at most :data:`MAX_DEPTH` ops that only move or recast the
value (``PASSTHROUGH_METHODS``/``PASSTHROUGH_FUNCTIONS``: views, reshapes, indexing, dtype casts). Anything else
in between (an add, a conv, a reduction) means the value is used as a signal, and the node is not a gate::

    sigmoid = self.gate(mean)                 # gate: view -> mul
    view = sigmoid.view(b, c, 1, 1)
    mul = x * view

    sigmoid = torch.sigmoid(h); add = sigmoid + 1; mul = add * x      # not a gate: the add is in between

The patch passes (module gates in traced code, function and method sites) and the Dynamo backend use this one
function; so does ``gaaf_patch.coverage`` when it decides whether an activation left in a graph is a gate.

A gated linear unit (``nn.GLU``, ``F.glu``: ``a * sigmoid(b)`` over two halves of its input) is a gate by
construction, one op: it has no GAAF form (its sigmoid is not a nonlinearity in the signal path). The passes list
each one in ``report(model).skipped`` (:func:`glu_skip`), as other gates, so that ``gaaf_patch.audit`` explains the
``aten.glu`` it sees; like other gates it raises no warning.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "reaches_mul",
    "GLU_FUNCTIONS",
    "GLU_MODULES",
    "GLU_REASON",
    "glu_skip",
    "MAX_DEPTH",
    "MUL_FUNCTIONS",
    "MUL_METHODS",
    "PASSTHROUGH_FUNCTIONS",
    "PASSTHROUGH_METHODS",
]

MUL_FUNCTIONS = frozenset({operator.mul, operator.imul, torch.mul})
MUL_METHODS = frozenset({"mul", "mul_"})
# Ops a gate's value flows through unchanged in meaning before it multiplies.
PASSTHROUGH_METHODS = frozenset({
    "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "permute", "transpose",
    "contiguous", "to", "type_as", "float", "half", "bfloat16",
})  # fmt: skip
PASSTHROUGH_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, operator.getitem})
MAX_DEPTH = 8  # passthrough ops between the activation and the multiplication

GLU_FUNCTIONS = frozenset({F.glu, torch._C._nn.glu})
GLU_MODULES: tuple[type, ...] = (nn.GLU,)
GLU_REASON = "gate: a gated linear unit (a * sigmoid(b)) has no GAAF form"


def glu_skip(name: str) -> dict[str, str]:
    """The ``skipped`` entry of a GLU site (a gate left alone on purpose, as the report lists gates)."""
    return {"name": name, "activation": "glu", "reason": GLU_REASON}


def _is(node: fx.Node, functions: frozenset, methods: frozenset) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def reaches_mul(node: fx.Node) -> bool:
    """Whether ``node``'s value reaches a multiplication through at most :data:`MAX_DEPTH` passthrough ops."""
    frontier, seen = [node], {node}
    for depth in range(MAX_DEPTH + 1):
        nxt = []
        for n in frontier:
            for user in n.users:
                if _is(user, MUL_FUNCTIONS, MUL_METHODS):
                    return True
                if depth < MAX_DEPTH and user not in seen and _is(user, PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS):
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False
