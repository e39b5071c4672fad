"""The ``gaaf-patch`` command line, run in-process through ``main(argv)``.

Models are random-init and small (timm/torchvision resnet18 on 32x32 inputs, toy models from a factory file), so the
whole file runs in seconds on a CPU; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from gaaf_patch import PatchConfig, patch, report, shapes
from gaaf_patch.cli import main
from gaaf_patch.models import build_model

SMALL = ["--input-size", "3,32,32"]

FACTORY = textwrap.dedent(
    """
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.Tanh()
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.drop(self.act(self.conv(x)))
            x = F.dropout(x, 0.1, self.training)
            return self.head(F.relu(x).mean((2, 3)))


    def make_net(num_classes=10):
        return Net(num_classes)


    def not_a_model():
        return 3
    """
)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    rc = main([*argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)  # --json: stdout is the JSON document and nothing else


def counted_sites(spec: str, input_size: tuple[int, ...] = (3, 32, 32)):
    """The activation sites of the model ``spec`` names, counted in the test from the ops its forward runs."""
    from tests.helpers import count_activation_sites

    return count_activation_sites(build_model(spec, None, input_size), torch.randn(2, *input_size))


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("gaaf-patch: error: ")
    return lines[0]


def test_timm_model_json_exact_is_bit_identical(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, ["resnet18", *SMALL, "--num-classes", "10"])
    assert rc == 0
    assert doc["model"] == "resnet18"
    rep = doc["report"]
    assert rep["summary"]["replaced"] == counted_sites("resnet18").sites == len(rep["replaced"])
    assert {r["activation"] for r in rep["replaced"]} == {"relu"}
    assert "act1" in {r["name"] for r in rep["replaced"]}
    v = doc["verification"]
    assert v["ok"] is True
    assert v["input_shape"] == [2, 3, 32, 32]
    assert v["output"] == {"ok": True, "check": "bit-identical", "max_abs_diff": 0.0, "tolerance": 0.0}
    assert v["gradient"]["ok"] is True and v["gradient"]["expect"] == "differ"
    assert v["gradient"]["max_abs_diff"] > 0
    assert doc["patch_seconds"] > 0
    assert rep["config"]["mode"] == "exact"


def test_patch_subcommand_is_the_default(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    argv = [f"{factory_file}:make_net", "--input-size", "3,8,8", "--num-classes", "5"]
    rc_short, short = run_json(capsys, argv)
    rc_long, long = run_json(capsys, ["patch", *argv])
    assert rc_short == rc_long == 0
    assert short["report"]["replaced"] == long["report"]["replaced"]
    assert short["verification"] == long["verification"]  # seeded init and batch: runs are reproducible


def test_torchvision_model(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, ["tv:resnet18", *SMALL, "--num-classes", "10"])
    assert rc == 0 and doc["verification"]["ok"] is True
    # torchvision's resnet18 calls one ReLU module twice per block: one site per module, each replaced once
    assert len(doc["report"]["replaced"]) == counted_sites("tv:resnet18").sites
    assert "layer1.0.relu" in {r["name"] for r in doc["report"]["replaced"]}


def test_torchvision_vit_takes_the_input_size_and_its_zero_head_is_not_a_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # torchvision's ViTs are built for one image_size; their head starts at zero, so no input gradient exists to compare
    assert main(["tv:vit_b_16", "--input-size", "3,32,32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verification"]["input_shape"] == [2, 3, 32, 32]
    assert doc["verification"]["output"]["check"] == "bit-identical" and doc["verification"]["ok"]
    assert "does not depend on the input" in json.dumps(doc["verification"])
    assert doc["report"]["summary"]["by_activation"] == dict(counted_sites("tv:vit_b_16").by_activation)


def test_rich_output_lists_sites_and_summary(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    assert main([f"{factory_file}:make_net", "--input-size", "3,8,8", "--shape", "relu=gauss(width=3)"]) == 0
    out = capsys.readouterr().out
    assert "GAAF activations" in out
    assert "gauss(width=3.0)" in out
    assert "replaced 2 (relu 1, tanh 1)" in out
    assert "bit-identical" in out and "FAILED" not in out
    assert " ms" in out


def test_sawtooth_mode_within_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, ["tv:resnet18", *SMALL, "--num-classes", "10", "--mode", "sawtooth"])
    assert rc == 0
    out = doc["verification"]["output"]
    assert out["check"] == "allclose" and out["ok"] is True
    assert 0 < out["max_abs_diff"] <= out["tolerance"]  # the sawtooth does move the forward, a little
    assert {r["mode"] for r in doc["report"]["replaced"]} == {"sawtooth"}


def test_sawtooth_with_a_coarse_K_fails_verification(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    out = factory_file.parent / "never.pt"
    argv = [f"{factory_file}:make_net", "--input-size", "3,8,8", "--mode", "sawtooth", "--K", "10", "--out", str(out)]
    rc, doc = run_json(capsys, argv)
    assert rc == 1
    assert doc["verification"]["ok"] is False
    assert doc["verification"]["output"]["max_abs_diff"] > doc["verification"]["output"]["tolerance"]
    assert doc["out"] is None and not out.exists()  # a patch that failed its check is not saved
    assert main(argv[:-2]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_file_factory_and_strip_dropout(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    rc, doc = run_json(capsys, [f"{factory_file}:make_net", "--input-size", "3,8,8", "--strip-dropout"])
    assert rc == 0
    rep = doc["report"]
    assert {r["name"]: (r["form"], r["activation"]) for r in rep["replaced"]} == {
        "act": ("module", "tanh"),
        "relu": ("function", "relu"),
    }
    stripped = {r["name"]: r for r in rep["stripped"]}
    assert "drop" in stripped and stripped["drop"]["p"] == pytest.approx(0.3)
    assert stripped["dropout"]["form"] == "function" and stripped["dropout"]["p"] == pytest.approx(0.1)
    assert len(stripped) == 2
    assert doc["verification"]["ok"] is True


def test_timm_vit_strip_dropout(capsys: pytest.CaptureFixture[str]) -> None:
    # fixed-input-size timm models get img_size from --input-size
    rc, doc = run_json(capsys, ["vit_tiny_patch16_224", *SMALL, "--num-classes", "10", "--strip-dropout"])
    assert rc == 0
    rep = doc["report"]
    assert rep["summary"]["by_activation"] == dict(counted_sites("vit_tiny_patch16_224").by_activation)
    assert rep["stripped"] == []  # timm's default rates are 0: Dropout(p=0) is the identity, nothing to strip
    assert doc["verification"]["output"]["ok"] is True
    assert doc["verification"]["audit"]["ok"] and doc["verification"]["audit"]["findings"] == []


def test_unknown_model_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet5O"]) == 2
    line = error_line(capsys)
    assert "resnet5O" in line and "resnet50" in line


def test_unknown_torchvision_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tv:resnet1B"]) == 2
    assert "tv:resnet18" in error_line(capsys)


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("{dir}/missing.py:make_net", "no such file"),
        ("{file}:nope", "no function 'nope'"),
        ("{file}:not_a_model", "not an nn.Module"),
        ("{file}", "FACTORY"),
    ],
)
def test_bad_factory(capsys: pytest.CaptureFixture[str], factory_file: Path, spec: str, expect: str) -> None:
    assert main([spec.format(dir=factory_file.parent, file=factory_file)]) == 2
    assert expect in error_line(capsys)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--shape", "relu=nope"], "unknown shape 'nope'"),
        (["--shape", "relu=gauss(wdth=3)"], "wdth"),
        (["--activations", "rlu"], "unknown activation 'rlu'"),
        (["--shape", "layer9.*=gauss"], "layer9.*"),
    ],
)
def test_bad_patch_options_exit_2(
    capsys: pytest.CaptureFixture[str], factory_file: Path, args: list[str], expect: str
) -> None:
    assert main([f"{factory_file}:make_net", "--input-size", "3,8,8", *args]) == 2
    assert expect in error_line(capsys)


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resnet18", "--shape", "relu"]) == 2
    assert "ACTIVATION=SHAPE" in capsys.readouterr().err
    assert main(["resnet18", "--input-size", "3,a,2"]) == 2
    assert "C,H,W" in capsys.readouterr().err
    assert main([]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "patch" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["patch", "finetune", "repro", "coverage", "kernels"])
def test_every_subcommand_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse %-formats help strings when it prints them: a bare % crashed `gaaf-patch coverage --help`."""
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and command in out.splitlines()[0]


