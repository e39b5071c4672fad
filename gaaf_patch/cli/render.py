"""How the subcommands show their results on a terminal (rich tables and lines); ``--json`` bypasses all of this.

Everything that comes from the model or the user (site names, paths, reasons) is data, never rich markup: it is
escaped, or printed with ``markup=False``. rich is imported inside the functions, so ``--help`` and ``--json`` runs do
not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..gradscale import GradientScale
from ..report import Report
from ..verify import NO_GRADIENT, NOT_DIFFERENTIABLE, WRT_INPUT, Verification

__all__ = ["print_report", "print_gradient_scale", "print_calibration", "print_deployment", "coverage_progress"]

NOT_REPLACED = "no activation replaced"  # the gradient-scale note that needs no line of its own
PARAMETERS_ONLY = "integer inputs (token ids): only the parameters' gradient is compared"


def _console(**kw: Any) -> Any:
    from rich.console import Console

    return Console(highlight=False, **kw)


def print_report(
    model_name: str,
    rep: Report,
    check: Verification,
    seconds: float,
    checkpoint: dict[str, Any] | None,
    saved: str | None,
    out: str | None,
) -> None:
    """``patch``: the checkpoint loaded, the sites replaced / stripped / unreached, the summary, and the check."""
    from rich.markup import escape
    from rich.table import Table

    console = _console()

    def table(title: str, columns: Sequence[str], rows: list[Sequence[str]], **kw: Any) -> None:
        t = Table(title=escape(title), **kw)
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in rows:
            t.add_row(*(escape(str(c)) for c in row))
        console.print(t)

    if checkpoint:
        where = f" [{checkpoint['key']}]" if checkpoint["key"] else ""
        console.print(f"loaded {escape(checkpoint['path'])}{escape(where)}", soft_wrap=True)
        old = checkpoint["gaaf_config"]
        if old is not None and old != rep.config:  # the options given now win; say so, since it may be a slip
            console.print(
                f"[yellow]note: it was saved patched with a different config: {escape(str(old))}[/]", soft_wrap=True
            )
    if rep.replaced:
        rows = [
            (r["name"] or "<root>", r["form"], r["target"], r["activation"], f"→ {r['shape']}") for r in rep.replaced
        ]
        table(f"{model_name}: GAAF activations", ("site", "form", "was", "activation", "shape"), rows)
        gains = sorted({r.get("gain", "paper") for r in rep.replaced})
        console.print(f"gain: {', '.join(gains)} (gaaf_patch/gain.py)", soft_wrap=True, markup=False)
    if rep.stripped:
        rows = [
            (r["name"] or "<root>", r.get("form", ""), r.get("target", ""), "" if r.get("p") is None else f"{r['p']:g}")
            for r in rep.stripped
        ]
        table("dropout removed", ("site", "form", "was", "p"), rows)
    if rep.unreached:
        rows = [(r["name"], r.get("form", ""), r.get("target", ""), r.get("reason", "")) for r in rep.unreached]
        table("not patched (unreached)", ("site", "form", "was", "reason"), rows, style="yellow")
    if rep.runtime:
        rows = [(r["name"], r["method"], str(r["sites_seen"]), r["why"]) for r in rep.runtime]
        table("patched at run time (code fx cannot trace)", ("module", "method", "sites so far", "why"), rows)
    droppath = [r for r in rep.kept if not r.get("kind")]  # the others: noise kept on purpose (passes/noise.py)
    if droppath:
        rates = ", ".join(sorted({format(r["p"], "g") for r in droppath}))
        console.print(
            f"kept {len(droppath)} DropPath (p {rates}); --strip-droppath removes them", soft_wrap=True, markup=False
        )
    for r in rep.kept:
        if r.get("kind"):
            where = r["name"] or "<root>"
            at = "" if where in r["reason"] else f" (at {where})"  # a config knob names itself in the reason
            console.print(f"{r['reason']}{at}", soft_wrap=True, markup=False)  # "X kept: why"

    s = rep.summary()
    acts = ", ".join(f"{k} {v}" for k, v in sorted(s["by_activation"].items()))
    console.print(
        f"replaced {s['replaced']}" + (f" ({acts})" if acts else "")
        + f", stripped {s['stripped']}, unreached {s['unreached']}, skipped gates {s['skipped']}"
        + (f", BatchNorms fused {s['fused']}" if s["fused"] else "")
        + f"; patched in {seconds * 1e3:.1f} ms",
        soft_wrap=True,
    )  # fmt: skip
    console.print(_check_line(check), soft_wrap=True)
    if saved:
        console.print(f"saved to {escape(saved)}", soft_wrap=True)
    elif out:
        console.print(f"[red]not saved to {escape(out)}: the check failed[/]", soft_wrap=True)


def _check_line(check: Verification) -> str:
    from rich.markup import escape

    out_word = "[green]ok[/]" if check.output_ok else "[red]FAILED[/]"
    tol = "" if check.output_check == "bit-identical" else f", tolerance {check.output_tolerance:.3g}"
    grad_word = "[green]ok[/]" if check.gradient_ok else "[red]FAILED[/]"
    which = "input gradient" if check.gradient_wrt == WRT_INPUT else f"gradient w.r.t. the {check.gradient_wrt}"
    if check.gradient_expect == NOT_DIFFERENTIABLE:
        grad_text = f"input gradient {NOT_DIFFERENTIABLE}"
    elif check.gradient_expect == NO_GRADIENT:
        grad_text = f"{which} not checked: {check.gradient_expect}"
    else:
        grad_text = (
            f"{which} should {check.gradient_expect}: {grad_word} (max |diff| {check.gradient_max_abs_diff:.3g})"
        )
    on = escape(check.inputs or str(list(check.input_shape)))
    line = f"forward {check.output_check} on {on}: {out_word} (max |diff| {check.output_max_abs_diff:.3g}{tol}); {grad_text}"
    if check.audit is not None:
        a = check.audit
        word = "[green]ok[/]" if a.ok else "[red]FAILED[/]"
        line += (
            f"\naudit (one train-mode step, ops outside GAAF): {word}: {len(a.findings)} found, "
            f"{len(a.findings) - len(a.silent)} in the report, {len(a.silent)} silent"
        )
        line += "".join(f"\n  [red]{escape(f.line())}[/]" for f in a.silent)
    return line


def print_gradient_scale(scale: GradientScale | None, note: str) -> None:
    """``patch``: the train-mode gradient-norm ratio patched / plain, or why it was not measured."""
    console = _console(soft_wrap=True)
    if scale is None:
        if note != NOT_REPLACED:
            console.print(f"gradient scale {note}", markup=False)
        return
    word = "[green]ok[/]" if scale.safe else "[yellow]outside [0.5, 2][/]"
    ratios = (
        f"parameters x{scale.params:.3g}"
        if note == PARAMETERS_ONLY
        else (f"input x{scale.input:.3g}, parameters x{scale.params:.3g}")
    )
    console.print(f"gradient norm patched / plain (train mode): {ratios}: {word}")


def print_calibration(rows: list[dict[str, Any]] | None) -> None:
    """``patch --calibrate``: the dropout noise measured on each site's net and the sigma its shape got."""
    if not rows:
        return
    from rich.markup import escape
    from rich.table import Table

    any_fed = any(r["fed"] for r in rows)
    caption = None if any_fed else "no site is fed by dropout: every site keeps its default shape"
    t = Table(title="calibration: dropout noise on each site's net", caption=caption)
    for col in ("site", "activation", "sigma (masks)", "sigma (eq. 6)", "net RMS", "fed by", "sigma used"):
        t.add_column(col, overflow="fold")
    for r in rows:
        eq6 = "" if r["sigma_eq6"] is None else f"{r['sigma_eq6']:.3g}"
        fed = f"{r['dropout']} (p={r['p']:g})" if r["dropout"] else ("upstream dropout" if r["fed"] else "-")
        used = r["shape"].rsplit("sigma=", 1)[-1].rstrip(")") if r["shape"] else "- (default shape)"
        cells = (r["name"], r["activation"], f"{r['sigma']:.3g}", eq6, f"{r['net_rms']:.3g}", fed, used)
        t.add_row(*(escape(str(c)) for c in cells))
    _console().print(t)


