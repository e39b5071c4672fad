"""Coverage results as a rich table (the terminal), as markdown (docs/coverage.md) and as JSON.

docs/coverage.md holds both sweeps: the timm/torchvision document, then the Hugging Face section between
:data:`HF_BEGIN` and :data:`HF_END`; each sweep's ``--markdown`` rewrites its own part and keeps the other
(:func:`merge_markdown`).
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from typing import Any

from .check import CHECKS, FAIL, PASS, SKIP, Result
from .sweep import Summary

__all__ = [
    "console_table",
    "totals_line",
    "markdown",
    "markdown_hf",
    "merge_markdown",
    "to_json",
    "versions",
    "HF_BEGIN",
    "HF_END",
]

COLUMNS = ("family", "model", "params", "input", "replaced", "stripped", "gates", "checks a-e", "time")
HF_COLUMNS = ("model type", "base class", "params", "inputs", "replaced", "stripped", "gates", "checks a-e", "time")
HF_BEGIN, HF_END = "<!-- coverage --hf: begin -->", "<!-- coverage --hf: end -->"
_HF_CHECKS = "a exact, b audit, c deterministic, d reload, e state_dict"


def versions(hf: bool = False) -> dict[str, str]:
    import timm
    import torch
    import torchvision

    from ..version import __version__

    out = {
        "gaaf_patch": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    if hf:
        import transformers

        out["transformers"] = transformers.__version__
    return out


def _params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def _row(r: Result) -> list[str]:
    if r.source == "hf":  # keyword inputs: "input_ids [2, 8]"
        size = ", ".join(map(str, r.input_size or []))
    else:
        size = "x".join(map(str, r.input_size[1:])) if r.input_size else ""
    failed = [k[0] for k in (r.checks or CHECKS) if r.checks.get(k) is False]
    marks = (
        "skipped" if r.status == SKIP else f"FAIL {' '.join(failed)}" if failed else "ok" if r.status == PASS else "-"
    )
    return [
        r.family if r.source == "hf" else r.family_id,
        r.name,
        _params(r.params),
        size,
        str(r.replaced),
        str(r.stripped),
        str(r.gates),
        marks,
        f"{r.seconds:.1f}s",
    ]


def totals_line(summary: Summary, results: Sequence[Result]) -> str:
    if results and all(r.source == "hf" for r in results):
        return _hf_totals_line(summary, results)
    m = summary.models
    skipped = sum(s == SKIP for s in summary.families.values())
    return (
        f"families: {summary.passed}/{summary.checked} fully patched and verified ({summary.rate:.1%}; target "
        f"{summary.target:.0%}: {'met' if summary.met else 'NOT met'}), {skipped} skipped; models: "
        f"{m.get(PASS, 0)} passed, {m.get(FAIL, 0)} failed, {m.get(SKIP, 0)} skipped of {len(results)}; "
        f"{sum(r.seconds for r in results):.0f} s"
    )


def console_table(results: Sequence[Result], summary: Summary, console: Any = None) -> None:
    """One table per library, a section per family, then the failures and skips with their reasons."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False, width=None if _is_terminal() else 160)
    for source in sorted({r.source for r in results}):
        rows = [r for r in results if r.source == source]
        checks = _HF_CHECKS if source == "hf" else "a exact, b complete, c deterministic, d backward, e state_dict"
        table = Table(title=f"{source}: coverage ({checks})")
        for c in HF_COLUMNS if source == "hf" else COLUMNS:
            table.add_column(c, overflow="fold", justify="right" if c in ("params", "time") else "left")
        for i, r in enumerate(rows):
            last = i + 1 == len(rows) or rows[i + 1].family_id != r.family_id
            style = {FAIL: "red", SKIP: "dim"}.get(r.status)
            table.add_row(*(escape(c) for c in _row(r)), style=style, end_section=last)
        console.print(table)
    skipped = "does not build (not counted)" if all(r.source == "hf" for r in results) else "skipped (not counted)"
    for status, title in ((FAIL, "failures"), (SKIP, skipped)):
        bad = [r for r in results if r.status == status]
        if bad:
            t = Table(title=title, style="red" if status == FAIL else "dim")
            for c in ("model", "reason"):
                t.add_column(c, overflow="fold")
            for r in bad:
                t.add_row(escape(f"{r.family_id}/{r.name}"), escape(r.reason))
            console.print(t)
    console.print(totals_line(summary, results), soft_wrap=True)


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def _counts(results: Sequence[Result]) -> list[str]:
    """How the independent counts saw the checked models: what traced whole, and what ran outside GAAF."""
    ran = [r for r in results if r.status != SKIP and r.input_size]
    whole = sum(r.leftover_fx is not None for r in ran)
    gates = {k: sum(sum(x["gate"] for x in getattr(r, f"leftover_{k}") or []) for r in ran) for k in _KINDS}
    misses = {k: sum(sum(not x["gate"] for x in getattr(r, f"leftover_{k}") or []) for r in ran) for k in _KINDS}
    acts = [f for r in ran for f in r.leftover_runtime if f.get("kind") == "activation"]
    silent = sum(f.get("explained") is None for f in acts)
    randoms = [f for r in ran for f in r.leftover_runtime if f.get("kind") == "random"]
    draws = [f for r in ran for f in r.leftover_runtime if f.get("kind") == "draw"]
    return [
        f"- {whole} of {len(ran)} checked models trace whole with torch.fx, timm's non-traceable modules as leaves "
        "(the others are counted by modules and by the audit only; the patch itself traces each module's own code).",
        "- Activations left, not gates: "
        + ", ".join(f"{misses[k]} by {k}" for k in _KINDS)
        + f", {silent} silent in the audit. Left at a reported gate (not counted as misses): "
        + ", ".join(f"{gates[k]} by {k}" for k in _KINDS)
        + f"; the audit's activation findings the report explains: {len(acts) - silent}.",
        f"- Random ops the audit saw outside GAAF: {len(randoms)} (kind of op per module), "
        f"{sum(f.get('explained') is None for f in randoms)} silent; random draws used as data (part of the model): "
        f"{len(draws)}.",
    ]


