"""``gaaf-patch kernels``: build the fused CPU backward kernel now, rather than on first use, and say where it is."""

from __future__ import annotations

import argparse

from .common import Subparsers, UsageError

NAME = "kernels"


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        NAME,
        help="build the fused CPU backward kernel now (else it is built on first use) and say where it is cached",
        description="Compile gaaf_patch's C++ CPU backward kernel (about 30 s, once per torch version, CPU "
        "capability and kernel source; cached under $TORCH_EXTENSIONS_DIR). Exit code 2 when it cannot be built: "
        "training then uses plain torch ops, with the same results, more slowly.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import kernels

    if not kernels.enabled():
        raise UsageError("the kernel is turned off (GAAF_KERNELS=off); unset GAAF_KERNELS to build it")
    print(f"gaaf_patch CPU kernel ready: {kernels.build()}")  # a KernelBuildError is a GaafError: one line, exit 2
    return 0
