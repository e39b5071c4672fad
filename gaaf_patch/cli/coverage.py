"""``gaaf-patch coverage``: patch one model per timm/torchvision family (or every model) and check each patch;
``--hf``: every Hugging Face transformers model type instead.

The checks are :mod:`gaaf_patch.coverage`'s; this file picks the models, prints one line per model as the sweep
goes, and writes the JSON and markdown reports (``--markdown`` rewrites its sweep's part of the file only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import GaafError, one_line
from . import render
from .common import PROG, Subparsers, UsageError, positive_int, require_directory, write_text

if TYPE_CHECKING:
    from ..coverage import Result, Summary

NAME = "coverage"


def _names(text: str) -> list[str]:
    return [m for m in text.split(",") if m]


def add_parser(sub: Subparsers) -> None:
    from ..coverage import DEFAULT_MAX_PARAMS, TARGET
    from ..coverage.hf import HF_TARGET

    p = sub.add_parser(
        NAME,
        help="patch one model per timm/torchvision family (--all: every model) and check each patch",
        description="Build each model with random weights, patch it with strip_dropout=True and check: (a) eval "
        "output bit-identical, (b) no activation left (counted independently of the report), (c) train-mode forward "
        "deterministic, (d) backward runs, (e) state_dict keys unchanged. Exit code 0 when at least "
        f"{TARGET:.0%} of the families pass, 1 otherwise.",
    )
    p.add_argument("--all", dest="all_models", action="store_true", help="every model, not one per family")
    p.add_argument(
        "--hf", action="store_true",
        help="every transformers model type with a base model class, shrunk config, random weights (checks: eval "
        f"bit-identical, audit clean, train deterministic, save_pretrained/from_pretrained; target {HF_TARGET:.0%}%)",
    )  # fmt: skip
    p.add_argument(
        "--models", type=_names, metavar="A,B", help="only these models (timm names, tv:NAME; --hf: bert,gpt2)"
    )
    p.add_argument("--families", type=_names, metavar="F,G",
                   help="only these families (timm module names, tv:NAME for torchvision's)")  # fmt: skip
    p.add_argument("--no-timm", dest="timm_zoo", action="store_false", help="leave timm's models out")
    p.add_argument("--no-torchvision", dest="torchvision_zoo", action="store_false", help="leave torchvision out")
    p.add_argument("--size", type=positive_int, default=64, help="input height and width where the model allows it")
    p.add_argument("--max-params", type=float, default=None, metavar="N",
                   help=f"skip larger models (default {DEFAULT_MAX_PARAMS:.0e}; none with --all)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-model time limit (0: none, inline)")
    p.add_argument("--jobs", type=positive_int, default=1, help="models checked side by side (worker processes)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker")
    p.add_argument("--json", metavar="PATH", help="write every result and the totals as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report as markdown (docs/coverage.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .. import coverage as cov

    for path in (args.json, args.markdown):
        if path:
            require_directory(path)
    if args.hf:
        return _run_hf(args)
    try:
        if args.models:
            models = [cov.entry_for(m) for m in args.models]
        else:
            models = cov.entries(args.all_models, args.timm_zoo, args.torchvision_zoo, args.families)
    except GaafError:
        raise
    except ValueError as e:  # the zoo's "no such model / family": a name the user gave
        raise UsageError(one_line(e)) from e
    if not models:
        raise UsageError("no model matches the selection")
    max_params = args.max_params if args.max_params is not None else None if args.all_models else cov.DEFAULT_MAX_PARAMS
    results = cov.sweep(
        models,
        size=args.size,
        max_params=int(max_params) if max_params else None,
        timeout=args.timeout or None,
        jobs=args.jobs,
        threads=args.threads,
        on_result=render.coverage_progress(Console(highlight=False, stderr=True)),
    )
    return _report(args, results, cov.summarize(results), cov.markdown)


def _run_hf(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .. import coverage as cov
    from ..coverage.hf import HF_TARGET
    from ..hf import model_types

    model_types()  # transformers missing: the one-line error, before any worker starts
    timm_only = {
        "--all": args.all_models,
        "--families": bool(args.families),
        "--no-timm": not args.timm_zoo,
        "--no-torchvision": not args.torchvision_zoo,
        "--max-params": args.max_params is not None,
    }
    other = [flag for flag, given in timm_only.items() if given]
    if other:
        raise UsageError(f"{', '.join(other)}: the timm/torchvision sweep's options; --hf checks model types")
    try:
        models = cov.hf_entries([m.removeprefix("hf:") for m in args.models] if args.models else None)
    except ValueError as e:
        raise UsageError(one_line(e)) from e
    results = cov.sweep(
        models,
        timeout=args.timeout or None,
        jobs=args.jobs,
        threads=args.threads,
        on_result=render.coverage_progress(Console(highlight=False, stderr=True)),
    )
    return _report(args, results, cov.summarize(results, HF_TARGET), cov.markdown_hf)


def _report(args: argparse.Namespace, results: list[Result], summary: Summary, markdown: Callable[..., str]) -> int:
    from pathlib import Path

    from .. import coverage as cov

    cov.console_table(results, summary)
    argv = sys.argv[1:] if sys.argv[1:2] == [NAME] else [NAME]
    shown = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    command = " ".join([PROG, *shown])  # as run; --json PATH left out (a scratch file, not part of the report)
    if args.json:
        write_text("--json", args.json, cov.to_json(results, summary, command))
    if args.markdown:
        path = Path(args.markdown)
        old = path.read_text() if path.is_file() else ""
        write_text("--markdown", args.markdown, cov.merge_markdown(old, markdown(results, summary, command)))
    return 0 if summary.met else 1
