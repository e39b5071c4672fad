"""Every fact of every entry of the activation table, against a reference outside the table.

The references: PyTorch's autograd of the activation (``phi'``, where it jumps or bends, the slope), what PyTorch
dispatches when the activation runs (the audits' aten operators), the class names torch and timm give the activation's
modules (``passes.targets``' rows). A new table entry is checked by every test here without touching this file.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gaaf_patch.activations import ACTIVATIONS, class_name_pattern
from gaaf_patch.coverage.count import ACTIVATION_OPS
from gaaf_patch.passes import targets
from gaaf_patch.passes.context import looks_like_activation

F64 = torch.float64

# Default parameters for every entry, and non-default ones where an entry takes any.
OTHER = {
    "leaky_relu": [{"negative_slope": 0.2}],
    "elu": [{"alpha": 0.5}],
    "celu": [{"alpha": 2.0}],
    "gelu": [{"approximate": "tanh"}],
    "softplus": [{"beta": 2.0}],
    "hardtanh": [{"min_val": -2.0, "max_val": 3.0}],
}
CASES = [(n, p) for n in ACTIVATIONS for p in [{}, *OTHER.get(n, [])]]
IDS = [n + "".join(f"-{k}={v}" for k, v in p.items()) for n, p in CASES]


def test_the_cases_cover_every_parameter():
    assert set(OTHER) <= set(ACTIVATIONS)
    assert {n for n, a in ACTIVATIONS.items() if a.defaults} <= set(OTHER), "give the new entry's parameters a case"


def _autograd_dphi(name: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    """phi'(x) as PyTorch's autograd has it (its conventions at the kinks), in float64."""
    x = x.detach().to(F64).requires_grad_()
    (g,) = torch.autograd.grad(ACTIVATIONS[name].phi(x, **params).sum(), x)
    return g


def _points(name: str, params: dict) -> torch.Tensor:
    """A dense float64 grid, the kinks exactly, both zeros and far points."""
    p = ACTIVATIONS[name].params(params)
    kinks = list(ACTIVATIONS[name].kinks(p))
    extra = [*kinks, *(k + d for k in kinks for d in (-1e-9, 1e-9)), 0.0, -0.0, 20.0, -20.0, 40.0, -40.0, 10.0, 2.0]
    return torch.cat([torch.linspace(-12, 12, 4801, dtype=F64), torch.tensor(extra, dtype=F64)])


# PyTorch's hardsigmoid_backward multiplies by float32's 1/6 in every dtype (3e-8 off in float64); ours is exact.
_RTOL = {"hardsigmoid": 1e-7}


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_dphi_is_autograds_derivative(name, params):
    act = ACTIVATIONS[name]
    p = act.params(params)
    x = _points(name, params)
    want = _autograd_dphi(name, p, x)
    torch.testing.assert_close(act.dphi(x, act.phi(x, **p), **p), want, rtol=_RTOL.get(name, 1e-12), atol=1e-14)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_native_backward_is_autograds(name, params):
    act = ACTIVATIONS[name]
    if act.native is None:
        pytest.skip("no PyTorch kernel of its own: the generic dy dphi is used")
    p = act.params(params)
    x = _points(name, params)
    g = torch.linspace(-2, 3, x.numel(), dtype=F64)
    saved = act.phi(x, **p) if act.saves_output else x  # what backward keeps
    torch.testing.assert_close(act.native(g, saved, p), g * _autograd_dphi(name, p, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_dphi_from_output_holds_exactly_where_claimed(name, params):
    """Where the table says the output determines phi', PyTorch's kernel given y equals it given x, bit for bit."""
    act = ACTIVATIONS[name]
    p = act.params(params)
    if not act.output_determines_dphi(p):
        pytest.skip("backward keeps what it needs")
    x = torch.cat([_points(name, params), torch.tensor([1e-300, -1e-300, 5.9999999, 6.0000001], dtype=F64)])
    for dtype in (F64, torch.float32):
        t, g = x.to(dtype), torch.linspace(-2, 3, x.numel(), dtype=dtype)
        assert torch.equal(act.native(g, act.phi(t, **p), p), act.native(g, t, p))


def test_a_non_positive_leaky_slope_loses_the_sign():
    act = ACTIVATIONS["leaky_relu"]
    p = act.params({"negative_slope": -0.1})
    assert not act.output_determines_dphi(p)
    x = torch.tensor([-1.0, 1.0], dtype=F64)
    g = torch.ones_like(x)
    assert not torch.equal(act.native(g, act.phi(x, **p), p), act.native(g, x, p))  # the reason it must not claim it


def _breaks(name: str, params: dict) -> list[tuple[float, float]]:
    """Intervals of a grid where autograd's phi' jumps or bends (phi'' jumps).

    On each interval ``[a, b]``, ``phi'`` at the midpoint against the mean of its ends: below ``h^2/8 max|phi'''|``
    (< 1e-6 here) where ``phi`` is smooth, ``J/2`` for a jump ``J`` of ``phi'``, ``0.15 h J2`` for a jump ``J2`` of
    ``phi''``: the grid is offset by ``0.3 h`` so that no integer falls on a node or a midpoint.
    """
    h = 1e-3
    n = round(24 / h)
    x = -12 + 0.3 * h + torch.arange(2 * n + 1, dtype=F64) * (h / 2)
    d = _autograd_dphi(name, ACTIVATIONS[name].params(params), x)
    a, mid, b = d[0:-2:2], d[1:-1:2], d[2::2]
    bad = torch.nonzero(((a + b) / 2 - mid).abs() > 1e-5).flatten()
    return [(float(x[2 * i]), float(x[2 * i + 2])) for i in bad]


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_kinks_are_where_autograds_derivative_breaks(name, params):
    """The listed kinks and nowhere else, on [-12, 12] (softplus' switch to the identity at threshold/beta, 10 for
    beta = 2, moves phi' by sigmoid(-threshold) = 2e-9: no kink; a threshold below about 16 would make one that the
    table does not list)."""
    act = ACTIVATIONS[name]
    kinks = act.kinks(act.params(params))
    breaks = _breaks(name, params)
    assert all(any(a < k < b for k in kinks) for a, b in breaks), f"phi' breaks in {breaks}, kinks listed: {kinks}"
    assert all(any(a < k < b for a, b in breaks) for k in kinks), f"listed kinks {kinks}, breaks found: {breaks}"


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_slope_is_phi_prime_in_the_linear_regime(name):
    """At 0 (tanh- and sigmoid-shaped), at 0.5 (ReLU-shaped, past the kink) or far right (smooth ReLU-likes)."""
    act = ACTIVATIONS[name]
    d = _autograd_dphi(name, act.params(), torch.tensor([0.0, 0.5, 30.0], dtype=F64)).tolist()
    assert any(v == pytest.approx(act.slope, rel=1e-7) for v in d), (act.slope, d)


@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if a.saves_output))
def test_inverses_recover_the_input(name):
    act = ACTIVATIONS[name]
    x = torch.linspace(-8, 8, 1601, dtype=F64)
    y = act.phi(x)
    torch.testing.assert_close(act.inverse(y), x, rtol=1e-9, atol=1e-9)
    if act.exact_inverse is not None:
        torch.testing.assert_close(act.exact_inverse(y), x, rtol=1e-9, atol=1e-9)
        saturated = act.exact_inverse(act.phi(torch.tensor([-1e3, 1e3], dtype=F64)))
        assert saturated.isinf().all() and not act.inverse(act.phi(torch.tensor([1e3], dtype=F64))).isinf().any()


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.add(name[:-1] if name.endswith("_") else name)
        return func(*args, **(kwargs or {}))


def _dispatched(name: str) -> set[str]:
    """The aten operators PyTorch runs for the activation's forward, with autograd and in inference mode."""
    act = ACTIVATIONS[name]
    seen: set[str] = set()
    for inference in (False, True):
        with torch.inference_mode(inference):
            x = torch.randn(8, requires_grad=not inference)
            with _Ops() as ops:
                act.phi(x, **act.params())
            seen |= ops.names
    return seen


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_aten_ops_are_what_torch_dispatches(name):
    listed, seen = set(ACTIVATIONS[name].aten_ops), _dispatched(name)
    assert listed <= seen, f"{name} lists {sorted(listed - seen)}, which PyTorch never runs for it ({sorted(seen)})"
    assert name not in seen or name in listed, f"PyTorch runs aten.{name} for {name}: list it in aten_ops"
    assert all(ACTIVATION_OPS[op] == name for op in listed)  # one operator, one activation


def test_class_names_are_those_of_the_activations_modules():
    """Each module class the patch replaces is named after its own activation's class_names; the union is what the
    patch's warning for unhandled activation-like modules uses."""
    for cls, form in targets.MODULES.items():
        endings = ACTIVATIONS[form.activation].class_names
        assert re.search(rf"(?i)({'|'.join(endings)})(me)?$", cls.__name__), (cls, form.activation, endings)
        assert class_name_pattern().search(cls.__name__)
    assert all(ACTIVATIONS[n].class_names for n in ACTIVATIONS)
    for module in (nn.ReLU(), nn.PReLU(), nn.GELU(), nn.Tanh()):
        assert looks_like_activation(module)
    for module in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Dropout(), nn.Softmax(-1), nn.Identity()):
        assert not looks_like_activation(module)
