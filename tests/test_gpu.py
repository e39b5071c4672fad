"""The CUDA paths: eager GAAF, the fused BatchNorm, Inductor/Triton through both compile routes, half precision and
loss scaling, against references written in the tests (the torch functions, their autograd derivatives, the shape
formulas of tests/helpers.py).

Every test takes a ``device``. Its ``cuda`` cases are marked ``gpu`` and skipped without a CUDA device (CI has none);
its ``cpu`` cases always run, so the assertions are exercised on every machine. What only a GPU has (Triton kernel
counts, GradScaler's float16 steps) and compiled reduced precision, which tests/test_backend.py checks on the CPU
(test_mixed_precision_stays_finite), are collected for ``cuda`` only; so is float16 autocast.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import gaaf
from tests.helpers import (
    TORCH_FN,
    FunctionalTanhGeluRelu,
    SmallCNN,
    assert_fused,
    kernel_counts,
    mlp,
    reference_gradient,
    unfused,
)

CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BOTH, CUDA = ["cpu", "cuda"], ["cuda"]
HALF = [torch.float16, torch.bfloat16]
NAMES = ["tanh", "sigmoid", "relu", "gelu", "silu", "elu", "softplus"]
EXTREMES = [-60000.0, -1000.0, -10.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 6.0, 10.0, 1000.0, 60000.0]


def cases(devices: list[str], *axes: list) -> list:
    """Every combination of a device and the values of ``axes``; the cuda ones marked ``gpu`` and skipped without a
    CUDA device."""
    return [
        pytest.param(*case, marks=CUDA_MARKS if case[0] == "cuda" else (), id="-".join(map(str, case)))
        for case in itertools.product(devices, *axes)
    ]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(model: nn.Module, x: torch.Tensor):
    """Output, input gradient and parameter gradients of ``(model(x) ** 2).sum()``."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize(
    ("device", "name", "mode"),
    cases(BOTH, ["tanh", "sigmoid", "relu", "gelu", "silu", "leaky_relu"], ["exact", "sawtooth"]),
)
def test_eager_gradient_is_phi_prime_plus_s(name, mode, device):
    x = torch.linspace(-6, 6, 4097, device=device)
    leaf = x.clone().requires_grad_()
    y = gaaf(leaf, name, mode=mode)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(leaf.grad.double().cpu(), reference_gradient(name, x.cpu()), rtol=1e-5, atol=1e-5)
    if mode == "exact":
        assert torch.equal(y, TORCH_FN[name](x))


@pytest.mark.parametrize("device", cases(BOTH))
def test_fused_batchnorm_matches_the_unfused_patch(device):
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    x = torch.randn(4, 3, 16, 16, device=device)
    fused = gaaf_patch.patch(copy.deepcopy(model))
    plain = unfused(fused)
    assert gaaf_patch.report(fused).fused
    got, want, original = _run(fused, x), _run(plain, x), _run(model, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], original[0], rtol=1e-5, atol=1e-6)  # the forward is the unpatched model's


@pytest.mark.parametrize(("device", "model", "how"), cases(BOTH, ["tanh_mlp", "cnn"], ["backend", "gaaf.compile"]))
def test_compiled_matches_eager_patch(model, how, device):
    torch.manual_seed(0)
    if model == "tanh_mlp":
        net, x = mlp(sizes=(32, 64, 64, 10)), torch.randn(8, 32) * 2
    else:
        net, x = SmallCNN(), torch.randn(2, 3, 8, 8)
    net, x = net.to(device), x.to(device)
    ref = gaaf_patch.patch(copy.deepcopy(net))
    if how == "backend":
        compiled = torch.compile(copy.deepcopy(net), backend="gaaf")
    else:
        compiled = gaaf_patch.compile(copy.deepcopy(net))
    got = _run(compiled, x)
    for a, b in zip(got, _run(ref, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], _run(net, x)[0], rtol=1e-4, atol=1e-5)  # exact mode: the unpatched forward


@pytest.mark.parametrize("device", cases(CUDA))
def test_inductor_fuses_the_gaaf_op(device):
    """The gaaf backend generates no more Triton kernels than plain Inductor, forward and backward, but the auto
    gain's one reduction per site (the CPU's C++ kernels: tests/test_backend.py)."""
    torch.manual_seed(0)
    counts = kernel_counts(SmallCNN().to(device), torch.randn(2, 3, 8, 8, device=device))
    assert_fused(counts, sites=3)


@pytest.mark.parametrize(
    ("device", "name", "dtype", "mode", "compiled"),
    cases(BOTH, NAMES, HALF, ["exact", "sawtooth"], [False]) + cases(CUDA, NAMES, HALF, ["exact", "sawtooth"], [True]),
)
def test_half_extremes_stay_finite(name, dtype, mode, compiled, device):
    site = gaaf_patch.GAAF(name, mode=mode)
    fn = torch.compile(site, dynamic=False) if compiled else site
    x = torch.tensor(EXTREMES, device=device, dtype=dtype).requires_grad_()
    y = fn(x)
    y.backward(torch.ones_like(y))
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(y).all(), y
    assert torch.isfinite(x.grad).all(), x.grad
    if mode == "exact":
        torch.testing.assert_close(y, TORCH_FN[name](x.detach()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("device", "dtype", "mode", "compiled"),
    cases(["cpu"], [torch.bfloat16], ["exact", "sawtooth"], [False])  # compiled: tests/test_backend.py
    + cases(CUDA, HALF, ["exact", "sawtooth"], [False, True]),
)
def test_autocast_stays_finite(dtype, mode, compiled, device):
    torch.manual_seed(0)
    model = gaaf_patch.patch(FunctionalTanhGeluRelu().to(device), mode=mode, activations="all")
    if compiled:
        model = torch.compile(model)
    x = torch.linspace(-60000, 60000, 64, device=device).view(8, 8)
    with torch.autocast(device, dtype=dtype):
        out = _run(model, x)
    for t in out:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", cases(CUDA))
def test_float16_loss_scaling_takes_every_step(device):
    torch.manual_seed(0)
    model = gaaf_patch.patch(SmallCNN().to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device)
    x, target = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 10, (8,), device=device)
    scales = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert len(set(scales)) == 1  # no step found an inf/NaN gradient: the scale was never cut
    assert all(torch.isfinite(p).all() for p in model.parameters())
