"""The paper's MNIST study, resumable: every (model, seed) run, its probes, ``results.json`` and the figures.

Each run trains one model (:mod:`.models`) with :func:`.train.train`, then measures the trained model on the test set:
net-value histograms and saturation fractions per activation site, node-pair correlations per hidden layer; the
gradient information (eq. 5) is measured during training. After every finished run ``results.json`` in the output
folder is rewritten atomically (temp file + ``os.replace``), so a study killed at any point loses at most the run in
progress, and ``resume=True`` skips the runs already there (refusing when the training setup differs).

Validation: the last ``val_size`` (10,000) images of MNIST's training set; training: the rest; test: MNIST's test set.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import data as _data
from ..analysis import NetValues, NodeCorrelations, plots
from ..analysis.sites import ACTIVATION_MODULES
from . import study
from .models import MODELS, PAPER, PAPER_GRADIENT_INFO, build, calibrate_at_init
from .noisy import NoisyHardTanh
from .study import Reporter, stats
from .train import Data, StudyError, TrainConfig, train

__all__ = ["StudyConfig", "Reporter", "run_study", "load_data", "summarize", "write_figures", "RESULTS", "QUICK"]

RESULTS = "results.json"
VERSION = 1
# --quick: a subset and a few epochs, for CI and a first look. Full-size flags given explicitly still win.
QUICK = {"train": 5000, "val": 1000, "test": 2000, "max_epochs": 3, "patience": 2}
SITES = (*ACTIVATION_MODULES, NoisyHardTanh)
CORR_BINS = 40


@dataclass
class StudyConfig:
    out: Path
    models: tuple[str, ...] = tuple(MODELS)
    seeds: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None
    val_size: int = 10_000
    subset: dict[str, int] | None = None  # {"train", "val", "test"}: first N of each split
    saturation: float = 2.0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    quick: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise StudyError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
        if self.seeds < 1:
            raise StudyError("--seeds must be at least 1")

    def setup(self) -> dict[str, Any]:
        """What a result depends on besides model and seed: a resumed study must have the same."""
        return {"train": self.train.to_dict(), "val_size": self.val_size, "subset": self.subset,
                "saturation": self.saturation, "quick": self.quick}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data


def load_data(cfg: StudyConfig) -> Data:
    """MNIST as flat float tensors: train / validation (the last ``val_size`` of the training set) / test."""
    study.require_mnist(cfg.data_dir)
    tr = _data.mnist(cfg.data_dir, train=True, download=False)
    te = _data.mnist(cfg.data_dir, train=False, download=False)
    x, y = tr.images.flatten(1), tr.labels
    if not 0 < cfg.val_size < len(y):
        raise StudyError(f"validation size {cfg.val_size} must be between 1 and {len(y) - 1}")
    cut = len(y) - cfg.val_size
    parts = [x[:cut], y[:cut], x[cut:], y[cut:], te.images.flatten(1), te.labels]
    if cfg.subset:
        n = (cfg.subset["train"], cfg.subset["train"], cfg.subset["val"], cfg.subset["val"], cfg.subset["test"],
             cfg.subset["test"])  # fmt: skip
        parts = [p[:k] for p, k in zip(parts, n, strict=True)]
    return Data(*(p.contiguous() for p in parts))


# ---------------------------------------------------------------------------------------------------------- runs


def _saturation(kind: str, t: float) -> float | Callable[[Tensor], Tensor]:
    if kind == "relu":
        return lambda z: z < 0
    return 1.0 if kind == "hardtanh" else t


def _label(names: list[str], prefix: str) -> dict[str, str]:
    return {n: f"{prefix}{i}" for i, n in enumerate(names, 1)}


def measure(model: torch.nn.Module, x: Tensor, kind: str, saturation: float) -> dict[str, Any]:
    """Net values and node correlations of a trained model on ``x`` (eval mode), keyed ``act1, act2, ...``."""
    from ..analysis import forward_over

    with NetValues(model, SITES, saturation=_saturation(kind, saturation)) as nv, NodeCorrelations(model, SITES) as nc:
        forward_over(model, x, batch_size=2000)
    names = _label(list(nv.sites), "act")
    nets, corrs = nv.result(), nc.result()
    out_nets, out_corr = {}, {}
    for site, label in names.items():
        r = nets[site]
        out_nets[label] = {
            "site": site, "saturated": r["saturated"], "mean": r["mean"], "std": r["std"], "count": r["count"],
            "below": r["below"], "above": r["above"], "range": [float(r["edges"][0]), float(r["edges"][-1])],
            "counts": r["counts"].astype(int).tolist(),
        }  # fmt: skip
        c = corrs[site]
        hist = plots.histogram(c["values"], bins=CORR_BINS)
        out_corr[label] = {
            "site": site, "nodes": c["nodes"], "pairs": c["pairs"], "constant": c["constant"], "counts": c["counts"],
            "hist": hist["counts"].astype(int).tolist(),
        }  # fmt: skip
    return {"net_values": out_nets, "correlations": out_corr}


def run_one(name: str, seed: int, data: Data, cfg: StudyConfig, reporter: Reporter) -> dict[str, Any]:
    """Train and measure one (model, seed)."""
    torch.manual_seed(seed)
    model = build(name).to(data.x_train.device)
    calibration = calibrate_at_init(model, data.x_train, seed) if MODELS[name].calibrate else None
    reporter.run_start(name, seed, cfg.train.max_epochs)
    res = train(model, data, cfg.train, seed=seed, on_epoch=lambda log: reporter.epoch(name, seed, log))
    layers = _label(list(res["gradient_info"]), "layer")
    res["gradient_info"] = {layers[k]: v for k, v in res["gradient_info"].items()}
    res.update(measure(model, data.x_test, MODELS[name].saturation, cfg.saturation))
    res["saturation"] = {k: v["saturated"] for k, v in res["net_values"].items()}
    if calibration is not None:  # per site (act1, act2, ... as in net_values) the sigma measured at init
        calibration["sites"] = {f"act{i}": s for i, s in enumerate(calibration["sites"], 1)}
        res["calibration"] = calibration
    return {"model": name, "seed": seed, **res}


# ------------------------------------------------------------------------------------------------------- results


def summarize(runs: list[dict[str, Any]], models: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Mean and (sample) std over seeds, per model: accuracy, epochs, time, eq. 5 per layer, saturation per site,
    correlation counts per layer; for a calibrated model also the dropout noise sigma per site measured at init."""
    order = models or list(dict.fromkeys(r["model"] for r in runs))
    out: dict[str, dict[str, Any]] = {}
    for m in order:
        rs = [r for r in runs if r["model"] == m]
        if not rs:
            continue
        s: dict[str, Any] = {k: stats([r[k] for r in rs]) for k in
                             ("test_acc", "best_epoch", "epochs_run", "wall_s", "s_per_epoch")}  # fmt: skip
        s["seeds"] = sorted(r["seed"] for r in rs)
        s["gradient_info"] = {k: stats([r["gradient_info"][k] for r in rs]) for k in rs[0]["gradient_info"]}
        s["saturation"] = {k: stats([r["saturation"][k] for r in rs]) for k in rs[0]["saturation"]}
        s["correlations"] = {
            site: {t: stats([r["correlations"][site]["counts"][t] for r in rs]) for t in c["counts"]}
            for site, c in rs[0]["correlations"].items()
        }
        if "calibration" in rs[0]:  # the calibrated model: the noise sigma measured per site at init
            s["calibration_sigma"] = {k: stats([r["calibration"]["sites"][k]["sigma"] for r in rs])
                                      for k in rs[0]["calibration"]["sites"]}  # fmt: skip
        out[m] = s
    return out


