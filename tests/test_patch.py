"""gaaf_patch.patch / unpatch / report on toy models: every form, counts, state_dict, idempotence, errors."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch import GAAF, StrippedDropout
from gaaf_patch.modules import original_of
from tests.helpers import DEFAULT_SHAPE, TORCH_FN, EveryForm, SmallCNN, mlp


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def every_form():
    torch.manual_seed(0)
    return EveryForm().eval(), torch.randn(8, 16)


def test_every_form_is_replaced_and_eval_is_bit_identical(every_form):
    model, x = every_form
    ref = model(x)
    keys = list(model.state_dict())
    assert not gaaf.report(model)  # unpatched: empty
    assert gaaf.patch(model, strip_dropout=True) is model
    rep = gaaf.report(model)
    forms = {(r["form"], r["activation"]) for r in rep.replaced}
    assert forms == {
        ("module", "relu"),
        ("function", "gelu"),
        ("function", "tanh"),
        ("method", "relu"),
        ("method", "tanh"),
        ("function", "leaky_relu"),
        ("function", "silu"),
    }
    assert len(rep.replaced) == 8  # gelu appears twice (F.gelu and torch._C._nn.gelu)
    assert _count(model, GAAF) == 8
    assert {s["form"] for s in rep.stripped} == {"module", "function"} and len(rep.stripped) == 2
    assert [s["name"] for s in rep.skipped] == ["se.1"]  # the sigmoid gate is left alone in "auto"
    assert not rep.unreached
    assert list(model.state_dict()) == keys
    assert isinstance(model, EveryForm)
    assert torch.equal(model(x), ref)


def test_leaky_relu_parameter_and_gelu_approximation_are_kept(every_form):
    model, _ = every_form
    gaaf.patch(model)
    by_act = {r["activation"]: r for r in gaaf.report(model).replaced}
    assert by_act["leaky_relu"]["params"] == {"negative_slope": 0.2}
    approx = sorted(r["params"]["approximate"] for r in gaaf.report(model).replaced if r["activation"] == "gelu")
    assert approx == ["none", "tanh"]


@pytest.mark.parametrize("gain", ["paper", "auto"])
def test_gradients_change_and_match_gaaf_reference(gain):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    base = _grads(model, x)
    gaaf.patch(model, gain=gain)
    if gain == "auto":
        model[1].delta = 0.02  # the one site would get 1.0; a small allowance makes the budget bind
    patched = _grads(model, x)
    assert torch.equal(base[2], patched[2])  # the last layer's weight gradient only sees the (identical) forward
    assert not torch.allclose(base[0], patched[0])
    # reference: d loss / d h = (W2^T g) * (tanh'(h) + exp(-h^2/4))
    lin1, lin2 = model[0], model[2]
    h = lin1(x)
    torch.manual_seed(1)
    g = torch.randn(4, 3, dtype=torch.float64)
    dphi, s = 1 - torch.tanh(h) ** 2, torch.exp(-(h**2) / 4)
    if gain == "paper":
        multiplier = dphi + s
    else:  # phi' + c s (1 - phi'), c: mean((phi' + c st)^2) = 1.02 mean(phi'^2) over the site's input
        st = s * (1 - dphi)
        qa, qb, qc = (st * st).mean(), (dphi * st).mean(), 0.02 * (dphi * dphi).mean()
        c = (-qb + torch.sqrt(qb * qb + qa * qc)) / qa
        assert 0 < c < 1
        multiplier = dphi + c * st
    dh = (g @ lin2.weight) * multiplier
    torch.testing.assert_close(patched[0].detach(), (dh.T @ x).detach())


def test_patch_twice_is_a_noop(every_form):
    model, x = every_form
    gaaf.patch(model, strip_dropout=True)
    first = gaaf.report(model).to_dict()
    forward = model.__dict__["forward"]
    modules = [(n, type(m)) for n, m in model.named_modules()]
    grads = _grads(model, x)
    gaaf.patch(model, strip_dropout=True)
    assert gaaf.report(model).to_dict() == first
    assert model.__dict__["forward"] is forward
    assert [(n, type(m)) for n, m in model.named_modules()] == modules  # no module added or swapped
    assert not any(isinstance(original_of(m), GAAF) for m in model.modules() if isinstance(m, GAAF))
    for again, once in zip(_grads(model, x), grads, strict=True):  # a site patched twice would add its shape twice
        assert torch.equal(again, once)


@pytest.mark.parametrize(("module", "name"), [(nn.ReLU, "relu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid")])
def test_module_site_forward_is_unchanged_and_its_gradient_is_phi_prime_plus_s(module, name):
    """Against references written here: the torch function, its autograd derivative and the shape's formula."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), module(), nn.Linear(64, 2)).double()
    x = torch.randn(32, 4, dtype=torch.float64) * 3
    with torch.no_grad():
        ref = model(x)
    gaaf.patch(model, gain="paper")
    assert type(model[1]) is not module and isinstance(model[1], GAAF)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    h = model[0](x).detach().requires_grad_()
    model[1](h).backward(torch.ones_like(h))
    hd = h.detach().clone().requires_grad_()
    (dphi,) = torch.autograd.grad(TORCH_FN[name](hd).sum(), hd)
    torch.testing.assert_close(h.grad, dphi + DEFAULT_SHAPE[name](hd.detach()), rtol=1e-12, atol=1e-12)


