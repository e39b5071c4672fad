"""What keeps GAAF cheap, checked without timing anything (docs/performance.md has the timings).

- backward keeps one tensor per site, and a patched model keeps as many bytes for backward as the plain one, except
  for the one documented gap: an in-place ReLU site keeps its input too;
- the backward of a site is one fused kernel (gaaf_patch.kernels) or, in plain ops, a handful of ATen ops, and the
  forward of exact mode is the activation's own op alone;
- the fast backward never writes into what it did not allocate, agrees with the generic formula, and stays
  traceable by torch.compile.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gaaf_patch
from gaaf_patch import gaaf, kernels, ops
from gaaf_patch.activations import ACTIVATIONS
from gaaf_patch.shapes import get as get_shape
from tests.helpers import SmallCNN, mlp
from tests.helpers import saved_storages as _saved_storages

F64 = torch.float64
# Ops that compute nothing (views, detach): not counted as kernels.
_FREE = {"detach", "view", "alias", "t", "transpose", "expand", "as_strided", "_unsafe_view", "reshape"}


class _Ops(TorchDispatchMode):
    """The ATen ops that make a pass over the data: not views, not 0-dim constants."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _FREE and not (isinstance(out, torch.Tensor) and out.dim() == 0):
            self.names.append(name)
        return out


@pytest.fixture
def plain_ops():
    """The plain-ops backward (no C++ kernel), whatever GAAF_KERNELS says."""
    previous = kernels.set_enabled(False)
    yield
    kernels.set_enabled(previous)


