"""``gaaf-patch``: patch a model from the command line, check the patch, and optionally save it.

A thin layer over the library: it parses flags, calls :func:`gaaf_patch.patch`, :func:`gaaf_patch.verify.verify`,
:func:`gaaf_patch.finetune.finetune` and the studies, and prints what they return. ``app`` assembles the parser and
maps errors to exit codes; ``common`` holds the shared options; one module per subcommand (``patch``, ``finetune``,
``repro``, ``coverage``, ``kernels``); ``render`` draws the tables. ``python -m gaaf_patch.cli`` runs it too
(``torchrun ... -m gaaf_patch.cli finetune`` for data-parallel fine-tuning).

Exit codes: 0 success, 1 the check failed or an internal error (a bug: its traceback), 2 a usage error (one line on
stderr, no traceback), 130 interrupted.
"""

from .app import main

__all__ = ["main"]
