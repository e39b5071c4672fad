"""The models of the MNIST study and the paper's numbers to compare with.

The paper's network is 784-512-256-256-10 with tanh (Hahn & Choi, section 4.1); it compares a base model, the same
with dropout (p = 0.5 after each hidden activation) and with GAAF (tanh with the paper's shape, exp(-x^2/4)). We add
what users ask next: the ReLU network with and without GAAF, a noisy-activation baseline (Gulcehre et al. 2016), and
``calibrated``: the dropout model turned into GAAF by :func:`gaaf_patch.calibrate` at initialisation (dropout stripped,
each site given the dropout-matched shape of the noise its dropout put there; see docs/calibration.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.variance import net_variance
from ..api import patch
from ..calibrate import calibrate_from, calibrated_shapes
from .noisy import NoisyHardTanh
from .train import StudyError

__all__ = [
    "ModelSpec",
    "MODELS",
    "PAPER",
    "PAPER_GRADIENT_INFO",
    "SIZES",
    "CALIBRATION",
    "mlp",
    "build",
    "calibrate_at_init",
]

SIZES = (784, 512, 256, 256, 10)


def mlp(act: Callable[[], nn.Module] = nn.Tanh, dropout: float = 0.0, sizes=SIZES) -> nn.Sequential:
    """The paper's MLP (input flattened by the caller); ``dropout`` > 0 adds ``nn.Dropout`` after each hidden
    activation."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    saturation: str  # how "saturated" is measured: "tanh" |z| > t (the --saturation flag), "relu" z < 0,
    # "hardtanh" |z| > 1
    calibrate: bool = False  # built with dropout; the study calls calibrate_at_init on training batches before training


def _gaaf(act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: patch(mlp(act), shapes="paper")  # the paper's gain: the reproduction is unchanged


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("base", "tanh", lambda: mlp(nn.Tanh), "tanh"),
        ModelSpec("dropout", "tanh + dropout 0.5 after each hidden activation", lambda: mlp(nn.Tanh, 0.5), "tanh"),
        ModelSpec("gaaf", "tanh, GAAF (paper's shape exp(-x^2/4))", _gaaf(nn.Tanh), "tanh"),
        ModelSpec("relu", "ReLU", lambda: mlp(nn.ReLU), "relu"),
        ModelSpec("gaaf_relu", "ReLU, GAAF (paper's shape sigmoid(5(x+0.5)))", _gaaf(nn.ReLU), "relu"),
        ModelSpec("noisy", "noisy hard-tanh (Gulcehre et al. 2016)", lambda: mlp(NoisyHardTanh), "hardtanh"),
        ModelSpec(
            "calibrated",
            "the dropout model, gaaf.calibrate'd at init: dropout stripped, tanh GAAF with "
            "dropout-matched shapes (act1, fed by no dropout: paper's shape)",
            lambda: mlp(nn.Tanh, 0.5),
            "tanh",
            calibrate=True,
        ),  # fmt: skip
    )
}

# Table 4 of the paper (MNIST, tanh MLP): test accuracy (%) and training epochs.
PAPER: dict[str, dict[str, float]] = {
    "base": {"test_acc": 98.23, "epochs": 82},
    "dropout": {"test_acc": 98.40, "epochs": 169},
    "gaaf": {"test_acc": 98.35, "epochs": 114},
}

# Table 2 of the paper: gradient information (eq. 5) of layers 1, 2, 3. The paper does not say which end layer 1 is;
# we list its numbers as printed and compare them with our weight layers 1-3 counted from the input.
PAPER_GRADIENT_INFO: dict[str, dict[str, float]] = {
    "base": {"layer1": 1.07e-4, "layer2": 1.40e-4, "layer3": 9.35e-5},
    "dropout": {"layer1": 5.93e-4, "layer2": 6.52e-4, "layer3": 5.83e-4},
    "gaaf": {"layer1": 1.78e-4, "layer2": 6.43e-4, "layer3": 1.15e-3},
}


# How the calibrated model measures its dropout noise: once, at initialisation (re-measuring every 100 steps changed
# nothing measurable in benchmarks/calibration_check.py), on `batches` random training batches of `batch_size`, each
# run with `masks` dropout masks. The batches and the masks are drawn from the run's seed.
CALIBRATION = {"batches": 4, "batch_size": 128, "masks": 8}


def calibrate_at_init(model: nn.Module, x_train: Tensor, seed: int) -> dict[str, object]:
    """Calibrate the dropout ``model`` in place (:func:`gaaf_patch.calibrate`) on ``CALIBRATION["batches"]`` training
    batches drawn with ``seed``; returns what was measured, for results.json: per site its sigma and the shape given.
    """
    n = CALIBRATION["batches"] * CALIBRATION["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x_train), generator=gen)[:n].to(x_train.device)
    batches = list(x_train[idx].split(CALIBRATION["batch_size"]))
    noise = net_variance(model, batches, batches=CALIBRATION["batches"], masks=CALIBRATION["masks"], seed=seed)
    shapes = calibrated_shapes(noise)
    calibrate_from(model, noise)
    sites = [{"site": s.name, "fed": s.fed, "sigma": s.sigma, "sigma_eq6": s.sigma_eq6, "net_rms": s.net_rms,
              "shape": shapes[s.name].spec if s.name in shapes else "default"} for s in noise]  # fmt: skip
    return {**CALIBRATION, "when": "init", "sites": sites}


def build(name: str) -> nn.Module:
    if name not in MODELS:
        raise StudyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name].build()
