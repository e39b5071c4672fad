"""The depth benchmark's results (:mod:`benchmarks.depth`): the JSON file, rewritten atomically after every model,
the table (rich on stdout, or markdown) and the summary counts.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from gaaf_patch.gradscale import SAFE
from gaaf_patch.repro.study import save

__all__ = ["save_json", "ratios_text", "table_rows", "COLUMNS", "markdown", "print_table", "summarize"]


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def save_json(results: dict[str, Any], path: Path) -> None:
    """``results`` to ``path`` atomically (:func:`gaaf_patch.repro.study.save`), every non-finite float as ``null``:
    strict JSON, which any reader parses."""
    save(_json_safe(results), path)


def _fmt(r: float | None) -> str:
    if r is None:
        return "overflow"
    if abs(r) < 10:
        return f"{r:.3f}" if abs(r) >= 1e-3 or r == 0 else f"{r:.2e}"
    return f"{r:.0f}" if abs(r) < 1e4 else f"{r:.2e}"


def ratios_text(whole: dict[str, Any]) -> str:
    """``paper P/I auto P/I``: the whole-network ratios (parameters / input) of one measurement, for the log."""
    return " ".join(f"{g} {_fmt(whole[g]['params'])}/{_fmt(whole[g]['input'])}" for g in ("paper", "auto"))


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per measurement: model, when, input, paper params / input ratio, auto params / input ratio, auto
    per-stage range, in target."""
    rows = []

    def add(model: str, when: str, size: Any, m: dict[str, Any]) -> None:
        w = m["whole"]
        rng = m.get("auto_stage_range")
        if m["zero_gradient"]:
            rows.append([model, when, "x".join(map(str, size[1:])), *["n/a"] * 4, "", "n/a: plain gradient is 0"])
            return
        rows.append(
            [
                model,
                when,
                "x".join(map(str, size[1:])) if size else "",
                _fmt(w["paper"]["params"]),
                _fmt(w["paper"]["input"]),
                _fmt(w["auto"]["params"]),
                _fmt(w["auto"]["input"]),
                f"{_fmt(rng[0])}-{_fmt(rng[1])}" if rng else "whole only",
                "yes" if m["in_target"] else "NO",
            ]
        )

    for r in results["init"]:
        if r["status"] == "ok":
            add(r["model"], "init", r["input_size"], r)
            if "head_reinit" in r:
                add(r["model"], "init, zero head redrawn", r["input_size"], r["head_reinit"])
        else:
            rows.append([r["model"], "init", "", r["status"], r.get("reason", "")[:60], "", "", "", ""])
    for r in results.get("trained", []):
        if r["status"] == "ok":
            acc = f"trained (acc {r['train']['train_acc']:.2f})"
            add(r["model"], "init (digits)", r["input_size"], r["init"])
            add(r["model"], acc, r["input_size"], r["trained"])
        else:
            rows.append([r["model"], "trained", "", r["status"], r.get("reason", "")[:60], "", "", "", ""])
    return rows


COLUMNS = (
    "model",
    "weights",
    "input",
    "params paper",
    "input paper",
    "params auto",
    "input auto",
    "auto per stage",
    "auto in [0.5, 2]",
)


def markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5 + ["---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GAAF gradient-norm ratio patched / plain (target [{SAFE[0]}, {SAFE[1]}])")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "weights", "input") else "right", no_wrap=c == "model")
    for row in table_rows(results):
        t.add_row(*row, style="bold red" if row[-1] == "NO" else None)
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results["init"] if r["status"] == "ok"]
    tr = [r for r in results.get("trained", []) if r["status"] == "ok"]
    heads = [r for r in ok if "head_reinit" in r]

    def out(rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return [{"model": n, **m["whole"]["auto"]} for n, m in rows if m["in_target"] is False]

    return {
        "init_measured": len(ok),
        "init_skipped": [r["model"] for r in results["init"] if r["status"] == "skip"],
        "init_errors": [r["model"] for r in results["init"] if r["status"] == "error"],
        "init_auto_in_target": sum(r["in_target"] is True for r in ok),
        "init_zero_gradient": [r["model"] for r in ok if r["zero_gradient"]],
        "init_auto_out_of_target": out(
            [(r["model"], r) for r in ok] + [(f"{r['model']} (head redrawn)", r["head_reinit"]) for r in heads]
        ),
        "init_head_redrawn": [r["model"] for r in heads],
        "init_head_redrawn_auto_in_target": sum(r["head_reinit"]["in_target"] is True for r in heads),
        "init_whole_network_only": [r["model"] for r in ok if not r["stages"]],
        "forward_not_identical": [r["model"] for r in ok if not all(r["forward_identical"].values())],
        "trained_measured": len(tr),
        "trained_auto_in_target": sum(r["trained"]["in_target"] is True for r in tr),
        "trained_auto_out_of_target": out([(r["model"], r["trained"]) for r in tr]),
        "trained_errors": [r["model"] for r in results.get("trained", []) if r["status"] == "error"],
    }
