"""The ``fuse`` pass: a BatchNorm feeding a GAAF ReLU-family site is recomputed in backward instead of kept.

Fusing changes which tensor autograd keeps, never a value: the forward, the running statistics and the BatchNorm
parameters' gradients must match the unfused patch (bit for bit where the same kernels run, to float32 rounding
where ``s`` reads the recomputed input), and the saved bytes must drop to the unpatched model's.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import fused
from tests.helpers import SmallCNN, unfused
from tests.helpers import saved_storages as _saved_storages

F64 = torch.float64


class Block(nn.Module):
    """Every way a BatchNorm meets a ReLU in user code: module, function (in place), method, after an add."""

    def __init__(self, c: int = 6, bn=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.conv4, self.bn4 = nn.Conv2d(c, c, 1), bn(c)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))  # module
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)  # function, in place
        y = self.bn3(self.conv3(y)).relu()  # method
        y = self.act(self.bn4(self.conv4(y)) + x)  # after an add with the input: x is not recomputable, y is kept
        return self.head(y)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    return sum(_saved_storages(model, x).values())


def _fused_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, fused.BatchNormRecompute)]


def test_pairs_found_in_traced_code_and_sequentials():
    torch.manual_seed(0)
    model = gaaf_patch.patch(nn.Sequential(Block(), SmallCNN()))
    # bn4 feeds the ReLU through a residual add: converted too (whether that site recomputes is decided at run time)
    assert _fused_names(model) == ["0.bn1", "0.bn2", "0.bn3", "0.bn4", "1.features.1", "1.features.4"]
    rep = gaaf_patch.report(model)
    assert sorted(f["name"] for f in rep.fused) == _fused_names(model) and rep.summary()["fused"] == 6
    assert {f["into"] for f in rep.fused} >= {"0.act", "1.features.2", "1.features.5"}
    gaaf_patch.unpatch(model)
    assert not gaaf_patch.report(model).fused


def test_same_forward_stats_and_close_gradients_asunfused():
    torch.manual_seed(0)
    model = gaaf_patch.patch(Block())
    ref = unfused(model)
    assert len(_fused_names(model)) == 4 and not _fused_names(ref)
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    for _ in range(2):  # running stats and num_batches_tracked advance identically
        out, out_ref = model(x), ref(xr)
        assert torch.equal(out, out_ref)
        gy = torch.randn_like(out)
        out.backward(gy)
        out_ref.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b, c), name


def _auto_relu_multiplier(z: torch.Tensor, delta: float) -> torch.Tensor:
    """The auto gain of a ReLU site, written out: phi' + c s~ (1 - phi'), c from the energy budget."""
    p = (z > 0).to(z.dtype)
    st = torch.sigmoid(5 * (z + 0.5)) * (1 - p)
    A, a = (p * p).mean(), (st * st).mean()  # p st = 0: the quadratic has no linear term
    c = torch.sqrt(delta * A / a).clamp(max=1)
    assert 0 < c < 1
    return p + c * st


@pytest.mark.parametrize("gain", ["paper", "auto"])
def test_float64_gradient_matches_formula(gain):
    """In float64 the recomputed input equals the forward's to ~1e-15, so the fused gradient is the formula's."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5).double()
    model = gaaf_patch.patch(nn.Sequential(bn, nn.ReLU()), gain=gain)
    assert _fused_names(model) == ["0"]
    if gain == "auto":
        model[1].delta = 0.05  # below what the whole blend adds, so the budget binds
    x = (torch.randn(32, 5, dtype=F64) * 2).requires_grad_()
    model(x).sum().backward()
    xr = x.detach().clone().requires_grad_()
    zr = F.batch_norm(xr, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    z = zr.detach()
    if gain == "paper":
        zr.backward((z > 0).to(F64) + gaaf_patch.shapes.get("relu")(z))
    else:
        zr.backward(_auto_relu_multiplier(z, 0.05))
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_saved_bytes_drop_to_unpatched():
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    patched = gaaf_patch.patch(copy.deepcopy(base))
    x = torch.randn(2, 3, 8, 8)
    act_bytes = 2 * 8 * 8 * 8 * 4
    assert _saved_bytes(unfused(patched), x) == _saved_bytes(base, x) + 2 * act_bytes
    assert _saved_bytes(patched, x) == _saved_bytes(base, x)


def test_resnet_residual_sites_recompute_and_matchunfused():
    """torchvision ResNet-50: every BatchNorm is converted (33 feed a ReLU, 16 feed one through the residual add,
    4 are downsample branches), saved bytes equal the unpatched model's, and gradients match the unfused patch."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet50(num_classes=4)
    model = gaaf_patch.patch(copy.deepcopy(base))
    assert len(_fused_names(model)) == 53 == sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    x = torch.randn(2, 3, 32, 32)
    assert _saved_bytes(model, x) == _saved_bytes(base, x)
    ref = unfused(model)
    assert _saved_bytes(ref, x) > _saved_bytes(base, x)
    out, out_ref = model(x), ref(x)
    assert torch.equal(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_add_of_kept_outputs_recomputes_in_float64():
    """``relu(bn(a) + tanh(b))``: both operands are recomputable (a fused BatchNorm; a site that kept its output)."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.t, self.r = nn.BatchNorm1d(5), nn.Tanh(), nn.ReLU()

        def forward(self, a, b):
            return self.r(self.bn(a) + self.t(b))

    torch.manual_seed(0)
    model = gaaf_patch.patch(Res().double(), gain="paper")  # the written-out formula below is the paper's
    assert _fused_names(model) == ["bn"]
    a, b = (torch.randn(16, 5, dtype=F64) * 2).requires_grad_(), torch.randn(16, 5, dtype=F64).requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = model(a, b)
    assert any(t.data_ptr() == out.data_ptr() for t in packed)  # the ReLU site kept its output, not its input
    out.sum().backward()
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    bn = model.bn
    z = F.batch_norm(ra, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) + gaaf_patch.gaaf(rb, "tanh")
    z.backward((z.detach() > 0).to(F64) + gaaf_patch.shapes.get("relu")(z.detach()))
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.LeakyReLU(0.1)])
def test_relu_family(act):
    torch.manual_seed(0)
    model = gaaf_patch.patch(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), act, nn.Linear(8, 2)))
    assert _fused_names(model) == ["1"]
    ref = unfused(model)
    x = torch.randn(16, 4) * 4
    model(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        dict(module=nn.Tanh()),  # output-saving activations gain nothing
        dict(module=nn.LeakyReLU(-0.5)),  # a negative slope flips the sign: phi' not readable from the output
        dict(module=nn.ReLU(), mode="sawtooth"),  # sawtooth moves the output: keep x
        dict(module=nn.ReLU(), bn=nn.SyncBatchNorm),  # not the plain class
    ],
    ids=["tanh", "negative-slope", "sawtooth", "syncbn"],
)
def test_not_fused(case):
    bn = case.get("bn", nn.BatchNorm1d)(8)
    model = gaaf_patch.patch(nn.Sequential(bn, case["module"]), mode=case.get("mode", "exact"))
    assert not _fused_names(model)