def print_deployment(console: Any, model_name: str, out: str, deploy: dict[str, Any] | None) -> None:
    """``finetune``: where the checkpoint is, and whether it loads into the unpatched model with the same outputs."""
    from rich.markup import escape

    console.print(f"saved {escape(out)}", soft_wrap=True)
    if deploy is None:
        return
    if deploy["ok"]:
        same = "bit-identical" if deploy["bit_identical"] else f"max |diff| {deploy['max_abs_diff']:.3g}"
        console.print(
            f"deployment check: loads with strict=True into the unpatched {escape(model_name)}; "
            f"outputs {same} on a held-out batch [green]ok[/]",
            soft_wrap=True,
        )
    else:
        why = deploy.get("error") or f"outputs differ (max |diff| {deploy['max_abs_diff']:.3g})"
        console.print(f"[red]deployment check FAILED: {escape(why)}[/]", soft_wrap=True)


def coverage_progress(console: Any) -> Any:
    """``coverage``: a callback that prints one line per checked model as the sweep goes."""
    from rich.markup import escape

    def progress(r: Any) -> None:
        mark = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}[r.status]
        line = escape(f"{r.family_id}/{r.name} {r.seconds:.1f}s {r.reason[:150]}")
        console.print(f"{mark} {line}", soft_wrap=True, markup=True)

    return progress
