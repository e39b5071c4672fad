"""``gaaf-patch finetune`` under torchrun with 2 gloo processes on the CPU: DDP and ``--fsdp`` against one process,
the sharded checkpoint's export and resume, and a failing rank that must not leave the other one waiting.

Equality with one process: the 2-rank runs use ``--batch-size 32`` per process and the reference ``--batch-size 64``
in one process, so every optimizer step sees the same 64 samples (DistributedSampler gives rank r the indices
``r::2`` of the permutation one process walks in order). The model is a toy MLP with no BatchNorm and no dropout,
patched with ``--gain paper`` (elementwise: the default auto gain picks a coefficient per batch, so per rank, like
BatchNorm's statistics). The weights then differ only by float rounding: the mean of two half-batch mean gradients
is not the full-batch mean bit for bit, and 44 SGD-with-momentum steps carry that on. Measured: at most 2.2e-8 on
weights up to 0.23; the tolerance below (atol 1e-6, rtol 1e-5) leaves a 45x margin and still fails on any real
difference (a lost or doubled sample moves weights by ~1e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gaaf_patch.cli import main
from gaaf_patch.finetune import FinetuneError, state_digest

ROOT = Path(__file__).resolve().parents[2]
TOY = '''
from torch import nn


class Net(nn.Module):
    """An MLP whose middle layers sit in ``blocks`` (so --fsdp shards them one by one); no BatchNorm, no dropout."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Linear(64, 32)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2)))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x).tanh()))


def net(num_classes=10):
    return Net(num_classes)