_KINDS = ("modules", "fx")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: Sequence[Result], summary: Summary, command: str) -> str:
    """docs/coverage.md: how it was made, the totals, every failure and skip with its reason, then every row."""
    v = versions()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Coverage of the timm and torchvision zoos",
        "",
        f"Generated by `{command}` on {when} (gaaf-patch {v['gaaf_patch']}, torch {v['torch']}, torchvision "
        f"{v['torchvision']}, timm {v['timm']}, Python {v['python']}, CPU). Do not edit: rerun the command.",
        "",
        "Each model is built with random weights, patched with `gaaf_patch.patch(model, strip_dropout=True)` and "
        "checked: **a** eval outputs bit-identical to the unpatched model; **b** no activation left: nothing "
        "unreached in the report, and no activation counted independently of the report (modules of activation "
        "classes, `F.*`/method nodes of a whole-model fx trace where the model traces) and none silent in "
        "`gaaf_patch.audit` (native activation ops run outside GAAF during a train-mode forward and backward, each "
        "explained by the report or silent), gates (a sigmoid multiplying a tensor, left alone on purpose, listed in "
        "the report) excepted; **c** train-mode forward deterministic after stripping (drop-path, which "
        "`strip_dropout` keeps, held in eval mode), and no random op silent in the audit; **d** a backward pass runs and reaches the "
        "input; **e** `state_dict` keys unchanged. Inputs are `--size` square (64 by default) where the model "
        "allows it, else its own size. See gaaf_patch/coverage/ for the details.",
        "",
        "## Totals",
        "",
        totals_line(summary, results),
        "",
        *_counts(results),
        "",
    ]
    for status, title, empty in (
        (FAIL, "Failures", "None."),
        (SKIP, "Skipped (not counted as failures)", "None."),
    ):
        bad = [r for r in results if r.status == status]
        out += [f"## {title}", ""]
        if not bad:
            out += [empty, ""]
            continue
        out += ["| family | model | reason |", "|---|---|---|"]
        out += [f"| {r.family_id} | {r.name} | {_md_escape(r.reason)} |" for r in bad]
        out.append("")
    out += ["## Every model", "", "| " + " | ".join(COLUMNS) + " |"]
    out.append("|" + "---|" * len(COLUMNS))
    out += ["| " + " | ".join(_md_escape(c) for c in _row(r)) + " |" for r in results]
    out.append("")
    return "\n".join(out)


