"""benchmarks/depth.py on its ``--quick`` path (3 small models at 64x64, one tiny trained model; ~20-30 s on 2 CPU
cores): the JSON it writes, the auto gain inside the target band, the paper gain outside it on the deepest model,
and its whole-network ratios against ``gaaf_patch.measure_gradient_scale`` computed separately."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
from pathlib import Path

import pytest
import torch

import gaaf_patch
from benchmarks import depth
from benchmarks.depth_measure import measure
from benchmarks.depth_models import build_at, entry_for, reinit_zero_head
from gaaf_patch.gradscale import SAFE


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the benchmark runs: on a busy 2-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("depth")
    threads = torch.get_num_threads()
    try:
        depth.main(["--quick", "--out", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    files = sorted(out.glob("depth-*-cpu.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), out


def _in_band(r: float | None) -> bool:
    return r is not None and SAFE[0] <= r <= SAFE[1]


def test_files_and_metadata(quick: tuple[dict, Path]) -> None:
    results, out = quick
    date = _dt.date.today().isoformat()
    assert (out / f"depth-{date}-cpu.json").is_file()
    png = out / f"depth-{date}-cpu.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert results["command"][:3] == ["python", "-m", "benchmarks.depth"] and "--quick" in results["command"]
    m = results["machine"]
    assert m["torch"] == torch.__version__ and m["git_commit"] and m["cpu_count"]
    assert results["settings"]["seed"] == depth.SEED and results["settings"]["target"] == list(SAFE)
    assert results["models"] == [s for s, _ in depth.QUICK_MODELS]
    assert [r["model"] for r in results["init"]] == results["models"]
    assert results["trained_models"] == list(depth.QUICK_TRAINED)


def test_init_entries(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    for r in results["init"]:
        assert r["status"] == "ok", r
        assert r["input_size"] == [3, 64, 64] and r["batch"] == depth.BATCH
        assert r["forward_identical"] == {"paper": True, "auto": True}  # same masks, same forward
        assert r["sites"]["paper"] == r["sites"]["auto"] > 0
        assert not r["zero_gradient"]
        stages = r["stages"]
        assert len(stages) >= 2 and r["stage_source"] == "timm feature_info"
        depths = [s["depth"] for s in stages]
        assert depths == sorted(depths) and depths[-1] == 1.0
        for s in stages:
            assert s["plain"] > 0 and s["paper"] > 0 and s["auto"] > 0
            assert s["paper_ratio"] == pytest.approx(s["paper"] / s["plain"])
            assert _in_band(s["auto_ratio"]), (r["model"], s)
        for key in ("input", "params"):
            assert _in_band(r["whole"]["auto"][key]), (r["model"], r["whole"])
        assert r["in_target"] is True


def test_paper_gain_compounds_on_the_deepest_model(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    deepest = max(results["init"], key=lambda r: r["sites"]["paper"])
    assert deepest["model"] == "resnet50"
    w = deepest["whole"]
    for key in ("input", "params"):
        assert w["paper"][key] > SAFE[1] and w["paper"][key] > 10 * w["auto"][key], w
    # the paper gain grows toward the input: the first stage's ratio is far above the last one's
    first, last = deepest["stages"][0], deepest["stages"][-1]
    assert first["paper_ratio"] > 100 * last["paper_ratio"]
    # nothing GAAF after layer4 (pool, fc): the gradient there is the plain one, bit for bit or nearly
    assert last["name"] == "layer4" and last["paper_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_trained_entry(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    (r,) = results["trained"]
    assert r["status"] == "ok", r
    assert r["checkpoint"]["strict"] is True and r["checkpoint"]["max_abs_change_from_init"] > 0
    assert r["train"]["steps"] == depth.QUICK_TRAIN.steps
    assert r["train"]["final_loss"] < r["train"]["first_loss"]
    assert r["train"]["train_acc"] > 0.2  # chance is 0.1
    for when in ("init", "trained"):
        for key in ("input", "params"):
            assert _in_band(r[when]["whole"]["auto"][key]), (when, r[when]["whole"])
    s = results["summary"]
    assert s["init_auto_in_target"] == len(results["init"]) and s["trained_auto_in_target"] == 1
    assert s["init_auto_out_of_target"] == [] and s["init_errors"] == []


def test_whole_network_ratios_match_measure_gradient_scale(quick: tuple[dict, Path]) -> None:
    results, _ = quick
    row = next(r for r in results["init"] if r["model"] == "test_vit")
    model, x, _ = build_at(entry_for("test_vit"), (64,), depth.BATCH)
    for g in depth.GAINS:
        patched = gaaf_patch.patch(copy.deepcopy(model), gain=g)
        scale = gaaf_patch.measure_gradient_scale(patched, x, seed=depth.SEED)
        for key in ("input", "params"):
            want = getattr(scale, key)
            assert math.isfinite(want)
            assert row["whole"][g][key] == pytest.approx(want, rel=1e-4), (g, key)


def test_plan_and_table() -> None:
    args = depth.parse_args(["--models", "resnet50,test_vit", "--no-trained"])
    init, trained = depth.plan(args)
    assert init == [("resnet50", "depth", (None,)), ("test_vit", "selected", depth.ZOO_SIZES)] and trained == []
    args = depth.parse_args(["--quick"])
    init, trained = depth.plan(args)
    assert [s for s, _, _ in init] == [s for s, _ in depth.QUICK_MODELS] and trained == list(depth.QUICK_TRAINED)


def test_zero_head_is_reported_then_redrawn() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.nn.init.zeros_(model[2].weight)
    torch.nn.init.zeros_(model[2].bias)
    x = torch.randn(4, 8)
    m = measure(model, x)
    assert m["zero_gradient"] is True and m["in_target"] is None
    assert m["whole"]["auto"] == {"input": None, "params": None}
    assert m["stages"] == [] and m["stage_source"].startswith("none")
    assert reinit_zero_head(model) == ["2"] and bool(model[2].weight.any())
    m = measure(model, x)
    assert not m["zero_gradient"] and m["in_target"] is True
    assert m["forward_identical"] == {"paper": True, "auto": True}
