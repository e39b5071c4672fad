"""``gaaf-patch``: patch a model from the command line, check the patch, and optionally save it.

``gaaf-patch MODEL`` is short for ``gaaf-patch patch MODEL``. The CLI is a thin layer: it builds the model
(:mod:`gaaf_patch.models`), calls :func:`gaaf_patch.patch`, and checks on one random batch that the forward is
unchanged (bit for bit in ``exact`` mode) and the input gradient is not. The check is there because a patch that
silently changes the forward, or silently changes nothing, is the failure a user cannot see otherwise.

Exit codes: 0 success, 1 the check failed, 2 a usage error (one line on stderr, no traceback).

A subcommand is one ``_add_<name>_parser(subparsers)`` function that sets ``func`` to one ``_cmd_<name>(args)``
function returning the exit code, listed in :data:`_PARSERS`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .api import PatchError, patch
from .config import GAINS
from .errors import GaafError
from .gradscale import GradientScale, measure_gradient_scale
from .models import CheckpointError, ModelSpecError, build_model, default_input_size, load_checkpoint
from .models import output_tensors as _tensors
from .ops import DEFAULT_K, MODES
from .report import Report, report

__all__ = ["main", "verify", "Verification"]

PROG = "gaaf-patch"
SEED = 0
SCALE_BATCH = 8  # the smallest batch the gradient-scale check runs on
# sawtooth mode moves the forward by at most max|s| / (2K) per site; this bounds the whole model's output drift.
SAWTOOTH_RTOL = 1e-3
NO_GRADIENT = "the unpatched output does not depend on the input (a zero-initialised head?)"


class UsageError(GaafError):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class VerificationFailed(GaafError):
    """The patched model does not behave as a patch must: exit code 1."""


# ----------------------------------------------------------------------------------------------------------- checks


@dataclass
class Verification:
    """What :func:`verify` found: the forward check, the gradient check, and whether both passed."""

    input_shape: tuple[int, ...]
    mode: str
    output_ok: bool
    output_check: str  # "bit-identical" or "allclose"
    output_max_abs_diff: float
    output_tolerance: float
    gradient_ok: bool
    gradient_expect: str  # "differ" (sites were replaced), "equal" (nothing was) or NO_GRADIENT
    gradient_max_abs_diff: float
    seed: int = SEED

    @property
    def ok(self) -> bool:
        return self.output_ok and self.gradient_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "input_shape": list(self.input_shape),
            "seed": self.seed,
            "output": {
                "ok": self.output_ok,
                "check": self.output_check,
                "max_abs_diff": self.output_max_abs_diff,
                "tolerance": self.output_tolerance,
            },
            "gradient": {
                "ok": self.gradient_ok,
                "expect": self.gradient_expect,
                "max_abs_diff": self.gradient_max_abs_diff,
            },
        }


def _bit_equal(a: Tensor, b: Tensor) -> bool:
    """``torch.equal``, except that NaN equals NaN: a random-init model may overflow, and does so identically."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0), b.masked_fill(nb, 0))


