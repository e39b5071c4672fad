"""What a patch reaches beyond traceable code and known classes, each case measured by gaaf_patch.audit.

- activation classes no table names, identified by their values (passes/probe.py), Hugging Face's among them;
- code fx cannot trace (``**kwargs``, data-dependent control flow, module-level helpers), rewritten as it runs
  (passes/scope.py), attention dropout given as a float included;
- RNNs (reported, their inter-layer dropout stripped), DropPath kept on purpose, Dropout(p=0), LayerDrop.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.audit import audit


def _gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new, written here: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class NewGELUActivation(nn.Module):  # transformers.activations.NewGELUActivation, op for op
    def forward(self, x):
        return _gelu_tanh_reference(x)


class ReLUSquaredActivation(nn.Module):
    def forward(self, x):
        return torch.square(F.relu(x))


class LaplaceActivation(nn.Module):
    def forward(self, x, mu=0.707107, sigma=0.282095):
        return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


class XIELUActivation(nn.Module):  # a learned activation: parameters
    def __init__(self) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        return torch.where(x > 0, x, F.softplus(self.alpha_p) * (torch.expm1(x) - x))


def _grad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    module(x).sum().backward()
    return x.grad


def test_composite_gelu_is_one_gelu_site_with_the_right_gradient_sign():
    """Regression (issue 13): GAAF wrapped NewGELU's inner tanh; at x = -2 the gradient went from -0.086 to -0.592.
    Now the whole module is the GELU (tanh) family: the forward is the module's own, the extra gradient is >= 0."""
    model = nn.Sequential(nn.Identity(), NewGELUActivation())
    plain = copy.deepcopy(model)
    gaaf.patch(model)
    (site,) = gaaf.report(model).replaced
    assert (site["activation"], site["params"], site["target"]) == (
        "gelu",
        {"approximate": "tanh"},
        "NewGELUActivation",
    )
    x = torch.linspace(-6, 6, 241)
    assert torch.equal(model.eval()(x), plain(x))
    added = _grad(model, x) - _grad(plain, x)
    assert (added[x <= 0] >= 0).all(), "for x <= 0 GELU's phi' < 1: GAAF's term c s (1 - phi') is >= 0"
    x2 = torch.tensor([-2.0], dtype=torch.float64)
    plain_d = torch.autograd.functional.jacobian(_gelu_tanh_reference, x2).item()
    assert plain_d == pytest.approx(-0.0862, abs=1e-3)  # the plain slope the issue quotes
    assert _grad(model, x2.float()).item() > plain_d  # the old patch gave -0.592


def test_relu_squared_maps_to_its_family_and_unknowns_are_unreached_with_a_reason():
    model = nn.Sequential(ReLUSquaredActivation(), LaplaceActivation(), XIELUActivation(), nn.Identity())
    gaaf.patch(model)
    rep = gaaf.report(model)
    assert [(r["name"], r["activation"]) for r in rep.replaced] == [("0", "relu2")]
    reasons = {u["name"]: u["reason"] for u in rep.unreached}
    assert "match no activation" in reasons["1"] and "learned activation" in reasons["2"]
    assert isinstance(model[2], XIELUActivation)  # never patched inside: softplus(alpha_p) is no activation site
    # the relu2 site: phi' = 2 relu(x) (float64 formula here) plus GAAF's term where x < 0 only
    x = torch.linspace(-3, 3, 61)
    g = _grad(model[0], x)
    far = x >= 2  # past the shape's bump (centred at -1.5): relu2's own phi'
    assert torch.allclose(g[far], 2 * x[far], atol=1e-5)
    assert (g[x < 0] > 0).any() and torch.equal(g[x < -6], torch.zeros_like(g[x < -6]))


@pytest.mark.parametrize("name", ["gelu_new", "gelu_fast", "gelu_accurate", "quick_gelu", "gelu_python", "relu2"])
def test_transformers_activation_classes_map_to_their_family(name):
    activations = pytest.importorskip("transformers.activations")
    family = {"quick_gelu": "quick_gelu", "relu2": "relu2"}.get(name, "gelu")
    model = nn.Sequential(nn.Linear(4, 4), activations.ACT2FN[name])
    gaaf.patch(model)
    (site,) = gaaf.report(model).replaced
    assert site["activation"] == family and site["name"] == "1"
    assert audit(model, torch.randn(3, 4)).ok


# ------------------------------------------------------------------------------------------ code fx cannot trace


def _attention(module, q, dropout=0.0, **kwargs):
    """Hugging Face's sdpa_attention_forward in small: a module-level helper given the dropout as a float."""
    return F.scaled_dot_product_attention(q, q, q, dropout_p=dropout)


class FloatDropoutAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.act = nn.Tanh()  # a child: patched by the modules pass, never by the parent's scope
        self.attention_dropout = 0.5

    def forward(self, x, **kwargs):
        q = self.act(self.q(x))
        out = _attention(self, q, dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        return F.dropout(F.gelu(out), p=0.2, training=self.training)


def test_attention_dropout_given_as_a_float_is_stripped_at_run_time():
    torch.manual_seed(0)
    model = nn.Sequential(FloatDropoutAttention())
    before = audit(model, torch.randn(2, 3, 8))
    assert sum(f.count for f in before.randoms()) == 2  # the attention's and F.dropout's masks
    gaaf.patch(model, strip_dropout=True)
    x = torch.randn(2, 3, 8)
    model.train()
    assert torch.equal(model(x), model(x))  # train mode is deterministic now
    a = audit(model, x)
    assert a.ok and a.randoms() == [] and a.activations() == [], str(a)
    rep = gaaf.report(model)
    assert {r["target"] for r in rep.stripped} == {
        "torch.nn.functional.scaled_dot_product_attention(dropout_p)",
        "torch.nn.functional.dropout",
    }
    assert all(r["name"].startswith("0:test_reach:") for r in rep.stripped)
    kinds = {(r["form"], r["activation"]) for r in rep.replaced}
    assert kinds == {("module", "tanh"), ("runtime", "gelu")}  # the child by the modules pass, F.gelu at run time


def test_run_time_patch_keeps_eval_outputs_and_state_dict_and_unpatches():
    torch.manual_seed(0)
    model = nn.Sequential(FloatDropoutAttention()).eval()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    gaaf.patch(model, strip_dropout=True)
    x = torch.randn(2, 3, 8)
    assert torch.equal(model(x), plain(x))
    model.train()
    model(x)  # the run-time sites appear as GAAF children, with no state
    assert list(model.state_dict()) == keys
    gaaf.unpatch(model)
    assert "forward" not in model[0].__dict__
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]


def test_non_reentrant_checkpoint_over_run_time_code():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    inner = FloatDropoutAttention()
    gaaf.patch(inner, strip_dropout=True)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    x = torch.randn(2, 3, 8, requires_grad=True)
    Outer().train()(x).sum().backward()
    ref = x.detach().clone().requires_grad_()
    inner(ref).sum().backward()
    assert torch.equal(x.grad, ref.grad)


# --------------------------------------------------------------------------------------------- RNNs and friends


def test_rnn_is_reported_and_its_dropout_stripped_and_restored():
    model = nn.Sequential(nn.LSTM(4, 8, num_layers=2, dropout=0.3))
    gaaf.patch(model, strip_dropout=True)
    rep = gaaf.report(model)
    assert [(u["name"], u["target"]) for u in rep.unreached] == [("0", "LSTM")]
    assert [(s["name"], s["p"]) for s in rep.stripped] == [("0.dropout", 0.3)]
    assert model[0].dropout == 0.0
    gaaf.unpatch(model)
    assert model[0].dropout == 0.3


def test_droppath_kept_is_reported_and_dropout_p0_is_not_stripped():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Linear(4, 4), timm_layers.DropPath(0.2), nn.Dropout(0.0), nn.Dropout(0.1))
    gaaf.patch(model, strip_dropout=True)
    rep = gaaf.report(model)
    assert [s["name"] for s in rep.stripped] == ["3"]  # Dropout(p=0) is already the identity
    assert [(k["name"], k["p"]) for k in rep.kept] == [("1", 0.2)]
    a = audit(model, torch.randn(3, 4))
    assert a.ok and [f.module for f in a.randoms()] == ["1"]  # DropPath's draw, explained by report.kept


def test_layerdrop_is_zeroed_and_restored():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.layerdrop = 0.4

        def forward(self, x):
            for layer in self.layers:
                if self.training and torch.rand([]) < self.layerdrop:
                    continue
                x = layer(x)
            return x

    model = Encoder()
    assert audit(model, torch.randn(2, 4)).randoms()  # three draws
    gaaf.patch(model, strip_dropout=True)
    assert model.layerdrop == 0.0
    assert [s["name"] for s in gaaf.report(model).stripped] == ["layerdrop"]
    gaaf.unpatch(model)
    assert model.layerdrop == 0.4


# -------------------------------------------------------------------------------------- what a trace must not freeze


def test_call_with_arguments_the_trace_did_not_see_is_still_patched():
    class WithMask(nn.Module):
        def forward(self, x, mask=None):
            x = F.relu(x)
            return x if mask is None else x * mask

    torch.manual_seed(0)
    plain = WithMask()
    model = gaaf.patch(WithMask())
    x = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = _grad(lambda z: model(z, mask=mask), x)
    assert not torch.equal(patched, _grad(lambda z: plain(z, mask=mask), x))  # GAAF's gradient, not relu's
    assert torch.equal(patched, _grad(model, x))  # the same site's gradient as through the traced code


