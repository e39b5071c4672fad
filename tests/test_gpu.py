"""The CUDA paths: eager GAAF, the fused BatchNorm, Inductor/Triton through both compile routes, half precision and
loss scaling. Marked ``gpu``: skipped without a CUDA device (CI has none).

``GAAF_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py`` runs the same tests on the CPU (float16 loss
scaling excepted), which is how they are kept working on machines without a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import gaaf
from gaaf_patch.activations import ACTIVATIONS
from gaaf_patch.shapes import get as get_shape
from tests.test_compile import Mixed, assert_fused, kernel_counts
from tests.test_fuse import _unfused
from tests.toys import SmallCNN, mlp

DEVICE = os.environ.get("GAAF_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
HALF = [torch.float16, torch.bfloat16]
EXTREMES = [-60000.0, -1000.0, -10.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 6.0, 10.0, 1000.0, 60000.0]


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


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "gelu", "silu", "leaky_relu"])
@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
def test_eager_gradient_is_phi_prime_plus_s(name, mode):
    x = torch.linspace(-6, 6, 4097, device=DEVICE)
    leaf = x.clone().requires_grad_()
    y = gaaf(leaf, name, mode=mode)
    y.backward(torch.ones_like(y))
    act, xd = ACTIVATIONS[name], x.double().cpu()
    want = act.dphi(xd, act.phi(xd, **act.params()), **act.params()) + get_shape(name)(xd)
    torch.testing.assert_close(leaf.grad.double().cpu(), want, rtol=1e-5, atol=1e-5)
    if mode == "exact":
        assert torch.equal(y, act.phi(x, **act.params()))


def test_fused_batchnorm_matches_the_unfused_patch():
    torch.manual_seed(0)
    model = SmallCNN().to(DEVICE)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    fused = gaaf_patch.patch(copy.deepcopy(model))
    plain = _unfused(fused)
    assert gaaf_patch.report(fused).fused
    for a, b in zip(_run(fused, x), _run(plain, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["backend", "gaaf.compile"])
@pytest.mark.parametrize("model", ["tanh_mlp", "cnn"])
def test_compiled_matches_eager_patch(model, how):
    torch.manual_seed(0)
    if model == "tanh_mlp":
        net, x = mlp(sizes=(32, 64, 64, 10)), torch.randn(8, 32) * 2
    else:
        net, x = SmallCNN(), torch.randn(2, 3, 8, 8)
    net, x = net.to(DEVICE), x.to(DEVICE)
    ref = gaaf_patch.patch(copy.deepcopy(net))
    if how == "backend":
        compiled = torch.compile(copy.deepcopy(net), backend="gaaf")
    else:
        compiled = gaaf_patch.compile(copy.deepcopy(net))
    for a, b in zip(_run(compiled, x), _run(ref, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inductor_fuses_the_gaaf_op():
    """The gaaf backend generates no more kernels (Triton on CUDA) than plain Inductor, forward and backward, but the
    auto gain's one reduction per site."""
    torch.manual_seed(0)
    counts = kernel_counts(SmallCNN().to(DEVICE), torch.randn(2, 3, 8, 8, device=DEVICE))
    assert_fused(counts, sites=3)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "gelu", "silu", "elu", "softplus"])
def test_half_extremes_stay_finite(name, dtype, mode, compiled):
    if DEVICE == "cpu" and dtype == torch.float16 and compiled:
        pytest.skip("float16 Inductor on CPU is not the GPU path being checked")
    site = gaaf_patch.GAAF(name, mode=mode)
    fn = torch.compile(site, dynamic=False) if compiled else site
    x = torch.tensor(EXTREMES, device=DEVICE, dtype=dtype).requires_grad_()
    y = fn(x)
    y.backward(torch.ones_like(y))
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(y).all(), y
    assert torch.isfinite(x.grad).all(), x.grad
    if mode == "exact":
        act = ACTIVATIONS[name]
        torch.testing.assert_close(y, act.phi(x.detach(), **act.params()), rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_stays_finite(dtype, mode, compiled):
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is the GPU path")
    torch.manual_seed(0)
    model = gaaf_patch.patch(Mixed().to(DEVICE), mode=mode, activations="all")
    if compiled:
        model = torch.compile(model)
    x = torch.linspace(-60000, 60000, 64, device=DEVICE).view(8, 8)
    with torch.autocast(DEVICE, dtype=dtype):
        out = _run(model, x)
    for t in out:
        assert torch.isfinite(t).all()


def test_float16_loss_scaling_takes_every_step():
    if DEVICE != "cuda":
        pytest.skip("GradScaler's float16 path is CUDA's")
    torch.manual_seed(0)
    model = gaaf_patch.patch(SmallCNN().cuda())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    x, target = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    scales = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert len(set(scales)) == 1  # no step found an inf/NaN gradient: the scale was never cut
    assert all(torch.isfinite(p).all() for p in model.parameters())
