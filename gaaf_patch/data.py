"""Data sets as whole tensors: MNIST (torchvision) and scikit-learn's bundled digits.

The studies and fine-tuning here train small models on small data sets, where a per-sample ``DataLoader`` costs more
than the model. So each loader returns the whole split as two tensors, ``images`` (float32 in [0, 1], ``N x 1 x H x W``)
and ``labels`` (int64), and callers batch by indexing.

Where MNIST lives: the ``root`` argument (a ``--data-dir`` flag), else ``$GAAF_DATA_DIR``, else
``~/.cache/gaaf-patch/data``; torchvision's layout below it (``MNIST/raw/*-ubyte``). When the files are absent it
downloads through torchvision if ``download`` is true, and otherwise (or when the download fails) raises
:class:`DataError` with one line that says where it looked and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DataError", "Split", "data_dir", "mnist", "digits", "mnist_available"]

ENV = "GAAF_DATA_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "gaaf-patch" / "data"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(ValueError):
    """A data set could not be found or read; the message says where it looked and what to do."""


class Split(NamedTuple):
    """One split of a data set, whole: ``images`` float32 ``N x C x H x W`` in [0, 1], ``labels`` int64 ``N``."""

    images: Tensor
    labels: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The data directory: ``root`` if given, else ``$GAAF_DATA_DIR``, else ``~/.cache/gaaf-patch/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else DEFAULT_DIR


def mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether the four MNIST files (raw or ``.gz``) are under ``data_dir(root)/MNIST/raw``."""
    raw = data_dir(root) / "MNIST" / "raw"
    return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in MNIST_FILES)


def mnist(root: str | os.PathLike | None = None, *, train: bool = True, download: bool = True) -> Split:
    """MNIST's 60k training or 10k test split as tensors (``N x 1 x 28 x 28``)."""
    from torchvision.datasets import MNIST

    where = data_dir(root)
    if not mnist_available(where) and not download:
        raise DataError(
            f"MNIST not found under {where / 'MNIST' / 'raw'}; pass --data-dir DIR or set {ENV} to a directory "
            "holding MNIST/raw/*-ubyte (torchvision layout), or allow the download"
        )
    try:
        ds = MNIST(str(where), train=train, download=download and not mnist_available(where))
    except Exception as e:  # offline, a proxy, a truncated file: all end the same way for the user
        raise DataError(
            f"MNIST could not be loaded from {where / 'MNIST'} ({' '.join(str(e).split())[:200]}); pass --data-dir "
            f"DIR or set {ENV} to a directory holding MNIST/raw/*-ubyte (torchvision layout)"
        ) from e
    return Split(ds.data.unsqueeze(1).float().div_(255), ds.targets.long())


def digits() -> Split:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): needs no download, so it is the default for
    quick runs. Pixel values 0..16 are scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = torch.from_numpy(d.images).float().div_(16).unsqueeze(1)
    return Split(images, torch.from_numpy(d.target).long())
