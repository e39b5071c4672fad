"""How GAAF's gradient gain grows with depth, paper gain against the auto gain: ``python -m benchmarks.depth``.

::

    python -m benchmarks.depth                        # every model below, at init and after a short training
    python -m benchmarks.depth --quick --out /tmp/d   # 3 small models at 64x64 + one tiny trained one (< 30 s)
    python -m benchmarks.depth --models resnet50,tv:resnet152 --no-trained

For every model, three copies of the same randomly initialised weights (seeded) run one train-mode forward and
backward on the same seeded input batch, each under the same forked and re-seeded RNG (dropout and drop-path draw
the same masks; the forwards are checked bit for bit): the plain model, ``gaaf_patch.patch(m, gain="paper")``
(``phi' + s``) and ``gaaf_patch.patch(m)`` (``gain="auto"``, the default). The loss is
:func:`gaaf_patch.measure_gradient_scale`'s, the mean of the squared outputs. Measured, as ratios patched / plain:

- whole network: the norm of the gradient on the input and the norm of the gradient on all parameters (the same
  numbers ``measure_gradient_scale`` returns, computed here in the same pass as the per-stage ones);
- per depth: the norm of the gradient on the output of each stage, block or block group (forward hooks on the
  stage modules; each hooked output is passed on as a clone, so an in-place op downstream cannot change which
  tensor the gradient is taken of). The stage list is timm's ``feature_info`` (``layer1..4`` and the stem for
  ResNets, every block for ViTs), else a ``stages`` / ``layers`` / ``blocks`` / ``features`` / ``encoder.layers``
  container or torchvision's ``layer1..4``; a model with none of these is measured whole, and its entry says so.
  Stages are ordered as the forward calls them; the relative depth of stage ``k`` of ``n`` is ``k/n`` and the
  input sits at depth 0, so the plot reads from the input (left) to the loss (right).

Models: every model of the coverage sweep (gaaf_patch/coverage/zoo.py: one per timm / torchvision family, built by
its ``build`` at the sweep's 64x64 where the model takes it, else at 128, else at its own size; over 200M parameters
skipped as the sweep does), then a depth list of ResNets 18-152, EfficientNets B0-B3 and other deep networks, each
at its own input size (224x224 for most; EfficientNet-B1..B3 and Inception-v3 larger). Batch 4. A model whose
classifier starts at zero sends no gradient back at init (nothing to compare; ``zero_gradient``): it is measured
again with that classifier redrawn (``head_reinit``).

After training (``--no-trained`` skips it): a few models are trained briefly from scratch on scikit-learn's digits
(gaaf_patch/data.py, 8x8 upsampled to 3x32x32, the ViT to 3x64x64, SGD with momentum), their ``state_dict`` saved
to a temporary folder and loaded into a freshly built model (``strict=True``), which is then measured as above on
held-out digits, next to the same architecture at its initial weights on the same batch. Training and held-out
accuracy say whether it learnt.

One torch thread by default (``--threads``): on a shared 2-core machine two threads ran 10-40x slower.

The pieces: :mod:`benchmarks.depth_measure` (the gradient norms and ratios), :mod:`benchmarks.depth_models` (the
models at init), :mod:`benchmarks.depth_train` (after training), :mod:`benchmarks.depth_output` (JSON, table,
summary) and :mod:`benchmarks.depth_plot` (the figure).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.depth_measure import GAINS, SEED
from benchmarks.depth_models import init_entry
from benchmarks.depth_output import markdown, print_table, ratios_text, save_json, summarize
from benchmarks.depth_plot import plot
from benchmarks.depth_train import LR, QUICK_TRAIN, SIZE, STEPS, TrainConfig, trained_entry
from benchmarks.machine import loadavg, machine_info, worktree_changes
from gaaf_patch import gain as _gain
from gaaf_patch.coverage import zoo
from gaaf_patch.gradscale import SAFE

__all__ = ["SEED", "BATCH", "GAINS", "QUICK_TRAIN", "ZOO_SIZES", "MAX_PARAMS", "DEPTH_MODELS", "TRAINED_MODELS",
           "QUICK_MODELS", "QUICK_TRAINED", "parse_args", "plan", "main"]  # fmt: skip

BATCH = 4
ZOO_SIZES: tuple[int | None, ...] = (64, 128, None)  # the sweep's size, then a larger one, then the model's own
MAX_PARAMS = 200_000_000  # the coverage sweep's default limit
# (spec, input size): the depth list, at each model's own size (None: timm's pretrained_cfg, torchvision's crop).
DEPTH_MODELS: tuple[tuple[str, int | None], ...] = (
    ("resnet18", None),
    ("resnet34", None),
    ("resnet50", None),
    ("resnet101", None),
    ("resnet152", None),
    ("efficientnet_b0", None),
    ("efficientnet_b1", None),
    ("efficientnet_b2", None),
    ("efficientnet_b3", None),
    ("mobilenetv3_large_100", None),
    ("regnety_008", None),
    ("densenet121", None),
    ("inception_v3", None),
    ("vit_tiny_patch16_224", None),
    ("deit_tiny_patch16_224", None),
    ("swin_tiny_patch4_window7_224", None),
    ("tv:resnet152", None),
)
TRAINED_MODELS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "densenet121",
    "vit_tiny_patch16_224",
    "mobilenetv3_large_100",
)
QUICK_MODELS: tuple[tuple[str, int], ...] = (("test_efficientnet", 64), ("test_vit", 64), ("resnet50", 64))
QUICK_TRAINED = ("test_resnet",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated model specs (timm names, tv:NAME); default: all")
    p.add_argument("--quick", action="store_true", help="3 small models at 64x64 and one tiny trained model")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    p.add_argument("--no-trained", dest="trained", action="store_false", help="skip the after-training part")
    p.add_argument("--trained-models", default=None, help="comma-separated models for the after-training part")
    p.add_argument("--train-steps", type=int, default=None, help="SGD steps per trained model (default 150)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"measuring batch (default {BATCH})")
    p.add_argument("--size", type=int, default=None, help="input size for every model (default: per model)")
    p.add_argument("--no-zoo", action="store_true", help="the depth list only, not the coverage sweep's models")
    p.add_argument("--max-params", type=int, default=MAX_PARAMS, help="skip larger models (the sweep's 200M)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default); on a shared 2-core machine 2 threads ran 10-40x slower "
        "than 1 (OpenMP threads spinning against other processes)",
    )
    p.add_argument("--tag", default="cpu", help="file name suffix: depth-<date>-<tag>.json")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    return p.parse_args(argv)


def _sizes(size: int | None) -> tuple[int | None, ...]:
    return (None,) if size is None else (size, None)


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, tuple[int | None, ...]]], list[str]]:
    """``(spec, group, sizes to try)`` for the init part, and the trained part's models. ``--models``: those only
    (depth-list models at their size, any other at the zoo's sizes), without listing the zoo."""
    depth = dict(DEPTH_MODELS)
    if args.quick:
        init = [(s, "quick", (n,)) for s, n in QUICK_MODELS]
        trained = list(QUICK_TRAINED)
    elif args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        init = [(s, "depth", _sizes(depth[s])) if s in depth else (s, "selected", ZOO_SIZES) for s in wanted]
        trained = [s for s in TRAINED_MODELS if s in wanted]
    else:
        init = [] if args.no_zoo else [(e.spec, "zoo", ZOO_SIZES) for e in zoo.entries() if e.spec not in depth]
        init += [(s, "depth", _sizes(n)) for s, n in DEPTH_MODELS]
        trained = list(TRAINED_MODELS)
    if args.trained_models is not None:
        trained = [m.strip() for m in args.trained_models.split(",") if m.strip()]
    if args.size:
        init = [(s, g, _sizes(args.size)) for s, g, _ in init]
    if not args.trained:
        trained = []
    return init, trained


def _kernels_state() -> str:
    from gaaf_patch import kernels

    try:
        return "C++ kernel" if kernels.available() else "plain torch ops (no C++ kernel)"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    json_path, png_path = out / f"depth-{date}-{args.tag}.json", out / f"depth-{date}-{args.tag}.png"
    init_plan, trained_plan = plan(args)
    cfg = QUICK_TRAIN if args.quick else TrainConfig()
    if args.train_steps:
        cfg = TrainConfig(**{**cfg.__dict__, "steps": args.train_steps})
    results: dict[str, Any] = {
        "benchmark": "depth",
        "command": ["python", "-m", "benchmarks.depth", *(sys.argv[1:] if argv is None else argv)],
        "machine": {**machine_info(torch.get_num_threads()), "worktree_changes": worktree_changes()},
        "settings": {
            "seed": SEED,
            "batch": args.batch,
            "target": list(SAFE),
            "loss": "sum over output tensors of mean(output^2), train mode (gaaf_patch.measure_gradient_scale's)",
            "gains": {"paper": "gaaf_patch.patch(m, gain='paper')", "auto": "gaaf_patch.patch(m) (gain='auto')"},
            "kernels": _kernels_state(),
            "auto_budget": _gain.BUDGET,
            "auto_max_delta": _gain.MAX_DELTA,
            "zoo_sizes_tried": [s or "native" for s in ZOO_SIZES],
            "max_params": args.max_params,
            "train": {
                **cfg.__dict__,
                "data": "sklearn digits, 80/20 holdout (seed 0), bilinear to 3xSxS, (x-0.5)/0.5",
                "lr_overrides": LR,
                "size_overrides": SIZE,
                "steps_overrides": STEPS,
            },
        },
        "models": [s for s, _, _ in init_plan],
        "trained_models": trained_plan,
        "init": [],
        "trained": [],
    }
    for i, (spec, group, sizes) in enumerate(init_plan, 1):
        row = init_entry(spec, group, sizes, args.batch, args.max_params)
        results["init"].append(row)
        if row["status"] == "ok" and row["zero_gradient"]:
            msg = "no gradient in the plain model (nothing to compare)"
        elif row["status"] == "ok":
            msg = f"{ratios_text(row['whole'])} {len(row['stages'])} stages"
        else:
            msg = f"{row['status']}: {row.get('reason', '')[:100]}"
        print(f"[{i}/{len(init_plan)}] {spec} ({row['seconds']:.1f} s): {msg}", flush=True)
        save_json(results, json_path)
    if trained_plan:
        for spec in trained_plan:
            row = trained_entry(spec, cfg)
            results["trained"].append(row)
            if row["status"] == "ok":
                acc = f"acc {row['train']['train_acc']:.3f}/{row['train']['heldout_acc']:.3f}"
                msg = f"{acc} {ratios_text(row['trained']['whole'])}"
            else:
                msg = f"{row['status']}: {row.get('reason', '')[:100]}"
            print(f"[trained] {spec} ({row['seconds']:.1f} s): {msg}", flush=True)
            save_json(results, json_path)
    results["summary"] = summarize(results)
    results["machine"]["loadavg_end"] = loadavg()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["files"] = {"json": str(json_path), "png": str(png_path)}
    save_json(results, json_path)
    plot(results, png_path)
    print_table(results)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    s = results["summary"]
    print(
        f"{results['wall_s']:.0f} s; auto in target: {s['init_auto_in_target']}/"
        f"{s['init_measured'] - len(s['init_zero_gradient'])} at init, "
        f"{s['init_head_redrawn_auto_in_target']}/{len(s['init_head_redrawn'])} with a zero head redrawn, "
        f"{s['trained_auto_in_target']}/{s['trained_measured']} trained; {json_path}, {png_path}"
    )
    return results


if __name__ == "__main__":
    main()
