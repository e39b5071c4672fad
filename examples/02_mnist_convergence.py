"""Train a small tanh MLP four ways, side by side: plain, dropout, GAAF (default gain), GAAF (paper's gain).

The paper's question on a small scale: does GAAF's extra gradient in the saturated parts of tanh speed up training?
Uses an MNIST subset when it is on disk (``$GAAF_DATA_DIR/MNIST/raw``, torchvision layout; never downloaded), else
scikit-learn's bundled 8x8 digits. Every run starts from the same initial weights and sees the same batches (seeded).
A few epochs on a small set: a demonstration of the API, not a verdict.

Run from the repository root:

    python examples/02_mnist_convergence.py
    GAAF_DATA_DIR=/path/to/data python examples/02_mnist_convergence.py   # MNIST subset
"""

import copy

import torch
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch import data

EPOCHS = 4
BATCH = 64
LR = 0.05


def load() -> tuple[str, data.Split, data.Split]:
    """An MNIST subset if available, else digits; returns (name, train, test); the MLP flattens the images."""
    if data.mnist_available():
        try:
            train = data.mnist(train=True, download=False)
            test = data.mnist(train=False, download=False)
            subset = data.Split(train.images[:4000], train.labels[:4000])
            return "mnist (4k subset)", subset, data.Split(test.images[:2000], test.labels[:2000])
        except data.DataError as e:
            print(f"MNIST not usable ({e}); using digits")
    train, test = data.holdout(data.digits(), fraction=0.25, seed=0)
    return "digits", train, test


def mlp(features: int, classes: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = features
    for hidden in (128, 64):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(nn.Flatten(), *layers)


def accuracy(model: nn.Module, split: data.Split) -> float:
    model.eval()
    with torch.no_grad():
        return (model(split.images).argmax(1) == split.labels).float().mean().item()


def train(model: nn.Module, train_split: data.Split, test_split: data.Split) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)  # the same batch order for every model
    accs = []
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train_split), generator=g)
        for idx in order.split(BATCH):
            opt.zero_grad()
            loss_fn(model(train_split.images[idx]), train_split.labels[idx]).backward()
            opt.step()
        accs.append(accuracy(model, test_split))
    return accs


def main() -> None:
    torch.set_num_threads(1)
    name, train_split, test_split = load()
    features = train_split.images[0].numel()
    classes = train_split.num_classes
    print(f"data: {name}, {len(train_split)} train / {len(test_split)} test, {features} features")

    torch.manual_seed(0)
    base = mlp(features, classes)
    dropout = mlp(features, classes, dropout=0.2)
    # the same initial weights: Dropout has no parameters, so the parameters line up in order
    with torch.no_grad():
        for p, q in zip(base.parameters(), dropout.parameters(), strict=True):
            q.copy_(p)

    models = {
        "plain": copy.deepcopy(base),
        "dropout 0.2": dropout,
        "GAAF (gain auto)": gaaf.patch(copy.deepcopy(base)),
        "GAAF (paper)": gaaf.patch(copy.deepcopy(base), shapes="paper"),
    }
    assert gaaf.report(models["GAAF (gain auto)"]).summary()["by_activation"] == {"tanh": 2}

    results = {}
    for label, model in models.items():
        torch.manual_seed(2)  # the same dropout masks / any other randomness per run
        results[label] = train(model, train_split, test_split)

    header = "model".ljust(18) + "".join(f"ep{e + 1:>2}".rjust(8) for e in range(EPOCHS))
    print(header)
    for label, accs in results.items():
        print(label.ljust(18) + "".join(f"{a * 100:7.2f}%" for a in accs))

    for label, accs in results.items():
        assert accs[-1] > 0.8, f"{label} did not learn ({accs[-1]:.3f})"
    print("ok")


if __name__ == "__main__":
    main()
