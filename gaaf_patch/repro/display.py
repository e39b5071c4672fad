"""The study as the CLI shows it: a rich progress display while training, and tables next to the paper's numbers.

When the console is not a terminal (a background run writing to a log), the live bars are off; a line every
``LOG_EVERY`` epochs and one per finished run are printed instead, so the log says how far the study got.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .models import MODELS, PAPER, PAPER_GRADIENT_INFO
from .study import Reporter
from .train import EpochLog

__all__ = ["RichReporter", "tables", "mean_std"]

LOG_EVERY = 10


def mean_std(s: dict[str, float] | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    """``mean (std)``; the std only when there is more than one seed."""
    if not s or not s.get("n") or not math.isfinite(s["mean"]):
        return "-"
    text = f"{s['mean'] * scale:{fmt}}"
    return text + (f" ({s['std'] * scale:{fmt}})" if s["n"] > 1 else "")


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, disable=not live, transient=False,
        )  # fmt: skip
        self._all = self._run = None

    title = "study"  # the overall bar's label
    log_every = LOG_EVERY  # without a terminal: a line every this many epochs

    def start(self, runs, done, sizes: dict[str, int], device: str) -> None:
        self._begin(f"MNIST study on {device}: train {sizes['train']}, validation {sizes['val']}, test {sizes['test']}",
                    runs, done)  # fmt: skip

    def _begin(self, line: str, runs: list[Any], done: list[Any]) -> None:
        """The study's first line, with the runs to do and those a resume skips; then the live bars."""
        resumed = f", {len(done)} already done (resumed)" if done else ""
        self.console.print(f"{line}; {len(runs)} run(s) to do{resumed}", soft_wrap=True)
        self.progress.start()
        self._all = self.progress.add_task(self.title, total=len(runs), info="")

    def run_start(self, model: str, seed: int, max_epochs: int) -> None:
        if self._run is not None:
            self.progress.remove_task(self._run)
        self._run = self.progress.add_task(f"{model} seed {seed}", total=max_epochs, info="")

    def epoch(self, model: str, seed: int, log: EpochLog) -> None:
        info = self._epoch_info(log)
        self.progress.update(self._run, completed=log.epoch, info=info)
        if not self.console.is_terminal and log.epoch % self.log_every == 0:
            self.console.print(f"{model} seed {seed}: epoch {log.epoch}: {info}", soft_wrap=True)

    def _epoch_info(self, log: EpochLog) -> str:
        return (f"loss {log.train_loss:.4f}  val {log.val_loss:.4f} / {log.val_acc:.2f}%  best ep {log.best_epoch}"
                f"  {log.seconds:.1f} s/ep")  # fmt: skip

    def run_end(self, model: str, seed: int, run: dict[str, Any]) -> None:
        self.progress.advance(self._all)
        self.progress.console.print(
            f"{model} seed {seed}: test {run['test_acc']:.2f}% at epoch {run['best_epoch']} "
            f"({run['epochs_run']} run, {run['wall_s']:.0f} s, {run['s_per_epoch']:.2f} s/epoch)",
            soft_wrap=True,
        )

    def finish(self, results: dict[str, Any]) -> None:
        self.progress.stop()


def tables(results: dict[str, Any]) -> list[Table]:
    """Ours next to the paper's: Table 4 (+ time), Table 2 (eq. 5) with the saturation fractions, Table 1 (counts);
    and the sigmas a calibrated model measured, when the study has one."""
    summary = results.get("summary", {})
    seeds = max((len(s["seeds"]) for s in summary.values()), default=0)
    quick = " (--quick subset)" if results.get("setup", {}).get("quick") else ""
    acc = Table(title=f"MNIST 784-512-256-256-10: mean (std) over {seeds} seed(s){quick}; paper = Hahn & Choi Table 4")
    for col in ("model", "test acc %", "paper", "best epoch", "paper", "epochs run", "s/epoch", "wall s"):
        acc.add_column(col, justify="left" if col == "model" else "right")
    for m, s in summary.items():
        paper = PAPER.get(m, {})
        acc.add_row(
            m, mean_std(s["test_acc"]), f"{paper['test_acc']:.2f}" if paper else "",
            mean_std(s["best_epoch"], ".0f"), f"{paper['epochs']}" if paper else "",
            mean_std(s["epochs_run"], ".0f"), mean_std(s["s_per_epoch"], ".2f"), mean_std(s["wall_s"], ".0f"),
        )  # fmt: skip

    layers = list(dict.fromkeys(k for s in summary.values() for k in s["gradient_info"]))
    sites = list(dict.fromkeys(k for s in summary.values() for k in s["saturation"]))
    probes = Table(title="Gradient information per weight layer (eq. 5, from the input; mean ±std; paper's Table 2 in "
                   "brackets) "
                   "and % of test-set nets in the saturation area per hidden layer")  # fmt: skip
    probes.add_column("model")
    for k in layers:
        probes.add_column(f"G {k}", justify="right")
    for k in sites:
        probes.add_column(f"sat {k}", justify="right")
    for m, s in summary.items():
        pg = PAPER_GRADIENT_INFO.get(m, {})
        row = [m]
        for k in layers:
            g = s["gradient_info"].get(k)
            cell = "-" if not g or not g["n"] else f"{g['mean']:.2e}" + (f" ±{g['std']:.0e}" if g["n"] > 1 else "")
            row.append(cell + (f" ({pg[k]:.2e})" if k in pg else ""))
        for k in sites:
            sat = s["saturation"].get(k)
            row.append(mean_std(sat, ".1f", 100.0))
        probes.add_row(*row)

    corr = Table(
        title="Node pairs with correlation above 0.9 / 0.8 / 0.7 / 0.6 / 0.5 per hidden layer (test set, mean)"
    )
    corr.add_column("model")
    csites = list(dict.fromkeys(k for s in summary.values() for k in s["correlations"]))
    for k in csites:
        corr.add_column(k, justify="right")
    for m, s in summary.items():
        cells = []
        for k in csites:
            c = s["correlations"].get(k, {})
            cells.append(" / ".join(f"{v['mean']:.0f}" for v in c.values()) if c else "-")
        corr.add_row(m, *cells)
    sigma = {m: s["calibration_sigma"] for m, s in summary.items() if s.get("calibration_sigma")}
    cal = Table(title="Calibrated models: dropout noise sigma on each site's net, measured at init (mean (std)); "
                "0: no dropout feeds the site, it keeps the paper's shape")  # fmt: skip
    cal.add_column("model")
    for k in dict.fromkeys(k for v in sigma.values() for k in v):
        cal.add_column(f"sigma {k}", justify="right")
    for m, v in sigma.items():
        cal.add_row(m, *(mean_std(x, ".3f") for x in v.values()))
    notes = ", ".join(f"{m}: {MODELS[m].description}" for m in summary if m in MODELS)
    models = Table.grid()
    models.add_row(f"models - {notes}; saturation: tanh |z| > {results.get('setup', {}).get('saturation', 2):g}, "
                   "ReLU z < 0, hard-tanh |z| > 1")  # fmt: skip
    return [acc, probes, corr, *([cal] if sigma else []), models]