def test_unpatch_restores_everything(every_form):
    model, x = every_form
    pristine = copy.deepcopy(model)
    before = [(n, type(m)) for n, m in model.named_modules()]
    gaaf.patch(model, strip_dropout=True)
    gaaf.unpatch(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert "forward" not in model.__dict__
    assert not gaaf.report(model)
    model.train(), pristine.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = pristine(x)
    assert torch.equal(a, b)  # dropout back too: same RNG, same masks
    assert torch.equal(_grads(model, x)[0], _grads(pristine, x)[0])


def test_strip_dropout_makes_train_mode_deterministic(every_form):
    model, x = every_form
    model.train()
    assert not torch.equal(model(x), model(x))
    gaaf.patch(model, strip_dropout=True)
    assert torch.equal(model(x), model(x))


def test_strip_dropout_every_module_kind_and_droppath_separately():
    from timm.layers import DropPath

    drops = [nn.Dropout(0.3), nn.Dropout1d(0.3), nn.Dropout2d(0.3), nn.Dropout3d(0.3), nn.AlphaDropout(0.3)]
    model = nn.Sequential(*drops, nn.FeatureAlphaDropout(0.3), DropPath(0.3))
    gaaf.patch(model, strip_dropout=True)
    assert _count(model, StrippedDropout) == 6 and isinstance(model[6], DropPath)
    gaaf.patch(model, strip_dropout=True, strip_droppath=True)  # other options: a re-patch to exactly these
    assert _count(model, StrippedDropout) == 7
    assert {s["target"] for s in gaaf.report(model).stripped} >= {"Dropout2d", "FeatureAlphaDropout", "DropPath"}
    gaaf.patch(model, strip_droppath=True)  # dropout no longer asked for: put back
    assert _count(model, StrippedDropout) == 1 and isinstance(model[0], nn.Dropout)
    assert gaaf.report(model).config["strip_dropout"] is False


def test_attention_dropout_is_stripped_timm_and_torch():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, attn_drop_rate=0.5)
    mha = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.5, batch_first=True)
    for model, x in ((vit, torch.randn(2, 3, 32, 32)), (mha, torch.randn(2, 5, 16))):
        model.train()
        gaaf.patch(model, strip_dropout=True)
        assert torch.equal(model(x), model(x))
    assert all(b.attn.attn_drop.p == 0 for b in vit.blocks)
    assert any(s["target"] == "MultiheadAttention.dropout" for s in gaaf.report(mha).stripped)
    assert [r["form"] for r in gaaf.report(mha).replaced] == ["attribute"]  # the layer's F.relu attribute
    gaaf.unpatch(mha)
    assert mha.self_attn.dropout == 0.5 and mha.activation is F.relu


def test_activation_selection_and_gates():
    torch.manual_seed(0)
    model = EveryForm()
    gaaf.patch(model, activations="all")
    assert any(r["activation"] == "sigmoid" for r in gaaf.report(model).replaced)
    model = EveryForm()
    gaaf.patch(model, activations=["tanh"])
    assert {r["activation"] for r in gaaf.report(model).replaced} == {"tanh"}
    with pytest.raises(gaaf.PatchError, match="unknown activation 'tanhh'"):
        gaaf.patch(EveryForm(), activations=["tanhh"])


