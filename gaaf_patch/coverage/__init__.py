"""Coverage of the model zoo: does ``gaaf_patch.patch`` patch every timm and torchvision architecture completely?

``gaaf-patch coverage`` (or :func:`run`) builds one model per family (``--all``: every model) with random weights,
patches it with ``strip_dropout=True`` and checks (a) bit-identical eval outputs, (b) no activation left, counted
independently of the report, (c) a deterministic train-mode forward, (d) a working backward, (e) unchanged
``state_dict`` keys. Modules: :mod:`.zoo` (which models), :mod:`.count` (leftovers), :mod:`.check` (one model),
:mod:`.sweep` (many, under time limits; totals), :mod:`.render` (table, markdown, JSON).
"""

from .check import CHECKS, FAIL, PASS, SKIP, Result, check, check_model
from .count import Leftover, RuntimeCounter, leftover_fx, leftover_modules
from .render import console_table, markdown, to_json, totals_line
from .sweep import DEFAULT_MAX_PARAMS, TARGET, Summary, summarize, sweep
from .zoo import Entry, entries, entry_for

__all__ = [
    "Entry",
    "entries",
    "entry_for",
    "check",
    "check_model",
    "sweep",
    "summarize",
    "Summary",
    "Result",
    "Leftover",
    "RuntimeCounter",
    "leftover_modules",
    "leftover_fx",
    "console_table",
    "markdown",
    "to_json",
    "totals_line",
    "CHECKS",
    "PASS",
    "FAIL",
    "SKIP",
    "TARGET",
    "DEFAULT_MAX_PARAMS",
]
