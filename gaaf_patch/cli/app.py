"""The ``gaaf-patch`` parser, assembled from the subcommand modules, and the mapping from errors to exit codes.

A subcommand is one module with ``NAME``, ``add_parser(subparsers)`` (which sets ``func``) and ``run(args)``
returning the exit code, listed in :data:`COMMANDS`. ``gaaf-patch MODEL`` is short for ``gaaf-patch patch MODEL``.

Errors are told apart by type, never by message: a :class:`~gaaf_patch.errors.GaafError` is the user's to fix (one
line, exit 2; :class:`~gaaf_patch.verify.VerificationFailed`, exit 1); an interrupt is one line, exit 130; anything
else is a bug in gaaf-patch, and its traceback is what a report needs: it is printed, exit 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from ..errors import GaafError, one_line
from ..verify import VerificationFailed
from . import coverage, finetune, kernels, patch, repro
from .common import PROG

__all__ = ["main", "build_parser", "COMMANDS", "DEFAULT_COMMAND"]

COMMANDS = (patch, finetune, repro, coverage, kernels)
DEFAULT_COMMAND = patch.NAME
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130: the shell's code for a process ended by SIGINT
EXIT_INTERNAL = EXIT_FAILED  # a bug: its traceback, and 1 like any uncaught Python exception


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`COMMANDS`."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Replace a model's activations by GAAF activations (Hahn & Choi) and check the result. "
        f"'{PROG} MODEL ...' is short for '{PROG} {DEFAULT_COMMAND} MODEL ...'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert the default subcommand unless the first argument names one (or asks for top-level help)."""
    if argv and (argv[0] in {c.NAME for c in COMMANDS} or argv[0] in ("-h", "--help", "--version")):
        return argv
    return [DEFAULT_COMMAND, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code instead of exiting, so tests
    and other programs can call it in-process.

    0 success; 1 the check failed (the patch, or the fine-tuning's deployment check), or an internal error (a bug:
    its traceback on stderr); 2 a usage error, argparse's or any :class:`~gaaf_patch.errors.GaafError` (one line on
    stderr, no traceback); 130 interrupted (Ctrl-C; one line).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_with_default_command(argv))
    except SystemExit as e:  # argparse: --help, --version (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except VerificationFailed as e:
        print(f"{PROG}: verification failed: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except GaafError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # subcommands that have more to say (finetune: which checkpoint) catch it first
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - not raised on purpose: a bug, shown as one, with its traceback
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
