"""The MNIST study: training and early stopping on synthetic data, resumable results.json, the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gaaf_patch import cli
from gaaf_patch import data as gdata
from gaaf_patch.repro import mnist
from gaaf_patch.repro.models import MODELS, build
from gaaf_patch.repro.noisy import NoisyHardTanh
from gaaf_patch.repro.train import Data, TrainConfig, evaluate, train


def _synthetic(n: int = 256, seed: int = 0) -> Data:
    """A learnable 10-class problem in MNIST's shape: the label is the argmax of 10 fixed pixel groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 784, generator=g)
    y = x[:, :10].argmax(1)
    return Data(x[: n // 2], y[: n // 2], x[n // 2 : 3 * n // 4], y[n // 2 : 3 * n // 4], x[3 * n // 4 :],
                y[3 * n // 4 :])  # fmt: skip


def test_models_have_the_papers_shape():
    for name in MODELS:
        model = build(name)
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 256), (256, 256), (256, 10)]
    drop = build("dropout")
    assert [m.p for m in drop if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5, 0.5]
    gaaf = build("gaaf")
    assert [m.shape.spec for m in gaaf if hasattr(m, "shape")] == ["gauss(width=4.0)"] * 3
    with pytest.raises(ValueError, match="unknown model"):
        build("nope")


def test_noisy_hardtanh_by_hand():
    act = NoisyHardTanh().eval()
    x = torch.tensor([-0.5, 0.0, 0.9, 2.0])
    y = act(x).detach()
    assert torch.equal(y[:3], x[:3])  # linear region: no noise, identity
    sigma = 0.5 * (1 / (1 + math.e) - 0.5) ** 2  # Delta = -1 at x = 2, p = 1
    assert y[3].item() == pytest.approx(1.15 - 0.15 * 2 + sigma * math.sqrt(2 / math.pi), rel=1e-6)
    act.train()
    torch.manual_seed(0)
    assert torch.equal(act(x[:3]), x[:3])
    assert act(torch.full((1000,), 2.0)).std() > 0  # saturated: noisy in training


def test_train_stops_early_and_restores_the_best_epoch():
    torch.manual_seed(0)
    d = _synthetic()
    model = build("base")
    cfg = TrainConfig(lr=0.5, momentum=0.9, batch_size=32, max_epochs=40, patience=3)  # large lr: val loss wobbles
    logs = []
    res = train(model, d, cfg, seed=0, on_epoch=logs.append)
    h = res["history"]
    assert res["epochs_run"] == len(h["val_loss"]) == len(logs)
    best = min(range(len(h["val_loss"])), key=h["val_loss"].__getitem__) + 1
    assert res["best_epoch"] == best and res["best_val_loss"] == h["val_loss"][best - 1]
    assert res["epochs_run"] == cfg.max_epochs or res["epochs_run"] == best + cfg.patience
    # the model ends at the best epoch's weights
    assert evaluate(model, d.x_val, d.y_val)[0] == pytest.approx(h["val_loss"][best - 1], rel=1e-9)
    assert res["steps"] == res["epochs_run"] * math.ceil(len(d.y_train) / cfg.batch_size)
    assert list(res["gradient_info"]) == ["0", "2", "4", "6"] and all(v > 0 for v in res["gradient_info"].values())


def test_train_is_reproducible_per_seed():
    d = _synthetic()
    cfg = TrainConfig(max_epochs=2, batch_size=64)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(train(build("dropout"), d, cfg, seed=seed)["history"]["train_loss"])
    assert runs[0] == runs[1] != runs[2]


def test_evaluate_matches_cross_entropy():
    d = _synthetic()
    model = build("relu")
    loss, acc = evaluate(model, d.x_test, d.y_test, batch_size=7)
    with torch.no_grad():
        out = model(d.x_test)
    assert loss == pytest.approx(F.cross_entropy(out.double(), d.y_test).item(), rel=1e-6)
    assert acc == pytest.approx(100 * (out.argmax(1) == d.y_test).float().mean().item())


class _Spy(mnist.Reporter):
    def __init__(self, path):
        self.path, self.seen = path, []

    def run_end(self, model, seed, run):
        # results.json is already rewritten when a run ends: a kill now loses nothing
        self.seen.append(len(json.loads(self.path.read_text())["runs"]))


def test_study_saves_after_every_run_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "load_data", lambda cfg: _synthetic(128))

    def no_matplotlib(results, out):
        raise ImportError("plots need matplotlib")

    monkeypatch.setattr(mnist, "write_figures", no_matplotlib)
    train_cfg = TrainConfig(max_epochs=1, batch_size=64)
    cfg = mnist.StudyConfig(out=tmp_path, models=("base", "noisy"), seeds=2, train=train_cfg, device="cpu")
    spy = _Spy(tmp_path / mnist.RESULTS)
    res = mnist.run_study(cfg, spy)
    assert spy.seen == [1, 2, 3, 4]
    assert res["figures"] == [] and "matplotlib" in res["figures_skipped"]  # the numbers stand without the PNGs
    assert [(r["model"], r["seed"]) for r in res["runs"]] == [("base", 0), ("noisy", 0), ("base", 1), ("noisy", 1)]
    on_disk = json.loads((tmp_path / mnist.RESULTS).read_text())
    assert on_disk["summary"]["noisy"]["test_acc"]["n"] == 2
    accs = [r["test_acc"] for r in on_disk["runs"] if r["model"] == "base"]
    assert on_disk["summary"]["base"]["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert set(on_disk["runs"][0]["gradient_info"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert set(on_disk["runs"][0]["saturation"]) == {"act1", "act2", "act3"}
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(ValueError, match="--resume"):  # never overwrite a study by accident
        mnist.run_study(cfg)
    cfg.resume, cfg.seeds, cfg.models = True, 3, ("base", "noisy", "gaaf_relu")
    spy = _Spy(tmp_path / mnist.RESULTS)
    res = mnist.run_study(cfg, spy)
    assert spy.seen == [5, 6, 7, 8, 9]  # gaaf_relu 0, 1; then seed 2 of each: the 4 finished runs are skipped
    assert res["models"] == ["base", "noisy", "gaaf_relu"]
    other = mnist.StudyConfig(out=tmp_path, models=("base",), train=TrainConfig(max_epochs=1, lr=0.1), resume=True)
    with pytest.raises(ValueError, match="different train"):
        mnist.run_study(other)


def test_cli_reports_missing_data_in_one_line(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise gdata.DataError("MNIST could not be loaded from X (offline); pass --data-dir DIR")

    monkeypatch.setattr(gdata, "mnist", offline)
    rc = cli.main(["repro", "mnist", "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--data-dir" in err


@pytest.mark.parametrize("study", [["mnist", "--quick"], ["depth", "--models", "resnet18"]])
def test_the_studies_never_download_and_create_nothing_without_mnist(tmp_path, monkeypatch, capsys, study):
    """Issue 14, item 13: ``repro mnist`` without data tried to download it, creating the data directory (and the
    output folder); now one line that points to --data-dir / GAAF_DATA_DIR, and nothing on disk."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda *a, **k: pytest.fail("torchvision's MNIST was called"))
    monkeypatch.delenv(gdata.ENV, raising=False)
    data_dir, out = tmp_path / "data", tmp_path / "out"
    assert cli.main(["repro", *study, "--data-dir", str(data_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gaaf-patch: error: MNIST not found under {data_dir}")
    assert "do not download" in err and "--data-dir" in err and gdata.ENV in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("device", "expect"), [("bogus", "not a device"), ("cuda:99", "")])
def test_a_bad_device_is_one_line_and_creates_nothing(tmp_path, capsys, device, expect):
    out = tmp_path / "out"
    assert cli.main(["repro", "mnist", "--quick", "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gaaf-patch: error: --device {device}: ") and expect in err
    assert not out.exists()


def test_cli_repro_mnist_quick_end_to_end(tmp_path, mnist_dir, capsys):
    out = tmp_path / "quick"
    models = ["base", "dropout", "gaaf", "gaaf_relu", "calibrated"]  # tanh, dropout, GAAF on both, calibrated
    argv = ["repro", "mnist", "--quick", "--data-dir", str(mnist_dir), "--out", str(out), "--threads", "1",
            "--models", ",".join(models)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for word in ("98.23", "paper", "G layer1", "sat act1", "0.9 / 0.8", "gaaf_relu", "sigma act2"):
        assert word in text
    res = json.loads((out / "results.json").read_text())
    assert res["data"] == {"train": 5000, "val": 1000, "test": 2000}
    assert [r["model"] for r in res["runs"]] == models
    assert all(r["epochs_run"] == 3 and r["steps"] == 3 * math.ceil(5000 / 128) for r in res["runs"])
    assert all(r["test_acc"] > 50 for r in res["runs"])  # 3 epochs on 5k images learn something
    for name in ("mnist_net_values.png", "mnist_gradient_info.png", "mnist_correlations.png"):
        assert (out / name).stat().st_size > 10_000
    # resuming a finished study trains nothing; a changed setup is refused with one line
    assert cli.main([*argv, "--resume"]) == 0
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(models)
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--lr", "0.1"]) == 2
    assert "different train" in capsys.readouterr().err


def test_calibrated_model_is_calibrated_at_init_and_records_sigmas(tmp_path, monkeypatch):
    """`calibrated` = the dropout MLP, gaaf.calibrate'd on seeded training batches before training: dropout stripped,
    act1 (no dropout feeds it) keeps the paper's shape, act2/act3 get dropout-matched shapes whose sigma is recorded."""
    from gaaf_patch.repro.models import CALIBRATION

    d = _synthetic(1200)
    monkeypatch.setattr(mnist, "load_data", lambda cfg: d)
    monkeypatch.setattr(mnist, "write_figures", lambda results, out: [])
    cfg = mnist.StudyConfig(
        out=tmp_path, models=("calibrated",), seeds=1, train=TrainConfig(max_epochs=1), device="cpu"
    )
    run = mnist.run_study(cfg)["runs"][0]
    cal = run["calibration"]
    assert run["epochs_run"] == 1 and math.isfinite(run["test_acc"])
    assert cal["when"] == "init" and list(cal["sites"]) == ["act1", "act2", "act3"]
    a1, a2, a3 = cal["sites"].values()
    assert not a1["fed"] and a1["sigma"] == 0 and a1["shape"] == "default"
    # act2's net is Linear(dropout(tanh(Linear(x)))): eq. 6 by hand, float64, on the same seeded batches and initial
    # weights. Nothing upstream drops, so the measured sigma agrees with it up to the sampling of 8 masks.
    torch.manual_seed(0)
    ref = build("dropout").double()
    n = CALIBRATION["batches"] * CALIBRATION["batch_size"]
    x = d.x_train[torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(0))[:n]].double()
    h2 = torch.tanh(ref[0](x)).square()
    sigma_eq6 = F.linear(h2, ref[3].weight.square()).mean().sqrt().item()  # p / (1 - p) = 1 for p = 0.5
    assert a2["fed"] and a2["sigma_eq6"] == pytest.approx(sigma_eq6, rel=1e-5)
    assert a2["sigma"] == pytest.approx(sigma_eq6, rel=0.05)
    assert a3["fed"] and a3["sigma"] >= a3["sigma_eq6"] > 0  # act3 also sees act1's dropout, passed on
    for site in (a2, a3):
        rounded = float(f"{site['sigma']:.3g}")
        assert site["shape"] == f"dropout_matched(act='tanh', sigma={rounded})"
    on_disk = json.loads((tmp_path / mnist.RESULTS).read_text())
    assert on_disk["runs"][0]["calibration"] == cal
    assert on_disk["summary"]["calibrated"]["calibration_sigma"]["act2"]["mean"] == pytest.approx(a2["sigma"])
    from gaaf_patch.repro.models import calibrate_at_init

    torch.manual_seed(0)  # the study seeds the initial weights with the run's seed
    model = build("calibrated")
    assert calibrate_at_init(model, d.x_train, 0)["sites"][1]["sigma"] == a2["sigma"]  # deterministic per seed
    assert not any(isinstance(m, torch.nn.Dropout) for m in model)
    assert [m.shape.spec for m in model if hasattr(m, "shape")][0] == "gauss(width=4.0)"