def _hf_totals_line(summary: Summary, results: Sequence[Result]) -> str:
    skipped = sum(r.status == SKIP for r in results)
    return (
        f"model types: {summary.passed}/{summary.checked} of those that build pass every check ({summary.rate:.1%}; "
        f"target {summary.target:.0%}: {'met' if summary.met else 'NOT met'}), "
        f"{summary.checked - summary.passed} fail; {skipped} of {len(results)} do not build with the shrunk config "
        f"(not counted); {sum(r.seconds for r in results):.0f} s"
    )


def markdown_hf(results: Sequence[Result], summary: Summary, command: str) -> str:
    """The Hugging Face section of docs/coverage.md, between :data:`HF_BEGIN` and :data:`HF_END`."""
    v = versions(hf=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ran = [r for r in results if r.status != SKIP]
    silent = sum(1 for r in ran for f in r.leftover_runtime if f.get("explained") is None)
    explained = sum(1 for r in ran for f in r.leftover_runtime if f.get("explained") is not None)
    out = [
        HF_BEGIN,
        "## Hugging Face transformers",
        "",
        f"Generated by `{command}` on {when} (gaaf-patch {v['gaaf_patch']}, transformers {v['transformers']}, torch "
        f"{v['torch']}, Python {v['python']}, CPU). Do not edit: rerun the command.",
        "",
        "Every transformers model type with a base model class (`AutoModel`) is built by `gaaf_patch.hf.build` from "
        "its default config shrunk to a few layers and a narrow width (`gaaf_patch/hf.py`), with random weights, fed "
        "`gaaf_patch.hf.runnable_inputs` (token ids, images, waveforms or features sized from the config), patched "
        "with `gaaf_patch.patch(model, strip_dropout=True)` and checked: **a** eval outputs bit-identical to the "
        "unpatched model; **b** `gaaf_patch.audit` clean: every native activation and random op that ran outside "
        "GAAF in one train-mode forward and backward is explained by the report (a gate, an unreached site with its "
        "reason, a DropPath kept, training noise turned off or kept with its reason) or is a random draw the model "
        "uses as data (`gaaf_patch/draws.py`: a uniform draw compared with a threshold is a dropout, never data); "
        "**c** train-mode forward deterministic (two forwards under different seeds, DropPath held in eval mode; "
        "under one seed, said in the row, where the report keeps noise or the model draws); **d** `save_pretrained` of the patched model, then `from_pretrained` into the "
        "plain class: no missing, unexpected or mismatched keys, the same weights, the same eval outputs; **e** "
        "`state_dict` keys unchanged. A type whose unpatched model does not build or run with the shrunk config is "
        "listed as *does not build*, with the reason, and not counted. See gaaf_patch/coverage/hf.py.",
        "",
        "### Totals",
        "",
        totals_line(summary, results),
        "",
        f"- Audit findings over the checked types: {explained} explained by the report, {silent} silent.",
        "",
    ]
    for status, title in ((FAIL, "Failures"), (SKIP, "Does not build (not counted)")):
        bad = [r for r in results if r.status == status]
        out += [f"### {title}", ""]
        if not bad:
            out += ["None.", ""]
            continue
        out += ["| model type | class | reason |", "|---|---|---|"]
        out += [f"| {r.family} | {r.name} | {_md_escape(r.reason)} |" for r in bad]
        out.append("")
    out += ["### Every model type that builds", "", "| " + " | ".join(HF_COLUMNS) + " |"]
    out.append("|" + "---|" * len(HF_COLUMNS))
    out += ["| " + " | ".join(_md_escape(c) for c in _row(r)) + " |" for r in ran]
    out += ["", HF_END, ""]
    return "\n".join(out)


def merge_markdown(old: str, new: str) -> str:
    """``new`` (one sweep's markdown) in place of its part of ``old`` (the file as it is), the other part kept."""
    start, end = old.find(HF_BEGIN), old.find(HF_END)
    hf_part = old[start : end + len(HF_END)] if 0 <= start < end else ""
    if new.startswith(HF_BEGIN):
        rest = old.replace(hf_part, "").rstrip() if hf_part else old.rstrip()
        return (rest + "\n\n" if rest else "") + new
    return new.rstrip() + ("\n\n" + hf_part + "\n" if hf_part else "\n")


def to_json(results: Sequence[Result], summary: Summary, command: str) -> str:
    doc = {
        "command": command,
        "versions": versions(hf=any(r.source == "hf" for r in results)),
        "summary": summary.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    return json.dumps(doc, indent=1, default=str)