def _max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """The largest |a - b|; NaN where one side is NaN and the other is not (NaN on both sides counts as equal)."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        if not x.numel():
            continue
        if x.is_floating_point() and not torch.equal(x.isnan(), y.isnan()):
            return math.nan
        diffs.append((x.double() - y.double()).abs().nan_to_num(0.0).max().item())
    return max(diffs, default=0.0)


def _run(model: nn.Module, batch: Tensor) -> tuple[list[Tensor], Tensor]:
    """Eval-mode outputs and the gradient of their sum with respect to the input."""
    x = batch.clone().requires_grad_(True)
    outs = _tensors(model(x))
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not floats:
        raise UsageError("the model output has no differentiable tensor to check the gradient on")
    (grad,) = torch.autograd.grad(sum(o.sum() for o in floats), x, allow_unused=True)
    return [o.detach() for o in outs], torch.zeros_like(x) if grad is None else grad


def verify(original: nn.Module, patched: nn.Module, rep: Report, input_shape: Sequence[int], mode: str) -> Verification:
    """Compare ``patched`` with its unpatched ``original`` on one seeded random batch, both in eval mode.

    Forward: ``exact`` mode must be bit-identical; ``sawtooth`` within ``1e-3 * max(1, max|reference|)``. Gradient
    of the summed output with respect to the input: it must differ when sites were replaced (GAAF adds ``s(x)``
    where activations saturate) and be identical when none were.
    """
    batch = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(SEED))
    original.eval()
    patched.eval()
    try:
        ref_out, ref_grad = _run(original, batch)
    except RuntimeError as e:  # the unpatched model rejects the batch: almost always an input size it does not take
        raise UsageError(
            f"the model fails on a batch of shape {list(batch.shape)} ({_one_line(e)}); set --input-size"
        ) from e
    try:
        new_out, new_grad = _run(patched, batch)
    except Exception as e:  # the original ran on this batch, so the patch broke the model
        raise VerificationFailed(
            f"the patched model fails where the original runs: {type(e).__name__}: {_one_line(e)}"
        ) from e
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out, strict=True)):
        raise VerificationFailed("the patched model's output has a different structure or shape")
    out_diff = _max_abs_diff(ref_out, new_out)
    if mode == "exact":
        check, tol = "bit-identical", 0.0
        out_ok = all(_bit_equal(a, b) for a, b in zip(ref_out, new_out, strict=True))
    else:
        scale = max([1.0] + [a.abs().nan_to_num(0.0).max().item() for a in ref_out if a.numel()])
        check, tol = "allclose", SAWTOOTH_RTOL * scale
        out_ok = out_diff <= tol
    grad_diff = _max_abs_diff([ref_grad], [new_grad])
    same_grad = _bit_equal(ref_grad, new_grad)
    expect = "differ" if rep.replaced else "equal"
    grad_ok = not same_grad if rep.replaced else same_grad
    if rep.replaced and same_grad and not ref_grad.any():
        # e.g. torchvision's ViTs zero-initialise the head: the output does not depend on the input at all
        expect, grad_ok = NO_GRADIENT, True
    return Verification(tuple(input_shape), mode, out_ok, check, out_diff, tol, grad_ok, expect, grad_diff)


# ------------------------------------------------------------------------------------------------------ arguments


def _input_size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive integers C,H,W (e.g. 3,224,224), got {text!r}")
    return dims


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _shape_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected ACTIVATION=SHAPE (e.g. relu=relu_keras), got {text!r}")
    return key.strip(), value.strip()


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --checkpoint, --num-classes: every subcommand that builds a model takes these."""
    p.add_argument("model", metavar="MODEL", help="timm name (resnet50), tv:NAME (torchvision) or FILE.py:FACTORY")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (strictly) before patching")
    p.add_argument("--num-classes", type=_positive_int, metavar="N", help="classifier outputs (default: the model's)")


def _add_patch_options(p: argparse.ArgumentParser) -> None:
    """The options of gaaf_patch.patch(); their dest names are its keyword names."""
    g = p.add_argument_group("patch")
    g.add_argument("--activations", default="auto", help="auto (all but gates), all, or names: relu,tanh")
    g.add_argument(
        "--shape", dest="shapes", action="append", type=_shape_override, default=[], metavar="ACT=SHAPE",
        help="shape for an activation or a site pattern, repeatable: relu=relu_keras, tanh='gauss(width=3)'",
    )  # fmt: skip
    g.add_argument("--strip-dropout", action="store_true", help="replace dropout by identity")
    g.add_argument("--strip-droppath", action="store_true", help="replace drop-path (stochastic depth) by identity")
    g.add_argument(
        "--gain", choices=GAINS, default="auto",
        help="auto: the depth-safe blend that keeps the gradient scale (default); paper: phi' + s, as in the paper",
    )  # fmt: skip
    g.add_argument("--mode", choices=MODES, default="exact", help="exact: forward unchanged (default); sawtooth")
    g.add_argument("--K", type=float, default=DEFAULT_K, help=f"sawtooth frequency (default {DEFAULT_K:g})")


def _patch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "activations": args.activations,
        "shapes": dict(args.shapes),
        "gain": args.gain,
        "strip_dropout": args.strip_dropout,
        "strip_droppath": args.strip_droppath,
        "mode": args.mode,
        "K": args.K,
    }


# ------------------------------------------------------------------------------------------------------ `patch`


def _add_patch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="patch a model, check the patch, print what changed (the default)")
    _add_model_arguments(p)
    _add_patch_options(p)
    c = p.add_argument_group("check")
    c.add_argument("--input-size", type=_input_size, metavar="C,H,W", help="per-sample input (default: the model's)")
    c.add_argument("--batch-size", type=_positive_int, default=2, help="random batch size (default 2)")
    _add_calibrate_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="PATH", help="save {state_dict, gaaf_config, model} of the patched model")
    o.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.set_defaults(func=_cmd_patch)