'''
ATOL, RTOL = 1e-6, 1e-5
FAULT_TIMEOUT = 5  # --dist-timeout of the fault tests, seconds


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toy") / "toy_blocks.py"
    path.write_text(TOY)
    return f"{path}:net"


def _args(toy: str, *more: str) -> list[str]:
    return ["finetune", toy, "--input-size", "64", "--gain", "paper", "--epochs", "2", *more]


def _torchrun(args: list[str], fault: str | None = None, ok: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("GAAF_FINETUNE_FAULT", None)
    if fault:
        env["GAAF_FINETUNE_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "gaaf_patch.cli", *args]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    seconds = time.monotonic() - start
    if ok:
        assert proc.returncode == 0, textwrap.shorten(proc.stdout + proc.stderr, 3000)
    return proc, seconds


def _weights(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=name)


@pytest.fixture(scope="module")
def single(toy, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one") / "one.pt"
    assert main([*_args(toy, "--batch-size", "64"), "--out", str(out)]) == 0
    return _weights(out)


@pytest.fixture(scope="module")
def sharded(toy, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc, _ = _torchrun([*_args(toy, "--batch-size", "32", "--fsdp"), "--out", str(out)])
    return out, proc


def test_ddp_two_ranks_match_one_process(toy, single, tmp_path):
    out = tmp_path / "ddp.pt"
    _torchrun([*_args(toy, "--batch-size", "32"), "--out", str(out)])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["replicas"]["world_size"] == 2 and [row["epoch"] for row in ckpt["history"]] == [1, 2]
    _assert_close(ckpt["state_dict"], single)


def test_fsdp_two_ranks_match_one_process_and_export_deploys(toy, single, sharded):
    out, proc = sharded
    assert "sharded with FSDP2 over 2 processes" in proc.stdout
    assert proc.stdout.count(f"saved {out}.pt") == 1  # rank 0 writes the export
    assert "outputs bit-identical on a held-out batch ok" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt", "step_state.pt"
    ]  # fmt: skip
    step_state = torch.load(out / "step_state.pt", weights_only=True)
    assert step_state["epoch"] == 2 and step_state["deploy_check"]["bit_identical"] is True

    exported = torch.load(f"{out}.pt", weights_only=True)  # one plain state_dict
    _assert_close(exported, single)
    sys.path.insert(0, str(Path(toy.split(":")[0]).parent))
    try:
        import toy_blocks
    finally:
        sys.path.pop(0)
    plain = toy_blocks.net()
    plain.load_state_dict(exported, strict=True)  # the unpatched model, no FSDP


def test_fsdp_failing_rank_is_named_then_resume_is_bit_exact(toy, sharded, tmp_path):
    """Rank 1 raises (an I/O error) at the start of epoch 2: it says so, rank 0 stops with a line naming rank 1,
    both exit non-zero at once (not after the timeout). The epoch-1 checkpoint is intact, and resuming from it ends
    with the uninterrupted run's exact bytes."""
    reference, _ = sharded
    out = tmp_path / "run"
    args = [*_args(toy, "--batch-size", "32", "--fsdp"), "--out", str(out)]
    proc, seconds = _torchrun([*args, "--dist-timeout", "30"], fault="1:2:oserror", ok=False)
    assert proc.returncode != 0 and seconds < 60
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gaaf-patch: ")]
    assert "gaaf-patch: error: rank 1 of 2: input/output error: OSError: injected fault on rank 1" in proc.stderr
    assert any(line.startswith("gaaf-patch: error: rank 0 of 2 stopped: rank 1 failed: input/output error") for line
               in lines), textwrap.shorten(proc.stdout + proc.stderr, 3000)  # fmt: skip
    assert torch.load(out / "step_state.pt", weights_only=True)["epoch"] == 1
    assert not Path(f"{out}.pt").exists()

    proc, _ = _torchrun([*args, "--resume", str(out)])
    assert "resumed after epoch 1 of 2" in proc.stdout
    resumed, uninterrupted = _weights(Path(f"{out}.pt")), _weights(Path(f"{reference}.pt"))
    assert state_digest(resumed) == state_digest(uninterrupted)


@pytest.mark.slow
def test_ddp_hung_rank_times_out(toy, tmp_path):
    """Rank 1 hangs (outside any collective) in epoch 1: rank 0 gives up after --dist-timeout with one line saying
    so, exits non-zero, and torchrun then stops rank 1."""
    args = [*_args(toy, "--batch-size", "32"), "--out", str(tmp_path / "x.pt"), "--dist-timeout", str(FAULT_TIMEOUT)]
    proc, seconds = _torchrun(args, fault="1:1:hang", ok=False)
    assert proc.returncode != 0 and seconds < 60
    assert f"rank 0 of 2 stopped: no answer from the other processes within --dist-timeout {FAULT_TIMEOUT} s" in (
        proc.stderr
    ), textwrap.shorten(proc.stdout + proc.stderr, 3000)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_without_resharding(toy, tmp_path):
    out = tmp_path / "r"
    args = ["--batch-size", "32", "--fsdp", "--amp", "bf16", "--fsdp-reshard-after-forward", "off"]
    proc, _ = _torchrun([*_args(toy, *args), "--out", str(out)])
    assert "parameters in bfloat16" in proc.stdout and "bit-identical on a held-out batch ok" in proc.stdout


def test_fsdp_amp_refuses_batchnorm():
    import timm

    from gaaf_patch.finetune import sharded
    from gaaf_patch.finetune.loop import Precision

    with pytest.raises(FinetuneError, match=r"--fsdp --amp: the model has BatchNorm \(conv1\.1 and \d+ more\)"):
        sharded.mixed_precision(Precision("cpu", torch.bfloat16), timm.create_model("test_resnet"))
    assert sharded.mixed_precision(Precision("cpu"), timm.create_model("test_resnet"))[0] is None


# ------------------------------------------------------------------------------------------- refused at once, in-process


@pytest.mark.parametrize(
    ("world", "extra", "message"),
    [
        ("1", [], "--fsdp shards the model over processes: run under 'torchrun --nproc-per-node N' with N >= 2"),
        ("2", ["--out", "OUT.pt"], "--fsdp --out OUT.pt: name a folder for the sharded checkpoint, e.g. --out OUT"),
        ("2", ["--amp", "fp16"], "--fsdp --amp fp16 is not supported (it needs a sharded loss scaler); use --amp bf16"),
        ("2", ["--compile"], "--fsdp with --compile is not supported yet"),
        ("2", ["--resume", "FILE"], "is a file; with --fsdp resume from the folder an --fsdp run wrote"),
        ("2", ["--resume", "EMPTY"], "no sharded checkpoint there (no .metadata)"),
        ("2", ["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds"),
    ],
)
def test_fsdp_refusals_are_one_line(toy, tmp_path, monkeypatch, capsys, world, extra, message):
    monkeypatch.setenv("WORLD_SIZE", world)  # checked before the process group is joined
    (tmp_path / "FILE").write_bytes(b"x")
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / a) if a in ("OUT.pt", "FILE", "EMPTY") else a for a in extra]
    message = message.replace("OUT", str(tmp_path / "OUT"))
    assert main([*_args(toy, "--fsdp"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_sharded_checkpoint_needs_fsdp_and_an_existing_out_is_kept(toy, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    assert main([*_args(toy), "--resume", str(folder)]) == 2
    assert "is a folder of shards written by an --fsdp run; add --fsdp" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*_args(toy, "--fsdp"), "--out", str(folder)]) == 2
    assert f"{folder} already exists; continue that run with --resume {folder}" in capsys.readouterr().err


def test_a_sharded_checkpoint_resumes_only_with_its_world_size(toy, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*_args(toy, "--fsdp"), "--resume", str(folder), "--out", str(folder)]) == 2
    assert "no step_state.pt; not written by gaaf-patch finetune --fsdp" in capsys.readouterr().err
    torch.save({"epoch": 1, "replicas": {"world_size": 4, "digests": []}}, folder / "step_state.pt")
    assert main([*_args(toy, "--fsdp"), "--resume", str(folder), "--out", str(folder)]) == 2
    assert f"--resume {folder} was written by 4 processes, this job has 2" in capsys.readouterr().err
