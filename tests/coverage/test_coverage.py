"""The zoo coverage checker: its independent counts find what a patch leaves, its checks fail when they must, and
a per-family sample of timm and torchvision models passes (the full per-family sweep is a slow test)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch import coverage as cov
from gaaf_patch.audit import audit
from gaaf_patch.cli import main
from gaaf_patch.coverage import zoo
from gaaf_patch.gain import delta_for
from gaaf_patch.passes.scope import RuntimeScope


class _Toy(nn.Module):
    """One activation in each form: a module, a function, a method, and a squeeze-excite style gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = F.gelu(self.fc2(x))
        x = self.drop(x.tanh())
        return x * torch.sigmoid(x.mean(-1, keepdim=True))  # a gate: left alone in "auto"


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats fx: the tanh inside is unreachable to the passes, not to the runtime."""

    def forward(self, x):
        if x.sum() > -1e9:
            return torch.tanh(x)
        return x


class _Helper(nn.Module):
    """convit's GPSA in small: the forward cannot be traced (it branches on a traced shape), the helper method it
    calls can, once the buffer it expands by a traced size is a graph value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("pos", torch.randn(1, 6))

    def forward(self, x):
        if x.shape[0] > 0:
            return self.mix(x)
        return x

    def mix(self, x):
        pos = self.pos.expand(x.shape[0], -1)
        return torch.sigmoid(self.fc(x)) + F.gelu(pos + x)


class _Branchy(nn.Module):
    """timm's BilinearAttnTransform in small: the forward's own activations are traceable, but a helper it calls
    branches on a traced size, so the forward as a whole is not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        p = torch.sigmoid(self.fc(x))
        return F.relu(self.grow(p, x.shape[0]) - 0.5)

    def grow(self, p, t: int):
        if t <= 1:
            return p
        return p * t


class _Noisy(nn.Module):
    """Randomness that is not dropout: the train-mode forward stays random after stripping."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        x = torch.relu(self.fc(x))
        return x + torch.rand_like(x) if self.training else x


def _misses(items) -> int:
    return sum(not i.gate for i in items)


def _ran(a) -> list[tuple[str, str, str, str | None]]:
    """(module, op, phase, why explained) of each audit finding: what ran outside GAAF, one entry per op kind."""
    return sorted((f.module, f.op, f.phase, f.explained) for f in a.findings)


def test_counts_see_every_unpatched_activation():
    model = _Toy()
    x = torch.randn(3, 6)
    assert [m.what for m in cov.leftover_modules(model, None)] == ["ReLU"]
    fx, why = cov.leftover_fx(model)
    assert why == "" and sorted(m.what for m in fx) == [
        "gelu",
        "gelu",
        "sigmoid",
        "sigmoid",
        "tanh",
        "tanh",
    ]  # train and eval graphs
    assert [m.gate for m in fx if m.what == "sigmoid"] == [True, True]
    # The toy's forward runs four activations and one dropout: the audit (train mode) lists each in its module,
    # forward and backward (ReLU's backward is threshold_backward), all silent: an unpatched model has no report.
    a = audit(model, x)
    assert _ran(a) == [
        ("", "aten.gelu", "forward", None),
        ("", "aten.gelu_backward", "backward", None),
        ("", "aten.sigmoid", "forward", None),
        ("", "aten.sigmoid_backward", "backward", None),
        ("", "aten.tanh", "forward", None),
        ("", "aten.tanh_backward", "backward", None),
        ("act", "aten.relu", "forward", None),
        ("act", "aten.threshold_backward", "backward", None),
        ("drop", "aten.bernoulli_", "forward", None),
    ]


def test_counts_are_zero_after_patch_but_the_gate():
    model = _Toy()
    gaaf.patch(model, strip_dropout=True)
    rep = gaaf.report(model)
    assert len(rep.replaced) == 3 and len(rep.skipped) == 1
    assert cov.leftover_modules(model, rep) == []
    fx, _ = cov.leftover_fx(model)
    assert [(m.what, m.gate) for m in fx] == [("sigmoid", True)] * 2
    gate = "gate (output multiplies)"  # GAAF's own ops are not findings; the gate is, explained by the report
    assert _ran(audit(model, torch.randn(3, 6))) == [
        ("", "aten.sigmoid", "forward", gate),
        ("", "aten.sigmoid_backward", "backward", gate),
    ]