def _cmd_patch(args: argparse.Namespace) -> int:
    if args.out and not Path(args.out).resolve().parent.is_dir():  # fail before the work, not after it
        raise UsageError(f"--out {args.out}: no such directory {Path(args.out).resolve().parent}")
    with torch.random.fork_rng(devices=[]):  # a seeded init makes runs comparable, without touching the caller's RNG
        torch.manual_seed(SEED)
        model = build_model(args.model, args.num_classes, args.input_size)
    checkpoint = None
    if args.checkpoint:
        ckpt = load_checkpoint(model, args.checkpoint)
        checkpoint = {"path": args.checkpoint, "key": ckpt.key, "gaaf_config": ckpt.gaaf_config}
    original = copy.deepcopy(model)
    input_shape = (args.batch_size, *(args.input_size or default_input_size(model)))

    with warnings.catch_warnings():
        # patch() warns about unreached sites; they are in the report, printed below.
        warnings.filterwarnings("ignore", message="gaaf-patch:")
        start = time.perf_counter()
        calibration = _patch_or_calibrate(model, args, input_shape[1:])
        seconds = time.perf_counter() - start
    rep = report(model)

    check = verify(original, model, rep, input_shape, args.mode)
    scale, scale_note = _gradient_scale(model, rep, input_shape)
    rep = report(model)
    if scale is not None and scale.warning():
        print(scale.warning(), file=sys.stderr)

    saved = None
    if args.out and check.ok:
        try:
            from .finetune.checkpoint import atomic_save

            # through a temporary file and a rename: a failed save keeps the previous file as it was
            atomic_save({"state_dict": model.state_dict(), "gaaf_config": rep.config, "model": args.model}, args.out)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"cannot write {args.out}: {_one_line(e)}") from e
        saved = args.out

    if args.json:
        doc = {
            "model": args.model,
            "checkpoint": checkpoint,
            "report": rep.to_dict(),
            "verification": check.to_dict(),
            "patch_seconds": seconds,
            "out": saved,
        }
        if calibration is not None:
            doc["calibration"] = calibration
        if scale_note:
            doc["gradient_scale_note"] = scale_note
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_calibration(calibration)
        _print_report(args.model, rep, check, seconds, checkpoint, saved, args.out)
        _print_gradient_scale(scale, scale_note)
    return 0 if check.ok else 1


def _gradient_scale(model: nn.Module, rep: Report, input_shape: Sequence[int]) -> tuple[GradientScale | None, str]:
    """The train-mode gradient-norm ratio patched / plain on a random batch of at least ``SCALE_BATCH``, or why it
    was not measured. (A train-mode BatchNorm over 2 samples at 1x1 spatial size passes almost no gradient, and the
    ratio of two near-zero norms swings from seed to seed: tv:resnet18 at 32x32 on batches of 2 did, on batches of 8
    it did not.)"""
    if not rep.replaced:
        return None, "no activation replaced"
    shape = (max(SCALE_BATCH, input_shape[0]), *input_shape[1:])
    batch = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    try:
        return measure_gradient_scale(model, batch), ""
    except (RuntimeError, ValueError) as e:  # e.g. BatchNorm in train mode on one value per channel
        return None, f"not measured: {_one_line(e)}"


def _print_gradient_scale(scale: GradientScale | None, note: str) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if scale is None:
        if note != "no activation replaced":
            console.print(f"gradient scale {note}", markup=False)
        return
    word = "[green]ok[/]" if scale.safe else "[yellow]outside [0.5, 2][/]"
    console.print(
        f"gradient norm patched / plain (train mode): input x{scale.input:.3g}, parameters x{scale.params:.3g}: {word}"
    )


