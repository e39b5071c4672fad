"""Shared toy models for the tests: every activation form in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gaaf_patch.repro.models import mlp as _paper_mlp


class EveryForm(nn.Module):
    """Module, functional, method and in-place forms, a gate, functional and module dropout."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.se = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())  # a gate: its output multiplies x
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.l1(x)))  # module, inplace
        x = F.gelu(x, approximate="tanh") + torch.tanh(x)  # functional
        y = x.relu_()  # method, inplace; x is read again below
        x = x * self.se(x) + y
        x = F.dropout(x, 0.2, self.training)
        x = self.drop(self.l2(x)).tanh()  # method
        return self.l3(F.leaky_relu(x, 0.2) + torch._C._nn.gelu(x) + F.silu(x, inplace=False))


def mlp(act: type[nn.Module] = nn.Tanh, dropout: float = 0.0, sizes=(784, 512, 256, 256, 10)) -> nn.Sequential:
    """The paper's MNIST MLP (784-512-256-256-10, tanh by default): the library's own builder."""
    return _paper_mlp(act, dropout, sizes)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1).relu())