def test_filtered_site_is_counted_by_all_three():
    model = _Toy()
    gaaf.patch(model, filter_fn=lambda m, name: name != "act")  # the ReLU module stays
    rep = gaaf.report(model)
    assert [m.what for m in cov.leftover_modules(model, rep)] == ["ReLU"]
    a = audit(model, torch.randn(3, 6))
    assert [(f.module, f.op) for f in a.silent] == [("act", "aten.relu"), ("act", "aten.threshold_backward")]


def test_gate_in_code_is_reported_once():
    """Regression (passes/context.py): a functional gate was listed twice in report.skipped, once per traced
    graph (train and eval)."""
    model = _Toy()
    gaaf.patch(model, strip_dropout=True)
    assert gaaf.report(model).skipped == [
        {"name": "sigmoid", "activation": "sigmoid", "reason": "gate (output multiplies)"}
    ]


def test_untraceable_forward_has_its_helper_methods_patched():
    """Regression (passes/functional.py): convit_tiny's GPSA.forward is untraceable and its activations sit in
    get_attention, which the suspect scan of forward did not see: 20 sigmoids per model left silently."""
    model = _Helper()
    x = torch.randn(3, 6)
    ref = model(x)
    gaaf.patch(model)
    rep = gaaf.report(model)
    assert sorted(r["name"] for r in rep.replaced) == ["mix_gelu", "mix_sigmoid"] and not rep.unreached
    assert isinstance(model.__dict__["forward"], RuntimeScope) and "mix" in model.__dict__
    assert torch.equal(model(x), ref)
    model.pos.fill_(1.0)
    patched = model(x)
    gaaf.unpatch(model)
    assert "mix" not in model.__dict__ and not any(isinstance(m, gaaf.GAAF) for m in model.modules())
    assert torch.equal(patched, model(x))  # the buffer is read by the patched code, not frozen into it
    assert cov.check_model(_Helper(), (6,)).status == cov.PASS


class _BufferScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.zeros(4))

    def forward(self, x):
        return F.relu(x) * self.scale.exp()


def test_patched_code_reads_buffers_when_it_runs():
    """Regression (passes/functional.py): ``self.scale.exp()`` was evaluated while tracing and frozen into the
    rewritten forward, so a checkpoint loaded after patching was ignored there."""
    model, x = _BufferScaled(), torch.randn(2, 4)
    gaaf.patch(model)
    assert len(gaaf.report(model).replaced) == 1
    model.load_state_dict({"scale": torch.ones(4)})
    patched = model(x)
    gaaf.unpatch(model)
    assert torch.equal(patched, model(x)) and torch.equal(patched, F.relu(x) * math.e)


def test_forward_is_traced_with_untraceable_helpers_opaque():
    """Regression (passes/functional.py): bat_resnext26ts's BilinearAttnTransform.forward fails to trace inside
    resize_mat, so its two sigmoids were left unpatched (reported unreached)."""
    model, x, x1 = _Branchy(), torch.randn(3, 6), torch.randn(1, 6)
    ref, ref1 = model(x), model(x1)
    gaaf.patch(model)
    rep = gaaf.report(model)
    assert sorted(r["name"] for r in rep.replaced) == ["relu", "sigmoid"] and not rep.unreached
    assert model._gaaf_self is model and "_gaaf_self" not in dict(model.named_modules())
    assert torch.equal(model(x), ref) and torch.equal(model(x1), ref1)  # the helper still branches at run time
    assert cov.check_model(copy.deepcopy(model), (6,)).status == cov.PASS
    gaaf.unpatch(model)
    assert not {"_gaaf_self", "forward"} & set(model.__dict__)