def _print_report(
    model_name: str,
    rep: Report,
    check: Verification,
    seconds: float,
    checkpoint: dict[str, Any] | None,
    saved: str | None,
    out: str | None,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def table(title: str, columns: Sequence[str], rows: list[Sequence[str]], **kw: Any) -> None:
        t = Table(title=escape(title), **kw)
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in rows:  # site names and reasons are data, never rich markup
            t.add_row(*(escape(str(c)) for c in row))
        console.print(t)

    console = Console(highlight=False)
    if checkpoint:
        where = f" [{checkpoint['key']}]" if checkpoint["key"] else ""
        console.print(f"loaded {escape(checkpoint['path'])}{escape(where)}", soft_wrap=True)
        old = checkpoint["gaaf_config"]
        if old is not None and old != rep.config:  # the options given now win; say so, since it may be a slip
            console.print(
                f"[yellow]note: it was saved patched with a different config: {escape(str(old))}[/]", soft_wrap=True
            )
    if rep.replaced:
        rows = [
            (r["name"] or "<root>", r["form"], r["target"], r["activation"], f"→ {r['shape']}") for r in rep.replaced
        ]
        table(f"{model_name}: GAAF activations", ("site", "form", "was", "activation", "shape"), rows)
        gains = sorted({r.get("gain", "paper") for r in rep.replaced})
        console.print(f"gain: {', '.join(gains)} (gaaf_patch/gain.py)", soft_wrap=True, markup=False)
    if rep.stripped:
        rows = [
            (r["name"] or "<root>", r.get("form", ""), r.get("target", ""), "" if r.get("p") is None else f"{r['p']:g}")
            for r in rep.stripped
        ]
        table("dropout removed", ("site", "form", "was", "p"), rows)
    if rep.unreached:
        rows = [(r["name"], r.get("form", ""), r.get("target", ""), r.get("reason", "")) for r in rep.unreached]
        table("not patched (unreached)", ("site", "form", "was", "reason"), rows, style="yellow")

    s = rep.summary()
    acts = ", ".join(f"{k} {v}" for k, v in sorted(s["by_activation"].items()))
    console.print(
        f"replaced {s['replaced']}" + (f" ({acts})" if acts else "")
        + f", stripped {s['stripped']}, unreached {s['unreached']}, skipped gates {s['skipped']}"
        + (f", BatchNorms fused {s['fused']}" if s["fused"] else "")
        + f"; patched in {seconds * 1e3:.1f} ms",
        soft_wrap=True,
    )  # fmt: skip
    out_word = "[green]ok[/]" if check.output_ok else "[red]FAILED[/]"
    tol = "" if check.output_check == "bit-identical" else f", tolerance {check.output_tolerance:.3g}"
    grad_word = "[green]ok[/]" if check.gradient_ok else "[red]FAILED[/]"
    grad_text = (
        f"input gradient not checked: {check.gradient_expect}"
        if check.gradient_expect == NO_GRADIENT
        else f"input gradient should {check.gradient_expect}: {grad_word} (max |diff| {check.gradient_max_abs_diff:.3g})"
    )
    console.print(
        f"forward {check.output_check} on {list(check.input_shape)}: {out_word} "
        f"(max |diff| {check.output_max_abs_diff:.3g}{tol}); {grad_text}",
        soft_wrap=True,
    )
    if saved:
        console.print(f"saved to {escape(saved)}", soft_wrap=True)
    elif out:
        console.print(f"[red]not saved to {escape(out)}: the check failed[/]", soft_wrap=True)


# --------------------------------------------------------------------------------------------------- `finetune`


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    from .finetune.run import AMP_CHOICES, EMBEDDED_DATA, SCHEDULES

    p = sub.add_parser(
        "finetune",
        help="load a checkpoint, patch it, fine-tune with GAAF, save weights for the unpatched model",
        description="Fine-tune MODEL from --checkpoint with GAAF activations; the saved state_dict loads with "
        "strict=True into the unpatched model. Under 'torchrun --nproc-per-node N' it trains with "
        "DistributedDataParallel (--batch-size is per process).",
    )
    _add_model_arguments(p)
    _add_patch_options(p)
    p.add_argument("--no-patch", action="store_true", help="train unpatched (the baseline to compare GAAF with)")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", default="digits", metavar="DIR|" + "|".join(EMBEDDED_DATA),
        help="an image-folder tree (DIR/train + DIR/val, or class folders), digits (bundled, the default) or mnist",
    )  # fmt: skip
    d.add_argument("--data-dir", metavar="DIR", help="where MNIST is (default $GAAF_DATA_DIR)")
    d.add_argument("--download", action="store_true", help="download MNIST when it is not there")
    d.add_argument("--input-size", type=_input_size, metavar="C,H,W", help="model input (default: the model's)")
    d.add_argument("--workers", type=int, default=4, help="image-folder loader processes (default 4)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int, default=3, help="total epochs, also when resuming (default 3)")
    t.add_argument("--batch-size", type=_positive_int, default=64, help="per process (default 64)")
    t.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01; see docs/finetune.md)")
    t.add_argument(
        "--opt", default="sgd", help="timm optimizer name: sgd (Nesterov momentum), adamw, ... (default sgd)"
    )
    t.add_argument("--momentum", type=float, default=0.9, help="(default 0.9)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="(default 0)")
    t.add_argument("--sched", choices=SCHEDULES, default="cosine", help="per-step learning-rate schedule")
    t.add_argument(
        "--amp", nargs="?", const="auto", choices=AMP_CHOICES,
        help="mixed precision: bf16 on the CPU; on CUDA bf16 where supported, else fp16 with loss scaling",
    )  # fmt: skip
    t.add_argument("--compile", action="store_true", help="torch.compile the patched model (Inductor)")
    t.add_argument("--seed", type=int, default=0, help="(default 0)")
    t.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="PATH", help="checkpoint written after every epoch (default MODEL-gaaf.pt)")
    o.add_argument("--resume", metavar="PATH", help="continue from a checkpoint this command wrote")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from .finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        model=args.model, data=args.data, checkpoint=args.checkpoint, num_classes=args.num_classes,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, opt=args.opt, momentum=args.momentum,
        weight_decay=args.weight_decay, sched=args.sched, input_size=args.input_size, data_dir=args.data_dir,
        download=args.download, workers=args.workers, amp=args.amp, compile=args.compile,
        patch=None if args.no_patch else _patch_kwargs(args), out=args.out, resume=args.resume, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    console = Console(highlight=False)
    try:
        result = finetune(opts, console)
    except KeyboardInterrupt:
        out = opts.out_path
        where = f"; the last checkpoint is {out}: continue with --resume {out}" if out.is_file() else ""
        print(f"{PROG}: interrupted{where}", file=sys.stderr)
        return 130
    if result.out is None:
        return 0
    console.print(f"saved {escape(str(result.out))}", soft_wrap=True)
    dep = result.deploy
    if dep is not None:
        if dep["ok"]:
            same = "bit-identical" if dep["bit_identical"] else f"max |diff| {dep['max_abs_diff']:.3g}"
            console.print(
                f"deployment check: loads with strict=True into the unpatched {escape(args.model)}; "
                f"outputs {same} on a held-out batch [green]ok[/]",
                soft_wrap=True,
            )
        else:
            why = dep.get("error") or f"outputs differ (max |diff| {dep['max_abs_diff']:.3g})"
            console.print(f"[red]deployment check FAILED: {escape(why)}[/]", soft_wrap=True)
    return 0 if result.ok else 1


