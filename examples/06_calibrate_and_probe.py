"""Calibrate GAAF's shapes to a model's own dropout, then measure gradient information (the paper's eq. 5).

Shows: ``gaaf.calibrate(model, batches)`` on an MLP with dropout. It measures the noise each dropout puts on the
net of the activation it feeds (several masks per batch), strips the dropout, and gives that site the
dropout-matched shape (``dropout_matched(act=..., sigma=...)``, paper's gain); the sigma per site is in the report.
Then ``gaaf.analysis.GradientInfo`` (a hook-based probe, gone when its ``with`` block ends) records the mean
absolute weight gradient per layer over a few training steps, for the dropout model and the calibrated one.

Run from the repository root:

    python examples/06_calibrate_and_probe.py
"""

import copy

import torch
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch import data


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(128, 64),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(64, 10),
    )


def train_probed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """A few SGD steps with the gradient-information probe attached; returns {layer: G_l}."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    with gaaf.analysis.GradientInfo(model) as gi:
        for _ in range(steps):
            idx = torch.randint(len(y), (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    assert gi.steps == steps, gi.steps
    return gi.result()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    split = data.digits()
    x, y = split.images, split.labels

    dropout_model = mlp()
    model = copy.deepcopy(dropout_model)

    # calibrate takes input batches or (input, target) pairs, e.g. a DataLoader; here 4 batches of 64
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    gaaf.calibrate(model, batches, batches=4, masks=8, seed=0)

    rep = gaaf.report(model)
    print("report:", rep.summary())
    assert rep.summary()["stripped"] == 2, "both dropouts should be stripped"
    print("per site (the sigma of the dropout noise on its net is in the shape):")
    for r in rep.replaced:
        print(f"  {r['name']:>4}  {r['activation']:<5} {r['shape']}  gain={r['gain']}")
    calibrated = [r for r in rep.replaced if r["shape"].startswith("dropout_matched")]
    # the first tanh (module "2") is not fed by dropout; the second ("5") is, through Linear "4"
    assert [r["name"] for r in calibrated] == ["5"], [r["name"] for r in rep.replaced]
    assert "sigma=" in calibrated[0]["shape"]

    # eval forward unchanged (exact mode, dropout is identity in eval anyway)
    dropout_model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(dropout_model(x[:32]), model(x[:32]))

    # Gradient information per weight layer (eq. 5), averaged over 20 training steps, same start, same batches.
    info_dropout = train_probed(dropout_model, x, y, steps=20)
    info_gaaf = train_probed(model, x, y, steps=20)
    print("gradient information G_l (mean |dL/dW|) per layer:")
    print(f"  {'layer':>5} {'dropout':>10} {'calibrated':>11} {'ratio':>6}")
    for layer in info_dropout:
        a, b = info_dropout[layer], info_gaaf[layer]
        print(f"  {layer:>5} {a:10.3e} {b:11.3e} {b / a:6.2f}")
        assert b > 0 and a > 0
    print("ok")


if __name__ == "__main__":
    main()
