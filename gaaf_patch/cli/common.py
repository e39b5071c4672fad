"""What several subcommands share: the usage error, argument types, and the model and patch options.

Argument types raise ``argparse.ArgumentTypeError``, so argparse prints the usage and exits with code 2 before any
work starts; later input problems raise :class:`UsageError`, which :func:`gaaf_patch.cli.app.main` prints as one
line, also with code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Protocol

from ..config import GAINS
from ..errors import GaafError, one_line
from ..ops import DEFAULT_K, MODES

PROG = "gaaf-patch"


class UsageError(GaafError):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class Subparsers(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as a subcommand uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


# ------------------------------------------------------------------------------------------------------- file paths


def require_directory(path: str, flag: str = "") -> None:
    """Fail before the work, not after it, when ``path`` (an output file) is in a folder that does not exist."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{f'{flag} ' if flag else ''}{path}: no such directory {parent}")


def write_text(flag: str, path: str, text: str) -> None:
    """Write an output file the user named; a failure (permissions, a full disk) is a usage error saying so."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write it ({one_line(e)}); choose another path") from e


# ------------------------------------------------------------------------------------------------------ arg types


def input_size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive integers C,H,W (e.g. 3,224,224), got {text!r}")
    return dims


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def _shape_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected ACTIVATION=SHAPE (e.g. relu=relu_keras), got {text!r}")
    return key.strip(), value.strip()


# ---------------------------------------------------------------------------------------------- shared options


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --checkpoint, --num-classes: every subcommand that builds a model takes these."""
    p.add_argument(
        "model", metavar="MODEL",
        help="timm name (resnet50), tv:NAME (torchvision), hf:TYPE (a transformers model type, shrunk config, e.g. "
        "hf:bert), hf:DIR (a save_pretrained directory) or FILE.py:FACTORY",
    )  # fmt: skip
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (strictly) before patching")
    p.add_argument("--num-classes", type=positive_int, metavar="N", help="classifier outputs (default: the model's)")


def add_patch_options(p: argparse.ArgumentParser) -> None:
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


def patch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`gaaf_patch.patch` that :func:`add_patch_options` parsed."""
    return {
        "activations": args.activations,
        "shapes": dict(args.shapes),
        "gain": args.gain,
        "strip_dropout": args.strip_dropout,
        "strip_droppath": args.strip_droppath,
        "mode": args.mode,
        "K": args.K,
    }
