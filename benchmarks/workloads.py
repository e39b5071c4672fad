"""What ``benchmarks.run`` measures: the models, their variants, and a runner for each (one training step, the
training forward, inference).

Models (synthetic data, 10 classes): the paper's MNIST MLP 784-512-256-256-10 (:func:`gaaf_patch.repro.models.mlp`,
tanh, batch 128), torchvision ResNet-18 and ResNet-50 (ReLU, 3x64x64, batch 16), timm ``vit_tiny_patch16_224`` at
``img_size=64`` (GELU, batch 16). The variants of each (:func:`build_variants`) start from the same initial weights;
``benchmarks/run.py``'s docstring says what each is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch import activations as _acts
from gaaf_patch import shapes as _shapes
from gaaf_patch.repro.models import mlp as paper_mlp

__all__ = ["ALL_MODELS", "VARIANTS", "NUM_CLASSES", "NaiveGAAF", "naive", "ModelSpec", "SPECS", "build_variants",
           "Runner"]  # fmt: skip

ALL_MODELS = ("mlp", "resnet18", "resnet50", "vit")
VARIANTS = ("base", "dropout", "gaaf_exact", "gaaf_paper", "gaaf_sawtooth", "naive")
NUM_CLASSES = 10


class NaiveGAAF(nn.Module):
    """``phi(x) + g(x) s(x)`` (eq. 7-8) in plain torch ops; autograd differentiates all of it, ``g s'`` included."""

    def __init__(self, activation: str, K: float = 10_000.0, **params: Any) -> None:
        super().__init__()
        self.act = _acts.get(activation)
        self.params = self.act.params(params)
        self.shape = _shapes.get(activation)
        self.K = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x * self.K
        g = (xk - torch.floor(xk) - 0.5) / self.K
        return self.act.phi(x, **self.params) + g * self.shape(x)


_NAIVE_OF: dict[type, Callable[[nn.Module], NaiveGAAF]] = {
    nn.ReLU: lambda m: NaiveGAAF("relu"),
    nn.Tanh: lambda m: NaiveGAAF("tanh"),
    nn.GELU: lambda m: NaiveGAAF("gelu", approximate=m.approximate),
}


def naive(model: nn.Module) -> nn.Module:
    """``model`` with every ReLU / Tanh / GELU module replaced by :class:`NaiveGAAF` (in place; returns it)."""
    for name, child in list(model.named_children()):
        make = _NAIVE_OF.get(type(child))
        if make is not None:
            setattr(model, name, make(child))
        else:
            naive(child)
    return model


def mlp(dropout: bool) -> nn.Module:
    """The paper's MLP, tanh; with ``dropout``, ``nn.Dropout(0.5)`` after each hidden activation (its setting)."""
    return paper_mlp(nn.Tanh, 0.5 if dropout else 0.0)


def resnet(depth: int) -> Callable[[bool], nn.Module]:
    def build(dropout: bool) -> nn.Module:
        import torchvision

        m = getattr(torchvision.models, f"resnet{depth}")(num_classes=NUM_CLASSES)
        if dropout:
            m.fc = nn.Sequential(nn.Dropout(0.5), m.fc)
        return m

    return build


def vit(dropout: bool) -> nn.Module:
    import timm

    kw = {"drop_rate": 0.5, "proj_drop_rate": 0.1} if dropout else {}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=NUM_CLASSES, **kw)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[bool], nn.Module]
    input_shape: tuple[int, ...]
    activation: str
    label: str


SPECS = {
    "mlp": ModelSpec("mlp", mlp, (128, 784), "tanh", "MLP 784-512-256-256-10, tanh, batch 128"),
    "resnet18": ModelSpec("resnet18", resnet(18), (16, 3, 64, 64), "relu", "ResNet-18 (torchvision), 64x64, batch 16"),
    "resnet50": ModelSpec("resnet50", resnet(50), (16, 3, 64, 64), "relu", "ResNet-50 (torchvision), 64x64, batch 16"),
    "vit": ModelSpec("vit", vit, (16, 3, 64, 64), "gelu", "ViT-Tiny/16 (timm), img_size 64, batch 16"),
}


def build_variants(spec: ModelSpec) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = spec.build(False)
    torch.manual_seed(0)
    with_dropout = spec.build(True)
    return {
        "base": base,
        "dropout": with_dropout,
        "gaaf_exact": gaaf_patch.patch(copy.deepcopy(base), mode="exact"),
        "gaaf_paper": gaaf_patch.patch(copy.deepcopy(base), mode="exact", shapes="paper"),
        "gaaf_sawtooth": gaaf_patch.patch(copy.deepcopy(base), mode="sawtooth"),
        "naive": naive(copy.deepcopy(base)),
    }


@dataclass
class Runner:
    """One model on one batch, with its own SGD (momentum 0.9): what :mod:`benchmarks.timing` times."""

    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    lr: float = 1e-3
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)

    def step(self) -> None:
        """One training step: zero_grad, forward, cross-entropy, backward, optimizer step."""
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.target).backward()
        self.opt.step()

    def fwd(self) -> None:
        """The training forward (train mode, autograd recording, graph dropped)."""
        F.cross_entropy(self.model(self.x), self.target)

    def infer(self) -> None:
        """The forward under ``torch.inference_mode()`` (the caller puts the model in eval mode)."""
        with torch.inference_mode():
            self.model(self.x)
