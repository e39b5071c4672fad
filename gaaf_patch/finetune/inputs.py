"""Feeding a data set to a model that was built for other images: channels, size and normalisation.

digits are ``1 x 8 x 8`` and MNIST ``1 x 28 x 28``, while an ImageNet checkpoint expects ``3 x H x W`` at the size it
was trained at. The choice here is to adapt the *inputs*, not the model: the grey channel is repeated (or an RGB
image averaged for a one-channel model) and the image resized with ``F.interpolate`` (bilinear) to the model's input
size. The model keeps its architecture, so any checkpoint of it loads strictly and the fine-tuned weights deploy into
the same unpatched model. Rebuilding a timm model with ``in_chans=1`` would save a little compute but would not
accept an RGB checkpoint's first convolution.

The adaptation runs per batch on the device (a resize of a whole batch is one kernel there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import one_line
from ..models import default_input_size
from .loop import logits_of
from .options import FinetuneError

__all__ = ["InputAdapter", "model_input_size", "normalization", "output_width"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def model_input_size(model: nn.Module, override: Sequence[int] | None = None) -> tuple[int, ...]:
    """The per-sample input the model takes: ``override`` (``--input-size``), else its configured size, with the
    channel count corrected from its first convolution (a timm model built with ``in_chans=1`` keeps ``3`` in its
    config)."""
    if override:
        return tuple(int(d) for d in override)
    size = default_input_size(model)
    channels = _first_conv_channels(model)
    if len(size) == 3 and channels is not None and channels != size[0]:
        size = (channels, *size[1:])
    return size


def output_width(model: nn.Module, input_size: Sequence[int]) -> int:
    """The last dimension of the model's eval-mode output on two zero samples of ``input_size``.

    Run before any training, so that an input the model does not take (``--input-size 1,32,32`` for an RGB model)
    is one line saying so, not an error from inside the first training step.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(logits_of(model(torch.zeros(2, *input_size))).shape[-1])
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, reported as a usage problem
        size = ",".join(map(str, input_size))
        channels = _first_conv_channels(model)
        hint = (
            f"its first convolution takes {channels} channels, so pass --input-size {channels},H,W"
            if channels is not None and len(input_size) == 3 and channels != input_size[0]
            else "pass the --input-size the model takes (C,H,W, or D for flat inputs)"
        )
        raise FinetuneError(
            f"{type(model).__name__} does not take input {size}: {type(e).__name__}: {one_line(e, 200)}; {hint}"
        ) from None
    finally:
        model.train(was)


def normalization(model: nn.Module, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` the model's weights expect, per channel: a timm model's data config, else ImageNet's for
    three-channel models (torchvision's convention), else none (a user's model sees the data in [0, 1])."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    elif channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        return None
    if len(mean) != channels:  # a one-channel model with an RGB config: the grey value of the mean
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclass(frozen=True)
class InputAdapter:
    """Maps a batch ``N x C x H x W`` in [0, 1] to the model's input ``size``.

    ``size`` is ``(C, H, W)`` for an image model or ``(D,)`` for one that takes flat vectors (the images are then
    flattened; ``D`` must be ``C * H * W`` of the data). ``normalize`` is ``(mean, std)`` per channel, applied last.
    """

    size: tuple[int, ...]
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if len(self.size) not in (1, 3) or any(d < 1 for d in self.size):
            raise FinetuneError(f"input size must be C,H,W or D (positive), got {','.join(map(str, self.size))}")

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise FinetuneError(f"expected a batch of images N x C x H x W, got shape {list(x.shape)}")
        if len(self.size) == 1:
            flat = x.flatten(1)
            if flat.shape[1] != self.size[0]:
                raise FinetuneError(
                    f"the model takes {self.size[0]} inputs but an image has {flat.shape[1]} values "
                    f"({'x'.join(map(str, x.shape[1:]))}); set --input-size C,H,W for an image model"
                )
            return flat
        c, h, w = self.size
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise FinetuneError(f"cannot feed {x.shape[1]}-channel images to a model that takes {c} channels")
        if self.normalize is not None:
            mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in self.normalize)
            x = (x - mean) / std
        return x.contiguous()
