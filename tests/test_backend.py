"""The ``"gaaf"`` torch.compile backend against eager ``gaaf_patch.patch``, and against plain Inductor.

Numbers: compiled outputs and gradients equal the eager patch (float32 tolerance: Inductor reorders reductions).
Rewrite: gradients differ from ``backend="inductor"`` and equal ``phi' + s``; rewritten graphs hold no activation
node. Structure-only checks run the rewritten graph through ``aot_eager`` (AOTAutograd, no C++ compile) to stay fast;
the rest go through Inductor on tiny models.
"""

from __future__ import annotations

import copy
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import fx, nn
from torch._dynamo.utils import counters

import gaaf_patch
from gaaf_patch.backend import GAAFBackend, GAAFPass, gaaf_backend, uuid
from gaaf_patch.config import PatchConfig
from gaaf_patch.gain import delta_for
from gaaf_patch.passes import targets
from gaaf_patch.shapes import get as get_shape
from tests.helpers import EveryForm, FunctionalTanhGeluRelu, SmallCNN, assert_fused, kernel_counts, mlp

TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32, across Inductor's fused kernels and eager


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, input gradient and parameter gradients of ``(model(x) ** 2).sum()``."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same(a, b, **tol) -> None:
    for u, v in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(u, v, **tol)
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)


def _aot(**options) -> GAAFBackend:
    """The gaaf rewrite followed by AOTAutograd with eager kernels: traces GAAF's backward, compiles no C++."""
    return GAAFBackend(PatchConfig(**options), inner="aot_eager")


def _capture(model: nn.Module, *args) -> list[fx.GraphModule]:
    """The graphs Dynamo hands a backend (run eagerly, unchanged)."""
    graphs: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(*args)
    return graphs


def _activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if targets.is_activation_node(n)]


