"""``--resume`` means the same final bytes as an uninterrupted run, for every data source and worker count; options
that cannot change on resume are refused; ``--lr`` and ``--epochs`` take effect as docs/finetune.md says.

Each source is trained for 3 epochs in one go, and again with a Ctrl-C in the second epoch followed by ``--resume``;
the weights must be equal bit for bit. The models have dropout, so every random draw of the run matters (torch's
generator in the forward; an image folder's random crops and flips in this process or in the loader's workers).
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch

import gaaf_patch.finetune.run as run
from gaaf_patch.cli import main
from tests.helpers import finetune_fails, load_checkpoint, write_image_folder

TOYS = '''
from torch import nn


def _mlp(inputs, num_classes):
    return nn.Sequential(nn.Linear(inputs, 48), nn.Tanh(), nn.Dropout(0.3), nn.Linear(48, num_classes))


def digits_net(num_classes=10):
    return _mlp(64, num_classes)


def mnist_net(num_classes=10):
    return _mlp(784, num_classes)


class Cnn(nn.Module):
    """Conv, ReLU, dropout on the features: a small image model whose training step draws random numbers."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def cnn(num_classes=10):
    return Cnn(num_classes)
'''


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toys") / "resume_toys.py"
    path.write_text(TOYS)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image-folder tree of generated PNGs: two classes of 12 images (22 train / 2 held out)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"), 12, 20, 24)


def _interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C at the start of the given (1-based) epoch of the next run."""
    real, calls = run.train_epoch, []

    def train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train_epoch", train_epoch)


def _straight_and_resumed(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[dict, dict]:
    """The checkpoints of ``args`` run in one go and run with a Ctrl-C in epoch 2, then ``--resume``-d."""
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert main(["finetune", *args, "--out", str(straight)]) == 0, capsys.readouterr().err
    with monkeypatch.context() as m:
        _interrupt_in_epoch(m, 2)
        assert main(["finetune", *args, "--out", str(resumed)]) == 130
    assert f"continue with --resume {resumed} (it holds epoch 1 of" in capsys.readouterr().err
    assert main(["finetune", *args, "--resume", str(resumed), "--out", str(resumed)]) == 0
    assert "resumed after epoch 1 of 3" in capsys.readouterr().out
    return load_checkpoint(straight), load_checkpoint(resumed)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    timing = ("train_seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in b["history"]
    ]


# ----------------------------------------------------------------------------------------------- bit-exact, per source


def test_digits_resume_is_bit_exact(toys, tmp_path, monkeypatch, capsys):
    args = [f"{toys}:digits_net", "--input-size", "64", "--opt", "adamw", "--lr", "3e-3", "--epochs", "3",
            "--batch-size", "64"]  # fmt: skip
    a, b = _straight_and_resumed(args, tmp_path, monkeypatch, capsys)
    _assert_same_weights(a, b)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # the test can fail: resumed without the saved random state, the dropout masks (and so the weights) differ
    x = tmp_path / "x.pt"
    with monkeypatch.context() as m:
        _interrupt_in_epoch(m, 2)
        assert main(["finetune", *args, "--out", str(x)]) == 130
    monkeypatch.setattr(run, "restore_rng", lambda state: None)
    assert main(["finetune", *args, "--resume", str(x), "--out", str(x)]) == 0
    assert not torch.equal(a["state_dict"]["0.weight"], load_checkpoint(x)["state_dict"]["0.weight"])
    capsys.readouterr()


def test_mnist_resume_is_bit_exact(mnist_dir, toys, tmp_path, monkeypatch, capsys):
    args = [f"{toys}:mnist_net", "--input-size", "784", "--data", "mnist", "--data-dir", str(mnist_dir),
            "--epochs", "3", "--batch-size", "1024", "--lr", "0.05"]  # fmt: skip
    _assert_same_weights(*_straight_and_resumed(args, tmp_path, monkeypatch, capsys))


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_resume_is_bit_exact(workers, toys, folder, tmp_path, monkeypatch, capsys):
    """With workers the augmentation runs in the loader's processes, seeded per epoch; without, in this process,
    whose Python ``random`` (timm's random-resized crop) the run seeds and the checkpoint saves."""
    args = [f"{toys}:cnn", "--input-size", "3,16,16", "--data", str(folder), "--num-classes", "2",
            "--workers", str(workers), "--epochs", "3", "--batch-size", "4", "--lr", "0.05"]  # fmt: skip
    a, b = _straight_and_resumed(args, tmp_path, monkeypatch, capsys)
    _assert_same_weights(a, b)
    assert a["data_source"] == str(folder.resolve())


def test_image_folder_fresh_runs_with_one_seed_are_equal(toys, folder, tmp_path, capsys):
    """Python's ``random`` is seeded by the run (it was not: two runs with the same --seed differed), and the
    caller's own random state is given back."""
    args = ["finetune", f"{toys}:cnn", "--input-size", "3,16,16", "--data", str(folder), "--num-classes", "2",
            "--workers", "0", "--epochs", "1", "--batch-size", "4"]  # fmt: skip
    random.seed(1)
    assert main([*args, "--out", str(tmp_path / "a.pt")]) == 0
    assert random.random() == random.Random(1).random()  # the run did not consume the caller's state
    random.seed(2)
    assert main([*args, "--out", str(tmp_path / "b.pt")]) == 0
    a, b = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c.pt")]) == 0
    assert not torch.equal(a["head.weight"], load_checkpoint(tmp_path / "c.pt")["state_dict"]["head.weight"])
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------- changed options


@pytest.fixture
def one_epoch(toys, tmp_path, capsys) -> tuple[list[str], Path]:
    """A 1-of-3-epoch checkpoint of the digits MLP (the run was stopped after its first epoch)."""
    args = [f"{toys}:digits_net", "--input-size", "64", "--epochs", "3", "--batch-size", "64", "--lr", "0.01"]
    out = tmp_path / "one.pt"
    with pytest.MonkeyPatch.context() as m:
        _interrupt_in_epoch(m, 2)
        assert main(["finetune", *args, "--out", str(out)]) == 130
    capsys.readouterr()
    return args, out


def test_options_that_cannot_change_on_resume_are_refused(one_epoch, toys, folder, capsys):
    args, ckpt = one_epoch
    before = ckpt.read_bytes()
    resume = ["--resume", str(ckpt), "--out", str(ckpt)]
    err = finetune_fails([*args, *resume, "--opt", "adamw"], capsys)  # was "error: step", from inside the optimizer
    assert "the run was started with --opt sgd (now adamw)" in err and "cannot change on resume" in err
    err = finetune_fails([*args, *resume, "--batch-size", "32", "--seed", "5", "--weight-decay", "0.1"], capsys)
    assert "--batch-size 64 (now 32); --weight-decay 0.0 (now 0.1); --seed 0 (now 5)" in err
    assert "--sched cosine (now constant)" in finetune_fails([*args, *resume, "--sched", "constant"], capsys)
    assert "--momentum 0.9 (now 0.5)" in finetune_fails([*args, *resume, "--momentum", "0.5"], capsys)
    assert f"--data digits (now {folder.resolve()})" in finetune_fails([*args, *resume, "--data", str(folder)], capsys)
    assert "--input-size 64 (now 8,8)" in finetune_fails([*args, *resume, "--input-size", "8,8"], capsys)
    assert ckpt.read_bytes() == before  # nothing was trained, nothing written


def test_resume_with_more_epochs_rebuilds_the_schedule(one_epoch, capsys):
    """--epochs 3 -> 5 after epoch 1: the cosine runs over 5 epochs from where it is, never back up."""
    args, ckpt = one_epoch
    steps = load_checkpoint(ckpt)["steps_per_epoch"]
    assert main(["finetune", *args, "--epochs", "5", "--resume", str(ckpt), "--out", str(ckpt)]) == 0
    assert "schedule rebuilt for --lr 0.01 and --epochs 5" in capsys.readouterr().out
    lrs = [row["lr"] for row in load_checkpoint(ckpt)["history"]]
    assert steps == 22 and len(lrs) == 5
    assert lrs[0] == pytest.approx(0.01 * (1 + math.cos(math.pi / 3)) / 2)  # epoch 1 ran on the 3-epoch curve
    for epoch in range(2, 6):  # the 5-epoch curve (the old code went back up: T stayed 3 epochs)
        assert lrs[epoch - 1] == pytest.approx(0.01 * (1 + math.cos(math.pi * epoch / 5)) / 2, abs=1e-12)
    assert lrs[-1] < 1e-12 and all(x > y for x, y in zip(lrs[1:], lrs[2:], strict=False))


def test_resume_with_another_lr_uses_it(one_epoch, tmp_path, capsys):
    """The new --lr is the new base learning rate (it was silently ignored), on the curve at the resumed step."""
    args, ckpt = one_epoch
    shutil.copy(ckpt, tmp_path / "copy.pt")
    assert main(["finetune", *args, "--lr", "0.1", "--resume", str(ckpt), "--out", str(ckpt)]) == 0
    ck = load_checkpoint(ckpt)
    assert ck["args"]["lr"] == 0.1
    assert ck["history"][1]["lr"] == pytest.approx(0.1 * (1 + math.cos(2 * math.pi / 3)) / 2)
    # --sched constant: the new rate from the next step on
    const = [a if a != "0.01" else "0.02" for a in args] + ["--sched", "constant"]
    out = tmp_path / "const.pt"
    with pytest.MonkeyPatch.context() as m:
        _interrupt_in_epoch(m, 2)
        assert main(["finetune", *const, "--out", str(out)]) == 130
    assert main(["finetune", *const, "--lr", "0.05", "--resume", str(out), "--out", str(out)]) == 0
    assert [row["lr"] for row in load_checkpoint(out)["history"]] == [0.02, 0.05, 0.05]
    capsys.readouterr()