# ------------------------------------------------------------------------------------------- `patch --calibrate`


def _add_calibrate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibrate (with --strip-dropout: shapes derived from the dropout each site loses)")
    g.add_argument("--calibrate", metavar="DATA", help="digits, mnist (see --data-dir) or a .pt file of inputs")
    g.add_argument("--data-dir", metavar="DIR", help="where MNIST lives (default: $GAAF_DATA_DIR)")
    g.add_argument("--calibrate-batches", type=_positive_int, default=2, metavar="N", help="batches (default 2)")
    g.add_argument("--calibrate-batch-size", type=_positive_int, default=16, metavar="N", help="batch size (16)")
    g.add_argument("--masks", type=_positive_int, default=8, metavar="N", help="dropout masks per batch (default 8)")


def _patch_or_calibrate(model: nn.Module, args: argparse.Namespace, input_size: Sequence[int]) -> list | None:
    """``patch``, or with ``--calibrate``: measure the dropout noise per site and patch with calibrated shapes."""
    if not getattr(args, "calibrate", None):
        patch(model, **_patch_kwargs(args))
        return None
    from .analysis.variance import net_variance
    from .calibrate import calibrate_from, calibrated_shapes, load_batches, noise_table

    if not args.strip_dropout:
        raise UsageError("--calibrate derives the shapes from the dropout it strips: add --strip-dropout")
    if args.masks < 2:
        raise UsageError("--masks must be at least 2 to measure a variance")
    kwargs = _patch_kwargs(args)
    batches = load_batches(
        args.calibrate,
        input_size,
        batch_size=args.calibrate_batch_size,
        batches=args.calibrate_batches,
        data_dir=args.data_dir,
    )
    noise = net_variance(
        model,
        batches,
        batches=len(batches),
        masks=args.masks,
        activations=kwargs["activations"],
        strip_droppath=kwargs["strip_droppath"],
    )
    calibrate_from(model, noise, **kwargs)
    return noise_table(noise, calibrated_shapes(noise))