def test_sigmoid_hidden_activation_is_not_a_gate():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    gaaf.patch(model)
    assert isinstance(model[1], GAAF) and not gaaf.report(model).skipped


def test_shape_overrides_per_activation_pattern_and_callable():
    model = SmallCNN()
    gaaf.patch(model, shapes={"relu": "relu_keras", "features.5": "gauss(width=3)"})
    by_name = {r["name"]: r["shape"] for r in gaaf.report(model).replaced}
    assert by_name["features.2"] == "shifted_sigmoid(slope=1.0, shift=4.0)"
    assert by_name["features.5"] == "gauss(width=3.0)"
    model = SmallCNN()
    gaaf.patch(model, shapes={"features.*": lambda x: torch.ones_like(x)})
    assert {r["shape"] for r in gaaf.report(model).replaced if r["name"].startswith("features")} == {"<lambda>()"}
    with pytest.raises(gaaf.PatchError, match="matching a patched site"):
        gaaf.patch(SmallCNN(), shapes={"layer9.*": "tanh"})
    with pytest.raises(gaaf.PatchError, match="unknown shape 'gaus'"):
        gaaf.patch(SmallCNN(), shapes={"relu": "gaus"})


def test_filter_fn_picks_sites():
    model = SmallCNN()
    gaaf.patch(model, filter_fn=lambda m, name: name.startswith("features"))
    assert sorted(r["name"] for r in gaaf.report(model).replaced) == ["features.2", "features.5"]


def test_sawtooth_mode_moves_forward_by_less_than_half_over_k():
    torch.manual_seed(0)
    model = mlp(sizes=(20, 30, 30, 5)).eval()
    x = torch.randn(16, 20)
    ref = model(x)
    gaaf.patch(model, mode="sawtooth", K=100)
    diff = (model(x) - ref).abs().max().item()
    assert 0 < diff < 1.0  # propagated through two linear layers; the per-site bound is tested in test_ops


def test_shared_activation_module_is_replaced_at_every_name():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    gaaf.patch(model)
    assert model[1] is model[3] and isinstance(model[1], GAAF)