def write_figures(
    results: dict[str, Any], out: Path, prefix: str = "mnist_", models: list[str] | None = None
) -> list[Path]:
    """The three PNGs: net-value histograms (Figures 3/6), eq. 5 per layer (Table 2), correlations (Figure 1).
    Histograms are summed over seeds; eq. 5 is the mean over seeds with the std as error bar. ``models``: a subset
    (default all), e.g. the paper's three tanh models for a figure like its own."""
    runs = results["runs"]
    models = [m for m in (models or results["models"]) if any(r["model"] == m for r in runs)]
    if not models:
        return []
    nets: dict[str, dict[str, Any]] = {}
    corr: dict[str, dict[str, Any]] = {}
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        nets[m], corr[m] = {}, {}
        for site, h in rs[0]["net_values"].items():
            lo, hi = h["range"]
            counts = np.sum([r["net_values"][site]["counts"] for r in rs], axis=0)
            nets[m][site] = {
                "counts": counts, "edges": np.linspace(lo, hi, len(counts) + 1),
                "below": sum(r["net_values"][site]["below"] for r in rs),
                "above": sum(r["net_values"][site]["above"] for r in rs),
                "saturated": statistics.fmean(r["net_values"][site]["saturated"] for r in rs),
            }  # fmt: skip
        for site in rs[0]["correlations"]:
            counts = np.sum([r["correlations"][site]["hist"] for r in rs], axis=0)
            corr[m][site] = {"counts": counts, "edges": np.linspace(-1, 1, len(counts) + 1)}
    summary = summarize(runs, models)
    gi = {m: {k: v["mean"] for k, v in summary[m]["gradient_info"].items()} for m in models}
    gi_err = {m: {k: v["std"] for k, v in summary[m]["gradient_info"].items()} for m in models}
    seeds = max(len(summary[m]["seeds"]) for m in models)
    tag = f"MNIST MLP, {seeds} seed(s)" + (" (quick subset)" if results["setup"].get("quick") else "")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}net_values.png", out / f"{prefix}gradient_info.png", out / f"{prefix}correlations.png"]
    plots.net_histograms(nets, saturation=results["setup"]["saturation"], path=paths[0],
                         title=f"Net values per hidden layer, test set ({tag}); dotted: saturation bound")  # fmt: skip
    plots.gradient_info(gi, errors=gi_err, reference={m: v for m, v in PAPER_GRADIENT_INFO.items() if m in gi},
                        path=paths[1],
                        title=f"Gradient information per layer, eq. 5 ({tag}); bars: ours, -: paper")  # fmt: skip
    plots.correlation_histograms(
        corr, path=paths[2], title=f"Node-pair correlations per hidden layer, test set ({tag})"
    )
    return paths