def _print_calibration(rows: list | None) -> None:
    if not rows:
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    any_fed = any(r["fed"] for r in rows)
    caption = None if any_fed else "no site is fed by dropout: every site keeps its default shape"
    t = Table(title="calibration: dropout noise on each site's net", caption=caption)
    for col in ("site", "activation", "sigma (masks)", "sigma (eq. 6)", "net RMS", "fed by", "sigma used"):
        t.add_column(col, overflow="fold")
    for r in rows:
        eq6 = "" if r["sigma_eq6"] is None else f"{r['sigma_eq6']:.3g}"
        fed = f"{r['dropout']} (p={r['p']:g})" if r["dropout"] else ("upstream dropout" if r["fed"] else "-")
        used = r["shape"].rsplit("sigma=", 1)[-1].rstrip(")") if r["shape"] else "- (default shape)"
        cells = (r["name"], r["activation"], f"{r['sigma']:.3g}", eq6, f"{r['net_rms']:.3g}", fed, used)
        t.add_row(*(escape(str(c)) for c in cells))
    Console(highlight=False).print(t)


# ------------------------------------------------------------------------------------------------------ `repro`


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def _add_repro_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repro", help="reproduce one of the paper's experiments (mnist) or the depth study (depth)")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    m = studies.add_parser(
        "mnist",
        help="the MNIST MLP study: base / dropout / GAAF (+ ReLU, noisy activation), probes, table, figures",
        description="Train the paper's 784-512-256-256-10 MLP variants (SGD + momentum, early stopping on a held-out "
        "10k of the training set), measure eq. 5, net values and node correlations, write OUT/results.json "
        "(after every run; --resume continues it) and PNGs, and print the table next to the paper's numbers.",
    )
    from .repro.models import MODELS

    m.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    m.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0..N-1 per model (default 1; paper: 5)")
    m.add_argument("--quick", action="store_true", help="5k/1k/2k subset, 3 epochs: a smoke run for CI")
    m.add_argument("--out", metavar="DIR", help="output folder (default out/repro-mnist, or out/repro-mnist-quick)")
    m.add_argument("--resume", action="store_true", help="continue OUT/results.json, skipping finished runs")
    m.add_argument("--data-dir", metavar="DIR", help="MNIST root (torchvision layout; default $GAAF_DATA_DIR)")
    t = m.add_argument_group("training (the paper does not give its own)")
    t.add_argument("--max-epochs", type=_positive_int, help="default 200 (--quick: 3)")
    t.add_argument("--patience", type=_positive_int, help="epochs without a better val loss (default 10; --quick: 2)")
    t.add_argument("--lr", type=_positive_float, default=0.01, help="SGD learning rate (default 0.01)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--batch-size", type=_positive_int, default=128, help="default 128")
    t.add_argument("--val-size", type=_positive_int, default=10_000, help="held-out training images (default 10000)")
    t.add_argument("--saturation", type=_positive_float, default=2.0, help="tanh saturation bound |z| (default 2)")
    r = m.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    m.set_defaults(func=_cmd_repro)

    from .repro import depth

    d = studies.add_parser(
        "depth",
        help="deep nets at their usual learning rate: plain / dropout / gaaf-paper / gaaf-auto narrow ResNets",
        description="Train narrow timm ResNets on MNIST from scratch (SGD lr 0.1) and fine-tune a plain digits-0-4 "
        "checkpoint on all ten digits (lr 0.01), each as plain, with dropout, with the paper's GAAF gain and with "
        "the default auto gain; record curves, test accuracy, divergence, time to the plain model's best and the "
        "GAAF gradient ratio per stage; write OUT/results.json (after every run; --resume continues it), PNGs and "
        "a table (docs/depth-study.md).",
    )
    for flag, names, default in (("--models", depth.MODELS, depth.DEFAULT_MODELS),
                                 ("--variants", depth.VARIANTS, depth.VARIANTS),
                                 ("--regimes", depth.REGIMES, depth.REGIMES)):  # fmt: skip
        d.add_argument(flag, default=",".join(default), help=f"comma-separated subset of {','.join(names)} "
                       f"(default {','.join(default)})")  # fmt: skip
    d.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0..N-1 per cell (default 1)")
    d.add_argument("--quick", action="store_true", help="scikit-learn digits at 16x16, a few hundred images, "
                   "1 epoch per stage: a smoke run for CI (no MNIST needed)")  # fmt: skip
    d.add_argument("--out", metavar="DIR", help="output folder (default out/repro-depth, or out/repro-depth-quick)")
    d.add_argument("--resume", action="store_true", help="continue OUT/results.json, skipping finished runs")
    d.add_argument("--data-dir", metavar="DIR", help="MNIST root (torchvision layout; default $GAAF_DATA_DIR)")
    g = d.add_argument_group("sizing (default: docs/depth-study.md; --quick: its own)")
    for flag in ("train", "val", "test"):
        g.add_argument(f"--{flag}-size", type=_positive_int, help=f"{flag} images")
    for flag in ("scratch", "finetune", "pretrain"):
        g.add_argument(f"--{flag}-epochs", type=_positive_int, help=f"epochs of the {flag} stage")
    r = d.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    d.set_defaults(func=_cmd_repro)