@pytest.fixture(params=["kernel", "plain"])
def backend(request):
    """Each test twice: with the fused C++ kernel (skipped when it cannot be built) and with plain ops."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("the C++ kernel is off or cannot be built here (GAAF_KERNELS, compiler)")
    previous = kernels.set_enabled(request.param == "kernel")
    yield request.param
    kernels.set_enabled(previous)


def _site_ops(name: str, shape=None, mode: str = "exact", **params):
    x = (torch.randn(64, 32) * 3).requires_grad_()
    with _Ops() as fwd:
        y = gaaf(x, name, shape, mode=mode, **params)
    gy = torch.randn_like(y)
    with _Ops() as bwd:
        y.backward(gy)
    return fwd.names, bwd.names


# ---------------------------------------------------------------------------------------------------------------------
# kernels per site


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_exact_forward_is_the_activation_alone(name):
    fwd, _ = _site_ops(name)
    x = torch.randn(64, 32) * 3
    with _Ops() as ref:
        ACTIVATIONS[name].phi(x, **ACTIVATIONS[name].params())
    assert fwd == ref.names  # no extra kernel, no copy: what the plain activation runs


@pytest.mark.parametrize("name", ["tanh", "relu", "leaky_relu", "gelu", "silu", "elu", "sigmoid"])
def test_backward_kernels_with_default_shape(name, plain_ops):
    _, bwd = _site_ops(name)
    # PyTorch's own fused dy*phi' + the shape in place (2-3 passes) + one addcmul_, plus the inverse for tanh/sigmoid
    assert len(bwd) <= 5, bwd
    assert bwd.count("addcmul_") == 1


def test_backward_kernels_are_the_expected_ones(plain_ops):
    assert _site_ops("tanh")[1] == ["tanh_backward", "atanh", "addcmul", "exp2_", "addcmul_"]
    assert _site_ops("relu")[1] == ["threshold_backward", "add", "mul_", "sigmoid_", "addcmul_"]


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("tanh", ["backward"]),  # phi' and x from the saved output, the shape, the sum: one pass
        ("sigmoid", ["backward"]),
        ("relu", ["backward"]),
        ("leaky_relu", ["leaky_relu_backward", "backward"]),  # PyTorch's dy*phi', then the shape added in place
        ("gelu", ["gelu_backward", "backward"]),
        ("silu", ["silu_backward", "backward"]),
        ("elu", ["elu_backward", "backward"]),
    ],
)
def test_fused_backward_is_one_kernel(name, want):
    if not kernels.available():
        pytest.skip("the C++ kernel is off or cannot be built here (GAAF_KERNELS, compiler)")
    assert _site_ops(name)[1] == want
    # sawtooth mode saves the input: tanh and sigmoid are evaluated inside the same pass
    assert _site_ops(name, mode="sawtooth")[1] == want


def test_quick_gelu_zero_shape_is_autograds_gradient():
    # no fused PyTorch kernel exists for x * sigmoid(1.702 x): the generic formula must equal autograd's
    x = (torch.randn(64, 32, dtype=F64) * 3).requires_grad_()
    (want,) = torch.autograd.grad(ACTIVATIONS["quick_gelu"].phi(x).sum(), x)
    (got,) = torch.autograd.grad(gaaf(x, "quick_gelu", "zero").sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if a.native is not None))
def test_zero_shape_backward_is_pytorchs_single_kernel(name):
    _, bwd = _site_ops(name, "zero")
    assert len(bwd) == 1, bwd
    if name == "tanh":
        assert bwd == ["tanh_backward"]
    if name == "relu":
        assert bwd == ["threshold_backward"]


@pytest.mark.parametrize("name", ["tanh", "relu", "gelu"])
def test_sawtooth_forward_kernels(name, plain_ops):
    fwd, bwd = _site_ops(name, mode="sawtooth")
    exact_fwd, exact_bwd = _site_ops(name)
    # phi, then g (mul, floor, 3 in-place), s (2-3 passes), g*s and + phi in place
    assert len(fwd) <= len(exact_fwd) + 10, fwd
    if name == "tanh":  # x is saved in sawtooth mode: tanh recomputed for its kernel instead of atanh for x
        assert "atanh" not in bwd and len(bwd) == len(exact_bwd), bwd
    else:
        assert bwd == exact_bwd


# ---------------------------------------------------------------------------------------------------------------------
# what backward keeps: one tensor per site; memory parity with the plain model


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_one_saved_tensor_per_site(name):
    x = torch.randn(8, 8, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = gaaf(x, name)
    assert len(packed) == 1
    if ACTIVATIONS[name].inverse is not None:
        assert packed[0].data_ptr() == y.data_ptr()  # the output, shared with the next layer's saved input
    else:
        assert packed[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid])
def test_mlp_saved_bytes_equal_unpatched(act):
    torch.manual_seed(0)
    base = mlp(act, sizes=(64, 32, 32, 16, 4))
    patched = gaaf_patch.patch(copy.deepcopy(base), activations="all")
    x = torch.randn(16, 64)
    assert _saved_storages(patched, x)
    assert sum(_saved_storages(patched, x).values()) == sum(_saved_storages(base, x).values())


def test_relu_gap_is_one_input_per_site_not_fed_by_batchnorm():
    """A plain ReLU keeps only its output, which the next conv/linear keeps anyway; GAAF's ReLU shape needs x where
    the output is 0. After a BatchNorm, x is recomputed from the BatchNorm's saved input (gaaf_patch.fused), so the
    site keeps its output like PyTorch's ReLU. Elsewhere the site keeps its input: one activation where the output
    is kept downstream (the documented gap). SmallCNN: features.2 and .5 follow a BatchNorm (no gap); the head's
    ``.relu()`` follows a flatten and feeds a Linear (the gap)."""
    torch.manual_seed(0)
    base = SmallCNN()
    patched = gaaf_patch.patch(copy.deepcopy(base))
    x = torch.randn(2, 3, 8, 8)
    inputs = []
    for m in patched.modules():
        if isinstance(m, gaaf_patch.GAAF):
            m.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].numel() * inp[0].element_size()))
    got = sum(_saved_storages(patched, x).values())
    want = sum(_saved_storages(base, x).values())
    assert len(inputs) == 3  # features.2 (in place, before a conv), features.5 (in place, before pooling), head relu
    assert got == want + inputs[2]
    gaaf_patch.unpatch(patched)
    assert sum(_saved_storages(patched, x).values()) == want


# ---------------------------------------------------------------------------------------------------------------------
# the fast backward: only writes to its own buffers, same values as the generic formula


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_backward_writes_nothing_it_does_not_own(name, backend):
    x = (torch.randn(6, 5) * 3).requires_grad_()
    y = gaaf(x, name)
    gy = torch.randn_like(y)
    gy_copy, y_copy, x_copy = gy.clone(), y.detach().clone(), x.detach().clone()
    versions = (gy._version, y._version, x._version)
    y.backward(gy)
    assert (gy._version, y._version, x._version) == versions
    assert torch.equal(gy, gy_copy) and torch.equal(y.detach(), y_copy) and torch.equal(x.detach(), x_copy)


def test_backward_with_shared_gradient_buffer(backend):
    # autograd may hand the same gradient tensor to two branches: neither may see the other's in-place work
    x = (torch.randn(5, 4) * 2).requires_grad_()
    (gaaf(x, "tanh") + gaaf(x, "relu") + gaaf(x, "gelu")).sum().backward()
    want = sum(
        gaaf_patch.activations.get(n).dphi(x.detach(), torch.tanh(x.detach()), **ACTIVATIONS[n].params())
        + get_shape(n)(x.detach())
        for n in ("tanh", "relu", "gelu")
    )
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


SHAPES = [
    None,
    "zero",
    "gauss(width=3.0, center=0.5, scale=2.0, height=0.5)",
    "shifted_sigmoid(slope=2.0, shift=1.0, height=0.3)",
    "band",
    lambda t: 0.1 * torch.cos(t),
]


# (activation, whether the output is saved): tanh and sigmoid save it in exact mode, their input in sawtooth mode
_SAVED = [(n, False) for n in sorted(ACTIVATIONS)] + [(n, True) for n in sorted(ACTIVATIONS) if ACTIVATIONS[n].inverse]


@pytest.mark.parametrize("shape", SHAPES, ids=["default", "zero", "gauss", "sigmoid", "band", "callable"])
@pytest.mark.parametrize(("name", "from_output"), _SAVED, ids=[f"{n}-{'y' if o else 'x'}" for n, o in _SAVED])
def test_fast_backward_matches_generic_formula(name, from_output, shape, backend):
    act = ACTIVATIONS[name]
    params = act.params()
    sh = gaaf_patch.shapes.resolve(shape if shape is not None else name)
    x = torch.linspace(-7, 7, 301, dtype=F64)
    y = act.phi(x, **params)
    saved = y if from_output else x
    gy = torch.rand_like(x) + 0.5
    with torch.no_grad():
        fast = ops._backward(saved, gy, from_output, act, sh, params)
    generic = ops._multiplier(saved, from_output, act, sh, params) * gy
    atol = 1e-8 if name == "hardsigmoid" else 1e-12  # PyTorch's hardsigmoid_backward uses a float32 1/6 in float64
    torch.testing.assert_close(fast, generic, rtol=1e-12, atol=atol)


def test_double_backward_uses_the_differentiable_path():
    x = torch.randn(7, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(gaaf(x, "tanh").sum(), x, create_graph=True)
    want = 1 - torch.tanh(x.detach()) ** 2 + get_shape("tanh")(x.detach())
    torch.testing.assert_close(g.detach(), want)
    g.sum().backward()  # differentiable: no in-place error
    assert torch.isfinite(x.grad).all()


def test_compiles_with_aot_autograd():
    torch.manual_seed(0)
    m = gaaf_patch.patch(mlp(nn.Tanh, sizes=(16, 8, 8, 4)))
    ref = copy.deepcopy(m)
    x = torch.randn(4, 16)
    ref(x).square().sum().backward()
    torch._dynamo.reset()
    c = torch.compile(m, backend="aot_eager", fullgraph=True)
    c(x).square().sum().backward()
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark's own pieces (the timings themselves are not tests)


def test_benchmark_naive_module_is_eq_7_8():
    from benchmarks.workloads import NaiveGAAF, naive

    m = naive(mlp(nn.Tanh, sizes=(8, 8, 4)))
    assert sum(isinstance(c, NaiveGAAF) for c in m.modules()) == 1
    x = torch.linspace(-3, 3, 101, dtype=F64, requires_grad=True)
    y = NaiveGAAF("tanh")(x)
    torch.testing.assert_close(y, torch.tanh(x) + ops.sawtooth(x, 1e4) * get_shape("tanh")(x))
    y.sum().backward()
    # phi' + s + g s': within max|s'| / (2K) of GAAF's gradient
    xe = x.detach().clone().requires_grad_()
    gaaf(xe, "tanh").sum().backward()
    assert (x.grad - xe.grad).abs().max() < 1e-4


def test_benchmark_memory_probes():
    from benchmarks.memory import peak_step_bytes, saved_bytes
    from benchmarks.workloads import Runner

    torch.manual_seed(0)
    base = mlp(nn.Tanh, sizes=(64, 32, 4))
    x, t = torch.randn(8, 64), torch.randint(0, 4, (8,))
    rb, rg = Runner(base, x, t), Runner(gaaf_patch.patch(copy.deepcopy(base)), x, t)
    assert saved_bytes(rb) == saved_bytes(rg) > 0
    peak = peak_step_bytes(rb)
    if sys.platform.startswith("linux"):  # glibc's mallinfo2: the probe measures; the step holds what it saved
        assert peak is not None and peak >= saved_bytes(rb), peak
    else:
        assert peak is None or peak >= saved_bytes(rb)
