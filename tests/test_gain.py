"""The depth-safe auto gain (gaaf_patch/gain.py): gradients against a float64 formula written here, the energy
budget, the per-site allowance from the number of sites, and the whole-network gradient scale on deep models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import kernels

# phi, phi' and the linear-regime slope of each activation, written out here (not read from the library)
PHI = {
    "relu": (torch.relu, lambda x: (x > 0).double(), 1.0),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2, 1.0),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)), 0.25),
    "silu": (F.silu, lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))), 1.0),
    "gelu": (F.gelu, lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi), 1.0),
    "elu": (F.elu, lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x)), 1.0),
}  # fmt: skip
# unit-height shapes s~ of the defaults, written out
UNIT = {
    "relu": lambda x: torch.sigmoid(5 * (x + 0.5)),
    "tanh": lambda x: torch.exp(-x * x / 4),
    "sigmoid": lambda x: torch.exp(-((x / 2) ** 2) / 4),
    "silu": lambda x: torch.sigmoid(5 * (x + 0.5)),
    "gelu": lambda x: torch.sigmoid(5 * (x + 0.5)),
    "elu": lambda x: torch.sigmoid(5 * (x + 0.5)),
}


def _sample_memory_order(x: torch.Tensor) -> torch.Tensor:
    """What the gain is estimated on: every step-th element in memory order (step odd), all of a small tensor."""
    flat = x.detach().contiguous().reshape(-1) if x.is_contiguous() else x.detach().permute(0, 2, 3, 1).reshape(-1)
    n = flat.numel()
    if n <= 2 * 4096:
        return flat
    step = n // 4096
    step += 1 - step % 2
    return flat[::step]


def _reference(name: str, x: torch.Tensor, gy: torch.Tensor, delta: float) -> torch.Tensor:
    """dx = gy (phi' + c s~ (a - phi')), c solving mean((phi' + c st)^2) = (1 + delta) mean(phi'^2), in float64."""
    _phi, dphi, a = PHI[name]
    xs = _sample_memory_order(x).double()
    p, st = dphi(xs), UNIT[name](xs) * (a - dphi(xs))
    A, qa, qb = (p * p).mean(), (st * st).mean(), (p * st).mean()
    c = float(((-qb + torch.sqrt(qb * qb + qa * delta * A)) / qa).clamp(0, 1))
    xd = x.detach().double()
    return gy.double() * (dphi(xd) + c * UNIT[name](xd) * (a - dphi(xd))), c


def _grad(name, x, gy, delta, kernel):
    previous = kernels.set_enabled(kernel)
    try:
        x = x.detach().clone().requires_grad_()
        gaaf_patch.gaaf(x, name, delta=delta).backward(gy)
        return x.grad
    finally:
        kernels.set_enabled(previous)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "plain"])
@pytest.mark.parametrize("size", [(37, 50), (64, 8, 9, 9)], ids=["whole", "sampled"])
@pytest.mark.parametrize("name", sorted(PHI))
def test_gradient_is_the_budgeted_blend(name, size, kernel):
    torch.manual_seed(0)
    x = torch.randn(size) * 2 - 0.3
    gy = torch.randn(size)
    ref, c = _reference(name, x, gy, 0.05)
    assert 0 < c < 1  # the budget binds: not a test of the clamp
    got = _grad(name, x, gy, 0.05, kernel)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_channels_last_samples_in_memory_order():
    torch.manual_seed(1)
    x = (torch.randn(16, 32, 7, 7) * 2).to(memory_format=torch.channels_last)
    gy = torch.randn_like(x)
    ref, _ = _reference("relu", x, gy, 0.05)
    torch.testing.assert_close(_grad("relu", x, gy, 0.05, True).double(), ref, rtol=1e-4, atol=1e-5)


def test_energy_of_the_site_is_the_budget():
    """Over the input distribution, the gradient energy is exactly (1 + delta) times the plain one."""
    torch.manual_seed(2)
    x = torch.randn(4000, dtype=torch.float64).requires_grad_()
    for delta in (0.01, 0.05, 0.1):  # below what the whole blend (c = 1) adds here, 0.26
        x.grad = None
        gaaf_patch.gaaf(x, "relu", delta=delta).backward(torch.ones_like(x))
        plain = (x.detach() > 0).double()
        assert (x.grad**2).mean().item() == pytest.approx((1 + delta) * (plain**2).mean().item(), rel=1e-9)


def test_it_blends_toward_the_slope_and_never_exceeds_it():
    x = torch.linspace(-4, 4, 801, dtype=torch.float64).requires_grad_()
    gaaf_patch.gaaf(x, "relu", delta=1.0).backward(torch.ones_like(x))
    g = x.grad
    assert torch.all(g[x.detach() > 0] == 1)  # an active unit keeps exactly its gradient
    near = (x.detach() > -0.6) & (x.detach() < 0)
    assert torch.all(g[near] > 0.1)  # a unit near saturation gets gradient (the paper's mechanism)
    assert g.max() <= 1 and g.min() >= 0


def test_a_site_with_no_gradient_stays_at_none():
    x = torch.full((100,), -8.0, dtype=torch.float64, requires_grad=True)
    gaaf_patch.gaaf(x, "relu", delta=0.5).backward(torch.ones_like(x))
    assert torch.all(x.grad == 0)
    x.grad = None
    gaaf_patch.gaaf(x, "relu", "relu_keras").backward(torch.ones_like(x))  # the paper's gain revives it
    assert torch.all(x.grad > 0)


def test_paper_gain_is_phi_prime_plus_s():
    torch.manual_seed(3)
    x = (torch.randn(50, 30, dtype=torch.float64) * 2).requires_grad_()
    gaaf_patch.gaaf(x, "tanh").backward(torch.ones_like(x))
    xd = x.detach()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(xd) ** 2 + torch.exp(-xd * xd / 4))


def _activation_modules(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.ReLU, nn.Tanh)) for m in model.modules())


def test_patch_sets_the_allowance_from_the_number_of_sites():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(6)], nn.Tanh())
    n = _activation_modules(model)
    gaaf_patch.patch(model)
    deltas = [m.delta for m in model.modules() if isinstance(m, gaaf_patch.GAAF)]
    assert len(deltas) == n and deltas == pytest.approx([2 ** (1 / n) - 1] * n)
    rep = gaaf_patch.report(model)
    assert all(r["gain"].startswith("auto(delta=") for r in rep.replaced)
    assert rep.config["gain"] == "auto"


def test_paper_preset_sawtooth_and_old_configs_have_the_paper_gain():
    for kwargs in ({"shapes": "paper"}, {"gain": "paper"}, {"mode": "sawtooth"}):
        m = gaaf_patch.patch(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), **kwargs)
        assert [r["gain"] for r in gaaf_patch.report(m).replaced] == ["paper"], kwargs
    old = {"activations": "auto", "shapes": {}, "strip_dropout": False, "strip_droppath": False, "mode": "exact"}
    assert gaaf_patch.PatchConfig.from_dict({**old, "K": 1e4}).gain == "paper"
    with pytest.raises(gaaf_patch.PatchError, match="preset"):
        gaaf_patch.patch(nn.ReLU(), shapes="papr")
    with pytest.raises(gaaf_patch.PatchError, match="contradict"):
        gaaf_patch.patch(nn.ReLU(), shapes="paper", gain="auto")
    with pytest.raises(ValueError, match="exact"):
        gaaf_patch.gaaf(torch.zeros(2), "relu", mode="sawtooth", delta=0.1)


class _Deep(nn.Module):
    """A deep residual BN-ReLU network (no zero-init): the paper's gain compounds along it."""

    def __init__(self, blocks: int = 24, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.act = nn.ReLU()

    def forward(self, x):
        for b in self.blocks:
            x = self.act(x + b(x))
        return x


def _norms(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    model.train()
    x = x.clone().requires_grad_()
    model.zero_grad()
    model(x).square().mean().backward()
    return x.grad.norm().item(), math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()))


@pytest.mark.parametrize("gain", ["auto", "paper"])
def test_deep_network_gradient_scale(gain):
    torch.manual_seed(4)
    plain = _Deep()
    x = torch.randn(64, 32)
    patched = gaaf_patch.patch(copy.deepcopy(plain), gain=gain)
    (pi, pp), (qi, qp) = _norms(patched, x), _norms(plain, x)
    if gain == "auto":
        assert 0.5 <= pi / qi <= 2 and 0.5 <= pp / qp <= 2
    else:
        assert pi / qi > 10  # the reason the default changed
    # the library's measurement agrees with this one and leaves the model as it was
    fresh = gaaf_patch.patch(copy.deepcopy(plain), gain=gain)
    before = copy.deepcopy(fresh.state_dict())
    scale = gaaf_patch.measure_gradient_scale(fresh, x)
    assert scale.input == pytest.approx(pi / qi, rel=1e-4) and scale.params == pytest.approx(pp / qp, rel=1e-4)
    assert scale.safe == (gain == "auto")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert gaaf_patch.report(fresh).gradient_scale["input"] == scale.input
    assert (scale.warning() is None) == (gain == "auto")


def test_measure_needs_a_patched_model():
    with pytest.raises(ValueError, match="patch it first"):
        gaaf_patch.measure_gradient_scale(nn.Linear(2, 2), torch.zeros(1, 2))


def test_compiled_auto_gain_matches_eager():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    eager = gaaf_patch.patch(copy.deepcopy(model))
    compiled = gaaf_patch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(32, 8) * 2
    grads = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    plain = x.clone().requires_grad_()
    model(plain).square().sum().backward()
    assert not torch.allclose(grads[0], plain.grad)


def test_cli_reports_the_gradient_scale_and_warns_on_the_paper_gain(capsys):
    import json

    from gaaf_patch.cli import main

    small = ["tv:resnet18", "--input-size", "3,32,32", "--num-classes", "10", "--json"]
    assert main([*small, "--gain", "paper"]) == 0
    captured = capsys.readouterr()
    scale = json.loads(captured.out)["report"]["gradient_scale"]
    assert scale["input"] > 2 and scale["safe"] is False
    assert "outside [0.5, 2.0]" in captured.err and "gain='auto'" in captured.err
    assert main(small) == 0
    captured = capsys.readouterr()
    scale = json.loads(captured.out)["report"]["gradient_scale"]
    assert 0.5 <= scale["input"] <= 2 and 0.5 <= scale["params"] <= 2 and scale["safe"] is True
    assert captured.err == ""


def test_a_user_shape_returning_its_input_does_not_touch_what_backward_saved():
    """An identity-like callable shape: the auto blend scales s in place, which must not be the saved input."""
    x = torch.linspace(-2, 2, 50, dtype=torch.float64).requires_grad_()
    y = gaaf_patch.gaaf(x, "relu", lambda t: t, delta=0.5)
    y.backward(torch.ones_like(x), retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    y.backward(torch.ones_like(x))  # the same saved tensor, read again
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