def test_untraceable_module_is_patched_at_run_time():
    """Data-dependent control flow defeats fx: the module's code is rewritten as it runs (passes/scope.py), each
    branch's activation becoming a GAAF site the first time it runs, named by file and line."""

    class Dynamic(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                return F.relu(x)
            return torch.tanh(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Dynamic(), nn.ReLU())
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaaf.patch(model)
    rep = gaaf.report(model)
    assert rep.unreached == [] and [r["name"] for r in rep.runtime] == ["1"]
    assert isinstance(model[2], GAAF)  # the rest of the model is patched as before
    for sign, act in ((1.0, "relu"), (-1.0, "tanh")):
        h = (torch.linspace(-3, 3, 12).reshape(4, 3) + sign / 2).requires_grad_()  # both signs; the sum picks
        ref_h = h.detach().clone().requires_grad_()
        out = model[1](h)
        ref = plain[1](ref_h)
        assert torch.equal(out, ref)  # exact mode: the forward is bit-identical
        out.sum().backward()
        ref.sum().backward()
        assert not torch.equal(h.grad, ref_h.grad)  # the gradient is GAAF's
        assert act in {r["activation"] for r in gaaf.report(model).replaced if r["form"] == "runtime"}
    names = [r["name"] for r in gaaf.report(model).replaced if r["form"] == "runtime"]
    assert all(n.startswith("1:test_patch:") for n in names) and len(names) == 2
    gaaf.unpatch(model)
    assert "forward" not in model[1].__dict__ and not list(model[1].children())


def test_activation_classes_are_identified_by_their_values_or_reported():
    class HardMish(nn.Module):  # an activation with no GAAF form
        def forward(self, x):
            return 0.5 * x * (x + 2).clamp(min=0, max=2)

    class QuickGELU(nn.Module):  # x * sigmoid(1.702 x): its values are the quick_gelu family's
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    class MyGELU(nn.Module):  # an activation class computing a known activation: that family, as a whole
        def forward(self, x):
            return F.gelu(x)

    model = nn.Sequential(nn.Linear(3, 3), HardMish(), nn.PReLU(), QuickGELU(), MyGELU())
    with pytest.warns(UserWarning, match="2 activation/dropout site"):
        gaaf.patch(model)
    unreached = {u["target"]: u["reason"] for u in gaaf.report(model).unreached}
    assert set(unreached) == {"PReLU", "HardMish"}
    assert "learned" in unreached["PReLU"] and "match no activation" in unreached["HardMish"]
    replaced = [(r["name"], r["activation"], r["target"]) for r in gaaf.report(model).replaced]
    assert replaced == [("3", "quick_gelu", "QuickGELU"), ("4", "gelu", "MyGELU")]


def test_call_with_untraced_arguments_runs_patched_at_run_time():
    class WithMask(nn.Module):
        def forward(self, x, mask=None):
            x = F.relu(x)
            return x if mask is None else x * mask

    model = WithMask()
    gaaf.patch(model)
    x = torch.randn(3)
    assert torch.equal(model(x), F.relu(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the call is patched, not run unpatched
        out = model(x, torch.ones(3))
    assert torch.equal(out, F.relu(x))
    assert {r["form"] for r in gaaf.report(model).replaced} == {"function", "runtime"}


def test_train_and_eval_branches_are_traced_separately():
    class Branchy(nn.Module):
        def forward(self, x):
            return torch.tanh(x) if self.training else F.relu(x)

    model = Branchy()
    gaaf.patch(model)
    x = torch.randn(5)
    assert torch.equal(model.train()(x), torch.tanh(x))
    assert torch.equal(model.eval()(x), F.relu(x))
    assert {r["activation"] for r in gaaf.report(model).replaced} == {"tanh", "relu"}


def test_wrapped_models_are_refused():
    model = SmallCNN()
    with pytest.raises(gaaf.PatchError, match="DataParallel; patch model.module"):
        gaaf.patch(nn.DataParallel(model))
    with pytest.raises(gaaf.PatchError, match="before torch.compile"):
        gaaf.patch(torch.compile(model))
    with pytest.raises(gaaf.PatchError, match="mode"):
        gaaf.patch(model, mode="fast")


def test_deepcopy_and_pickle_of_a_patched_model(every_form):
    model, x = every_form
    gaaf.patch(model, strip_dropout=True)
    ref = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), ref)
        assert len(gaaf.report(clone).replaced) == len(gaaf.report(model).replaced)
        gaaf.unpatch(clone)
        assert "forward" not in clone.__dict__


def test_config_round_trip_replays_the_patch(every_form):
    model, _ = every_form
    gaaf.patch(model, shapes={"tanh": "tanh_keras"}, strip_dropout=True, mode="sawtooth", K=500)
    cfg = gaaf.report(model).config
    replay = EveryForm()
    gaaf.patch(replay, **gaaf.PatchConfig.from_dict(cfg).__dict__)
    assert gaaf.report(replay).to_dict()["replaced"] == gaaf.report(model).to_dict()["replaced"]


def test_no_warning_on_clean_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaaf.patch(SmallCNN())


def test_inplace_activation_on_a_view_and_on_the_input_is_seen_by_the_base():
    class ViewInplace(nn.Module):
        def forward(self, x):
            h = x * 1.0
            F.relu(h[:, :4], inplace=True)  # mutates h through a view, result discarded
            torch.tanh_(x)  # mutates the caller's tensor
            return h

    model = ViewInplace()
    x = torch.randn(3, 8)
    x1, x2 = x.clone(), x.clone()
    ref = model(x1)
    gaaf.patch(model)
    assert len(gaaf.report(model).replaced) == 2
    assert torch.equal(model(x2), ref) and torch.equal(x2, x1)
    xg = torch.randn(3, 8, requires_grad=True)
    model(xg * 1.0).sum().backward()  # the clone GAAF saves is not the tensor copy_ modifies
    assert xg.grad is not None


def test_timm_quick_gelu_is_patched_bit_identically():
    """CLIP's QuickGELU (x * sigmoid(1.702 x)) in a timm ViT: replaced as one activation, forward bit-identical."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", act_layer="quick_gelu", img_size=32, num_classes=3).eval()
    model = gaaf.patch(copy.deepcopy(base))
    rep = gaaf.report(model)
    assert not rep.unreached
    assert rep.summary()["by_activation"] == {"quick_gelu": 12}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("verb", ["unpatch", "report", "patch"])
def test_verbs_refuse_what_is_not_a_module(verb):
    """Issue 14, item 13: ``unpatch(42)`` and ``report(42)`` raised AttributeError from inside."""
    with pytest.raises(gaaf.PatchError, match=f"gaaf_patch.{verb} takes an nn.Module, not int"):
        getattr(gaaf, verb)(42)


# ---------------------------------------------------------------------------------------------------------------------
# All or nothing; a second patch with other options re-patches (issue 14, item 2)


class _Dynamic(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.sum() > 0 else torch.tanh(x)  # data-dependent: a run-time scope


def _rich() -> nn.Module:
    """Every kind of change a pass makes: module swaps, traced forwards, a fused BatchNorm (EveryForm), a run-time
    scope, the attribute forms of torch's transformer layer (activation function, attention dropout)."""
    torch.manual_seed(0)
    return nn.Sequential(EveryForm(), _Dynamic(), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1))


