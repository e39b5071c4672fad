"""gaaf_patch.audit: the ops that ran outside GAAF, counted from hand-written models whose op counts are known."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.audit import audit


class TwoActs(nn.Module):
    """A GELU module and a functional tanh in the root's own code: 2 activations, each once per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.GELU()

    def forward(self, x):
        return torch.tanh(self.act(self.fc(x)))


def _helper(q, p):
    return F.scaled_dot_product_attention(q, q, q, dropout_p=p)


class FloatAttention(nn.Module):
    """Hugging Face's pattern: attention dropout given as a float to a module-level helper, under ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.attention_dropout = 0.5

    def forward(self, x, **kwargs):
        return _helper(self.q(x), self.attention_dropout if self.training else 0.0)


def test_unpatched_model_lists_each_activation_forward_and_backward():
    a = audit(TwoActs(), torch.randn(3, 6))
    got = {(f.module, f.op, f.phase): f.count for f in a.findings}
    assert got == {
        ("act", "aten.gelu", "forward"): 1,
        ("act", "aten.gelu_backward", "backward"): 1,
        ("", "aten.tanh", "forward"): 1,
        ("", "aten.tanh_backward", "backward"): 1,
    }
    assert not a.ok and len(a.silent) == 4  # nothing was patched, nothing is explained


def test_patched_model_is_clean_and_runs_gaaf():
    m = gaaf.patch(TwoActs())
    a = audit(m, torch.randn(3, 6))
    assert a.findings == [] and a.ok
    assert a.gaaf_calls == 2


def test_relu_backward_is_threshold_backward_attributed_to_its_module():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    a = audit(m, torch.randn(2, 4))
    got = sorted((f.module, f.op, f.count) for f in a.findings)
    assert got == [
        ("1", "aten.relu", 1),
        ("1", "aten.threshold_backward", 1),
        ("3", "aten.relu", 1),
        ("3", "aten.threshold_backward", 1),
    ]


def test_shared_module_called_twice_counts_twice():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(self.relu(x)))

    a = audit(Shared(), torch.randn(2, 4))
    assert {(f.op, f.count) for f in a.findings} == {("aten.relu", 2), ("aten.threshold_backward", 2)}


def test_dropout_module_is_random_and_stripping_it_removes_it():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
    a = audit(m, torch.randn(2, 4))
    assert [(f.module, f.kind) for f in a.findings] == [("1", "random")]
    a = audit(gaaf.patch(m, strip_dropout=True), torch.randn(2, 4))
    assert a.findings == []


def test_dropout_with_p_zero_or_eval_is_not_random():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
    assert audit(m, torch.randn(2, 4)).findings == []


def test_float_attention_dropout_is_found():
    a = audit(FloatAttention(), torch.randn(2, 3, 8))
    assert [(f.module, f.kind, f.phase) for f in a.findings] == [("", "random", "forward")]


def test_audit_leaves_the_model_untouched():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    audit(m, torch.randn(8, 4))
    assert not m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_gate_reported_as_skipped_is_explained():
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x))

    m = gaaf.patch(SE())
    a = audit(m, torch.randn(2, 4))
    assert a.findings, "the gate's sigmoid runs natively"
    assert a.ok, str(a)


def test_audit_rejects_a_non_module():
    with pytest.raises(gaaf.GaafError, match="nn.Module"):
        audit(42, torch.randn(2))


class _Scale(nn.Module):
    def forward(self, x, *, ref):
        return x * ref


class KeywordInput(nn.Module):
    """The parent's own tanh reaches a child by keyword (Hugging Face passes reference points and masks so)."""

    def __init__(self) -> None:
        super().__init__()
        self.child = _Scale()

    def forward(self, x):
        return self.child(x, ref=torch.tanh(x))


def test_an_op_whose_output_a_child_takes_by_keyword_stays_the_parents():
    """Regression: the walk that tags a module's autograd nodes stopped at its positional inputs only, so the
    parent's tanh backward was put on the child (deformable_detr: a reported gate in the root's code turned into a
    silent finding in decoder.layers.0.encoder_attn)."""
    a = audit(KeywordInput(), torch.randn(2, 3))
    assert sorted((f.module, f.op) for f in a.findings) == [("", "aten.tanh"), ("", "aten.tanh_backward")]


