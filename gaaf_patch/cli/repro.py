"""``gaaf-patch repro mnist|depth``: the paper's MNIST study and the depth study (:mod:`gaaf_patch.repro`).

Both write ``OUT/results.json`` after every run, so ``--resume`` continues an interrupted study.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import one_line
from .common import Subparsers, UsageError, positive_float, positive_int

NAME = "repro"


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(NAME, help="reproduce one of the paper's experiments (mnist) or the depth study (depth)")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    _add_mnist(studies)
    _add_depth(studies)
    p.set_defaults(func=run)


def _add_mnist(studies: Subparsers) -> None:
    from ..repro.models import MODELS

    m = studies.add_parser(
        "mnist",
        help="the MNIST MLP study: base / dropout / GAAF (+ ReLU, noisy activation), probes, table, figures",
        description="Train the paper's 784-512-256-256-10 MLP variants (SGD + momentum, early stopping on a held-out "
        "10k of the training set), measure eq. 5, net values and node correlations, write OUT/results.json "
        "(after every run; --resume continues it) and PNGs, and print the table next to the paper's numbers.",
    )
    m.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    m.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per model (default 1; paper: 5)")
    m.add_argument("--quick", action="store_true", help="5k/1k/2k subset, 3 epochs: a smoke run for CI")
    m.add_argument("--out", metavar="DIR", help="output folder (default out/repro-mnist, or out/repro-mnist-quick)")
    m.add_argument("--resume", action="store_true", help="continue OUT/results.json, skipping finished runs")
    m.add_argument("--data-dir", metavar="DIR", help="MNIST root (torchvision layout; default $GAAF_DATA_DIR)")
    t = m.add_argument_group("training (the paper does not give its own)")
    t.add_argument("--max-epochs", type=positive_int, help="default 200 (--quick: 3)")
    t.add_argument("--patience", type=positive_int, help="epochs without a better val loss (default 10; --quick: 2)")
    t.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default 0.01)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    t.add_argument("--val-size", type=positive_int, default=10_000, help="held-out training images (default 10000)")
    t.add_argument("--saturation", type=positive_float, default=2.0, help="tanh saturation bound |z| (default 2)")
    _add_runtime(m)


def _add_depth(studies: Subparsers) -> None:
    from ..repro import depth

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
    d.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per cell (default 1)")
    d.add_argument("--quick", action="store_true", help="scikit-learn digits at 16x16, a few hundred images, "
                   "1 epoch per stage: a smoke run for CI (no MNIST needed)")  # fmt: skip
    d.add_argument("--out", metavar="DIR", help="output folder (default out/repro-depth, or out/repro-depth-quick)")
    d.add_argument("--resume", action="store_true", help="continue OUT/results.json, skipping finished runs")
    d.add_argument("--data-dir", metavar="DIR", help="MNIST root (torchvision layout; default $GAAF_DATA_DIR)")
    g = d.add_argument_group("sizing (default: docs/depth-study.md; --quick: its own)")
    for flag in ("train", "val", "test"):
        g.add_argument(f"--{flag}-size", type=positive_int, help=f"{flag} images")
    for flag in ("scratch", "finetune", "pretrain"):
        g.add_argument(f"--{flag}-epochs", type=positive_int, help=f"epochs of the {flag} stage")
    _add_runtime(d)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a log file or a pipe: wide enough that the tables are not folded
        console = Console(highlight=False, width=170)
    start = time.perf_counter()
    study = _depth if args.study == "depth" else _mnist
    try:
        results, path = study(args, console)
    except OSError as e:
        raise UsageError(f"{one_line(e)}; check --out and --data-dir") from e
    figures = ", ".join(results["figures"]) or f"none ({results.get('figures_skipped', 'no finished run')})"
    console.print(f"results: {path}; figures: {figures}", soft_wrap=True)
    console.print(f"wall time {time.perf_counter() - start:.1f} s", soft_wrap=True)
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _depth(args: argparse.Namespace, console: Any) -> tuple[dict[str, Any], Path]:
    from ..repro import depth
    from ..repro.depth_display import DepthReporter, table

    sizing = depth.with_overrides(
        depth.QUICK if args.quick else depth.FULL, train=args.train_size, val=args.val_size,
        test=args.test_size, scratch_epochs=args.scratch_epochs, finetune_epochs=args.finetune_epochs,
        pretrain_epochs=args.pretrain_epochs,
    )  # fmt: skip
    cfg = depth.DepthConfig(
        out=Path(args.out or ("out/repro-depth-quick" if args.quick else "out/repro-depth")),
        models=_names(args.models), variants=_names(args.variants), regimes=_names(args.regimes),
        seeds=args.seeds, sizing=sizing, data_dir=args.data_dir, device=args.device, threads=args.threads,
        resume=args.resume, quick=args.quick,
    )  # fmt: skip
    results = depth.run_study(cfg, DepthReporter(console))
    console.print(table(results))
    return results, cfg.out / depth.RESULTS


def _mnist(args: argparse.Namespace, console: Any) -> tuple[dict[str, Any], Path]:
    from ..repro import mnist
    from ..repro.display import RichReporter, tables
    from ..repro.train import TrainConfig

    quick = mnist.QUICK if args.quick else {}
    train = TrainConfig(
        lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
        max_epochs=args.max_epochs or quick.get("max_epochs", 200),
        patience=args.patience or quick.get("patience", 10),
    )  # fmt: skip
    out = args.out or ("out/repro-mnist-quick" if args.quick else "out/repro-mnist")
    cfg = mnist.StudyConfig(
        out=Path(out), models=_names(args.models), seeds=args.seeds,
        train=train, data_dir=args.data_dir, val_size=args.val_size, saturation=args.saturation,
        device=args.device, threads=args.threads, resume=args.resume, quick=args.quick,
        subset={k: quick[k] for k in ("train", "val", "test")} if quick else None,
    )  # fmt: skip
    results = mnist.run_study(cfg, RichReporter(console))
    for t in tables(results):
        console.print(t)
    return results, cfg.out / mnist.RESULTS