def _fingerprint(model: nn.Module):
    """Structure, every instance attribute and registry entry (by identity), classes, and the state's bytes."""
    rows = []
    for name, m in model.named_modules(remove_duplicate=False):
        registries = [list(m.__dict__[k].items()) for k in ("_modules", "_parameters", "_buffers")]
        rows.append(
            (
                name,
                id(m),
                type(m),
                [(k, id(v)) for k, v in m.__dict__.items()],
                [[(k, id(v)) for k, v in r] for r in registries],
            )
        )
    state = {k: (v.dtype, v.detach().numpy().tobytes()) for k, v in model.state_dict().items()}
    return rows, state


def _raising_filter(at: int, exc: type[BaseException] = RuntimeError):
    calls = [0]

    def filter_fn(module, name):
        calls[0] += 1
        if calls[0] == at:
            raise exc(f"filter failed at call {at}")
        return True

    return filter_fn, calls


def _filter_calls(**options) -> int:
    filter_fn, calls = _raising_filter(at=-1)
    gaaf.patch(_rich(), filter_fn=filter_fn, **options)
    return calls[0]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_filter_that_raises_leaves_the_model_exactly_as_it_was(exc):
    n = _filter_calls(strip_dropout=True)
    assert n > 10
    for at in (1, 3, n // 2, n):
        model = _rich()
        before = _fingerprint(model)
        filter_fn, _calls = _raising_filter(at, exc)
        with pytest.raises(exc, match=f"call {at}"):
            gaaf.patch(model, strip_dropout=True, filter_fn=filter_fn)
        assert _fingerprint(model) == before, f"changed by a patch that raised at filter call {at}"
        assert not gaaf.report(model) and gaaf.report(model).config is None  # no record


def test_a_failed_repatch_leaves_the_patched_model_as_it_was():
    model, x = _rich(), torch.randn(8, 16)
    gaaf.patch(model, strip_dropout=True)
    grads = _grads(model, x)  # a run adds the run-time scope's sites and moves BatchNorm statistics: first
    before, config = _fingerprint(model), gaaf.report(model).to_dict()
    filter_fn, _calls = _raising_filter(3)
    with pytest.raises(RuntimeError, match="call 3"):
        gaaf.patch(model, gain="paper", filter_fn=filter_fn)  # other options: unpatch, then patch, which fails
    assert _fingerprint(model) == before and gaaf.report(model).to_dict() == config
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, x), grads, strict=True))


def test_a_shapes_typo_raises_and_changes_nothing_then_a_retry_gets_its_own_shapes():
    model = SmallCNN()
    before = _fingerprint(model)
    with pytest.raises(gaaf.PatchError, match="'featurez.5' is neither an activation name nor a pattern"):
        gaaf.patch(model, shapes={"featurez.5": "gauss(width=3)"})
    assert _fingerprint(model) == before and not gaaf.report(model)
    gaaf.patch(model, shapes={"features.5": "gauss(width=3)"})
    shapes = {r["name"]: r["shape"] for r in gaaf.report(model).replaced}
    assert shapes["features.5"] == "gauss(width=3.0)"
    assert gaaf.report(model).config["shapes"] == {"features.5": "gauss(width=3.0)"}
    with pytest.raises(gaaf.PatchError, match="unknown shape 'gaus'"):  # an unknown name: before any pass runs
        gaaf.patch(model, shapes={"relu": "gaus"})
    with pytest.raises(gaaf.PatchError, match="filter_fn must be a callable"):
        gaaf.patch(model, filter_fn="features")
    assert gaaf.report(model).config["shapes"] == {"features.5": "gauss(width=3.0)"}