def test_unpatch_pickle_eval_and_double_patch():
    torch.manual_seed(0)
    base = SmallCNN()
    model = gaaf_patch.patch(copy.deepcopy(base))
    gaaf_patch.patch(model)
    assert len(_fused_names(model)) == 2
    assert model.state_dict().keys() == base.state_dict().keys()
    clone = pickle.loads(pickle.dumps(model))
    assert len(_fused_names(clone)) == 2
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone.eval()(x))
    gaaf_patch.unpatch(model)
    assert not _fused_names(model) and all(type(m) is not fused.BatchNorm2d for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]


def test_double_backward_through_fused_batchnorm_fails_loudly():
    model = gaaf_patch.patch(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    x = torch.randn(8, 4, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|marked with @once"):
        g.sum().backward()


def test_compiled_patched_model_takes_the_stock_path():
    torch.manual_seed(0)
    model = gaaf_patch.patch(SmallCNN())
    ref = unfused(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    ref(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


class _GaafLeaves(torch.fx.Tracer):
    """A whole-model trace that keeps GAAF sites as calls (how gaaf_patch.coverage counts what is left)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, gaaf_patch.GAAF) or super().is_leaf_module(m, qualname)


def test_a_whole_model_fx_trace_calls_the_batchnorm_twin_and_trains_the_same():
    """fx keeps torch.nn's BatchNorm a leaf, not its twin: tracing ran the stock forward, whose ``input.dim()``
    check is control flow on a Proxy (TraceError), and the coverage sweep lost its fx count on every ResNet."""
    torch.manual_seed(0)
    model = gaaf_patch.patch(nn.Sequential(SmallCNN()))
    twins = _fused_names(model)
    assert twins
    graph = torch.fx.GraphModule(model, _GaafLeaves().trace(model))
    assert twins == [n.target for n in graph.graph.nodes if n.op == "call_module" and n.target in twins]
    x = torch.randn(4, 3, 16, 16)
    eager, traced = copy.deepcopy(model).train(), copy.deepcopy(graph).train()
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [eager(xs[0]), traced(xs[1])]
    for y in ys:
        y.square().sum().backward()
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    before, after = eager.state_dict(), traced.state_dict()  # running statistics updated alike
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