class StarReLU(nn.Module):
    """metaformer's StarReLU, ``s * relu(x) ** 2 + b``: an activation-looking class whose ReLU is a child."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


def test_activation_lookalike_with_a_patched_child_is_not_unreached():
    """Regression (passes/swap.py): the walk reaches StarReLU before its child ReLU is replaced, so every
    caformer/convformer model reported each StarReLU as unreached ("no GAAF form for this class")."""
    model = nn.Sequential(nn.Linear(4, 4), StarReLU())
    gaaf.patch(model)
    rep = gaaf.report(model)
    assert [r["name"] for r in rep.replaced] == ["1.relu"] and rep.unreached == []
    lone = nn.Sequential(nn.Linear(4, 4), nn.PReLU())  # a lookalike with nothing inside stays reported
    with pytest.warns(UserWarning, match="could not be patched"):
        gaaf.patch(lone)
    assert [u["target"] for u in gaaf.report(lone).unreached] == ["PReLU"]


def test_check_model_passes_a_toy_and_reports_each_check():
    r = cov.check_model(_Toy(), (6,), "toy")
    assert r.status == cov.PASS, r.reason
    assert all(r.checks.values()) and set(r.checks) == set(cov.CHECKS)
    assert (r.replaced, r.stripped, r.gates) == (3, 1, 1)
    assert r.misses() == {"modules": 0, "fx": 0, "runtime": 0}


@torch.jit.script
def _scripted_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


class _Scripted(nn.Module):
    """TorchScript code is opaque to fx and to the run-time scope (no torch function mode inside it)."""

    def forward(self, x):
        return _scripted_tanh(x)


def test_runtime_count_reaches_code_no_tracer_does():
    model = nn.Sequential(nn.Linear(6, 6), _Scripted())
    r = cov.check_model(model, (6,))
    assert r.status == cov.FAIL and r.checks["b_complete"] is False
    assert r.silent("activation") == [  # the run shows it: the tanh in module 1, forward and backward
        {"module": "1", "kind": "activation", "op": "aten.tanh", "phase": "forward", "count": 1, "explained": None},
        {"module": "1", "kind": "activation", "op": "aten.tanh_backward", "phase": "backward", "count": 1,
         "explained": None},
    ]  # fmt: skip
    assert "not fully patched" in r.reason and "ran aten.tanh x1 in 1" in r.reason


def test_untraceable_code_is_patched_at_run_time_and_the_runtime_count_agrees():
    model = nn.Sequential(nn.Linear(6, 6), _Untraceable())
    with pytest.raises(Exception):  # noqa: B017 - any fx error
        torch.fx.symbolic_trace(model)
    r = cov.check_model(model, (6,))
    assert r.status == cov.PASS, r.reason
    assert r.leftover_runtime == [] and not r.unreached


def test_dynamo_backend_and_run_time_scope_give_one_gradient():
    """What no fx trace reaches (an activation inline in a forward that branches on data) is patched at run time
    in eager mode; compiling the unpatched model with the gaaf backend patches the same site: one gradient."""
    from gaaf_patch.backend import GAAFBackend

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    plain_model = nn.Sequential(nn.Linear(6, 6), _Untraceable())
    model = gaaf.patch(copy.deepcopy(plain_model))

    def input_grad(f):
        xi = x.clone().requires_grad_()
        f(xi).sum().backward()
        return xi.grad

    plain = input_grad(lambda z: torch.tanh(plain_model[0](z)))
    eager = input_grad(model)
    compiled = input_grad(torch.compile(copy.deepcopy(plain_model), backend=GAAFBackend(inner="eager")))
    one_site = gaaf.GAAF("tanh", delta=delta_for(1))  # one site: the auto gain's allowance for 1
    torch.testing.assert_close(compiled, input_grad(lambda z: one_site(plain_model[0](z))), rtol=0, atol=0)
    torch.testing.assert_close(eager, compiled, rtol=0, atol=0)
    assert not torch.allclose(eager, plain)


def test_randomness_other_than_dropout_fails_check_c():
    r = cov.check_model(_Noisy(), (6,))
    assert r.status == cov.FAIL and r.checks["c_deterministic"] is False
    assert r.checks["b_complete"] and r.checks["a_exact"]
    assert "not deterministic" in r.reason and "ran aten.rand_like in <root>" in r.reason  # the audit names it


def test_summary_counts_families_not_models():
    def res(fam, status, src="timm"):
        return cov.Result(src, fam, f"{fam}_x", status)

    results = [res("a", "pass"), res("a", "fail"), res("b", "pass"), res("c", "skip"), res("b", "pass", "torchvision")]
    s = cov.summarize(results, target=0.6)
    assert s.families == {"a": "fail", "b": "pass", "c": "skip", "tv:b": "pass"}
    assert (s.checked, s.passed) == (3, 2) and s.rate == pytest.approx(2 / 3) and s.met
    assert not cov.summarize(results).met  # 67% < 98%
    assert s.models == {"pass": 3, "fail": 1, "skip": 1}
    assert "2/3 fully patched" in cov.totals_line(s, results)


def test_representative_is_the_cheapest_candidate():
    fams = {"resnet": ["resnet50", "resnet18", "test_resnet", "resnet101"]}
    (rep,) = zoo.representatives("timm", fams)
    assert rep == cov.Entry("timm", "resnet", "test_resnet")
    assert zoo._name_cost("convnext_atto") < zoo._name_cost("convnext_tiny") < zoo._name_cost("convnext_base")
    # torchvision: every model of the family compared, by its weights' metadata (regnets do not build on meta)
    assert cov.entries(timm_zoo=False, families=["tv:regnet"], cache=False)[0].name == "regnet_y_400mf"
    assert cov.entry_for("tv:resnet18") == cov.Entry("torchvision", "resnet", "resnet18")
    assert cov.entry_for("resnet18").family_id == "resnet" and cov.entry_for("tv:vgg11").family_id == "tv:vgg"
    with pytest.raises(ValueError, match="no timm model"):
        cov.entry_for("resnet_nonexistent")


def test_parameter_counts_are_cached(tmp_path, monkeypatch):
    fams, cache = {"resnet": ["resnet18", "test_resnet"]}, tmp_path / "sub" / "params.json"
    assert zoo.representatives("timm", fams, cache=cache)[0].name == "test_resnet"
    counts = json.loads(cache.read_text())
    assert counts["resnet18"] == 11_689_512 and counts["test_resnet"] < 1_000_000
    monkeypatch.setattr(zoo, "meta_params", lambda e: pytest.fail("counted again"))
    assert zoo.representatives("timm", fams, cache=cache)[0].name == "test_resnet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo.cache_path("timm") == tmp_path / "gaaf-patch" / f"params-timm-{__import__('timm').__version__}.json"


def test_too_large_is_a_skip_with_the_reason():
    r = cov.check(cov.entry_for("resnet50"), max_params=10_000_000)
    assert r.status == cov.SKIP and r.reason == "too large for this sweep (26M > 10M parameters)"
    r = cov.check(cov.entry_for("deepseek_vit_412m"), max_params=cov.DEFAULT_MAX_PARAMS)
    assert r.status == cov.SKIP and r.reason == "too large for the default sweep (412M > 200M parameters)"


def test_fixed_size_models_are_built_small_and_others_fall_back_to_their_size():
    model, size = zoo.build(cov.entry_for("test_vit"), 48)
    assert size == (3, 48, 48) and model.patch_embed.img_size == (48, 48)
    r = cov.check(cov.entry_for("efficientformer_l1"), size=32)  # rejects 32x32: checked at 224x224
    assert r.status == cov.PASS and r.input_size == [3, 224, 224]


# One model per family, none of them in test_models.py, each exercising another path: fixed-size ViTs built at
# img_size (test_vit, swin), gates in code and modules (test_efficientnet, ghostnet, rexnet), functional activations
# in user code (test_nfnet, test_byobnet), train-mode tuple outputs (levit), LSTM blocks (sequencer), dilated/hybrid
# conv-attention (test_coatnet), an untraceable forward with traceable helper methods (convit), serial/parallel
# blocks with factorized attention (coat), torchvision's own layers (mnasnet, squeezenet, swin_t).
SAMPLE = [
    "convit_tiny",
    "coat_tiny",
    "edgenext_xx_small",
    "efficientvit_b0",
    "fastvit_t8",
    "cspnext_tiny",
    "xcit_nano_12_p8_224",
    "test_vit",
    "test_efficientnet",
    "test_nfnet",
    "test_byobnet",
    "test_coatnet",
    "test_mambaout",
    "ghostnet_050",
    "rexnet_100",
    "levit_128s",
    "swin_tiny_patch4_window7_224",
    "tv:mnasnet0_5",
    "tv:squeezenet1_1",
    "tv:swin_t",
]


@pytest.mark.parametrize("spec", SAMPLE)
def test_family_sample(spec):
    r = cov.check(cov.entry_for(spec))
    assert r.status == cov.PASS, r.reason
    assert r.replaced > 0 and r.misses()["modules"] == r.misses()["runtime"] == 0


def test_cli_coverage_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    code = main(["coverage", "--models", "test_resnet", "--timeout", "0", "--json", str(js), "--markdown", str(md)])
    assert code == 0
    out = capsys.readouterr().out
    assert "test_resnet" in out and "families: 1/1 fully patched" in out
    doc = json.loads(js.read_text())
    assert doc["summary"]["met"] and doc["results"][0]["name"] == "test_resnet"
    assert doc["results"][0]["checks"] == dict.fromkeys(cov.CHECKS, True)
    text = md.read_text()
    assert "# Coverage" in text and "| resnet | test_resnet |" in text and "## Failures\n\nNone." in text


def test_cli_coverage_errors_are_one_line(capsys):
    assert main(["coverage", "--models", "no_such_model"]) == 2
    assert "no timm model 'no_such_model'" in capsys.readouterr().err
    assert main(["coverage", "--json", "/no/such/dir/x.json"]) == 2
    assert main(["coverage", "--families", "resnet,no_such_family", "--no-torchvision"]) == 2
    assert "unknown family no_such_family" in capsys.readouterr().err


def test_worker_time_limit_two_jobs():
    models = [cov.entry_for("test_resnet"), cov.entry_for("test_vit")]
    seen = []
    results = cov.sweep(models, timeout=0.01, jobs=2, on_result=seen.append)
    assert [r.name for r in results] == ["test_resnet", "test_vit"] and len(seen) == 2  # in order, each reported
    assert all(r.status == cov.FAIL and r.reason == "time limit: over 0.01 s" for r in results)


@pytest.mark.slow
def test_worker_runs_a_model():
    (r,) = cov.sweep([cov.entry_for("test_resnet")], timeout=120, threads=1)
    assert r.status == cov.PASS, r.reason


def _assert_every_family_passes(results: list[cov.Result]) -> None:
    summary = cov.summarize(results)
    failures = "".join(f"\n{r.family_id}/{r.name}: {r.reason}" for r in results if r.status == cov.FAIL)
    assert summary.met, cov.totals_line(summary, results) + failures
    assert summary.checked > 100, cov.totals_line(summary, results)  # the zoo, not a few families that built


def test_every_family_at_ci_size():
    """The README's coverage claim, CI-sized: the representative of every timm and torchvision family at 32x32
    (where the model allows it), two worker processes of one thread (the full run, 64x64: the slow test below)."""
    results = cov.sweep(cov.entries(), size=32, max_params=cov.DEFAULT_MAX_PARAMS, timeout=300, jobs=2, threads=1)
    _assert_every_family_passes(results)


@pytest.mark.slow
def test_every_family_meets_the_target():
    _assert_every_family_passes(cov.sweep(cov.entries(), max_params=cov.DEFAULT_MAX_PARAMS, timeout=300, threads=1))


# ------------------------------------------------------------------------------ coverage --hf: noise kept on purpose


@pytest.mark.parametrize(
    ("model_type", "noise"),
    [
        ("vit_mae", "random draw kept (part of the model) at embeddings: aten.rand"),  # random masking, by design
        ("switch_transformers", None),  # router jitter stripped: two seeds agree
    ],
)
def test_hf_noise_kept_on_purpose_is_checked_under_one_seed_and_named_in_the_row(model_type, noise):
    pytest.importorskip("transformers")
    r = cov.check(zoo.entry_for(f"hf:{model_type}"))
    assert r.status == cov.PASS, r.reason
    assert r.checks == dict.fromkeys(cov.HF_CHECKS, True)
    if noise is None:
        assert "one seed" not in r.reason
    else:
        assert r.reason.startswith("train-mode determinism checked under one seed: ") and noise in r.reason


def test_kept_noise_lists_the_reports_noise_and_the_audits_draws_not_droppath():
    from gaaf_patch.audit import DRAW_KEPT
    from gaaf_patch.coverage.hf import kept_noise
    from gaaf_patch.report import Report

    rep = Report(kept=[{"name": "1", "reason": "DropPath kept"}, {"name": "config.x", "kind": "SpecAugment"}])
    findings = [
        {"module": "", "kind": "draw", "op": "aten.randn", "explained": DRAW_KEPT},
        {"module": "a", "kind": "random", "op": "aten.bernoulli_", "explained": None},
    ]
    assert kept_noise(rep, findings) == [
        "kept SpecAugment at config.x",
        "random draw kept (part of the model) at <root>: aten.randn",
    ]
