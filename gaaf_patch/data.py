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
from torch.utils.data import Dataset, Subset

from .errors import GaafError, one_line

__all__ = [
    "DataError",
    "Split",
    "data_dir",
    "mnist",
    "digits",
    "mnist_available",
    "holdout",
    "SplitDataset",
    "image_folders",
    "read_image",
    "IMAGE_FOLDER_VAL_NAMES",
]

ENV = "GAAF_DATA_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "gaaf-patch" / "data"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(GaafError, ValueError):
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


def holdout(split: Split, fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """``split`` cut in two by one seeded permutation: ``(train, held-out)``, the second ``fraction`` of the samples.

    For data sets with no test split of their own (digits). The seed is fixed apart from any training seed, so every
    run, resumed or not, evaluates on the same samples.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    n_held = max(1, round(len(split) * fraction))
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    train, held = order[n_held:], order[:n_held]
    return Split(split.images[train], split.labels[train]), Split(split.images[held], split.labels[held])


class SplitDataset(Dataset):
    """A :class:`Split` as a map-style data set that hands out whole batches.

    ``DataLoader`` calls ``__getitems__`` with a batch's indices: one indexing of the two tensors per batch instead of
    one call and one collate per sample. Pass ``collate_fn=SplitDataset.collate`` (the batch is already made).
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.split.images[i], self.split.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.split.images[idx], self.split.labels[idx]

    @staticmethod
    def collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch


IMAGE_FOLDER_VAL_NAMES = ("val", "validation", "test")


def read_image(path: str):
    """torchvision's image loader (PIL, RGB), with a failure that names the file: a truncated or foreign file in
    a folder of thousands is otherwise ``OSError: image file is truncated``, found only when its batch comes."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated, corrupt
        raise DataError(
            f"cannot read the image {path} ({type(e).__name__}: {one_line(e, 120)}); replace or remove it"
        ) from e


def image_folders(root: str | os.PathLike, train_transform=None, eval_transform=None, holdout_fraction: float = 0.1):
    """An ImageFolder tree as ``(train, held-out, classes)`` torchvision data sets (one sub-folder per class).

    ``root/train`` with ``root/val`` (or ``validation``, ``test``) are used as they are; a tree with neither is split
    by one seeded permutation (``holdout_fraction`` held out), each side with its own transform. Empty or malformed
    trees raise :class:`DataError` saying what was expected.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    train_dir = root / "train"
    val_dir = next((root / n for n in IMAGE_FOLDER_VAL_NAMES if (root / n).is_dir()), None)

    def load(folder: Path, transform) -> ImageFolder:
        try:
            return ImageFolder(str(folder), transform=transform, loader=read_image)
        except (FileNotFoundError, RuntimeError) as e:  # no class folder / no image file in any class folder
            raise DataError(
                f"{folder} is not an image-folder tree ({' '.join(str(e).split())[:160]}); expected one sub-folder "
                f"per class holding images (.jpg, .png, ...), or train/ and val/ folders laid out so"
            ) from e

    if train_dir.is_dir():
        if val_dir is None:
            raise DataError(f"{root} has train/ but no {'/, '.join(IMAGE_FOLDER_VAL_NAMES)}/ folder to evaluate on")
        train, held = load(train_dir, train_transform), load(val_dir, eval_transform)
        if train.classes != held.classes:
            raise DataError(
                f"{train_dir} and {val_dir} have different class folders "
                f"({len(train.classes)} vs {len(held.classes)}: {sorted(set(train.classes) ^ set(held.classes))[:5]})"
            )
        return train, held, list(train.classes)
    full = load(root, train_transform)
    if len(full) < 2:
        raise DataError(f"{root} holds {len(full)} image(s); at least 2 are needed to train and evaluate")
    n_held = max(1, round(len(full) * holdout_fraction))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    train = Subset(full, order[n_held:])
    held = Subset(load(root, eval_transform), order[:n_held])
    return train, held, list(full.classes)