class Forms(nn.Module):
    """Every function and method form, in place or not, with arguments, as Dynamo leaves them in its graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        a = F.relu6(x) + F.elu(x, 0.5) + F.hardtanh(x.clone(), -2.0, 2.0, True) + F.silu(x.clone(), inplace=True)
        b = F.mish(x) + F.hardswish(x) + F.leaky_relu(x, 0.2) + F.selu(x.clone(), True) + F.celu(x, 0.7)
        c = F.tanh(x) + x.tanh() + torch.tanh(x) + F.gelu(x, approximate="tanh") + F.softplus(x, 2.0)
        d = F.relu(x.clone(), inplace=True) + torch.relu(x) + x.clone().relu_() + F.leaky_relu(x.clone(), 0.1, True)
        return a + b + c + d + x.sigmoid() + F.hardsigmoid(x)


# ---------------------------------------------------------------------------------------------------------------------
# Registration and the rewrite itself (no compile)


def test_backend_is_registered_through_the_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert "gaaf" in torch._dynamo.list_backends()
    assert lookup_backend("gaaf") is gaaf_backend
    assert gaaf_patch.compile is gaaf_patch.backend.compile


def test_every_dynamo_form_is_rewritten():
    model, x = Forms(), torch.randn(4, 8)
    (gm,) = _capture(model, x)
    assert len(_activation_nodes(gm)) == 20
    graph_pass = GAAFPass(PatchConfig(activations="all"))
    assert graph_pass(gm).modified
    assert _activation_nodes(gm) == []
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == len(graph_pass.last_sites) == 20
    assert not GAAFPass()(gm).modified  # nothing left to rewrite
    # run eagerly after the rewrite: what the eagerly patched model computes, gradients included
    torch._dynamo.reset()
    backend = GAAFBackend(PatchConfig(activations="all"), inner="eager")
    got = _run(torch.compile(copy.deepcopy(model), backend=backend), x)
    assert len(backend.graph_pass.last_sites) == 20
    _assert_same(got, _run(gaaf_patch.patch(copy.deepcopy(model), activations="all"), x))


def test_sites_are_named_like_patch_names_them_and_gates_are_left():
    model = EveryForm().eval()
    (gm,) = _capture(model, torch.randn(4, 16))
    graph_pass = GAAFPass()
    graph_pass(gm)
    names = [s["name"] for s in graph_pass.last_sites]
    assert names[0] == "act"  # nn.ReLU(inplace=True) at self.act: its module name, as patch() reports it
    assert len(names) == 8
    assert [n.target for n in _activation_nodes(gm)] == [torch.sigmoid]  # the SE gate, left alone in "auto"
    (gm,) = _capture(SmallCNN(), torch.randn(1, 3, 8, 8))
    graph_pass(gm)
    assert [s["name"] for s in graph_pass.last_sites][:2] == ["features.2", "features.5"]


def test_per_layer_shapes_match_dynamo_module_paths():
    (gm,) = _capture(SmallCNN(), torch.randn(1, 3, 8, 8))
    graph_pass = GAAFPass(PatchConfig(shapes={"features.5": "zero", "relu": "relu_keras"}))
    graph_pass(gm)
    assert [s["shape"] for s in graph_pass.last_sites] == [
        get_shape("relu_keras").spec,
        get_shape("zero").spec,
        get_shape("relu_keras").spec,
    ]


def test_sites_inside_other_higher_order_ops_are_reported():
    def f(x):
        return torch.cond(x.sum() > 0, lambda t: torch.relu(t), lambda t: torch.tanh(t), (x,))

    (gm,) = _capture(f, torch.randn(4))
    graph_pass = GAAFPass()
    with pytest.warns(UserWarning, match="2 site.*left unpatched.*cond"):
        assert not graph_pass(gm).modified
    assert len(graph_pass.last_unreached) == 2


def test_uuid_is_stable_and_options_change_the_pass_identity():
    assert re.fullmatch(r"[0-9a-f]{64}", uuid()) and uuid() == uuid()
    assert GAAFPass(PatchConfig(K=10.0)).uuid() != GAAFPass(PatchConfig(K=20.0)).uuid()
    assert GAAFPass().uuid() == GAAFPass(PatchConfig()).uuid()
    assert GAAFBackend() == GAAFBackend(PatchConfig())
    shape = PatchConfig(shapes={"tanh": lambda x: x * 0})  # an unregistered callable: nothing stable to key on
    assert GAAFPass(shape).uuid() is None
    assert GAAFBackend(shape) != GAAFBackend(shape)


def test_compile_rejects_a_backend_and_bad_options():
    with pytest.raises(gaaf_patch.PatchError, match="backend"):
        gaaf_patch.compile(nn.Tanh(), backend="inductor")
    with pytest.raises(gaaf_patch.PatchError, match="mode"):
        gaaf_patch.compile(nn.Tanh(), mode="fast")


# ---------------------------------------------------------------------------------------------------------------------
# Through AOTAutograd (aot_eager): graph breaks, in place, already-patched models


class Break(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return F.relu(self.b(x), inplace=True)


def test_graph_break_patches_both_subgraphs():
    model, x = Break(), torch.randn(6, 8) * 2
    # the paper's gain: with the auto gain, an active ReLU keeps its gradient, and this loss (y^2 of a ReLU's output)
    # sends none to the inactive ones, so the last site would change nothing to see
    ref = gaaf_patch.patch(copy.deepcopy(model), gain="paper")
    counters.clear()
    backend = _aot(gain="paper")
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    got = _run(compiled, x)
    assert counters["stats"]["unique_graphs"] == 2
    _assert_same(got, _run(ref, x))
    plain = _run(model, x)
    assert not torch.allclose(got[1], plain[1])  # gradients through both sites changed
    torch._dynamo.reset()
    half = torch.compile(
        copy.deepcopy(model), backend=_aot(activations=["tanh"], gain="paper")
    )  # only the first subgraph's site
    assert not torch.allclose(_run(half, x)[1], got[1])


class InPlace(nn.Module):
    """``h.relu_()`` with ``h`` read afterwards; ``relu_`` on a view whose base is read afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = h.relu_()
        g = h * 3.0
        F.relu(g[:, :4], inplace=True)  # mutates g through a view
        return h * 2.0 + y.tanh() + g


