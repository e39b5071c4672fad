"""Faults and bad input in ``gaaf-patch finetune``: one line and exit 2 for what the user fixes, one line and exit
130/143 for an interrupt, and the last good checkpoint intact in every case (docs/reliability.md lists them).

Signals are sent to a real ``python -m gaaf_patch.cli finetune`` process once its first checkpoint exists; the
failures in the middle of a checkpoint write are made by a file whose ``write`` raises, under torch's own writer.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gaaf_patch.cli import main
from gaaf_patch.finetune import atomic_save
from gaaf_patch.finetune.checkpoint import stray_temps
from tests.helpers import finetune_fails, load_checkpoint, write_image_folder

ROOT = Path(__file__).resolve().parents[2]
RESNET = ["test_resnet", "--input-size", "3,16,16"]


@pytest.fixture(scope="module")
def epoch1(tmp_path_factory) -> Path:
    """A checkpoint after 1 of 3 epochs of test_resnet on digits (the run was stopped in its second epoch)."""
    import gaaf_patch.finetune.run as run

    out = tmp_path_factory.mktemp("e1") / "e1.pt"
    real, calls = run.train_epoch, []

    def stop_in_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run, "train_epoch", stop_in_second)
        assert main(["finetune", *RESNET, "--epochs", "3", "--out", str(out)]) == 130
    return out


# ----------------------------------------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image-folder tree of generated PNGs, 2 classes of 40 (loader workers decode them)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"), 40, 32, 32)


@pytest.mark.parametrize(
    "sig, group, workers",
    [(signal.SIGTERM, False, 0), (signal.SIGTERM, True, 2), (signal.SIGINT, True, 2)],
    ids=["TERM-process", "TERM-group-workers", "INT-group-workers"],
)
def test_a_signal_stops_with_one_line_and_keeps_the_checkpoint(sig, group, workers, folder, tmp_path):
    """SIGTERM printed nothing and left whatever it interrupted; now it takes Ctrl-C's path. Sent to the process
    group (a terminal's Ctrl-C, ``docker stop``), it also reaches the loader's workers, which must not turn it into
    a "DataLoader worker ... is killed by signal" error or a worker's traceback."""
    out = tmp_path / "run.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    data = ["--data", str(folder), "--num-classes", "2", "--batch-size", "8"] if workers else []
    cmd = [sys.executable, "-m", "gaaf_patch.cli", "finetune", *RESNET, *data, "--workers", str(workers),
           "--epochs", "50", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit it ignored
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint after 120 s"
        time.sleep(0.1)  # the next epoch's loader workers are starting: the worst moment
        (os.killpg if group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    word = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert proc.returncode == 128 + sig, err
    # the interrupt is the last line and the only one from it (a warning of the run's, e.g. PyTorch's about more
    # loader workers than CPUs, may come before)
    last = err.splitlines()[-1]
    assert last.startswith(f"gaaf-patch: {word}; the last checkpoint is {out}"), err
    assert "Traceback" not in err and "Error" not in err and err.count("gaaf-patch:") == 1, err
    epoch = load_checkpoint(out)["epoch"]  # loads: not torn
    assert last.endswith(f"continue with --resume {out} (it holds epoch {epoch} of 50)")
    assert stray_temps(out) == []


def _failing_write(exc: BaseException, after: int):
    """torch.save with a file whose write raises ``exc`` after ``after`` writes, under torch's own zip writer:
    what Ctrl-C or a full disk does in the middle of a checkpoint write."""
    real_save = torch.save

    class Failing(io.RawIOBase):
        def __init__(self, f) -> None:
            self.f, self.n = f, 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.n += 1
            if self.n > after:
                raise exc
            return self.f.write(b)

    def save(obj, f, *args, **kwargs):
        return real_save(obj, Failing(f), *args, **kwargs)

    return save


@pytest.mark.parametrize("after", [0, 3])  # at the first write; in the middle (torch then raises a RuntimeError)
def test_ctrl_c_during_a_checkpoint_write(epoch1, after, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(epoch1.read_bytes())
    monkeypatch.setattr(torch, "save", _failing_write(KeyboardInterrupt(), after))
    code = main(["finetune", *RESNET, "--epochs", "3", "--resume", str(ckpt), "--out", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1, err
    assert f"interrupted; the last checkpoint is {ckpt}: continue with --resume {ckpt} (it holds epoch 1 of 3)" in err
    assert ckpt.read_bytes() == epoch1.read_bytes() and stray_temps(ckpt) == []


@pytest.mark.parametrize("after", [0, 3])
def test_full_disk_during_a_checkpoint_write(epoch1, after, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(epoch1.read_bytes())
    monkeypatch.setattr(torch, "save", _failing_write(OSError(28, "No space left on device"), after))
    err = finetune_fails([*RESNET, "--epochs", "3", "--resume", str(ckpt), "--out", str(ckpt)], capsys)
    assert f"cannot write the checkpoint {ckpt}: [Errno 28] No space left on device" in err
    assert f"the last good checkpoint {ckpt} (epoch 1) is unchanged" in err
    assert ckpt.read_bytes() == epoch1.read_bytes() and stray_temps(ckpt) == []


def test_a_killed_write_leaves_a_temp_file_the_next_start_removes(tmp_path, capsys):
    """SIGKILL cannot be handled: its temporary file stays until the next run with that --out removes it, and
    nothing but that pattern is touched."""
    out = tmp_path / "k.pt"
    stray = tmp_path / ".k.pt.1a2b3c4d.tmp"
    others = [".k.pt.keep.tmp", ".other.pt.1a2b3c4d.tmp", "k.pt.1a2b3c4d.tmp", ".k.pt.1a2b3c4d.tmp.bak"]
    for name in [stray.name, *others]:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    assert stray_temps(out) == [stray]
    assert main(["finetune", *RESNET, "--epochs", "1", "--out", str(out)]) == 0
    assert f"removed {stray}" in capsys.readouterr().out
    assert not stray.exists() and all((tmp_path / n).exists() for n in others) and load_checkpoint(out)["epoch"] == 1


def test_checkpoints_honour_the_umask(tmp_path):
    """0644 under umask 022, 0640 under 027 (mkstemp made them 0600); a replaced file keeps its mode."""
    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.ones(1)}, tmp_path / "a.pt")
        os.umask(0o027)
        atomic_save({"x": torch.ones(1)}, tmp_path / "b.pt")
        created = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.pt", "b.pt")}
        (tmp_path / "a.pt").chmod(0o600)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
        (tmp_path / "b.pt").chmod(0o664)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert created == {"a.pt": 0o644, "b.pt": 0o640}
    replaced = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.pt", "b.pt")}
    assert replaced == {"a.pt": 0o600, "b.pt": 0o664} and load_checkpoint(tmp_path / "a.pt")["x"].item() == 0


# ---------------------------------------------------------------------------------------------------- the output file


def test_an_existing_out_is_not_replaced_unless_asked(epoch1, tmp_path, capsys):
    out = tmp_path / "o.pt"
    out.write_bytes(b"another run's checkpoint")
    err = finetune_fails([*RESNET, "--out", str(out)], capsys)
    assert f"--out {out} already exists; continue that run with --resume {out}, replace it with --overwrite" in err
    err = finetune_fails([*RESNET, "--resume", str(epoch1), "--out", str(out)], capsys)
    assert "already exists and is not the --resume file; replace it with --overwrite" in err
    assert out.read_bytes() == b"another run's checkpoint"
    assert main(["finetune", *RESNET, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out)["epoch"] == 1 and load_checkpoint(out)["args"]["overwrite"] is True
    capsys.readouterr()


def test_out_may_not_be_the_checkpoint_it_starts_from(epoch1, tmp_path, capsys):
    ckpt = tmp_path / "pre.pt"
    ckpt.write_bytes(epoch1.read_bytes())
    for extra in ([], ["--overwrite"]):
        err = finetune_fails([*RESNET, "--checkpoint", str(ckpt), "--out", str(ckpt), *extra], capsys)
        assert f"--out {ckpt} is the --checkpoint the run starts from; choose another --out" in err
    assert ckpt.read_bytes() == epoch1.read_bytes()


def test_an_unwritable_out_fails_before_training(tmp_path, monkeypatch, capsys):
    import gaaf_patch.finetune.run as run

    if os.geteuid() == 0:  # root writes into a read-only mode folder; /sys refuses even root
        where = Path("/sys")
    else:
        where = tmp_path / "ro"
        where.mkdir()
        where.chmod(0o555)
    monkeypatch.setattr(run, "train_epoch", lambda *a, **k: pytest.fail("trained before checking --out"))
    err = finetune_fails([*RESNET, "--out", str(where / "x.pt")], capsys)
    assert f"--out {where / 'x.pt'}: cannot write in {where}" in err and "choose another --out" in err
    assert f"--out {tmp_path} is a folder" in finetune_fails([*RESNET, "--out", str(tmp_path)], capsys)


# ------------------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(epoch1, tmp_path, capsys):
    """``--lr 1e30`` trained on and saved NaN weights over the last good checkpoint every epoch."""
    assert "--lr must be a positive finite number, got inf" in finetune_fails([*RESNET, "--lr", "inf"], capsys)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(epoch1.read_bytes())
    err = finetune_fails([*RESNET, "--epochs", "3", "--lr", "1e30", "--resume", str(ckpt), "--out", str(ckpt)], capsys)
    assert "training diverged: the training loss is nan" in err and "in epoch 2/3" in err
    assert f"the last good checkpoint {ckpt} (epoch 1) is unchanged; lower --lr (now 1e+30)" in err
    assert ckpt.read_bytes() == epoch1.read_bytes()
    fresh = tmp_path / "fresh.pt"
    err = finetune_fails([*RESNET, "--epochs", "1", "--lr", "1e30", "--out", str(fresh)], capsys)
    assert "in epoch 1/1; nothing of this epoch was saved and no checkpoint was written" in err
    assert not fresh.exists() and stray_temps(fresh) == []


# ------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_image_is_named(workers, folder, tmp_path, capsys):
    """A loader worker's error came back with the worker's whole traceback as its message, and named no file."""
    import shutil

    broken = tmp_path / "imgs"
    shutil.copytree(folder, broken)
    (broken / "dog" / "3.png").write_bytes((folder / "dog" / "3.png").read_bytes()[:100])
    err = finetune_fails([*RESNET, "--data", str(broken), "--num-classes", "2", "--workers", str(workers),
                  "--batch-size", "80", "--out", str(tmp_path / "o.pt")], capsys)  # fmt: skip
    assert err == (
        f"gaaf-patch: error: cannot read the image {broken / 'dog' / '3.png'} (OSError: image file is truncated); "
        "replace or remove it\n"
    )


def test_bad_inputs_are_one_line_saying_what_to_do(tmp_path, capsys):
    err = finetune_fails(["test_resnet", "--input-size", "1,32,32"], capsys)  # was a RuntimeError from the first step
    assert "ResNet does not take input 1,32,32: RuntimeError:" in err
    assert err.rstrip().endswith("its first convolution takes 3 channels, so pass --input-size 3,H,W")
    assert "values per sample" in finetune_fails(["test_resnet", "--input-size", "3,100000,100000"], capsys)
    err = finetune_fails([*RESNET, "--device", "bogus"], capsys)
    assert err == "gaaf-patch: error: --device bogus: not a device name; use auto, cpu, cuda or cuda:N\n"
    if not torch.cuda.is_available():
        assert "no CUDA device is visible; use --device cpu" in finetune_fails([*RESNET, "--device", "cuda:0"], capsys)
    empty, text = tmp_path / "empty.pt", tmp_path / "notes.txt"
    empty.touch()
    text.write_text("hello, these are my notes\n")
    err = finetune_fails([*RESNET, "--checkpoint", str(empty)], capsys)  # was "EOFError:"
    assert f"cannot read checkpoint {empty}: the file is empty (0 bytes" in err and "torch.save" in err
    err = finetune_fails([*RESNET, "--checkpoint", str(text)], capsys)  # was "KeyError: 101"
    assert f"cannot read checkpoint {text}: not a file torch.save writes" in err and "b'hello, t'" in err
    assert "--workers must be 0" in finetune_fails([*RESNET, "--workers", "-1"], capsys)
