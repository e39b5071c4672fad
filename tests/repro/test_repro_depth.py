"""The depth study (``gaaf-patch repro depth``): the --quick run through the CLI, resume, the gradient probe, and
divergence handling in the training loop."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from gaaf_patch import cli, patch
from gaaf_patch.repro import depth
from gaaf_patch.repro.train import Data


def _count_fits(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = depth.fit

    def counting(model, data, recipe, epochs, **kw):
        calls.append(f"{recipe.lr}/{len(data.y_train)}")
        return real(model, data, recipe, epochs, **kw)

    monkeypatch.setattr(depth, "fit", counting)
    return calls


def test_cli_repro_depth_quick_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "quick"
    base = ["repro", "depth", "--quick", "--out", str(out), "--threads", "1", "--models", "resnet18"]
    calls = _count_fits(monkeypatch)
    assert cli.main([*base, "--regimes", "scratch"]) == 0
    assert len(calls) == 4  # the four scratch variants
    first = json.loads((out / "results.json").read_text())
    stamps = {(r["regime"], r["variant"]): r["finished"] for r in first["runs"]}

    calls.clear()
    assert cli.main([*base, "--resume"]) == 0  # adds the finetune regime: one checkpoint, four runs
    assert len(calls) == 5 and len({c for c in calls if c.startswith("0.1/")}) == 1  # the pretrain at lr 0.1
    text = capsys.readouterr().out
    for word in ("Depth study", "gaaf-auto", "test acc %", "diverged", "already done (resumed)"):
        assert word in text

    res = json.loads((out / "results.json").read_text())
    assert res["study"] == "depth" and res["version"] == depth.VERSION
    assert res["setup"]["sizing"] == asdict(depth.QUICK) and res["setup"]["quick"] is True
    assert res["setup"]["recipes"]["scratch"]["lr"] == 0.1 and res["setup"]["recipes"]["finetune"]["lr"] == 0.01
    assert res["data"]["source"] == "digits" and res["data"]["train"] == depth.QUICK.train
    assert res["environment"]["torch"] == torch.__version__ and "git_commit" in res["environment"]
    assert res["environment"] == first["environment"]  # the first invocation's; each run keeps its own
    assert all(r["environment"]["torch"] == torch.__version__ for r in res["runs"])
    assert res["regimes"] == ["scratch", "finetune"] and res["variants"] == list(depth.VARIANTS)
    # the four scratch runs were not run again
    assert {(r["regime"], r["variant"]): r["finished"] for r in res["runs"] if r["regime"] == "scratch"} == stamps
    runs = {(r["regime"], r["variant"]): r for r in res["runs"]}
    assert set(runs) == {(g, v) for g in depth.REGIMES for v in depth.VARIANTS} and len(res["runs"]) == 8
    for (regime, variant), r in runs.items():
        epochs = depth.QUICK.epochs(regime)
        assert isinstance(r["diverged"], bool)
        if r["diverged"]:  # explicitly diverged: where, and no more epochs than that
            assert 1 <= r["diverged_epoch"] <= epochs and r["epochs_run"] < r["diverged_epoch"]
        else:
            assert r["diverged_epoch"] is None and r["epochs_run"] == epochs
            assert 0 <= r["test_acc"] <= 100 and math.isfinite(r["test_loss"])
            assert all(math.isfinite(v) for v in r["history"]["train_loss"])
        assert len(r["history"]["val_acc"]) == r["epochs_run"]
        assert ("grad_ratio" in r) == (variant in depth.GAAF_VARIANTS)
        if variant == "plain":  # its own best is the target it reaches at its best epoch
            assert r["reach_plain_best"]["epoch"] == r["best_epoch"]
            assert r["reach_plain_best"]["target"] == r["best_val_acc"]
    for regime in depth.REGIMES:
        auto, paper = runs[(regime, "gaaf-auto")]["grad_ratio"], runs[(regime, "gaaf-paper")]["grad_ratio"]
        assert set(auto) == {*depth.STAGES, "params"}
        assert len(auto["layer1"]) == depth.QUICK.epochs(regime) + 1  # epoch 0 (start) and after every epoch
        for stage in depth.STAGES:
            assert 0.5 <= auto[stage][0] <= 2.0, (regime, stage, auto[stage][0])
        # the paper's gain compounds toward the input; nothing is patched downstream of layer4's output
        assert paper["layer1"][0] > paper["layer2"][0] > paper["layer3"][0] > 2.0
        assert paper["layer4"][0] == pytest.approx(1.0, abs=1e-5) and auto["layer4"][0] == pytest.approx(1.0, abs=1e-5)
    cell = res["summary"]["resnet18"]["finetune"]["gaaf-auto"]
    assert cell["seeds"] == [0] and cell["diverged"] in (0, 1) and set(cell["grad_ratio_final"]) == set(auto)
    assert cell["test_acc"]["mean"] == runs[("finetune", "gaaf-auto")]["test_acc"]
    # the finetune checkpoint: plain, 5 classes, saved once, loads strictly into the 5-class network
    ckpt = torch.load(out / "checkpoints" / "pretrain-resnet18-seed0.pt", weights_only=True)
    depth.build("resnet18", "plain", depth.PRETRAIN_CLASSES).load_state_dict(ckpt["state_dict"], strict=True)
    assert res["pretrain"]["resnet18/seed0"]["epochs_run"] == depth.QUICK.pretrain_epochs
    for name in ("depth_val_error.png", "depth_train_loss.png", "depth_grad_ratio.png"):
        assert (out / name).stat().st_size > 10_000

    calls.clear()  # a finished study trains nothing; a changed setup is refused in one line
    assert cli.main([*base, "--resume"]) == 0 and calls == []
    capsys.readouterr()
    assert cli.main([*base, "--resume", "--scratch-epochs", "2"]) == 2
    assert "different sizing" in capsys.readouterr().err
    assert cli.main(base) == 2  # never overwrite a study by accident
    assert "--resume" in capsys.readouterr().err


def test_cli_rejects_unknown_variant(tmp_path, capsys):
    assert cli.main(["repro", "depth", "--quick", "--out", str(tmp_path), "--variants", "plain,nope"]) == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err


def test_fit_stops_at_a_non_finite_loss():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = Data(x, y, x[:16], y[:16], x[:16], y[:16])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    res = depth.fit(model, data, depth.Recipe(lr=1e38, momentum=0.0, weight_decay=0.0, batch_size=16), 3, seed=0)
    assert res["diverged"] and res["diverged_epoch"] == 1 and res["epochs_run"] == 0
    assert res["test_acc"] is None and res["best_val_acc"] is None
    ok = depth.fit(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), data, depth.Recipe(lr=0.1, batch_size=16), 2, seed=0)
    assert not ok["diverged"] and ok["epochs_run"] == 2 and math.isfinite(ok["test_acc"])


def test_stage_ratios_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = patch(depth.build("resnet18", "plain"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    r = depth.stage_ratios(model, x, y)
    assert set(r) == {*depth.STAGES, "params"} and all(0.5 <= v <= 2.0 for v in r.values())
    after = model.state_dict()  # BatchNorm running statistics included
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
