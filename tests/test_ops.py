"""The GAAF op against plain PyTorch, for every activation gaaf-patch knows.

References are independent of the library: the plain torch function (forward, and its autograd in float64 for
``phi'``) plus the shape function evaluated in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import quick_gelu
from torch import nn

import gaaf_patch
from gaaf_patch import GAAF, gaaf
from gaaf_patch.activations import ACTIVATIONS
from gaaf_patch.shapes import get as get_shape

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F64, F32, F16, BF16]
HALF = [F16, BF16]
K = 10_000.0

# The plain torch functions a model calls (not the library's Activation.phi).
TORCH = {
    "relu": torch.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "gelu": F.gelu,
    "silu": F.silu,
    "quick_gelu": quick_gelu,
    "relu2": lambda x: torch.square(torch.relu(x)),  # transformers' ReLUSquaredActivation
    "mish": F.mish,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
}

CASES = [
    ("relu", {}),
    ("relu6", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("selu", {}),
    ("celu", {}),
    ("celu", {"alpha": 2.0}),
    ("gelu", {}),
    ("gelu", {"approximate": "none"}),
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
    ("quick_gelu", {}),
    ("relu2", {}),
    ("mish", {}),
    ("softplus", {}),
    ("softplus", {"beta": 2.0}),
    ("tanh", {}),
    ("hardtanh", {}),
    ("hardtanh", {"min_val": -2.0, "max_val": 3.0}),
    ("sigmoid", {}),
    ("hardsigmoid", {}),
    ("hardswish", {}),
]
IDS = [n + "".join(f"-{k}={v}" for k, v in p.items()) for n, p in CASES]
SAVES_OUTPUT = {"tanh", "sigmoid"}


def kinks(name: str, params: dict) -> list[float]:
    """Where the activation's derivative jumps (PyTorch's convention there is what GAAF must reproduce)."""
    if name in ("hardtanh",):
        p = ACTIVATIONS[name].params(params)
        return [p["min_val"], p["max_val"]]
    if name == "relu6":
        return [0.0, 6.0]
    if name in ("hardsigmoid", "hardswish"):
        return [-3.0, 3.0]
    if name == "softplus":
        p = ACTIVATIONS[name].params(params)
        return [p["threshold"] / p["beta"]]
    if name in ("relu", "leaky_relu", "elu", "selu", "celu"):
        return [0.0]
    return []


def torch_fn(name, params):
    return lambda x: TORCH[name](x, **params)


def test_every_activation_is_covered():
    assert set(TORCH) == set(ACTIVATIONS)
    assert {n for n, _ in CASES} == set(ACTIVATIONS)
    assert {n for n, p in CASES if p} >= {"leaky_relu", "elu", "gelu", "softplus", "hardtanh"}


def _grid(name, params, n=481, lo=-9.0, hi=9.0) -> torch.Tensor:
    """float64 points on [lo, hi], the kinks exactly, and a few far points."""
    base = torch.linspace(lo, hi, n, dtype=F64)
    extra = torch.tensor([*kinks(name, params), 0.0, -0.5, 0.5, -3.0, 3.0, 20.0, -20.0, 25.0], dtype=F64)
    return torch.cat([base, extra])


# ---------------------------------------------------------------------------------------------------------------------
# (a) exact mode: forward bit-identical to the plain torch function


def _layouts(dtype: torch.dtype, gen: torch.Generator):
    r = lambda *s: (torch.randn(*s, generator=gen, dtype=F64) * 4).to(dtype)  # noqa: E731
    yield "contiguous", r(3, 5, 7)
    yield "transposed", r(7, 5).t()
    yield "strided", r(4, 12)[:, ::3]
    yield "expanded", r(5, 1).expand(5, 4)
    yield "channels_last", r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    yield "empty", r(0, 4)
    yield "one", r(1)
    yield "scalar", r(1).reshape(())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_exact_forward_is_bit_identical(name, params, dtype):
    gen = torch.Generator().manual_seed(0)
    ref_fn = torch_fn(name, params)
    inputs = list(_layouts(dtype, gen)) + [("kinks+grid", _grid(name, params).to(dtype))]
    for label, x in inputs:
        assert label in ("contiguous", "kinks+grid", "empty", "one", "scalar") or not x.is_contiguous()
        want = ref_fn(x)
        for grad in (False, True):
            xi = x.detach().requires_grad_() if grad else x  # same strides, through the autograd Function
            got = gaaf(xi, name, **params)
            assert (got.grad_fn is not None) == grad
            assert got.dtype == dtype and got.shape == x.shape, label
            assert torch.equal(got, want), f"{label} grad={grad}: max diff {(got.double() - want.double()).abs().max()}"


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_exact_forward_non_contiguous_through_autograd(name, params):
    # a non-contiguous view of a leaf that requires grad: the Function path, with the view's strides
    leaf = (torch.randn(7, 6, generator=torch.Generator().manual_seed(1), dtype=F32) * 4).requires_grad_()
    for view in (leaf.t(), leaf[:, ::2], leaf[1:, 1:].transpose(0, 1)):
        assert not view.is_contiguous()
        got = gaaf(view, name, **params)
        assert got.grad_fn is not None
        assert torch.equal(got, torch_fn(name, params)(view.detach()))


# ---------------------------------------------------------------------------------------------------------------------
# (b) gradient = phi'(x) + s(x), against a float64 reference

TOL = {F64: (1e-13, 1e-13), F32: (1e-6, 1e-6), F16: (1e-3, 1e-3), BF16: (8e-3, 8e-3)}


def _reference_multiplier(name, params, x64: torch.Tensor) -> torch.Tensor:
    """phi'(x) + s(x) in float64: PyTorch's autograd of the plain function plus the shape."""
    x = x64.detach().clone().requires_grad_()
    torch_fn(name, params)(x).backward(torch.ones_like(x))
    return x.grad + get_shape(name)(x64.detach())


def _inverse64(name: str, y: torch.Tensor) -> torch.Tensor:
    """The input a saved (rounded) output stands for, in float64."""
    y = y.detach().double()
    return torch.atanh(y) if name == "tanh" else torch.logit(y)


def _check_grad(name, params, x_leaf, gy, dtype):
    """x_leaf.grad after backward through gaaf(x_leaf) with gy, against the float64 reference."""
    y = gaaf(x_leaf, name, **params)
    y.backward(gy)
    got = x_leaf.grad
    assert got.dtype == dtype and got.shape == x_leaf.shape
    x64 = x_leaf.detach().double()
    g64 = gy.double()
    ref = _reference_multiplier(name, params, x64) * g64
    rtol, atol = TOL[dtype]
    if name == "hardsigmoid" and dtype == F64:
        atol = 1e-8  # PyTorch's own hardsigmoid backward multiplies by a float32 1/6 in every dtype
    allowed = atol + rtol * ref.abs()
    if name in SAVES_OUTPUT:
        # Backward sees only the output, rounded to the dtype (as PyTorch's own tanh/sigmoid backward): what it can
        # know of x is the inverse of that rounded output. Allow the difference that rounding makes to phi' + s.
        x_hat = _inverse64(name, y)
        ref_hat = _reference_multiplier(name, params, x_hat).nan_to_num(0.0) * g64
        allowed = allowed + (ref - ref_hat).abs()
    err = (got.double() - ref).abs()
    bad = err > allowed
    assert not bad.any(), (
        f"{int(bad.sum())} bad; worst at x={x64.flatten()[(err - allowed).argmax()].item():.6g}: "
        f"got {got.double().flatten()[(err - allowed).argmax()].item():.8g}, "
        f"want {ref.flatten()[(err - allowed).argmax()].item():.8g}"
    )
    return got, ref, allowed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_gradient_matches_reference(name, params, dtype):
    gen = torch.Generator().manual_seed(2)
    x = _grid(name, params).to(dtype).requires_grad_()
    gy = (torch.rand(x.shape, generator=gen, dtype=F64) * 2 - 0.5).to(dtype)  # mixed signs, some near zero
    got, ref, allowed = _check_grad(name, params, x, gy, dtype)
    # the check above can see the shape: on much of the grid, a gradient without s would be outside the tolerance
    s = get_shape(name)(x.detach().double())
    assert ((s * gy.double()).abs() > allowed).double().mean() > 0.2
    # at the kinks, exactly PyTorch's convention plus s (checked above with tolerance; here value by value)
    for k in kinks(name, params):
        xk = torch.tensor([k], dtype=F64, requires_grad=True)
        torch_fn(name, params)(xk).backward(torch.ones_like(xk))
        xg = torch.tensor([k], dtype=F64, requires_grad=True)
        gaaf(xg, name, **params).backward(torch.ones_like(xg))
        want = xk.grad + get_shape(name)(xk.detach())
        tol = 1e-8 if name == "hardsigmoid" else 1e-15
        assert xg.grad.item() == pytest.approx(want.item(), abs=tol), f"kink x={k}"


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_gradient_non_contiguous(name, params, dtype):
    gen = torch.Generator().manual_seed(3)
    leaf = (torch.randn(9, 8, generator=gen, dtype=F64) * 4).to(dtype).requires_grad_()
    view = leaf.t()[::2]  # (4, 9), non-contiguous
    gy = torch.randn(view.shape, generator=gen, dtype=F64).to(dtype).t().contiguous().t()  # non-contiguous gy too
    y = gaaf(view, name, **params)
    y.backward(gy)
    full = torch.zeros(8, 9, dtype=F64)
    full[::2] = _reference_multiplier(name, params, view.detach().double()) * gy.double()
    rtol, atol = TOL[dtype]
    if name == "hardsigmoid" and dtype == F64:
        atol = 5e-8  # PyTorch's float32 1/6, times |gy| up to ~3
    if name in SAVES_OUTPUT and dtype == BF16:
        atol = 0.2  # from a bfloat16 output, backward cannot tell x = 3.5 from x = 8 (see test_gradient_matches_...)
    torch.testing.assert_close(leaf.grad.double(), full.t(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_default_at_most_doubles_the_peak_gradient(name, params):
    # docs/shapes.md: phi' + s <= 2 max|phi'| for every default, so the gradient keeps the activation's own scale
    x = _grid(name, params, n=2401, lo=-12.0, hi=12.0)
    xa = x.clone().requires_grad_()
    torch_fn(name, params)(xa).sum().backward()
    xb = x.clone().requires_grad_()
    gaaf(xb, name, **params).sum().backward()
    assert xb.grad.abs().max() <= 2 * xa.grad.abs().max() + 1e-12
    assert (xb.grad >= xa.grad - 1e-12).all()  # s >= 0: GAAF only adds


def test_default_shape_is_the_activations_registered_one():
    x = torch.tensor([-0.5, 1.0, -3.0], dtype=F64, requires_grad=True)
    gaaf(x, "relu").backward(torch.ones_like(x))
    assert x.grad[0].item() == 0.5  # relu'(-0.5) = 0, s(-0.5) = 0.5
    assert x.grad[1].item() == pytest.approx(1 + 1 / (1 + math.exp(-7.5)), rel=1e-15)
    x = torch.tensor([0.0, 2.0], dtype=F64, requires_grad=True)
    gaaf(x, "tanh").backward(torch.ones_like(x))
    assert x.grad[0].item() == pytest.approx(2.0, rel=1e-15)  # tanh'(0) + s(0) = 1 + 1
    assert x.grad[1].item() == pytest.approx(1 - math.tanh(2.0) ** 2 + math.exp(-1.0), rel=1e-12)
    # an explicit shape, a spelled one and a callable one
    for shape in ("relu_keras", "shifted_sigmoid(slope=1, shift=4)", get_shape("relu_keras")):
        x = torch.tensor([-4.0], dtype=F64, requires_grad=True)
        gaaf(x, "relu", shape).backward(torch.ones_like(x))
        assert x.grad.item() == 0.5
    x = torch.tensor([-2.0, 3.0], dtype=F64, requires_grad=True)
    gaaf(x, "relu", lambda t: torch.full_like(t, 0.25)).backward(torch.ones_like(x))
    assert x.grad.tolist() == [0.25, 1.25]


# ---------------------------------------------------------------------------------------------------------------------
# (c) sawtooth mode: the literal equations; gradcheck passes up to the dropped g s' term


def _smooth_points(name, params, n=24, seed=4) -> torch.Tensor:
    x = torch.empty(4 * n, dtype=F64).uniform_(-7, 7, generator=torch.Generator().manual_seed(seed))
    for k in kinks(name, params):
        x = x[(x - k).abs() > 1e-3]
    return x[:n].clone()


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_sawtooth_gradcheck(name, params):
    x = _smooth_points(name, params).requires_grad_()
    # |g s'| <= max|s'| / (2K) ~ 6e-5 for the steepest default (slope 5): below atol
    assert torch.autograd.gradcheck(lambda t: gaaf(t, name, mode="sawtooth", **params), (x,), eps=1e-9, atol=1e-4)
    # exact mode is not the derivative of its own forward (that is the point): gradcheck must fail ...
    assert not torch.autograd.gradcheck(
        lambda t: gaaf(t, name, mode="exact", **params), (x,), eps=1e-6, atol=1e-4, raise_exception=False
    )
    # ... unless the shape is zero
    assert torch.autograd.gradcheck(lambda t: gaaf(t, name, "zero", **params), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
@pytest.mark.parametrize("k", [K, 100.0])
def test_sawtooth_gradient_is_the_same_as_exact(name, params, k):
    # the gradient is phi'(x) + s(x) in both modes, whatever K: only the forward differs
    x = _grid(name, params)
    ge = x.clone().requires_grad_()
    gs = x.clone().requires_grad_()
    gaaf(ge, name, **params).sum().backward()
    gaaf(gs, name, mode="sawtooth", K=k, **params).sum().backward()
    torch.testing.assert_close(gs.grad, ge.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SAVES_OUTPUT))
def test_sawtooth_gradient_from_output_stays_close(name):
    # whatever becomes of the bug above, the sawtooth-mode gradient of tanh/sigmoid must stay near phi' + s
    x = _grid(name, {})
    ge = x.clone().requires_grad_()
    gs = x.clone().requires_grad_()
    gaaf(ge, name).sum().backward()
    gaaf(gs, name, mode="sawtooth").sum().backward()
    torch.testing.assert_close(gs.grad, ge.grad, rtol=0, atol=5e-4)


# ---------------------------------------------------------------------------------------------------------------------
# (d) sawtooth deviation from phi: at most max|s| / (2K)


def _sawtooth_ref(x64: torch.Tensor, K: float) -> torch.Tensor:
    xk = x64 * K
    return (xk - torch.floor(xk) - 0.5) / K


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_sawtooth_deviation_bounded(name, params, dtype):
    x = torch.cat([_grid(name, params, n=2001), torch.rand(500, dtype=F64) * 16 - 8]).to(dtype)
    s = get_shape(name)(x.double())
    exact = torch_fn(name, params)(x)
    eps = torch.finfo(dtype).eps
    devs = {}
    for k in (K, 100.0):
        y = gaaf(x, name, mode="sawtooth", K=k, **params)
        assert y.dtype == dtype and y.shape == x.shape
        dev = (y.double() - exact.double()).abs()
        bound = s.max() / (2 * k)
        # pointwise |g s| <= s/(2K) (s itself computed in float32 below float64), plus the rounding of phi + g s
        # back to the dtype: half an ulp of the result, subnormals included
        slack = 1e-12 if dtype == F64 else 1e-5
        rounding = (
            eps * torch.maximum(exact.double().abs(), y.double().abs()) + torch.finfo(dtype).smallest_normal * eps
        )
        allowed = s / (2 * k) * (1 + slack) + rounding
        assert (dev <= allowed).all(), f"K={k}: worst excess {(dev - allowed).max().item():.3g}"
        assert dev.max() <= bound * (1 + slack) + rounding.max()
        devs[k] = dev.max().item()
        if dtype == F64:
            # and it is g(x) s(x) itself
            want = _sawtooth_ref(x, k) * s
            torch.testing.assert_close(y - exact, want, rtol=0, atol=4 * eps * max(1.0, exact.abs().max().item()))
            assert devs[k] > 0.4 * bound.item()  # the deviation is really there
    if dtype in (F64, F32):
        assert devs[100.0] > 20 * devs[K]  # K is used: a smaller K deviates more


def test_sawtooth_helper_matches_equation():
    x = torch.linspace(-5, 5, 100_001, dtype=F64)
    for k in (K, 100.0, 7.0):
        g = gaaf_patch.ops.sawtooth(x, k)
        torch.testing.assert_close(g, _sawtooth_ref(x, k), rtol=0, atol=1e-15)
        assert g.abs().max().item() <= 0.5 / k + 1e-15
    g32 = gaaf_patch.ops.sawtooth(x.float(), K)
    assert g32.dtype == F32 and g32.abs().max().item() <= 0.5 / K * (1 + 1e-6)
    assert gaaf_patch.ops.sawtooth(x.half(), K).dtype == F32  # computed in float32: x K overflows float16


# ---------------------------------------------------------------------------------------------------------------------
# (e) half precision: large magnitudes, no NaN/Inf in either mode; autocast

EXTREMES = [
    -60000.0,
    -1000.0,
    -100.0,
    -10.0,
    -3.0,
    -1e-4,
    -1e-7,
    0.0,
    1e-7,
    1e-4,
    3.0,
    6.0,
    10.0,
    100.0,
    1000.0,
    60000.0,
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_half_extremes_are_finite(name, params, dtype):
    if name == "relu2":
        pytest.skip("relu(x)^2 itself overflows half precision past |x| = 256, and its phi' = 2x is unbounded")
    xs = torch.tensor(EXTREMES + kinks(name, params), dtype=F64).to(dtype)
    assert torch.isfinite(xs).all()
    for mode in ("exact", "sawtooth"):
        x = xs.clone().requires_grad_()
        y = gaaf(x, name, mode=mode, **params)
        assert y.dtype == dtype
        assert torch.isfinite(y).all(), (mode, y)
        y.backward(torch.ones_like(y))
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all(), (mode, x.grad)
        if mode == "exact":
            assert torch.equal(y, torch_fn(name, params)(xs))
        # the multiplier phi' + s stays in [min phi', max phi' + max s]: no blow-up from x K or the inverse
        assert (x.grad.float().abs() <= 3.0).all()


@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_autocast_bfloat16_after_linear(name, params, mode):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, GAAF(name, mode=mode, **params))
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0, 1000.0, 1e4, 3e4]).repeat_interleave(2)[:, None]
    x = (torch.randn(16, 8) * scale).requires_grad_()  # rows from well inside to far beyond every kink
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        plain = torch_fn(name, params)(lin(x))
    assert y.dtype == BF16
    if mode == "exact":
        assert torch.equal(y, plain)
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    for t in (x.grad, lin.weight.grad, lin.bias.grad):
        assert t is not None and torch.isfinite(t).all()
    assert lin.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# (f) shape "zero": exactly PyTorch's own gradient

# phi' piecewise constant/linear: the product with dy rounds the same way in any order
BITWISE = {"relu", "relu6", "leaky_relu", "hardtanh", "hardswish"}
ZERO_ATOL = {F64: 1e-14, F32: 2e-6, F16: 1e-5, BF16: 1e-5}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_zero_shape_has_pytorchs_gradient(name, params, dtype):
    gen = torch.Generator().manual_seed(5)
    x = _grid(name, params).to(dtype)
    gy = (torch.rand(x.shape, generator=gen, dtype=F64) + 0.5).to(dtype)
    a = x.clone().requires_grad_()
    gaaf(a, name, "zero", **params).backward(gy)
    composite = name == "quick_gelu" and dtype in HALF  # no fused op: autograd rounds each of its ops in half
    b = x.clone().to(F64 if composite else dtype).requires_grad_()
    torch_fn(name, params)(b).backward(gy.to(b.dtype))
    want = b.grad.to(dtype)  # with `composite`: the exact gradient, rounded once
    assert a.grad.dtype == dtype
    if name in BITWISE:
        assert torch.equal(a.grad, want)
    else:
        # formulas with cancellation (gelu, silu, mish) differ by a few ulps of their terms
        atol = 1e-8 if (name == "hardsigmoid" and dtype == F64) else ZERO_ATOL[dtype]
        torch.testing.assert_close(a.grad, want, rtol=2 * torch.finfo(dtype).eps, atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# (g) what backward keeps


def _saved(fn, x):
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, packed


@pytest.mark.parametrize("name", sorted(SAVES_OUTPUT))
def test_invertible_activations_save_their_input_in_sawtooth_mode(name):
    # the sawtooth output carries g(x) s(x): inverting it would evaluate phi' + s at a shifted x
    x = torch.randn(4, 5, requires_grad=True)
    y, packed = _saved(lambda t: gaaf(t, name, mode="sawtooth"), x)
    assert len(packed) == 1 and packed[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("name", sorted(SAVES_OUTPUT))
def test_invertible_activations_save_only_their_output(name):
    mode = "exact"
    x = torch.randn(4, 5, requires_grad=True)
    y, packed = _saved(lambda t: gaaf(t, name, mode=mode), x)
    assert len(packed) == 1
    assert packed[0].data_ptr() == y.data_ptr() and packed[0].shape == y.shape
    assert packed[0].data_ptr() != x.data_ptr()
    assert torch.equal(packed[0], y)
    # as PyTorch itself does
    y_ref, packed_ref = _saved(TORCH[name], x)
    assert len(packed_ref) == 1 and packed_ref[0].data_ptr() == y_ref.data_ptr()
    y.sum().backward()  # and backward works from that alone
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_backward_saves_one_tensor(name, params):
    x = torch.randn(3, 7, requires_grad=True)
    y, packed = _saved(lambda t: gaaf(t, name, **params), x)
    assert len(packed) == 1
    assert packed[0].numel() == x.numel() and packed[0].element_size() <= x.element_size()
    if name not in SAVES_OUTPUT:
        assert packed[0].data_ptr() != y.data_ptr()  # the ReLU family needs x where the output is 0
    y.sum().backward()
    assert x.grad is not None


def test_relu_saves_one_tensor():
    x = torch.randn(64, requires_grad=True)
    _, packed = _saved(lambda t: gaaf(t, "relu"), x)
    assert len(packed) == 1


def test_no_graph_without_grad():
    x = torch.randn(5, requires_grad=True)
    with torch.no_grad():
        y = gaaf(x, "tanh")
    assert y.grad_fn is None and not y.requires_grad
    y = gaaf(torch.randn(5), "tanh")
    assert y.grad_fn is None


# ---------------------------------------------------------------------------------------------------------------------
# (h) the module


def test_module_repr():
    m = GAAF("relu")
    r = repr(m)
    assert r.startswith("GAAF(relu") and "shape=" in r and "shifted_sigmoid" in r and "mode=exact" in r
    assert "K=" not in r  # K means nothing in exact mode
    m = GAAF("leaky_relu", "relu_keras", negative_slope=0.2, mode="sawtooth", K=100)
    r = m.extra_repr()
    assert "leaky_relu" in r and "negative_slope=0.2" in r and "relu_keras" in r
    assert "slope=1.0" in r and "shift=4.0" in r and "mode=sawtooth" in r and "K=100" in r
    assert "approximate='tanh'" in GAAF("gelu", approximate="tanh").extra_repr()
    assert "gauss(width=3.0)" in GAAF("tanh", "gauss(width=3)").extra_repr()


def test_module_matches_function_and_holds_no_state():
    x = torch.randn(6, 4, dtype=F64)
    for mode, k in (("exact", K), ("sawtooth", 100.0)):
        m = GAAF("elu", mode=mode, K=k, alpha=0.5)
        assert m.activation == "elu" and m.mode == mode and m.K == k and m.params == {"alpha": 0.5}
        assert torch.equal(m(x), gaaf(x, "elu", mode=mode, K=k, alpha=0.5))
        assert m.state_dict() == {} and list(m.parameters()) == []
    assert GAAF("tanh").shape == get_shape("tanh")
    assert GAAF("tanh", "zero").shape == get_shape("zero")
    d = GAAF("relu", mode="sawtooth", K=50).describe()
    assert d["activation"] == "relu" and d["mode"] == "sawtooth" and d["K"] == 50
    assert get_shape(d["shape"]) == get_shape("relu")  # the report's spelling reads back


@pytest.mark.parametrize(
    "mode, k", [("fast", K), ("Exact", K), ("", K), ("exact", 0), ("exact", -1.0), ("sawtooth", float("nan"))]
)
def test_invalid_mode_or_K_raise(mode, k):
    with pytest.raises(ValueError):
        GAAF("relu", mode=mode, K=k)
    with pytest.raises(ValueError):
        gaaf(torch.randn(3), "relu", mode=mode, K=k)


def test_invalid_activation_shape_or_param_raise():
    with pytest.raises(KeyError, match="known"):
        GAAF("rellu")
    with pytest.raises(KeyError, match="gauss"):
        GAAF("relu", "gaus")
    with pytest.raises(ValueError, match="negative_slope"):
        GAAF("leaky_relu", slope=0.1)
    with pytest.raises(ValueError):
        gaaf(torch.randn(3), "relu", inplace=True)
    with pytest.raises(TypeError):
        GAAF("relu", 3.0)


# ---------------------------------------------------------------------------------------------------------------------
# (c2) double backward (create_graph=True): the derivative of the gradient formula, phi'' + s', in both modes and
# both gains. Regression: tanh and sigmoid differentiated their saved output through GAAF's own backward, and came
# out (phi' + s) / phi' times too large (2.2x at x = 0.5, 14.7x at x = 4).
GRADGRAD = [("exact", None), ("exact", 0.1), ("sawtooth", None)]  # the auto gain (delta) is exact-mode only


@pytest.mark.parametrize(("mode", "delta"), GRADGRAD, ids=["exact-paper", "exact-auto", "sawtooth"])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_gradgradcheck(name, params, mode, delta):
    x = _smooth_points(name, params, n=12).requires_grad_()
    fn = lambda t: gaaf(t, name, mode=mode, delta=delta, **params)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_second_derivative_against_float64_formula(name):
    """d/dx (phi'(x) + s(x)) written here: tanh'' = -2 tanh (1 - tanh^2), sigmoid'' = sig (1 - sig) (1 - 2 sig);
    the default shapes exp(-x^2 / 4) and exp(-x^2 / 16) / 4, differentiated by hand."""
    x = torch.tensor([-4.0, -0.5, 0.5, 1.0, 2.5, 4.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(gaaf(x, name).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    t = x.detach()
    if name == "tanh":
        y = torch.tanh(t)
        ref = -2 * y * (1 - y * y) - t / 2 * torch.exp(-t * t / 4)
    else:
        y = torch.sigmoid(t)
        ref = y * (1 - y) * (1 - 2 * y) - t / 32 * torch.exp(-t * t / 16)
    torch.testing.assert_close(gg, ref, rtol=1e-9, atol=1e-12)
