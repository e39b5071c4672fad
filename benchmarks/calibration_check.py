"""Calibrated GAAF against dropout itself, on the paper's MNIST MLP: ``python -m benchmarks.calibration_check``.

::

    python -m benchmarks.calibration_check --data-dir ../shared/data --epochs 2 --act tanh
    python -m benchmarks.calibration_check --cost --act tanh     # step time only (synthetic data, no MNIST)

Four variants from the same initial weights, trained side by side with the same batches (SGD, momentum 0.9):

- ``base``: the MLP 784-512-256-256-10 without dropout;
- ``dropout``: ``nn.Dropout(p)`` after each hidden activation (the paper's setting);
- ``gaaf_paper``: the dropout model through ``gaaf.patch(strip_dropout=True)``: the paper's hand-picked shapes;
- ``calibrated``: the dropout model through ``gaaf.calibrate(model, batches)``: one dropout-matched shape per site
  fed by dropout; the sites no dropout feeds (the first hidden layer) keep the paper's default shape;
- ``calibrated_zero``: the same, with ``shapes={ACT: "zero"}``: the sites no dropout feeds get no extra gradient
  (dropout gives them none either);
- ``recalibrated_zero``: ``calibrated_zero`` whose sigmas are measured again every ``--recalibrate-every`` steps
  (``gaaf.unpatch`` puts the dropouts back, ``gaaf.calibrate`` measures and patches again), since the noise grows
  with the weights.

Gradient information per layer (the paper's eq. 5) is computed inline: the mean over training steps of the mean
``|dL/dW|`` of each Linear weight. The check the issue asks for: is ``calibrated`` closer to ``dropout`` than
``gaaf_paper`` is? The script also re-measures the dropout noise on the trained dropout model, since the sigma
calibrated at initialisation drifts as the weights grow.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from benchmarks.timing import interleaved, summarize
from benchmarks.workloads import Runner
from gaaf_patch import data
from gaaf_patch.analysis import net_variance
from gaaf_patch.repro.models import mlp as paper_mlp

VARIANTS = ("base", "dropout", "gaaf_paper", "calibrated", "calibrated_zero", "recalibrated_zero")


def mlp(act: str, dropout: float) -> nn.Sequential:
    """The paper's MLP (:func:`gaaf_patch.repro.models.mlp`) behind a ``Flatten``, for MNIST's 1x28x28 images."""
    return nn.Sequential(nn.Flatten(), *paper_mlp(nn.Tanh if act == "tanh" else nn.ReLU, dropout))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000), strict=True)
        )
    model.train()
    return correct / len(labels)


def step_cost(act: str, repeats: int = 21, steps: int = 20) -> None:
    """Training-step time of the MLP (batch 128, synthetic data): GAAF with the paper's shapes against GAAF with a
    dropout-matched shape at every hidden site, both against the plain model; interleaved, median of ``repeats``."""
    torch.manual_seed(0)
    x, y = torch.rand(128, 784), torch.randint(0, 10, (128,))
    dropout_model = mlp(act, 0.5)
    base = mlp(act, 0.0)
    base.load_state_dict({k: v for k, v in zip(base.state_dict(), dropout_model.state_dict().values(), strict=True)})
    sites = [n for n, m in dropout_model.named_modules() if isinstance(m, (nn.Tanh, nn.ReLU))]
    matched = {s: gaaf.shapes.dropout_matched(act, 0.5) for s in sites}
    models = {
        "base": base,
        "gaaf_paper": gaaf.patch(copy.deepcopy(dropout_model), strip_dropout=True),
        "calibrated": gaaf.patch(copy.deepcopy(dropout_model), strip_dropout=True, shapes=matched),
    }
    runners = {k: Runner(m, x, y, lr=0.01) for k, m in models.items()}
    res = summarize(interleaved(runners, "step", repeats, steps))
    print(f"step time, MLP ({act}), batch 128, torch threads {torch.get_num_threads()}, median of {repeats}:")
    for k in models:
        print(f"  {k}: {res[k]['ms']:.2f} ms ({res[k]['ratio']:.3f}x base)")


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]] | None:
    """Run the check and print its tables; returns ``{variant: {"accuracy": [...], "gradinfo": [...],
    "distance": float}}`` (None with ``--cost``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--act", choices=("tanh", "relu"), default="tanh")
    p.add_argument("--p", type=float, default=0.5, help="dropout rate (default 0.5)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--cost", action="store_true", help="only time a training step: paper shapes vs calibrated")
    args = p.parse_args(argv)
    if args.cost:
        step_cost(args.act)
        return None

    train = data.mnist(args.data_dir, train=True, download=False)
    test = data.mnist(args.data_dir, train=False, download=False)
    images, labels = train.images[: args.train_size], train.labels[: args.train_size]

    torch.manual_seed(args.seed)
    dropout_model = mlp(args.act, args.p)
    base = mlp(args.act, 0.0)
    base.load_state_dict({k: v for k, v in zip(base.state_dict(), dropout_model.state_dict().values(), strict=True)})
    calib_batches = list(images[: 4 * args.batch_size].split(args.batch_size))
    start = time.perf_counter()
    calibrated = gaaf.calibrate(copy.deepcopy(dropout_model), calib_batches)
    calib_seconds = time.perf_counter() - start
    calibrated_zero = gaaf.calibrate(copy.deepcopy(dropout_model), calib_batches, shapes={args.act: "zero"})
    models = {
        "base": base,
        "dropout": dropout_model,
        "gaaf_paper": gaaf.patch(copy.deepcopy(dropout_model), strip_dropout=True),
        "calibrated": calibrated,
        "calibrated_zero": calibrated_zero,
        "recalibrated_zero": copy.deepcopy(calibrated_zero),
    }
    print(f"calibrated in {calib_seconds:.2f} s; shapes:")
    for r in gaaf.report(calibrated).replaced:
        print(f"  site {r['name']}: {r['shape']}")

    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for k, m in models.items()}
    linears = {k: [mod for mod in m.modules() if isinstance(mod, nn.Linear)] for k, m in models.items()}
    gradinfo = {k: torch.zeros(4, dtype=torch.float64) for k in models}
    steps = 0
    history: dict[str, list[float]] = {k: [] for k in models}
    gen = torch.Generator().manual_seed(args.seed)
    for _epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=gen)
        for idx in order.split(args.batch_size):
            x, y = images[idx], labels[idx]
            for k, m in models.items():
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(steps)  # the dropout variant's masks; identical for every rerun
                    loss = F.cross_entropy(m(x), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                gradinfo[k] += torch.tensor(
                    [lin.weight.grad.abs().mean().item() for lin in linears[k]], dtype=torch.float64
                )
                opts[k].step()
            steps += 1
            if steps % args.recalibrate_every == 0:
                m = gaaf.unpatch(models["recalibrated_zero"])
                gaaf.calibrate(m, calib_batches, shapes={args.act: "zero"})
        for k, m in models.items():
            history[k].append(accuracy(m, test.images, test.labels))
    gradinfo = {k: v / steps for k, v in gradinfo.items()}

    print(
        f"\nMNIST MLP 784-512-256-256-10 ({args.act}), dropout p={args.p}, {args.epochs} epochs x "
        f"{steps // args.epochs} steps, SGD lr {args.lr} momentum 0.9, batch {args.batch_size}, seed {args.seed}\n"
    )
    print("| variant | test acc. per epoch | grad. info W1 | W2 | W3 | W4 | mean rel. distance to dropout |")
    print("|---|---|---|---|---|---|---|")
    ref = gradinfo["dropout"]
    for k in VARIANTS:
        g = gradinfo[k]
        dist = float(((g - ref).abs() / ref).mean())
        accs = " / ".join(f"{a:.4f}" for a in history[k])
        print(f"| {k} | {accs} | " + " | ".join(f"{v:.3e}" for v in g) + f" | {dist:.3f} |")

    print(
        "\nrecalibrated_zero at the end: "
        + ", ".join(r["shape"] for r in gaaf.report(models["recalibrated_zero"]).replaced)
    )
    after = net_variance(models["dropout"], calib_batches, batches=4, masks=8)
    print("\ndropout noise sigma per site: at initialisation (used) -> after training")
    for r, n in zip(gaaf.report(calibrated).replaced, after, strict=True):
        print(f"  site {r['name']}: {r['shape']} -> sigma {n.sigma:.3g} (eq. 6: {n.sigma_eq6 or float('nan'):.3g})")
    return {
        k: {
            "accuracy": history[k],
            "gradinfo": gradinfo[k].tolist(),
            "distance": float(((gradinfo[k] - ref).abs() / ref).mean()),
        }
        for k in VARIANTS
    }


if __name__ == "__main__":
    main()