class InPlaceRef(InPlace):
    """What InPlace computes with GAAF sites, written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = delta_for(3)  # three sites in the graph: each gets the auto gain's allowance for 3
        h = gaaf_patch.gaaf(self.a(x), "relu", delta=d)
        g = h * 3.0
        g = torch.cat([gaaf_patch.gaaf(g[:, :4], "relu", delta=d), g[:, 4:]], 1)
        return h * 2.0 + gaaf_patch.gaaf(h, "tanh", delta=d) + g


def test_inplace_activation_whose_input_is_read_later():
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(6, 8)
    ref = InPlaceRef()
    ref.load_state_dict(model.state_dict())
    compiled = gaaf_patch.compile(copy.deepcopy(model))
    got = _run(compiled, x)
    _assert_same(got, _run(ref, x), **TOL)
    assert not torch.allclose(got[1], _run(model, x)[1])


def test_inplace_on_a_graph_input_keeps_the_mutation():
    def f(x):
        F.relu(x, inplace=True)
        return x + 1

    x = torch.randn(16)
    y = torch.compile(f, backend=_aot())(x)
    assert (x >= 0).all()  # the caller sees its tensor changed, as with torch.relu_
    torch.testing.assert_close(y, x + 1)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(8, 8), nn.ReLU(inplace=True)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.act(self.a(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False) * 2


def test_activation_checkpointing_bodies_are_rewritten():
    model, x = Checkpointed(), torch.randn(4, 8)
    backend = _aot()
    got = _run(torch.compile(copy.deepcopy(model), backend=backend), x)
    assert [s["activation"] for s in backend.graph_pass.last_sites] == ["relu", "tanh"]
    _assert_same(got, _run(gaaf_patch.patch(copy.deepcopy(model)), x))


def test_an_already_patched_model_is_not_patched_twice():
    # sawtooth mode: a second GAAF on top of the first would add the sawtooth twice and show in the values
    model, x = mlp(sizes=(8, 16, 4)), torch.randn(5, 8) * 2
    options = {"mode": "sawtooth", "K": 50.0}
    patched = gaaf_patch.patch(copy.deepcopy(model), **options)
    backend = _aot(**options)
    compiled = torch.compile(patched, backend=backend)
    _assert_same(_run(compiled, x), _run(patched, x))
    assert backend.graph_pass.last_sites == []
    torch._dynamo.reset()
    with torch.no_grad():  # without grad GAAF runs its plain ops, which Dynamo inlines into the graph
        y = torch.compile(patched, backend=backend)(x)
        torch.testing.assert_close(y, patched(x))
    assert backend.graph_pass.last_sites == []


# ---------------------------------------------------------------------------------------------------------------------
# Through Inductor


@pytest.mark.parametrize(
    "make,how",
    [
        (lambda: (mlp(sizes=(32, 64, 64, 10)), torch.randn(8, 32) * 2), "backend"),
        (lambda: (SmallCNN(), torch.randn(2, 3, 8, 8)), "compile"),
    ],
    ids=["tanh_mlp", "cnn_inplace_relu"],
)
def test_compiled_matches_eager_patch(make, how):
    torch.manual_seed(0)
    model, x = make()
    ref = gaaf_patch.patch(copy.deepcopy(model))
    if how == "backend":
        compiled = torch.compile(copy.deepcopy(model), backend="gaaf", options={"epilogue_fusion": True})
    else:
        compiled = gaaf_patch.compile(copy.deepcopy(model))
    got = _run(compiled, x)
    _assert_same(got, _run(ref, x), **TOL)
    _assert_same(_run(compiled, x), got, rtol=0, atol=0)  # second call: no recompile, same numbers


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradient_is_phi_prime_plus_s_and_differs_from_inductor(activation):
    module = {"tanh": nn.Tanh(), "relu": nn.ReLU()}[activation]
    x = torch.linspace(-4, 4, 101)
    plain = _run(torch.compile(module, backend="inductor"), x)
    torch._dynamo.reset()
    got = _run(gaaf_patch.compile(copy.deepcopy(module), shapes="paper"), x)
    xd = x.double().requires_grad_()
    phi = getattr(torch, activation)(xd)
    (dphi,) = torch.autograd.grad(phi.sum(), xd)
    s = get_shape(activation)(xd)
    torch.testing.assert_close(got[0], phi.float(), rtol=0, atol=0)  # exact mode: the forward is phi, bit for bit
    torch.testing.assert_close(got[1], (2 * phi * (dphi + s)).float())  # d/dx phi^2 = 2 phi (phi' + s)
    torch.testing.assert_close(plain[1], (2 * phi * dphi).float())
    assert not torch.allclose(got[1], plain[1])


def test_dynamic_shapes():
    torch.manual_seed(0)
    model = mlp(partial(nn.ReLU, inplace=True), sizes=(8, 16, 16, 4))
    ref = gaaf_patch.patch(copy.deepcopy(model))
    compiled = gaaf_patch.compile(copy.deepcopy(model), dynamic=True)
    counters.clear()
    for batch in (3, 5, 9):
        x = torch.randn(batch, 8) * 2
        _assert_same(_run(compiled, x), _run(ref, x), **TOL)
    assert counters["stats"]["unique_graphs"] == 1  # one symbolic graph served every batch size


def test_the_aot_cache_key_holds_the_gaaf_uuid(monkeypatch):
    """A cached compiled graph is reused for the same GAAF code and options, and not once that code changes."""
    import uuid as uuid_module

    import gaaf_patch.backend as backend_module

    x = torch.linspace(-4, 4, 101)  # the graph of test_gradient_is_phi_prime_plus_s...[tanh]: cached already

    def compile_once() -> dict[str, int]:
        torch._dynamo.reset()
        counters.clear()
        _run(torch.compile(nn.Tanh(), backend="gaaf"), x)
        return dict(counters["aot_autograd"])

    compile_once()  # fills the cache if it was cold
    assert compile_once().get("autograd_cache_hit") == 1
    new_version = uuid_module.uuid4().hex  # as if gaaf-patch's code had changed: never seen by any cache
    monkeypatch.setattr(backend_module, "uuid", lambda: new_version)
    assert compile_once().get("autograd_cache_miss") == 1


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop = nn.Linear(8, 16), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.tanh(self.a(x)), 0.3, self.training)
        q = self.drop(h).view(h.shape[0], 2, 2, 4)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.2).flatten(1)


def test_strip_dropout():
    torch.manual_seed(0)
    model, x = Dropouts().train(), torch.randn(4, 8)
    compiled = gaaf_patch.compile(copy.deepcopy(model), strip_dropout=True)
    first, second = _run(compiled, x), _run(compiled, x)
    _assert_same(first, second, rtol=0, atol=0)
    ref = gaaf_patch.patch(copy.deepcopy(model), strip_dropout=True)
    _assert_same(first, _run(ref, x), **TOL)
    torch._dynamo.reset()
    kept = torch.compile(copy.deepcopy(model), backend=_aot())  # by default dropout stays
    assert not torch.equal(kept(x), kept(x))


def test_inductor_fuses_the_gaaf_op():
    """Forward and backward: the gaaf backend generates no more kernels than plain Inductor on the same model."""
    torch.manual_seed(0)
    counts = kernel_counts(SmallCNN(), torch.randn(2, 3, 8, 8))
    print("kernels (forward, backward):", counts)
    assert_fused(counts, sites=3)


@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize("precision", ["bf16_model", "autocast"])
def test_mixed_precision_stays_finite(mode, precision):
    torch.manual_seed(0)
    model = FunctionalTanhGeluRelu()
    x = torch.linspace(-60000, 60000, 8 * 8).view(8, 8)
    if precision == "bf16_model":
        model, x = model.bfloat16(), x.bfloat16()
    compiled = gaaf_patch.compile(model, mode=mode)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast"):
        y, gx, gp = _run(compiled, x)
    for t in (y, gx, *gp):
        assert torch.isfinite(t).all()


def test_timm_model_matches_eager_patch():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("resnet10t", num_classes=5), torch.randn(2, 3, 32, 32)
    ref = gaaf_patch.patch(copy.deepcopy(model))
    backend = GAAFBackend()
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    got = _run(compiled, x)
    assert len(backend.graph_pass.last_sites) == 11  # every ReLU of the stem and the blocks
    # Training-mode batch norm on 2 images: GAAF's extra gradient reaches ~4e3 in the stem, so float32 reordering
    # across 14 convolutions and batch norms is judged against each tensor's scale.
    want = _run(ref, x)
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


def test_a_graph_break_splits_the_auto_gain_site_count():
    """Each Dynamo graph counts its own sites (gaaf_patch.gain): one site per graph here gets the allowance for 1."""
    model, x = Break(), torch.randn(6, 8) * 2
    ref = gaaf_patch.patch(copy.deepcopy(model))
    for site in ref.modules():
        if isinstance(site, gaaf_patch.GAAF):
            site.delta = delta_for(1)
    got = _run(torch.compile(copy.deepcopy(model), backend=_aot()), x)
    _assert_same(got, _run(ref, x))