def _cmd_repro(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .repro import depth, mnist
    from .repro.display import RichReporter, tables
    from .repro.train import TrainConfig

    console = Console(highlight=False)
    if not console.is_terminal:  # a log file or a pipe: wide enough that the tables are not folded
        console = Console(highlight=False, width=170)
    start = time.perf_counter()
    if args.study == "depth":
        from .repro.depth_display import DepthReporter, table

        sizing = depth.with_overrides(
            depth.QUICK if args.quick else depth.FULL, train=args.train_size, val=args.val_size,
            test=args.test_size, scratch_epochs=args.scratch_epochs, finetune_epochs=args.finetune_epochs,
            pretrain_epochs=args.pretrain_epochs,
        )  # fmt: skip
        names = {k: tuple(x.strip() for x in getattr(args, k).split(",") if x.strip()) for k in
                 ("models", "variants", "regimes")}  # fmt: skip
        cfg = depth.DepthConfig(
            out=Path(args.out or ("out/repro-depth-quick" if args.quick else "out/repro-depth")), **names,
            seeds=args.seeds, sizing=sizing, data_dir=args.data_dir, device=args.device, threads=args.threads,
            resume=args.resume, quick=args.quick,
        )  # fmt: skip
        results = depth.run_study(cfg, DepthReporter(console))
        console.print(table(results))
        path = cfg.out / depth.RESULTS
    else:
        quick = mnist.QUICK if args.quick else {}
        train = TrainConfig(
            lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
            max_epochs=args.max_epochs or quick.get("max_epochs", 200),
            patience=args.patience or quick.get("patience", 10),
        )  # fmt: skip
        out = args.out or ("out/repro-mnist-quick" if args.quick else "out/repro-mnist")
        cfg = mnist.StudyConfig(
            out=Path(out), models=tuple(x.strip() for x in args.models.split(",") if x.strip()), seeds=args.seeds,
            train=train, data_dir=args.data_dir, val_size=args.val_size, saturation=args.saturation,
            device=args.device, threads=args.threads, resume=args.resume, quick=args.quick,
            subset={k: quick[k] for k in ("train", "val", "test")} if quick else None,
        )  # fmt: skip
        results = mnist.run_study(cfg, RichReporter(console))
        for t in tables(results):
            console.print(t)
        path = cfg.out / mnist.RESULTS
    figures = ", ".join(results["figures"]) or f"none ({results.get('figures_skipped', 'no finished run')})"
    console.print(f"results: {path}; figures: {figures}", soft_wrap=True)
    console.print(f"wall time {time.perf_counter() - start:.1f} s", soft_wrap=True)
    return 0


# ------------------------------------------------------------------------------------------------------ `coverage`


def _add_coverage_parser(sub: argparse._SubParsersAction) -> None:
    from .coverage import DEFAULT_MAX_PARAMS, TARGET

    p = sub.add_parser(
        "coverage",
        help="patch one model per timm/torchvision family (--all: every model) and check each patch",
        description="Build each model with random weights, patch it with strip_dropout=True and check: (a) eval "
        "output bit-identical, (b) no activation left (counted independently of the report), (c) train-mode forward "
        "deterministic, (d) backward runs, (e) state_dict keys unchanged. Exit code 0 when at least "
        f"{TARGET:.0%} of the families pass, 1 otherwise.",
    )
    p.add_argument("--all", dest="all_models", action="store_true", help="every model, not one per family")
    p.add_argument("--models", type=lambda t: [m for m in t.split(",") if m], metavar="A,B",
                   help="only these models (timm names, tv:NAME)")  # fmt: skip
    p.add_argument("--families", type=lambda t: [m for m in t.split(",") if m], metavar="F,G",
                   help="only these families (timm module names, tv:NAME for torchvision's)")  # fmt: skip
    p.add_argument("--no-timm", dest="timm_zoo", action="store_false", help="leave timm's models out")
    p.add_argument("--no-torchvision", dest="torchvision_zoo", action="store_false", help="leave torchvision out")
    p.add_argument("--size", type=_positive_int, default=64, help="input height and width where the model allows it")
    p.add_argument("--max-params", type=float, default=None, metavar="N",
                   help=f"skip larger models (default {DEFAULT_MAX_PARAMS:.0e}; none with --all)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-model time limit (0: none, inline)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="models checked side by side (worker processes)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per worker")
    p.add_argument("--json", metavar="PATH", help="write every result and the totals as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report as markdown (docs/coverage.md)")
    p.set_defaults(func=_cmd_coverage)


def _cmd_coverage(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import coverage as cov

    for path in (args.json, args.markdown):
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{path}: no such directory {Path(path).resolve().parent}")
    if args.models:
        models = [cov.entry_for(m) for m in args.models]
    else:
        models = cov.entries(args.all_models, args.timm_zoo, args.torchvision_zoo, args.families)
    if not models:
        raise UsageError("no model matches the selection")
    max_params = args.max_params if args.max_params is not None else None if args.all_models else cov.DEFAULT_MAX_PARAMS
    console = Console(highlight=False, stderr=True)

    def progress(r: Any) -> None:
        mark = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}[r.status]
        console.print(f"{mark} {r.family_id}/{r.name} {r.seconds:.1f}s {r.reason[:150]}", soft_wrap=True, markup=True)

    results = cov.sweep(
        models,
        size=args.size,
        max_params=int(max_params) if max_params else None,
        timeout=args.timeout or None,
        jobs=args.jobs,
        threads=args.threads,
        on_result=progress,
    )
    summary = cov.summarize(results)
    cov.console_table(results, summary)
    argv = sys.argv[1:] if sys.argv[1:2] == ["coverage"] else ["coverage"]
    shown = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    command = " ".join([PROG, *shown])  # as run; --json PATH left out (a scratch file, not part of the report)
    if args.json:
        Path(args.json).write_text(cov.to_json(results, summary, command))
    if args.markdown:
        Path(args.markdown).write_text(cov.markdown(results, summary, command))
    return 0 if summary.met else 1


# ------------------------------------------------------------------------------------------------------- `kernels`


def _add_kernels_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kernels",
        help="build the fused CPU backward kernel now (else it is built on first use) and say where it is cached",
        description="Compile gaaf_patch's C++ CPU backward kernel (about 30 s, once per torch version, CPU "
        "capability and kernel source; cached under $TORCH_EXTENSIONS_DIR). Exit code 2 when it cannot be built: "
        "training then uses plain torch ops, with the same results, more slowly.",
    )
    p.set_defaults(func=_cmd_kernels)


def _cmd_kernels(args: argparse.Namespace) -> int:
    from . import kernels

    if not kernels.enabled():
        raise UsageError("the kernel is turned off (GAAF_KERNELS=off); unset GAAF_KERNELS to build it")
    try:
        where = kernels.build()
    except kernels.KernelBuildError as e:
        raise UsageError(str(e)) from None
    print(f"gaaf_patch CPU kernel ready: {where}")
    return 0


# ----------------------------------------------------------------------------------------------------------- main

_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_patch_parser,
    _add_finetune_parser,
    _add_repro_parser,
    _add_coverage_parser,
    _add_kernels_parser,
]
DEFAULT_COMMAND = "patch"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`_PARSERS`."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Replace a model's activations by GAAF activations (Hahn & Choi) and check the result. "
        f"'{PROG} MODEL ...' is short for '{PROG} {DEFAULT_COMMAND} MODEL ...'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def _with_default_command(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Insert the default subcommand unless the first argument names one (or asks for top-level help)."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and (argv[0] in commands or argv[0] in ("-h", "--help", "--version")):
        return argv
    return [DEFAULT_COMMAND, *argv]


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code instead of exiting, so tests
    and other programs can call it in-process."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_with_default_command(parser, argv))
    except SystemExit as e:  # argparse: --help, --version (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except VerificationFailed as e:
        print(f"{PROG}: verification failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except (UsageError, ModelSpecError, CheckpointError, PatchError, KeyError, ValueError, OSError) as e:
        return _error(_one_line(e))


if __name__ == "__main__":
    sys.exit(main())
