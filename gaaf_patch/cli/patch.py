"""``gaaf-patch patch MODEL`` (the default subcommand): build, patch (or calibrate), check, report, save.

The check (:func:`gaaf_patch.verify.verify`) runs on one seeded random batch (a Hugging Face model, ``hf:``: on
:func:`gaaf_patch.hf.runnable_inputs`, its token ids, images or waveforms); a patch that fails it is not saved and
the command exits with 1. The gradient-scale line is a warning, never a failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..api import patch
from ..errors import one_line
from ..gradscale import GradientScale, measure_gradient_scale
from ..hf import HF_PREFIX, parse_overrides, runnable_inputs
from ..models import build_model, default_input_size, load_checkpoint
from ..report import report
from ..verify import SEED, Example, verify
from . import render
from .common import (
    Subparsers,
    UsageError,
    add_model_arguments,
    add_patch_options,
    input_size,
    patch_kwargs,
    positive_int,
    require_directory,
)

NAME = "patch"
SCALE_BATCH = 8  # the smallest batch the gradient-scale check runs on
MAX_BATCH_BYTES = 1 << 30  # the largest random batch (float32) the check builds: 1 GiB


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(NAME, help="patch a model, check the patch, print what changed (the default)")
    add_model_arguments(p)
    add_patch_options(p)
    c = p.add_argument_group("check")
    c.add_argument("--input-size", type=input_size, metavar="C,H,W", help="per-sample input (default: the model's)")
    c.add_argument("--batch-size", type=positive_int, default=2, help="random batch size (default 2)")
    h = p.add_argument_group("Hugging Face (hf:TYPE, hf:DIR; checked on token ids, images or audio from the config)")
    h.add_argument(
        "--config", dest="hf_config", action="append", default=[], metavar="KEY=VALUE",
        help="set a config field after shrinking (hf:TYPE) or loading (hf:DIR), repeatable: --config num_hidden_layers=4",
    )  # fmt: skip
    g = p.add_argument_group("calibrate (with --strip-dropout: shapes derived from the dropout each site loses)")
    g.add_argument("--calibrate", metavar="DATA", help="digits, mnist (see --data-dir) or a .pt file of inputs")
    g.add_argument("--data-dir", metavar="DIR", help="where MNIST lives (default: $GAAF_DATA_DIR)")
    g.add_argument("--calibrate-batches", type=positive_int, default=2, metavar="N", help="batches (default 2)")
    g.add_argument("--calibrate-batch-size", type=positive_int, default=16, metavar="N", help="batch size (16)")
    g.add_argument("--masks", type=positive_int, default=8, metavar="N", help="dropout masks per batch (default 8)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="PATH", help="save {state_dict, gaaf_config, model} of the patched model")
    o.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.set_defaults(func=run)


def _check_hf_options(args: argparse.Namespace) -> bool:
    """Whether the model is a Hugging Face one; options that do not apply to it (or only to it) are usage errors."""
    hf = args.model.strip().startswith(HF_PREFIX)
    if args.hf_config and not hf:
        raise UsageError(f"--config sets fields of a Hugging Face config: only for hf:MODEL, not {args.model!r}")
    if hf and args.input_size:
        raise UsageError("--input-size: hf: models are checked on inputs sized from their config (token ids, images)")
    if hf and args.calibrate:
        raise UsageError("--calibrate feeds image batches; it does not apply to hf: models")
    return hf


def run(args: argparse.Namespace) -> int:
    if args.out:
        require_directory(args.out, "--out")
    if args.input_size:  # before the model is built: torchvision's ViTs size their position embedding by it
        check_batch_bytes((args.batch_size, *args.input_size))
    hf = _check_hf_options(args)
    overrides = parse_overrides(args.hf_config)
    with torch.random.fork_rng(devices=[]):  # a seeded init makes runs comparable, without touching the caller's RNG
        torch.manual_seed(SEED)
        model = build_model(args.model, args.num_classes, args.input_size, overrides)
    checkpoint = None
    if args.checkpoint:
        ckpt = load_checkpoint(model, args.checkpoint)
        checkpoint = {"path": args.checkpoint, "key": ckpt.key, "gaaf_config": ckpt.gaaf_config}
    original = copy.deepcopy(model)
    if hf:
        inputs: Example | tuple[int, ...] = Example(kwargs=runnable_inputs(model, batch=args.batch_size))
        input_shape = inputs.shape
    else:
        inputs = input_shape = (args.batch_size, *(args.input_size or default_input_size(model)))
        check_batch_bytes(input_shape)

    with warnings.catch_warnings():
        # patch() warns about unreached sites; they are in the report, printed below.
        warnings.filterwarnings("ignore", message="gaaf-patch:")
        start = time.perf_counter()
        calibration = _patch_or_calibrate(model, args, input_shape[1:])
        seconds = time.perf_counter() - start
    check = verify(original, model, inputs, args.mode)  # reads the report after running the model
    rep = report(model)
    scale, scale_note = _gradient_scale(model, bool(rep.replaced), inputs)
    rep = report(model)
    if scale is not None and scale.warning():
        print(scale.warning(), file=sys.stderr)

    saved = None
    if args.out and check.ok:
        _save(model, rep.config, args)
        saved = args.out

    if args.json:
        doc: dict[str, Any] = {
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
        render.print_calibration(calibration)
        render.print_report(args.model, rep, check, seconds, checkpoint, saved, args.out)
        render.print_gradient_scale(scale, scale_note)
    return 0 if check.ok else 1


def batch_bytes(shape: Sequence[int]) -> int:
    """Bytes of a float32 batch of ``shape``."""
    return math.prod(shape) * 4


def check_batch_bytes(shape: Sequence[int], batch_flag: str = "--batch-size") -> None:
    """Refuse, before anything is allocated, a check batch beyond :data:`MAX_BATCH_BYTES`: the model's activations
    take many times the input, so such a batch ends in an out-of-memory error (or the machine swapping) instead."""
    n = batch_bytes(shape)
    if n > MAX_BATCH_BYTES:
        raise UsageError(
            f"--input-size {','.join(map(str, shape[1:]))} with {batch_flag} {shape[0]} makes a batch of "
            f"{n / 2**30:.3g} GiB, and the model's activations need many times that; the check takes at most "
            f"{MAX_BATCH_BYTES / 2**30:g} GiB: give a smaller --input-size or {batch_flag}"
        )


def _save(model: nn.Module, config: dict[str, Any], args: argparse.Namespace) -> None:
    """Through a temporary file and a rename: a failed save keeps the previous file as it was."""
    from ..finetune.checkpoint import atomic_save

    try:
        atomic_save({"state_dict": model.state_dict(), "gaaf_config": config, "model": args.model}, args.out)
    except (OSError, RuntimeError) as e:  # torch.save reports some write failures as RuntimeError
        raise UsageError(f"cannot write {args.out}: {one_line(e)}") from e


def _patch_or_calibrate(model: nn.Module, args: argparse.Namespace, per_sample: Sequence[int]) -> list | None:
    """``patch``, or with ``--calibrate``: measure the dropout noise per site and patch with calibrated shapes."""
    if not args.calibrate:
        patch(model, **patch_kwargs(args))
        return None
    from ..calibrate import calibrate_on, load_batches

    if not args.strip_dropout:
        raise UsageError("--calibrate derives the shapes from the dropout it strips: add --strip-dropout")
    if args.masks < 2:
        raise UsageError("--masks must be at least 2 to measure a variance")
    check_batch_bytes((args.calibrate_batch_size, *per_sample), "--calibrate-batch-size")
    batches = load_batches(
        args.calibrate,
        per_sample,
        batch_size=args.calibrate_batch_size,
        batches=args.calibrate_batches,
        data_dir=args.data_dir,
    )
    return calibrate_on(model, batches, masks=args.masks, **patch_kwargs(args))


def _gradient_scale(
    model: nn.Module, replaced: bool, inputs: Sequence[int] | Example
) -> tuple[GradientScale | None, str]:
    """The train-mode gradient-norm ratio patched / plain on a random batch of at least ``SCALE_BATCH``, or why it
    was not measured. (A train-mode BatchNorm over 2 samples at 1x1 spatial size passes almost no gradient, and the
    ratio of two near-zero norms swings from seed to seed: tv:resnet18 at 32x32 on batches of 2 did, on batches of 8
    it did not.) Keyword inputs (``hf:`` models) are passed positionally, in the order of the forward's parameters;
    integer inputs (token ids) have no gradient, so only the parameters' ratio is shown for them."""
    if not replaced:
        return None, render.NOT_REPLACED
    if isinstance(inputs, Example):
        args = _positional(model, inputs)
        if args is None:
            return None, "not measured: the forward does not take these inputs positionally"
    else:
        shape = (max(SCALE_BATCH, inputs[0]), *inputs[1:])
        if batch_bytes(shape) > MAX_BATCH_BYTES:
            return None, f"not measured: a batch of {shape[0]} would take {batch_bytes(shape) / 2**30:.3g} GiB"
        args = (torch.randn(shape, generator=torch.Generator().manual_seed(SEED)),)
    try:
        scale = measure_gradient_scale(model, *args)
    except (RuntimeError, ValueError) as e:  # e.g. BatchNorm in train mode on one value per channel
        return None, f"not measured: {one_line(e)}"
    floats = any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)
    return scale, "" if floats else render.PARAMETERS_ONLY


def _positional(model: nn.Module, example: Example) -> tuple | None:
    """``example``'s keyword inputs as positional arguments of ``model.forward`` (gaps filled with the defaults), or
    None when a keyword is not a positional parameter."""
    import inspect

    try:  # the class's forward: a patched one may sit in the instance, taking (*args, **kwargs)
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    if not set(example.kwargs) <= set(names):
        return None
    last = max(names.index(k) for k in example.kwargs) if example.kwargs else -1
    args = list(example.args)
    for p in params[len(args) : last + 1]:
        if p.name in example.kwargs:
            args.append(example.kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            return None
    return tuple(args)