class AlwaysDraws(nn.Module):
    """OmniASR's LayerDrop: a draw per layer whatever the probability; the layer is skipped when it falls below.
    (``**kwargs``, as Hugging Face's forwards: the code runs as it is, in a run-time scope.)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.layerdrop = 0.5

    def forward(self, x, **kwargs):
        skip = self.training and torch.rand([]) < self.layerdrop
        return x if skip else torch.tanh(self.fc(x))


def test_a_draw_against_a_zeroed_layerdrop_is_explained_by_the_report():
    x = torch.randn(2, 4)
    assert [(f.op, f.explained) for f in audit(AlwaysDraws(), x).randoms()] == [("aten.rand", None)]
    model = gaaf.patch(AlwaysDraws(), strip_dropout=True)
    assert model.layerdrop == 0.0
    (draw,) = audit(model, x).randoms()
    assert draw.op == "aten.rand" and draw.explained == "LayerDrop off (layerdrop 0.5 -> 0.0): the draw decides nothing"


class CustomDropout(nn.Module):
    """A dropout written by hand: a uniform draw, scaled and reshaped, compared with the keep probability."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.fc, self.form = nn.Linear(4, 4), form

    def forward(self, x):
        x = self.fc(x)
        if self.form == "rand":
            keep = torch.rand(x.shape) < 0.9
        elif self.form == "view":
            keep = (torch.rand(x.numel()) * 1.0).view(x.shape) >= 0.1
        else:  # an in-place uniform on an empty tensor
            keep = torch.empty_like(x).uniform_().gt(0.1)
        return x * keep


@pytest.mark.parametrize("form", ["rand", "view", "uniform"])
def test_a_custom_dropout_from_a_uniform_draw_is_a_silent_random_finding(form):
    a = audit(gaaf.patch(CustomDropout(form), strip_dropout=True), torch.randn(2, 4))
    assert not a.ok and a.draws() == []
    (f,) = a.randoms()
    assert f.explained is None and f.op in ("aten.rand", "aten.uniform_")


class Sampler(nn.Module):
    """Random sampling that is the model's: a VAE's reparametrisation, ViT-MAE's random masking (``rand`` then
    ``argsort``), and a Gaussian compared with a bound (VITS's spline flows): draws, not masks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        z = self.fc(x) + torch.randn_like(x)
        order = torch.argsort(torch.rand(x.shape[0], x.shape[1]), dim=1)
        noise = torch.randn(x.shape)
        inside = (noise > -1) & (noise < 1)
        return torch.gather(z, 1, order) * inside


def test_sampling_draws_are_explained_as_part_of_the_model():
    from gaaf_patch.audit import DRAW_KEPT

    a = audit(gaaf.patch(Sampler(), strip_dropout=True), torch.randn(2, 4))
    assert a.ok and a.randoms() == []
    assert sorted(f.op for f in a.draws()) == ["aten.rand", "aten.randn", "aten.randn_like"]
    assert {f.explained for f in a.draws()} == {DRAW_KEPT}
    assert "random draw kept (part of the model)" in str(a)


class SpecAugmentAndDropout(nn.Module):
    """A module that reads a kept knob (SpecAugment) and also runs a dropout in a child the patch cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"mask_time_prob": 0.5, "layerdrop": 0.5})()
        self.inner = CustomDropout("rand")

    def forward(self, x):
        if self.training and self.config.layerdrop > 0 and self.config.mask_time_prob > 0:
            x = x * 1.0
        return self.inner(x)


def test_kept_noise_and_a_stripped_knob_explain_only_their_own_module():
    model = gaaf.patch(SpecAugmentAndDropout(), strip_dropout=True)
    rep = gaaf.report(model)
    assert [k["kind"] for k in rep.kept] == ["SpecAugment"] and rep.summary()["noise"] == {"LayerDrop": 1}
    a = audit(model, torch.randn(2, 4))
    (f,) = a.findings
    assert (f.module, f.kind, f.explained) == ("inner", "random", None)  # still silent: the custom dropout
