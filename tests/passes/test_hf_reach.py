"""Patterns of Hugging Face models the patch once missed in silence (issue 13), each as the smallest plain module that
does what the model does, measured by ``gaaf_patch.audit`` (what runs, not what the report believes):

- GLU (``nn.GLU``, ``F.glu``; Parakeet, LASR, Speech2Text, wav2vec2-conformer): a gate with no GAAF form, reported
  unreached, in traced code, in code patched at run time and as a module;
- an activation module made at each call inside a helper (Mamba's ``ACT2FN[self.activation](out)`` in
  ``causal_conv1d_fn``): the op is the calling module's site;
- a traced forward frozen at its default arguments (DAB-DETR's cross-attention drops out only when
  ``encoder_hidden_states`` is given): the calls the trace did not see run under a run-time scope;
- a forward that writes ``self.<attr>`` (recurrent Gemma's ``rg_lru``, wav2vec2-conformer's positional buffer): the
  trace must neither leave a Proxy there nor drop the write; the module falls back to the run-time scope.
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.audit import audit
from gaaf_patch.models import output_tensors
from gaaf_patch.passes.gates import GLU_REASON


def _grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    model(x).sum().backward()
    return x.grad


def _patched(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(plain copy, patched model), the patched one checked bit-identical in eval."""
    torch.manual_seed(0)
    plain = copy.deepcopy(model).eval()
    patched = gaaf.patch(model, strip_dropout=True).eval()
    with torch.no_grad():
        assert torch.equal(patched(x), plain(x)), "eval output must be bit-identical"
    return plain, patched


def _silent(model: nn.Module, x: torch.Tensor) -> list[str]:
    return [f.line() for f in audit(model, x).silent]


# --------------------------------------------------------------------------------------------------------------- GLU
class ConvGLU(nn.Module):  # ParakeetEncoderConvolutionModule: a pointwise conv, then F.glu over channels
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(8, 8)

    def forward(self, x, mask=None):
        h = F.glu(self.proj(x), dim=-1)
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return self.out(torch.tanh(h))


class KwargsGLU(ConvGLU):  # the same in code fx cannot trace (**kwargs): patched at run time
    def forward(self, x, **kwargs):
        return self.out(torch.tanh(F.glu(self.proj(x), dim=-1)))


class ModuleGLU(nn.Module):  # Wav2Vec2ConformerConvolutionModule: nn.GLU as a child
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.glu = nn.GLU(dim=-1)

    def forward(self, x):
        return self.glu(self.proj(x))


@pytest.mark.parametrize("cls", [ConvGLU, KwargsGLU, ModuleGLU])
def test_glu_is_listed_as_a_skipped_gate_and_the_audit_explains_it(cls, recwarn):
    x = torch.randn(2, 4, 8)
    _plain, model = _patched(nn.Sequential(cls()), x)
    assert _silent(model, x) == []
    rep = gaaf.report(model)
    glu = [s for s in rep.skipped if s["reason"] == GLU_REASON]
    assert len(glu) == 1 and glu[0]["activation"] == "glu", rep.skipped
    assert rep.unreached == [] and not [w for w in recwarn if "could not be patched" in str(w.message)]  # a gate
    found = [f for f in audit(model, x).findings if f.op in ("aten.glu", "aten.glu_backward")]
    assert {f.op for f in found} == {"aten.glu", "aten.glu_backward"}  # it runs, untouched, explained
    assert all(f.explained and "gated linear unit" in f.explained for f in found)


def test_glu_gets_no_gaaf_form_while_the_activation_next_to_it_does():
    x = torch.randn(2, 4, 8)
    plain, model = _patched(nn.Sequential(ConvGLU()), x)
    assert [r["activation"] for r in gaaf.report(model).replaced] == ["tanh"]
    assert not torch.equal(_grad(model.train(), x), _grad(plain.train(), x))  # the tanh's gradient grew


# ------------------------------------------------------------------------------------ activation modules made per call
class _Instantier(OrderedDict):  # transformers.activations.ClassInstantier: a new module at each lookup
    def __getitem__(self, key):
        return super().__getitem__(key)()


class SiLUActivation(nn.Module):  # transformers' own class: no table names it, the probe identifies it
    def forward(self, x):
        return F.silu(x)


class FastGELUActivation(nn.Module):  # a composite: its tanh is not the GELU's site
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT = _Instantier(silu=SiLUActivation, swish=nn.SiLU, fast_gelu=FastGELUActivation)


def causal_conv(x, weight, activation=None):  # modeling_mamba.causal_conv1d_fn, reduced
    out = x @ weight
    if activation is not None:
        out = ACT[activation](out)
    return out


class Mixer(nn.Module):  # MambaMixer: **kwargs (a run-time scope), the activation made inside a helper
    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x, **kwargs):
        return causal_conv(x, self.weight, activation=self.activation)


