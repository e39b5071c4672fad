"""The depth study's numbers per cell (:mod:`.depth`): how fast each variant reached the plain model's best, and the
mean and std over seeds of every (model, regime, variant), as ``results.json["summary"]`` and the CLI's table show.
"""

from __future__ import annotations

from typing import Any

from .study import stats

__all__ = ["reach_plain_best", "summarize"]


def reach_plain_best(runs: list[dict[str, Any]]) -> None:
    """Each run's epochs and seconds to the plain model's best validation accuracy (same model, regime, seed)."""
    plain = {(r["model"], r["regime"], r["seed"]): r for r in runs if r["variant"] == "plain"}
    for r in runs:
        p = plain.get((r["model"], r["regime"], r["seed"]))
        if p is None or p["best_val_acc"] is None:
            r["reach_plain_best"] = None
            continue
        target = p["best_val_acc"]
        h = r["history"]
        epoch = next((e for e, acc in enumerate(h["val_acc"], 1) if acc >= target), None)
        seconds = sum(h["seconds"][:epoch]) if epoch else None
        r["reach_plain_best"] = {"target": target, "epoch": epoch, "seconds": seconds}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``summary[model][regime][variant]``: mean and (sample) std over seeds of test accuracy, best epoch, wall time,
    epochs/seconds to the plain best (over the runs that reached it), the number of diverged runs and of runs that
    reached the plain best, and for GAAF variants the gradient ratio per stage at epoch 0 and at the last epoch."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for m, g, v in dict.fromkeys((r["model"], r["regime"], r["variant"]) for r in runs):
        rs = [r for r in runs if (r["model"], r["regime"], r["variant"]) == (m, g, v)]
        reach = [r.get("reach_plain_best") or {} for r in rs]
        s: dict[str, Any] = {k: stats([r[k] for r in rs]) for k in ("test_acc", "best_epoch", "wall_s", "s_per_epoch")}
        s["seeds"] = sorted(r["seed"] for r in rs)
        s["diverged"] = sum(bool(r["diverged"]) for r in rs)
        s["reached_plain_best"] = sum(x.get("epoch") is not None for x in reach)
        s["epochs_to_plain_best"] = stats([x.get("epoch") for x in reach])
        s["seconds_to_plain_best"] = stats([x.get("seconds") for x in reach])
        if all("grad_ratio" in r for r in rs):
            s["grad_ratio_start"] = {k: stats([r["grad_ratio"][k][0] for r in rs]) for k in rs[0]["grad_ratio"]}
            s["grad_ratio_final"] = {k: stats([r["grad_ratio"][k][-1] for r in rs]) for k in rs[0]["grad_ratio"]}
        out.setdefault(m, {}).setdefault(g, {})[v] = s
    return out