def _site_gradient(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    h = h.detach().clone().requires_grad_()
    model[1](h).backward(torch.ones_like(h))
    return h.grad


def test_patching_again_with_other_options_repatches():
    """The site's gradient against float64 formulas written here, after each re-patch; the report's config follows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    h = torch.randn(16, 32, dtype=torch.float64) * 2
    dphi = 1 - torch.tanh(h) ** 2
    gaaf.patch(model, gain="paper")
    torch.testing.assert_close(_site_gradient(model, h), dphi + torch.exp(-(h**2) / 4), rtol=1e-12, atol=1e-12)
    gaaf.patch(model, gain="paper", shapes={"tanh": "gauss(width=1)"})  # was ignored: the old shape stayed
    torch.testing.assert_close(_site_gradient(model, h), dphi + torch.exp(-(h**2)), rtol=1e-12, atol=1e-12)
    assert gaaf.report(model).config["shapes"] == {"tanh": "gauss(width=1.0)"}
    assert [r["shape"] for r in gaaf.report(model).replaced] == ["gauss(width=1.0)"]
    gaaf.patch(model, mode="sawtooth", K=50.0)  # was ignored: the forward stayed exact
    y = model[1](h)
    g = (h * 50 - torch.floor(h * 50) - 0.5) / 50
    torch.testing.assert_close(y, torch.tanh(h) + g * torch.exp(-(h**2) / 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_site_gradient(model, h), dphi + torch.exp(-(h**2) / 4), rtol=1e-12, atol=1e-12)
    cfg = gaaf.report(model).config
    assert (cfg["mode"], cfg["K"], cfg["shapes"], cfg["gain"]) == ("sawtooth", 50.0, {}, "paper")
    assert [r["mode"] for r in gaaf.report(model).replaced] == ["sawtooth"]
    assert sum(isinstance(m, GAAF) for m in model.modules()) == 1  # re-patched, not stacked
    gaaf.unpatch(model)
    assert isinstance(model[1], nn.Tanh) and not gaaf.report(model)


def test_patching_again_with_another_filter_or_callable_shape_repatches():
    model = SmallCNN()
    gaaf.patch(model, filter_fn=lambda m, name: name.startswith("features"))
    gaaf.patch(model, filter_fn=lambda m, name: not name.startswith("features"))
    assert [r["name"] for r in gaaf.report(model).replaced] == ["relu"]  # the head's x.relu() only
    one, two = (lambda x: torch.ones_like(x)), (lambda x: torch.zeros_like(x))  # both named <lambda>
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    h = torch.randn(5, 3, dtype=torch.float64)
    gaaf.patch(model, gain="paper", shapes={"tanh": one})
    gaaf.patch(model, gain="paper", shapes={"tanh": two})
    torch.testing.assert_close(_site_gradient(model, h), 1 - torch.tanh(h) ** 2, rtol=1e-12, atol=1e-12)


def test_an_unpickled_model_is_repatched_to_the_same_result(every_form):
    model, x = every_form
    gaaf.patch(model, strip_dropout=True)
    clone = pickle.loads(pickle.dumps(model))
    gaaf.patch(clone, strip_dropout=True)  # its options are unknown after pickling: unpatched and patched again
    assert gaaf.report(clone).to_dict() == gaaf.report(model).to_dict()
    assert torch.equal(clone(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(_grads(clone, x), _grads(model, x), strict=True))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"K": "10"}, "K must be a finite positive number, got '10'"),
        ({"shapes": {"tanh": "gauss(width='10')"}}, "shape gauss: width must be a finite number, got '10'"),
        ({"shapes": {"tanh": "gaus"}}, "unknown shape 'gaus' (did you mean gauss?); known: "),
    ],
)
def test_option_errors_keep_their_quotes(options, message):
    """Issue 14, item 8: the message's closing quote was stripped ("got '10"), a KeyError's quotes were the aim."""
    with pytest.raises(gaaf.PatchError) as info:
        gaaf.patch(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), **options)
    assert str(info.value).startswith(message)