@pytest.mark.parametrize("activation", ["silu", "swish"])
def test_an_activation_module_made_in_a_helper_is_the_callers_site(activation):
    x = torch.randn(2, 4, 8)
    plain, model = _patched(nn.Sequential(Mixer(activation)), x)
    assert _silent(model, x) == []
    replaced = gaaf.report(model).replaced
    assert [r["activation"] for r in replaced] == ["silu"]
    assert replaced[0]["name"].startswith("0:test_hf_reach:")  # named after the line that called the module
    assert not torch.equal(_grad(model.train(), x), _grad(plain.train(), x))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_a_composite_activation_made_per_call_is_reported_not_patched_inside():
    x = torch.randn(2, 4, 8)
    plain, model = _patched(nn.Sequential(Mixer("fast_gelu")), x)
    assert _silent(model, x) == []
    assert gaaf.report(model).replaced == []  # GAAF on its inner tanh would be the wrong family
    assert any("FastGELUActivation" in u["reason"] for u in gaaf.report(model).unreached)
    assert torch.equal(_grad(model.train(), x), _grad(plain.train(), x))


# ----------------------------------------------------------------------------------- traces frozen at default arguments
class CrossAttention(nn.Module):  # DabDetrDecoderLayerCrossAttention: dropout only when memory is given
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.dropout = 0.5

    def forward(self, x, memory=None, scale=None):
        h = self.q(x)
        if memory is not None:
            h = F.dropout(h + memory, p=self.dropout, training=self.training)
        if scale is not None:
            h = F.gelu(h) * scale
        return h


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cross = CrossAttention()

    def forward(self, x):
        return self.cross(x, memory=x, scale=2.0)


def test_a_branch_the_trace_froze_shut_is_patched_when_it_runs():
    x = torch.randn(2, 4, 8)
    plain, model = _patched(Decoder(), x)
    assert _silent(model, x) == []
    rep = gaaf.report(model)
    assert [s["p"] for s in rep.stripped] == [0.5]
    assert [r["activation"] for r in rep.replaced] == ["gelu"]
    model.train()
    assert torch.equal(model(x), model(x))  # train mode deterministic: the dropout is gone
    assert not torch.equal(_grad(model.train(), x), _grad(plain.eval(), x))  # the gelu's gradient grew
    with torch.no_grad():  # the calls the trace saw still run the traced code, unchanged
        assert torch.equal(model.eval().cross.q(x), plain.cross.q(x))
        assert torch.equal(model.cross(x), plain.cross(x))


# ----------------------------------------------------------------------------------- forwards that write attributes
class Recurrence(nn.Module):  # RecurrentGemmaRglru: forward stores the state the helper returns
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.state = None

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        out, self.state = self._scan(h, self.state)
        return out

    def _scan(self, h, state):
        if h.shape[1] == 1:  # control flow on a traced value: traced opaque
            return h, h[:, 0]
        return h.cumsum(1), h[:, -1]


class Positions(nn.Module):  # Wav2Vec2ConformerRelPositionalEmbedding: a buffer extended in forward
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pe", torch.zeros(1, 2, 8), persistent=False)

    def extend(self, x, pe):
        if pe.size(1) >= x.size(1):
            return pe
        return torch.ones(1, x.size(1), 8)

    def forward(self, x):
        self.pe = self.extend(x, self.pe)
        return F.gelu(x + self.pe[:, : x.size(1)])


@pytest.mark.parametrize("cls", [Recurrence, Positions])
def test_a_forward_that_writes_self_falls_back_and_keeps_its_write(cls):
    x = torch.randn(2, 4, 8)
    plain, model = _patched(nn.Sequential(cls()), x)  # patch raised "does not belong to this Graph" before
    inner = model[0]
    assert not any(isinstance(v, torch.fx.Proxy) for v in [*inner.__dict__.values(), *inner._buffers.values()])
    assert _silent(model, x) == []
    assert [r["activation"] for r in gaaf.report(model).replaced] == ["tanh" if cls is Recurrence else "gelu"]
    with torch.no_grad():
        model(x)
    written = "state" if cls is Recurrence else "pe"
    assert torch.equal(getattr(inner, written), getattr(plain[0], written))  # the write still happens
    assert not torch.equal(_grad(model.train(), x), _grad(plain.train(), x))


# ------------------------------------------------------------------------------------- the models themselves, shrunk
@pytest.mark.parametrize("model_type", ["mamba", "parakeet_ctc", "recurrent_gemma", "wav2vec2-conformer"])
def test_hugging_face_models_leave_no_activation_silent(model_type):
    """GLU (parakeet_ctc, wav2vec2-conformer), ACT2FN made per call (mamba), forwards writing self (recurrent_gemma,
    wav2vec2-conformer: the patch or the patched model raised). Random ops are another check's (LayerDrop's draw)."""
    pytest.importorskip("transformers")
    from gaaf_patch import hf

    torch.manual_seed(0)
    model = hf.build(model_type).eval()
    inputs = hf.runnable_inputs(model)
    with torch.no_grad():
        ref = output_tensors(model(**inputs))
    gaaf.patch(model, strip_dropout=True)
    with torch.no_grad():
        out = output_tensors(model(**inputs))
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    found = audit(model, **inputs)
    assert [f.line() for f in found.silent if f.kind == "activation"] == []
    assert found.gaaf_calls > 0
