"""``benchmarks.run``'s results as tables: rich tables on the console and a markdown table for docs/performance.md.
The base variant is shown in absolute units, every other variant as its ratio to the base."""

from __future__ import annotations

from typing import Any

__all__ = ["render", "markdown"]


def _fmt_ratio(r: dict[str, float], iqr: bool = False) -> str:
    """``1.034x``, with the interquartile range of the per-repeat ratios when ``iqr``: ``1.034x [1.01-1.06]``."""
    return f"{r['ratio']:.3f}x" + (f" [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]" if iqr else "")


def render(results: dict[str, Any], console) -> None:
    from rich.table import Table

    info = results["machine"]
    console.print(
        f"[bold]gaaf-patch benchmarks[/] {info['date']}  {info['cpu']} ({info['cpu_count']} cpus, "
        f"{info['torch_threads']} torch threads)  torch {info['torch']}"
    )
    for r in results["models"].values():
        t = Table(title=f"{r['label']} - eager (base: absolute; others: ratio to base, median of per-repeat ratios)")
        for col in ("variant", "step", "fwd (train)", "infer", "peak mem", "saved act."):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for v in r["eager"]["step"]:
            cells = _eager_cells(r, v)
            t.add_row(v, *cells)
        console.print(t)
        if "compiled" in r:
            c = Table(title=f"{r['label']} - torch.compile (ratio to compiled base)")
            for col in ("variant", "step", "vs eager base", "compile (first step)"):
                c.add_column(col, justify="left" if col == "variant" else "right")
            for v, s in r["compiled"].items():
                step = f"{s['ms']:.2f} ms" if v == "base" else _fmt_ratio(s, iqr=True)
                c.add_row(v, step, f"{s['vs_eager_base']:.3f}x", f"{s['compile_s']:.1f} s")
            console.print(c)
        for note in r["notes"]:
            console.print(f"  note: {note}")
    console.print("patch time: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in results["patch_s"].items()))


def _eager_cells(r: dict[str, Any], v: str) -> list[str]:
    """The eager row of variant ``v``: absolute for the base, ratios to it for the others."""
    e, m = r["eager"], r["memory"][v]
    if v == "base":
        cells = [f"{e[w][v]['ms']:.2f} ms" for w in ("step", "fwd", "infer")]
        return cells + [f"{m['peak_MB']:.1f} MB" if m["peak_MB"] is not None else "n/a", f"{m['saved_MB']:.1f} MB"]
    cells = [_fmt_ratio(e[w][v], iqr=w == "step") for w in ("step", "fwd", "infer")]
    return cells + [f"{m['peak_ratio']:.3f}x" if m["peak_ratio"] is not None else "n/a", f"{m['saved_ratio']:.3f}x"]


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"`{' '.join(results['command'])}` on {info['date'][:10]}, {info['cpu']} ({info['cpu_count']} cpus, "
        f"{info['torch_threads']} torch threads, {info['cpu_capability']}), torch {info['torch']}, "
        f"torchvision {info['torchvision']}, timm {info['timm']}, commit {info['git_commit'] or '?'}.",
        "",
        "| model | variant | step | fwd (train) | infer | peak mem | saved act. |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        for v in r["eager"]["step"]:
            cells = _eager_cells(r, v)
            lines.append(f"| {name} | {v} | " + " | ".join(cells) + " |")
    if any("compiled" in r for r in results["models"].values()):
        lines += [
            "",
            "| model | compiled variant | step | vs eager base | compile (first step) |",
            "|---|---|---:|---:|---:|",
        ]
        for name, r in results["models"].items():
            for v, s in r.get("compiled", {}).items():
                step = f"{s['ms']:.2f} ms" if v == "base" else _fmt_ratio(s, iqr=True)
                lines.append(f"| {name} | {v} | {step} | {s['vs_eager_base']:.3f}x | {s['compile_s']:.1f} s |")
    lines += ["", "patch time: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in results["patch_s"].items())]
    notes = [f"{n}: {note}" for n, r in results["models"].items() for note in r["notes"]]
    lines += [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