def run_study(cfg: StudyConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run every (model, seed) not yet in ``cfg.out/results.json``; returns the results (also on disk)."""
    reporter = reporter or Reporter()
    path = cfg.out / RESULTS
    setup = cfg.setup()
    if path.exists() and not cfg.resume:
        raise StudyError(f"{path} exists; pass --resume to continue that study, or choose another --out")
    if path.exists():  # checked before the data load: a refused resume fails at once
        results = study.load_resumable(path, "mnist", VERSION, setup)
        results["models"] = list(dict.fromkeys([*results["models"], *cfg.models]))
    else:
        results = {"study": "mnist", "version": VERSION, "setup": setup, "models": list(cfg.models), "runs": [],
                   "paper": {"table4": PAPER, "table2": PAPER_GRADIENT_INFO}}  # fmt: skip
    device = study.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    done = {(r["model"], r["seed"]) for r in results["runs"]}
    # Seed-major order: after k seeds every model has k runs, so a partial study is a fair comparison.
    todo = [(m, s) for s in range(cfg.seeds) for m in cfg.models if (m, s) not in done]
    if todo:  # a finished study is only re-summarized and re-plotted
        data = load_data(cfg).to(device)
        results["data"] = data.sizes()
    cfg.out.mkdir(parents=True, exist_ok=True)  # after what may fail on the options or the data: nothing left behind
    if todo:
        reporter.start(todo, sorted(done), results["data"], str(device))
    for name, seed in todo:
        run = run_one(name, seed, data, cfg, reporter)
        run["environment"] = study.environment(device)
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results["runs"].append(run)
        results["summary"] = summarize(results["runs"], results["models"])
        study.save(results, path)
        reporter.run_end(name, seed, run)
    results["summary"] = summarize(results["runs"], results["models"])
    study.save(results, path)
    try:
        results["figures"] = [str(p) for p in write_figures(results, cfg.out)]
    except ImportError as e:  # matplotlib is optional: the numbers are on disk, say why the PNGs are not
        results["figures"], results["figures_skipped"] = [], str(e)
    reporter.finish(results)
    return results
