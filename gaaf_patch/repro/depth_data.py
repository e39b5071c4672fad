"""The depth study's data (:mod:`.depth`): MNIST or, for ``--quick``, scikit-learn's digits, as whole tensors.

The images stay ``N x 1 x size x size`` (the ResNets are convolutional) and are standardised with the training
subset's own mean and std, which results.json records; the finetune regime's checkpoint sees only digits 0-4
(:func:`only_classes`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from .. import data as _data
from . import study
from .depth_setup import Sizing
from .train import Data, StudyError

__all__ = ["load_data", "only_classes"]


def load_data(sizing: Sizing, data_dir: str | None = None) -> tuple[Data, dict[str, Any]]:
    """The three splits as ``N x 1 x size x size`` tensors, standardised with the training subset's mean and std.

    MNIST: training = its first ``train`` images, validation = the last ``val`` of its training set, test = the first
    ``test`` of its test set. Digits: :func:`gaaf_patch.data.holdout` twice (test 20%, then validation 20% of the
    rest), each capped at the sizing, bilinearly upsampled from 8x8.
    """
    if sizing.data == "mnist":
        study.require_mnist(data_dir)
        tr, te = _data.mnist(data_dir, train=True, download=False), _data.mnist(data_dir, train=False, download=False)
        if sizing.train + sizing.val > len(tr):
            raise StudyError(f"train {sizing.train} + validation {sizing.val} exceed MNIST's {len(tr)} images")
        parts = [tr.images[: sizing.train], tr.labels[: sizing.train], tr.images[-sizing.val :],
                 tr.labels[-sizing.val :], te.images[: sizing.test], te.labels[: sizing.test]]  # fmt: skip
    else:
        rest, test = _data.holdout(_data.digits(), 0.2, seed=0)
        train, val = _data.holdout(rest, 0.2, seed=1)
        parts = [train.images[: sizing.train], train.labels[: sizing.train], val.images[: sizing.val],
                 val.labels[: sizing.val], test.images[: sizing.test], test.labels[: sizing.test]]  # fmt: skip
    for i in (0, 2, 4):
        if parts[i].shape[-1] != sizing.size:
            parts[i] = F.interpolate(parts[i], size=(sizing.size, sizing.size), mode="bilinear", align_corners=False)
    mean, std = parts[0].mean().item(), parts[0].std().item()
    for i in (0, 2, 4):
        parts[i] = (parts[i] - mean) / std
    return Data(*(p.contiguous() for p in parts)), {"mean": mean, "std": std}


def only_classes(data: Data, n: int) -> Data:
    """The splits restricted to labels ``< n`` (the checkpoint's task)."""
    keep = [y < n for y in (data.y_train, data.y_val, data.y_test)]
    return Data(data.x_train[keep[0]], data.y_train[keep[0]], data.x_val[keep[1]], data.y_val[keep[1]],
                data.x_test[keep[2]], data.y_test[keep[2]])  # fmt: skip