def test_grad_checkpointing_set_after_patching_is_honoured_and_trains(monkeypatch):
    """Regression (issue 13): the traced top-level forward froze ``grad_checkpointing=False`` (no checkpoint ever
    ran), and once it did run, the fused BatchNorm twin crashed non-reentrant checkpointing in backward."""
    timm = pytest.importorskip("timm")
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4, drop_rate=0.2)
    gaaf.patch(model, strip_dropout=True)
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model).train()
    expected = _grad(reference, x)
    model.train().set_grad_checkpointing(True)
    got = _grad(model, x)
    assert calls, "timm's checkpoint_seq never ran"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_torch_jit_script_is_refused_in_one_clear_line():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.relu(self.fc(x))

    for model in (nn.Sequential(nn.Linear(3, 3), nn.ReLU()), Functional()):
        gaaf.patch(model)
        with pytest.raises(gaaf.GaafError, match="torch.jit.script cannot compile a gaaf-patched model.*torch.compile"):
            torch.jit.script(model)
        gaaf.unpatch(model)
        torch.jit.script(model)  # unpatched: TorchScript's business again


@pytest.mark.parametrize("model_type, overrides", [("llama", {"attention_dropout": 0.1}), ("bert", {})])
def test_compile_and_patch_strip_and_replace_the_same_sites(model_type, overrides):
    """One answer from both entry points (issue 13): Llama's attention dropout is a float handed to
    ``F.scaled_dot_product_attention``; Dynamo sees it as a constant, eager code only at run time."""
    pytest.importorskip("transformers")
    from gaaf_patch import hf

    model = hf.build(model_type, overrides)
    x = hf.example_inputs(model)
    compiled = gaaf.compile(copy.deepcopy(model), strip_dropout=True).train()
    patched = gaaf.patch(copy.deepcopy(model), strip_dropout=True).train()
    compiled(**x)
    patched(**x)
    rc, rp = gaaf.report(compiled), gaaf.report(patched)
    assert rc.replaced and rc.summary()["by_activation"] == rp.summary()["by_activation"]
    # The same sites, written differently: Dynamo sees a Dropout module as F.dropout, and BERT's attention reads
    # its Dropout module's p into F.scaled_dot_product_attention (eager: the module is stripped, so p reads 0).
    assert len(rc.stripped) == len(rp.stripped) > 0
    assert sorted(s["p"] for s in rc.stripped) == sorted(s["p"] for s in rp.stripped)
    assert audit(patched, **x).ok


def test_a_rewritten_forward_keeps_the_class_signature():
    """Hugging Face's Trainer drops the dataset columns ``model.forward``'s signature does not name: the patched
    forward (traced or run-time) must show the class's parameters, not ``(*args, **kwargs)``."""
    import inspect

    class Traced(nn.Module):
        def forward(self, x, mask=None):
            return F.relu(x)

    class Untraced(nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            return F.gelu(input_ids.float()) if input_ids.sum() > 0 else input_ids.float()

    for cls in (Traced, Untraced):
        model = gaaf.patch(cls())
        assert type(model.__dict__["forward"]).__name__ in ("PatchedForward", "RuntimeScope")
        assert inspect.signature(model.forward) == inspect.signature(cls().forward)


# Two helpers calling each other: `_cycle_a` calls `_cycle_b`, then drops out; `_cycle_b` only calls `_cycle_a`.
def _cycle_a(x: torch.Tensor, p: float, again: bool) -> torch.Tensor:
    x = _cycle_b(x, p) if again else x
    return F.dropout(x, p, True)


def _cycle_b(x: torch.Tensor, p: float) -> torch.Tensor:
    return _cycle_a(x, p, False)


class _CallsA(nn.Module):
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # **kwargs: fx cannot trace, a run-time scope
        return _cycle_a(x, 0.5, True)


class _CallsB(nn.Module):
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return _cycle_b(x, 0.5)


def test_which_module_is_scanned_first_does_not_change_what_is_patched():
    """The helper scan cached an answer cut short by a cycle: scanning A first left B "holds no site" for good, so
    a module calling B kept its dropout in train mode, silently (it depended on which model was patched first)."""
    x = torch.randn(4, 64)
    gaaf.patch(_CallsA(), strip_dropout=True)  # scans _cycle_a, then _cycle_b inside it
    model = gaaf.patch(_CallsB(), strip_dropout=True).train()
    assert torch.equal(model(x), x)  # the dropout B reaches through A is stripped
    assert [f for f in audit(model, x).findings if f.explained is None] == []
