"""The depth study as the CLI shows it: :class:`.display.RichReporter`'s progress bars, a line per epoch in a log,
and one summary table (mean (std) over seeds per model, regime and variant)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .depth_setup import GAAF_VARIANTS, STAGES
from .display import RichReporter, mean_std
from .train import EpochLog

__all__ = ["DepthReporter", "table"]


class DepthReporter(RichReporter):
    """Runs are labelled ``model regime variant``; without a terminal every epoch is a line (runs are short)."""

    title = "depth study"
    log_every = 1

    def start(self, runs, done, sizes: dict[str, Any], device: str) -> None:
        self._begin(f"depth study on {device}: {sizes['source']} {sizes['size']}x{sizes['size']}, train "
                    f"{sizes['train']}, validation {sizes['val']}, test {sizes['test']}", runs, done)  # fmt: skip

    def _epoch_info(self, log: EpochLog) -> str:
        return f"loss {log.train_loss:.4f}  val {log.val_acc:.2f}%  best ep {log.best_epoch}  {log.seconds:.1f} s"

    def run_end(self, model: str, seed: int, run: dict[str, Any]) -> None:
        if "pretrain" not in model:
            self.progress.advance(self._all)
        acc = "-" if run["test_acc"] is None else f"{run['test_acc']:.2f}%"
        div = f", DIVERGED in epoch {run['diverged_epoch']}" if run["diverged"] else ""
        ratio = run.get("grad_ratio", {}).get("layer1")
        grad = f", layer1 grad ratio {ratio[0]:.3g} -> {ratio[-1]:.3g}" if ratio else ""
        self.progress.console.print(
            f"{model} seed {seed}: test {acc} at epoch {run['best_epoch']} ({run['epochs_run']} run, "
            f"{run['wall_s']:.0f} s){div}{grad}",
            soft_wrap=True,
        )


def _ratio_cell(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['mean']:.3g}" + (f" ({s['std']:.2g})" if s["n"] > 1 else "")


def table(results: dict[str, Any]) -> Table:
    """Per model, regime and variant: test accuracy, best epoch, epochs and seconds to the plain model's best
    validation accuracy (n reached / n runs), wall time, diverged runs, and the GAAF gradient ratio per stage at the
    last epoch."""
    summary = results.get("summary", {})
    seeds = max((len(v["seeds"]) for g in summary.values() for c in g.values() for v in c.values()), default=0)
    quick = " (--quick)" if results.get("setup", {}).get("quick") else ""
    t = Table(title=f"Depth study: mean (std) over {seeds} seed(s){quick}; grad ratio = patched / plain gradient norm "
              "at the stage output, last epoch")  # fmt: skip
    cols = ["model", "regime", "variant", "test acc %", "best ep", "ep to plain best", "s to plain best", "wall s",
            "diverged", *(f"ratio {s}" for s in STAGES)]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "regime", "variant") else "right")
    for m, regimes in summary.items():
        for g, variants in regimes.items():
            for v, s in variants.items():
                n = len(s["seeds"])
                final = s.get("grad_ratio_final", {})
                t.add_row(
                    m, g, v, mean_std(s["test_acc"]), mean_std(s["best_epoch"], ".1f"),
                    f"{mean_std(s['epochs_to_plain_best'], '.1f')} [{s['reached_plain_best']}/{n}]",
                    mean_std(s["seconds_to_plain_best"], ".0f"), mean_std(s["wall_s"], ".0f"), f"{s['diverged']}/{n}",
                    *(_ratio_cell(final.get(st)) if v in GAAF_VARIANTS else "1" for st in STAGES),
                )  # fmt: skip
    return t