def test_out_into_a_missing_directory_exits_2_before_patching(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["resnet18", "--out", str(tmp_path / "no" / "such.pt")]) == 2
    assert "no such directory" in error_line(capsys)


def test_input_size_the_model_rejects_exits_2(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    assert main([f"{factory_file}:make_net", "--input-size", "5,8,8"]) == 2
    line = error_line(capsys)
    assert "[2, 5, 8, 8]" in line and "--input-size" in line


def test_checkpoint_with_wrong_keys_names_them(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    sd = build_model(f"{factory_file}:make_net").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    sd["conv.weight"] = torch.zeros(1, 2, 3)
    bad = factory_file.parent / "bad.pt"
    torch.save({"state_dict": sd}, bad)
    assert main([f"{factory_file}:make_net", "--checkpoint", str(bad)]) == 2
    line = error_line(capsys)
    assert "1 missing key(s): head.bias" in line
    assert "1 unexpected key(s): extra.weight" in line
    assert "conv.weight (1, 2, 3) vs model (8, 3, 3, 3)" in line


def test_unreadable_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path, factory_file: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    model = f"{factory_file}:make_net"
    assert main([model, "--checkpoint", str(junk)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    assert main([model, "--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert "no such checkpoint" in error_line(capsys)


def test_plain_and_timm_style_checkpoints_load(capsys: pytest.CaptureFixture[str], factory_file: Path) -> None:
    model = build_model(f"{factory_file}:make_net")
    with torch.no_grad():
        model.head.bias.fill_(7.0)
    sd = model.state_dict()
    for name, obj in [
        ("plain.pt", sd),
        ("timm.pt", {"epoch": 3, "arch": "x", "state_dict": sd}),
        ("ddp.pt", {"model": {f"module.{k}": v for k, v in sd.items()}}),
        ("ema.pt", {"state_dict_ema": sd}),
    ]:
        path = factory_file.parent / name
        torch.save(obj, path)
        rc, doc = run_json(capsys, [f"{factory_file}:make_net", "--input-size", "3,8,8", "--checkpoint", str(path)])
        assert rc == 0, name
        assert doc["checkpoint"]["path"] == str(path)


def test_out_then_checkpoint_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "patched.pt"
    args = ["tv:resnet18", *SMALL, "--num-classes", "10", "--shape", "relu=relu_keras", "--strip-dropout"]
    rc, first = run_json(capsys, [*args, "--out", str(out)])
    assert rc == 0 and first["out"] == str(out)

    saved = torch.load(out, weights_only=True)
    assert saved["model"] == "tv:resnet18"
    assert saved["gaaf_config"] == first["report"]["config"]
    # The saved config replays through the library: the same sites, the same shapes.
    model = build_model("tv:resnet18", 10)
    model.load_state_dict(saved["state_dict"], strict=True)
    cfg = PatchConfig.from_dict(saved["gaaf_config"])
    patch(model, **{k: getattr(cfg, k) for k in saved["gaaf_config"]})
    assert [r["shape"] for r in report(model).replaced] == [r["shape"] for r in first["report"]["replaced"]]
    assert {r["shape"] for r in report(model).replaced} == {shapes.get("relu_keras").spec}

    rc, second = run_json(capsys, [*args, "--checkpoint", str(out)])
    assert rc == 0
    assert second["checkpoint"]["key"] == "state_dict"
    assert second["checkpoint"]["gaaf_config"] == first["report"]["config"]
    assert second["verification"]["ok"] is True
    # Loaded weights, not a fresh random init: the reloaded model computes what the saved one did.
    fresh = build_model("tv:resnet18", 10)
    assert not torch.equal(fresh.fc.weight, saved["state_dict"]["fc.weight"])


def test_untraceable_code_is_patched_at_run_time_and_listed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "odd.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Odd(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = nn.Linear(4, 4)

                def forward(self, x):
                    x = self.lin(x)
                    if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace this forward
                        x = x * 2
                    return torch.tanh(x)

            def make():
                return Odd()
            """
        )
    )
    rc = main([f"{path}:make", "--input-size", "4", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err == ""  # patch()'s warning is replaced by the report's unreached table
    doc = json.loads(captured.out)
    assert doc["verification"]["input_shape"] == [2, 4]
    assert doc["verification"]["gradient"]["ok"] and doc["verification"]["gradient"]["expect"] == "differ"
    assert doc["report"]["unreached"] == []
    (site,) = doc["report"]["replaced"]  # patched at run time: listed once the check ran it
    line = path.read_text().splitlines().index("        return torch.tanh(x)") + 1
    assert site["target"] == "torch.tanh" and site["form"] == "runtime" and site["name"] == f"<root>:odd:{line}"
    assert [r["name"] for r in doc["report"]["runtime"]] == ["<root>"]

    assert main([f"{path}:make", "--input-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"<root>:odd:{line}" in out and "runtime" in out


def test_out_is_written_atomically_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    """Issue 14, item 5: a save that dies half way (a full disk, a kill) must not destroy the file it replaces."""
    out = tmp_path / "patched.pth"
    out.write_bytes(b"the previous good file")

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    assert main(["tv:resnet18", "--input-size", "3,32,32", "--num-classes", "10", "--out", str(out)]) == 2
    assert out.read_bytes() == b"the previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["patched.pth"]  # no temporary file left behind
    assert "No space left on device" in capsys.readouterr().err


def test_an_infinite_K_is_a_usage_error_and_nan_outputs_fail_the_check(capsys):
    """Issue 14, item 4: --K inf made every output NaN while the check said "allclose ok"."""
    assert main(["resnet10t", "--input-size", "3,32,32", "--mode", "sawtooth", "--K", "inf"]) == 2
    assert capsys.readouterr().err.strip() == "gaaf-patch: error: K must be a finite positive number, got inf"
    from gaaf_patch.verify import max_abs_diff

    ref, bad = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    assert math.isnan(max_abs_diff([ref], [bad]))  # NaN where the original is finite: no "ok" can follow
    assert max_abs_diff([bad], [bad.clone()]) == 0.0  # the same NaN on both sides (an overflowing init) is equal


# ----------------------------------------------------------------------------------------------------- exit codes


def test_a_bug_is_an_internal_error_with_its_traceback(monkeypatch, capsys, factory_file: Path) -> None:
    """Errors are told apart by type: a ValueError that no one raised on purpose is a bug, not a usage error (2).
    Issue 14: a bug shows its traceback, exit 1 (it was one line and exit 3)."""
    from gaaf_patch.cli import patch as patch_command

    def buggy(*args, **kwargs):
        raise ValueError("an internal slip")

    monkeypatch.setattr(patch_command, "verify", buggy)
    assert main([f"{factory_file}:make_net", "--input-size", "3,8,8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in buggy" in err
    assert err.splitlines()[-2:] == [
        "ValueError: an internal slip",
        "gaaf-patch: internal error (a bug): please report it with the traceback above",
    ]


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys, factory_file: Path) -> None:
    from gaaf_patch.cli import patch as patch_command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patch_command, "verify", interrupted)
    assert main([f"{factory_file}:make_net", "--input-size", "3,8,8"]) == 130
    assert capsys.readouterr().err == "gaaf-patch: interrupted\n"


PICKY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Picky(nn.Module):
        # a model with its own rules about the input, like torchvision's ViT (an assert on the image size)
        def __init__(self, error):
            super().__init__()
            self.conv, self.error = nn.Conv2d(3, 4, 3), error

        def forward(self, x):
            if x.shape[-1] != x.shape[-2]:
                if self.error == "assert":
                    assert False, f"Wrong image width! Expected {x.shape[-2]} but got {x.shape[-1]}!"
                raise TypeError(f"cannot take a {x.shape[-2]}x{x.shape[-1]} image")
            return torch.tanh(self.conv(x)).mean((2, 3))


    def asserting():
        return Picky("assert")


    def typed():
        return Picky("type")
    """
)


@pytest.mark.parametrize(("factory", "cause"), [("asserting", "Wrong image width"), ("typed", "cannot take a 32x48")])
def test_a_model_that_rejects_the_check_input_is_one_line(capsys, tmp_path: Path, factory: str, cause: str) -> None:
    """Issue 14, item 8 (``gaaf-patch tv:vit_b_16 --input-size 3,32,48``): the model's own AssertionError or
    TypeError on the check batch is the input size's fault: one line that says which flag to change, exit 2."""
    path = tmp_path / "picky.py"
    path.write_text(PICKY)
    assert main([f"{path}:{factory}", "--input-size", "3,32,48"]) == 2
    line = error_line(capsys)
    assert "[2, 3, 32, 48]" in line and cause in line and line.endswith("set --input-size")


def test_an_input_size_too_large_to_check_is_refused_before_building(monkeypatch, capsys) -> None:
    """Issue 14, item 8: ``--input-size 3,100000,100000`` allocated (or tried to) a 224 GiB batch, after building
    the model at that size; it is now refused in one line before anything is built."""
    from gaaf_patch.cli import patch as patch_command

    monkeypatch.setattr(patch_command, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["tv:vit_b_16", "--input-size", "3,100000,100000"]) == 2
    line = error_line(capsys)
    assert "--input-size 3,100000,100000 with --batch-size 2 makes a batch of 224 GiB" in line
    assert line.endswith("give a smaller --input-size or --batch-size")
    assert main(["resnet10t", "--input-size", "3,8192,8192", "--batch-size", "8"]) == 2
    assert "makes a batch of 6 GiB" in error_line(capsys)


def test_every_library_error_is_a_gaaf_error() -> None:
    """What the CLI reports as a usage error (exit 2) is exactly the GaafError family."""
    import importlib
    import inspect
    import pkgutil

    import gaaf_patch
    from gaaf_patch.errors import GaafError

    found = []
    for info in pkgutil.walk_packages(gaaf_patch.__path__, "gaaf_patch."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            # errors only: an interrupt (finetune's Interrupted, a KeyboardInterrupt) is not one
            if issubclass(cls, Exception) and cls.__module__ == info.name:
                found.append(cls)
    assert len(found) >= 10, found
    interrupts = [c for c in found if issubclass(c, KeyboardInterrupt)]  # Ctrl-C / SIGTERM: exit 130 / 143
    assert [c for c in found if not issubclass(c, GaafError) and c not in interrupts] == []


def test_python_dash_m() -> None:
    import subprocess
    import sys

    from gaaf_patch import __version__

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "gaaf_patch.cli", "--version"], capture_output=True, text=True,
                          cwd=root, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"gaaf-patch {__version__}", proc.stderr
