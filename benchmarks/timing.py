"""Wall-clock timing for the benchmarks: one timer, interleaved repeats, and medians of per-repeat ratios.

On a shared machine the speed drifts during a run. Timing the variants one after another in each repeat, in an order
that rotates every repeat, makes the drift hit every variant alike; the ratio to the base variant is taken within a
repeat (the same drift on both sides) and the median over repeats drops the outliers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["per_call", "interleaved", "summarize"]


def per_call(fn: Callable[[], Any], inner: int) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` calls in a row (``time.perf_counter``)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(runners: dict[str, Any], what: str, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of ``runner.<what>`` (``step``, ``fwd``, ``infer``: :class:`benchmarks.workloads.Runner`)
    for each variant, ``repeats`` times, the order rotating every repeat. ``infer`` runs with the model in eval
    mode, switched outside the timed block."""
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            runner = runners[n]
            if what == "infer":
                runner.model.eval()
            out[n].append(per_call(getattr(runner, what), inner))
            if what == "infer":
                runner.model.train()
    return out


def summarize(times: dict[str, list[float]], base: str = "base") -> dict[str, dict[str, float]]:
    """Per variant: the median milliseconds, and the median and quartiles of its per-repeat ratios to ``base``."""
    res = {}
    for n, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, times[base], strict=True))
        q1, q3 = statistics.quantiles(ratios, n=4)[0::2] if len(ratios) > 1 else (ratios[0], ratios[0])
        res[n] = {"ms": 1e3 * statistics.median(ts), "ratio": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3}
    return res
