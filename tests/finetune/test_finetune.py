"""``gaaf-patch finetune``: checkpoint in, GAAF training, checkpoint out that deploys into the unpatched model.

The end-to-end tests run the CLI in-process on scikit-learn's digits with timm's ``test_resnet`` at 16x16 (an epoch
is about a second on one CPU thread) and a flat toy MLP with dropout. The distributed test launches two real processes
with torchrun. Resuming is tested in test_resume.py, faults and bad input in test_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from gaaf_patch import data
from gaaf_patch.cli import main
from gaaf_patch.finetune import (
    HeadError,
    InputAdapter,
    atomic_save,
    find_classifier,
    normalization,
    replace_classifier,
    state_digest,
)
from tests.helpers import finetune_fails, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RESNET = ["test_resnet", "--input-size", "3,16,16"]
TOY = '''
from torch import nn


class Net(nn.Module):
    """A flat MLP with tanh and dropout (dropout makes a resumed run depend on the restored random state)."""

    def __init__(self, num_classes=10, inputs=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, 48), nn.Tanh(), nn.Dropout(0.2), nn.Linear(48, 32), nn.Tanh())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def net(num_classes=10):
    return Net(num_classes)


def mnist_net(num_classes=10):
    return Net(num_classes, inputs=784)
'''


def _held_out(size=(3, 16, 16), model=None):
    """The digits split the command evaluates on, adapted as it adapts it."""
    _, val = data.holdout(data.digits(), 0.2)
    norm = normalization(model, size[0]) if model is not None else None
    return InputAdapter(size, norm)(val.images), val.labels


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A plain state_dict of an *unpatched* test_resnet trained briefly on digits by a bare torch loop."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=10)
    train, _ = data.holdout(data.digits(), 0.2)
    adapt = InputAdapter((3, 16, 16), normalization(model, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(2):
        for i in range(0, len(train) - 63, 64):
            loss = nn.functional.cross_entropy(model(adapt(train.images[i : i + 64])), train.labels[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("pre") / "plain.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toy") / "toy_net.py"
    path.write_text(TOY)
    return f"{path}:net"


# ------------------------------------------------------------------------------------------------------ end to end


def test_finetune_deploys_into_the_unpatched_model(pretrained, tmp_path, capsys):
    out = tmp_path / "ft.pt"
    code = main(["finetune", *RESNET, "--checkpoint", str(pretrained), "--epochs", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "replaced 12 (relu 12)" in text and "deployment check" in text and "bit-identical" in text
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 2 and ckpt["num_classes"] == 10 and ckpt["gaaf_config"]["mode"] == "exact"
    assert ckpt["deploy_check"]["ok"] and ckpt["deploy_check"]["bit_identical"]
    assert ckpt["replicas"] == {"world_size": 1, "digests": [state_digest(ckpt["state_dict"])]}

    # the deployment path: a freshly built, never patched model, strict=True
    plain = timm.create_model("test_resnet", num_classes=10)
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    plain.eval()
    images, labels = _held_out(model=plain)
    with torch.no_grad():
        correct = int((plain(images).argmax(1) == labels).sum())
    last = ckpt["history"][-1]
    assert (correct, len(labels)) == (last["val_correct"], last["val_count"]) == (correct, 359)
    assert last["val_acc"] == pytest.approx(correct / 359)
    assert f"val loss {last['val_loss']:.4f} acc {last['val_acc']:.2%}" in text  # what was logged is what it is

    # fine-tuning changed the weights, and improved on the checkpoint it started from
    before = timm.create_model("test_resnet", num_classes=10)
    before.load_state_dict(torch.load(pretrained, weights_only=True))
    before.eval()
    with torch.no_grad():
        before_correct = int((before(images).argmax(1) == labels).sum())
    assert not torch.equal(before.fc.weight, plain.fc.weight)
    assert correct > before_correct and correct / 359 > 0.9

    # the file goes back into `gaaf-patch patch --checkpoint` (and so into --checkpoint/--resume here)
    assert main(["patch", *RESNET, "--num-classes", "10", "--checkpoint", str(out), "--json"]) == 0
    capsys.readouterr()


def test_reads_timm_ddp_and_gaaf_patch_out_checkpoints(pretrained, tmp_path, capsys):
    """The checkpoint formats --checkpoint takes, down to the weights they load (no training: that is above)."""
    from gaaf_patch.finetune.run import FinetuneOptions, _load_model

    plain = torch.load(pretrained, weights_only=True)
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": {f"module.{k}": v for k, v in plain.items()}},
               tmp_path / "timm.pt")  # fmt: skip
    assert main(["patch", *RESNET, "--num-classes", "10", "--checkpoint", str(pretrained),
                 "--out", str(tmp_path / "out.pt"), "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    for name in ("timm.pt", "out.pt"):
        model, ckpt, replaced = _load_model(FinetuneOptions("test_resnet", checkpoint=str(tmp_path / name)))
        assert replaced and model.fc.out_features == 10  # sized to the checkpoint's classifier, not timm's 1000
        assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items()), name


def test_gaaf_changes_training_and_no_patch_is_the_baseline(pretrained, tmp_path, capsys):
    """Same checkpoint, seed and batches: the GAAF gradient gives other weights than plain training."""
    common = [*RESNET, "--checkpoint", str(pretrained), "--epochs", "1", "--sched", "constant"]
    assert main(["finetune", *common, "--out", str(tmp_path / "g.pt")]) == 0
    assert main(["finetune", *common, "--no-patch", "--out", str(tmp_path / "p.pt")]) == 0
    assert "not patched (--no-patch)" in capsys.readouterr().out
    g, p = load_checkpoint(tmp_path / "g.pt"), load_checkpoint(tmp_path / "p.pt")
    assert g["gaaf_config"] is not None and p["gaaf_config"] is None
    assert g["state_dict"].keys() == p["state_dict"].keys()
    assert not torch.equal(g["state_dict"]["conv1.0.weight"], p["state_dict"]["conv1.0.weight"])
    assert p["deploy_check"]["bit_identical"]


def test_resume_when_done_does_nothing(toy, tmp_path, capsys):
    out = tmp_path / "t.pt"
    args = ["finetune", toy, "--input-size", "64", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    assert main([*args, "--resume", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out and out.read_bytes() == before


def test_amp_bf16_on_cpu(toy, tmp_path, capsys):
    out = tmp_path / "amp.pt"
    assert (
        main(["finetune", toy, "--input-size", "64", "--amp", "--lr", "0.05", "--epochs", "1", "--out", str(out)]) == 0
    )
    ckpt = load_checkpoint(out)
    assert ckpt["args"]["amp"] == "auto" and ckpt["deploy_check"]["bit_identical"]
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values())  # autocast: float32 master weights
    assert 0.2 < ckpt["history"][0]["val_acc"] <= 1  # learnt something (chance: 0.1)


@pytest.mark.slow
def test_compile_flag_trains_like_eager(toy, tmp_path, capsys):
    common = ["finetune", toy, "--input-size", "64", "--epochs", "1", "--strip-dropout"]
    assert main([*common, "--compile", "--out", str(tmp_path / "c.pt")]) == 0
    assert main([*common, "--out", str(tmp_path / "e.pt")]) == 0
    c, e = load_checkpoint(tmp_path / "c.pt"), load_checkpoint(tmp_path / "e.pt")
    for k in e["state_dict"]:
        torch.testing.assert_close(c["state_dict"][k], e["state_dict"][k], rtol=1e-3, atol=1e-4)


def test_mnist(mnist_dir, toy, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["finetune", toy.replace(":net", ":mnist_net"), "--input-size", "784", "--data", "mnist"]
    code = main([*args, "--data-dir", str(mnist_dir), "--epochs", "1", "--batch-size", "128", "--lr", "0.05",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    last = load_checkpoint(out)["history"][-1]
    assert last["val_count"] == 10_000 and last["val_acc"] > 0.9


def test_image_folder(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, cls in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(20, 24, 3, generator=g) * 60 + 150 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "f.pt"
    code = main(["finetune", *RESNET, "--data", str(tmp_path / "imgs"), "--num-classes", "2", "--workers", "0",
                 "--epochs", "1", "--batch-size", "8", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    ckpt = load_checkpoint(out)
    assert ckpt["num_classes"] == 2 and ckpt["state_dict"]["fc.weight"].shape == (2, 96)
    assert (ckpt["history"][0]["val_count"], "18 train / 2 val") == (2, text.split("imgs (")[1][:16])


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, value, value)).save(path)


def test_image_folders_train_val_layout_and_holdout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", 40 * i)
    train, val, classes = data.image_folders(tmp_path)
    assert (len(train), len(val), classes) == (6, 4, ["a", "b"])
    assert sorted(val.targets) == [0, 0, 1, 1]
    _png(tmp_path / "val" / "c" / "0.png", 0)  # a class only the validation split has
    with pytest.raises(data.DataError, match=r"different class folders \(2 vs 3: \['c'\]\)"):
        data.image_folders(tmp_path)

    digits = data.digits()
    tr, held = data.holdout(digits, 0.2)
    tr2, held2 = data.holdout(digits, 0.2)
    assert (len(tr), len(held)) == (1438, 359) and torch.equal(held.labels, held2.labels)
    everything = torch.cat([tr.images, held.images]).flatten(1)
    # a partition, nothing lost or doubled (pixels are k/16: these float32 sums are exact in any order)
    assert torch.equal(everything.sum(0), digits.images.flatten(1).sum(0))
    assert torch.equal(torch.sort(torch.cat([tr.labels, held.labels])).values, torch.sort(digits.labels).values)


# ------------------------------------------------------------------------------------------------------ bad inputs


def test_missing_and_unreadable_checkpoints(tmp_path, capsys):
    assert "no such checkpoint file" in finetune_fails([*RESNET, "--checkpoint", str(tmp_path / "nope.pt")], capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in finetune_fails([*RESNET, "--checkpoint", str(tmp_path / "junk.pt")], capsys)
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), tmp_path / "plain.pt")
    err = finetune_fails([*RESNET, "--resume", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "o.pt")], capsys)
    assert "not a fine-tuning checkpoint (no optimizer, epoch, rng)" in err


def test_checkpoint_of_another_architecture_names_the_keys(pretrained, capsys):
    err = finetune_fails(["test_efficientnet", "--input-size", "3,16,16", "--checkpoint", str(pretrained)], capsys)
    assert "is not a checkpoint of test_efficientnet" in err
    assert "missing key(s): conv_stem.weight" in err and "unexpected key(s): conv1.0.weight" in err


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "not an image-folder tree"),
        ({"a/readme.txt": "x", "b/notes.md": "y"}, "not an image-folder tree"),
        ({"train/a/x.txt": "x"}, "has train/ but no val"),
        ({"one.png": None}, "not an image-folder tree"),
    ],
)
def test_empty_or_malformed_data_folder(tmp_path, capsys, layout, message):
    for rel, text in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text or "")
    assert message in finetune_fails([*RESNET, "--data", str(tmp_path), "--workers", "0"], capsys)


def test_other_bad_options(pretrained, tmp_path, capsys):
    assert "no such folder (or use one of digits, mnist)" in finetune_fails([*RESNET, "--data", "digitz"], capsys)
    err = finetune_fails([*RESNET, "--checkpoint", str(pretrained), "--num-classes", "5"], capsys)
    assert "5 outputs but digits" in err and "10 classes" in err
    assert "no such directory" in finetune_fails([*RESNET, "--out", str(tmp_path / "no" / "x.pt")], capsys)
    assert "fp16 needs a CUDA device" in finetune_fails([*RESNET, "--amp", "fp16", "--device", "cpu"], capsys)
    assert "MNIST not found" in finetune_fails([*RESNET, "--data", "mnist", "--data-dir", str(tmp_path)], capsys)


def test_environment_errors_are_one_line(toy, tmp_path, monkeypatch, capsys):
    """A device torch does not know, a disk that is full at save time: the user's to fix, not internal errors."""
    assert "--device bogus" in finetune_fails([toy, "--input-size", "64", "--device", "bogus"], capsys)

    def full_disk(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    err = finetune_fails([toy, "--input-size", "64", "--epochs", "1", "--out", str(tmp_path / "t.pt")], capsys)
    assert f"cannot write the checkpoint {tmp_path / 't.pt'}" in err and "No space left on device" in err


# ----------------------------------------------------------------------------------------------------------- parts


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def torn(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_deploy_check_loads_into_the_unpatched_model_and_compares(toy):
    import gaaf_patch as gaaf
    from gaaf_patch.finetune.deploy import deploy_check
    from gaaf_patch.finetune.loop import Precision
    from gaaf_patch.finetune.options import FinetuneOptions
    from gaaf_patch.models import build_model

    batch, cpu = torch.randn(8, 64), Precision("cpu", None)
    exact = gaaf.patch(build_model(toy))
    r = deploy_check(FinetuneOptions(model=toy), exact, None, batch, cpu)
    assert r == {"ok": True, "strict_load": True, "bit_identical": True, "max_abs_diff": 0.0, "tolerance": 0.0,
                 "batch": [8, 64]}  # fmt: skip
    r = deploy_check(FinetuneOptions(model=toy), exact, 3, batch, cpu)  # an unpatched model with another head
    assert not r["ok"] and not r["strict_load"] and "head.weight" in r["error"]
    saw = gaaf.patch(build_model(toy), mode="sawtooth")
    r = deploy_check(FinetuneOptions(model=toy, patch={"mode": "sawtooth"}), saw, None, batch, cpu)
    assert r["ok"] and not r["bit_identical"] and 0 < r["max_abs_diff"] <= r["tolerance"]


def test_replace_classifier_timm_torchvision_and_user_models():
    import torchvision

    m = timm.create_model("test_resnet", num_classes=10)
    assert replace_classifier(m, 3) == "fc" and m.eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    tv = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    old = tv.classifier[0].weight.clone()
    assert replace_classifier(tv, 4) == "classifier.3" and tv.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert torch.equal(tv.classifier[0].weight, old)  # only the last Linear is new
    assert find_classifier(tv)[0] == "classifier.3" and find_classifier(m) == ("fc", m.fc)
    with pytest.raises(HeadError, match="fc, classifier, head, heads, last_linear"):
        replace_classifier(nn.Sequential(nn.Linear(4, 2)), 3)


def test_input_adapter():
    x = torch.rand(5, 1, 8, 8)
    y = InputAdapter((3, 16, 16))(x)
    assert y.shape == (5, 3, 16, 16) and torch.equal(y[:, 0], y[:, 2])
    const = InputAdapter((3, 16, 16), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))(torch.full((1, 1, 8, 8), 0.75))
    assert torch.allclose(const, torch.ones_like(const))  # (0.75 - 0.5) / 0.25, resizing a constant keeps it
    assert torch.equal(InputAdapter((64,))(x), x.flatten(1))
    with pytest.raises(ValueError, match="takes 10 inputs but an image has 64"):
        InputAdapter((10,))(x)
    rgb = torch.rand(2, 3, 4, 4)
    assert torch.allclose(InputAdapter((1, 4, 4))(rgb), rgb.mean(1, keepdim=True))


# ----------------------------------------------------------------------------------------------------- distributed


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "gaaf_patch.cli", "finetune", *RESNET, "--epochs", "1", "--batch-size", "32", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, textwrap.shorten(proc.stdout + proc.stderr, 3000)
    ckpt = load_checkpoint(out)
    digests = ckpt["replicas"]["digests"]
    assert ckpt["replicas"]["world_size"] == 2 and len(digests) == 2
    assert digests[0] == digests[1] == state_digest(ckpt["state_dict"])  # each rank hashed its own weights
    assert ckpt["history"][0]["val_count"] == 359  # the two unpadded shards cover the held-out set once
    assert proc.stdout.count("saved ") == 1  # only rank 0 prints and writes
