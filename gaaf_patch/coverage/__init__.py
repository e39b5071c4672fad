"""Coverage of the model zoo: does ``gaaf_patch.patch`` patch every timm, torchvision and Hugging Face
architecture completely?

``gaaf-patch coverage`` builds one model per family (``--all``: every model) with random weights, patches it with
``strip_dropout=True`` and checks (a) bit-identical eval outputs, (b) no activation left, counted independently of
the report and by :func:`gaaf_patch.audit.audit`, (c) a deterministic train-mode forward, (d) a working backward,
(e) unchanged ``state_dict`` keys. ``gaaf-patch coverage --hf`` does the same for every transformers model type,
with a ``save_pretrained`` / ``from_pretrained`` round trip as (d) (:mod:`.hf`). Modules: :mod:`.zoo` (which
models), :mod:`.count` (leftovers), :mod:`.check` (one model), :mod:`.hf` (one transformers model type),
:mod:`.status` (outcomes, DropPath held), :mod:`.sweep` (many, under time limits; totals), :mod:`.render` (table,
markdown, JSON).
"""

from .check import CHECKS, FAIL, PASS, SKIP, Result, check, check_model
from .count import Leftover, leftover_fx, leftover_modules
from .hf import DOES_NOT_BUILD, HF_CHECKS, HF_TARGET, check_hf
from .render import console_table, markdown, markdown_hf, merge_markdown, to_json, totals_line
from .sweep import DEFAULT_MAX_PARAMS, TARGET, Summary, summarize, sweep
from .zoo import Entry, entries, entry_for, hf_entries

__all__ = [
    "Entry",
    "entries",
    "entry_for",
    "hf_entries",
    "check_hf",
    "HF_CHECKS",
    "HF_TARGET",
    "DOES_NOT_BUILD",
    "markdown_hf",
    "merge_markdown",
    "check",
    "check_model",
    "sweep",
    "summarize",
    "Summary",
    "Result",
    "Leftover",
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
