"""``gaaf-patch coverage``: patch one model per timm/torchvision family (or every model) and check each patch.

The checks are :mod:`gaaf_patch.coverage`'s; this file picks the models, prints one line per model as the sweep
goes, and writes the JSON and markdown reports.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GaafError, one_line
from . import render
from .common import PROG, Subparsers, UsageError, positive_int, require_directory, write_text

NAME = "coverage"


def _names(text: str) -> list[str]:
    return [m for m in text.split(",") if m]


def add_parser(sub: Subparsers) -> None:
    from ..coverage import DEFAULT_MAX_PARAMS, TARGET

    p = sub.add_parser(
        NAME,
        help="patch one model per timm/torchvision family (--all: every model) and check each patch",
        description="Build each model with random weights, patch it with strip_dropout=True and check: (a) eval "
        "output bit-identical, (b) no activation left (counted independently of the report), (c) train-mode forward "
        "deterministic, (d) backward runs, (e) state_dict keys unchanged. Exit code 0 when at least "
        f"{TARGET:.0%} of the families pass, 1 otherwise.",
    )
    p.add_argument("--all", dest="all_models", action="store_true", help="every model, not one per family")
    p.add_argument("--models", type=_names, metavar="A,B", help="only these models (timm names, tv:NAME)")
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
    summary = cov.summarize(results)
    cov.console_table(results, summary)
    argv = sys.argv[1:] if sys.argv[1:2] == [NAME] else [NAME]
    shown = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    command = " ".join([PROG, *shown])  # as run; --json PATH left out (a scratch file, not part of the report)
    if args.json:
        write_text("--json", args.json, cov.to_json(results, summary, command))
    if args.markdown:
        write_text("--markdown", args.markdown, cov.markdown(results, summary, command))
    return 0 if summary.met else 1
