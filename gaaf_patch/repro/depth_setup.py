"""What the depth study (:mod:`.depth`) compares, and how big it is: the networks and their four variants, the two
regimes' recipes, the sizings (full and ``--quick``) and the configuration that a resumed study must share.

Everything a result depends on besides (model, regime, variant, seed) is in :meth:`DepthConfig.setup`, which is
stored in ``results.json`` and compared on ``--resume``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..api import patch
from .train import StudyError

__all__ = [
    "MODELS",
    "DEFAULT_MODELS",
    "VARIANTS",
    "GAAF_VARIANTS",
    "REGIMES",
    "STAGES",
    "CHANNELS",
    "STEM_WIDTH",
    "DROPOUT",
    "PRETRAIN_CLASSES",
    "Recipe",
    "RECIPES",
    "Sizing",
    "FULL",
    "QUICK",
    "DepthConfig",
    "with_overrides",
    "build",
    "patch_variant",
]

STAGES = ("layer1", "layer2", "layer3", "layer4")
CHANNELS = (16, 32, 64, 128)
STEM_WIDTH = 16
MODELS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
DEFAULT_MODELS = ("resnet18", "resnet34")
VARIANTS = ("plain", "dropout", "gaaf-paper", "gaaf-auto")
GAAF_VARIANTS = ("gaaf-paper", "gaaf-auto")
REGIMES = ("scratch", "finetune")
# timm's regularisation knobs as its ResNet recipes use them: dropout before the classifier, stochastic depth in
# the residual branches (the "ResNet strikes back" recipes use drop_path 0.05 for ResNet-50).
DROPOUT = {"drop_rate": 0.2, "drop_path_rate": 0.05}
PRETRAIN_CLASSES = 5  # the finetune regime's checkpoint knows digits 0-4


@dataclass(frozen=True)
class Recipe:
    """One regime's optimisation: SGD with momentum and weight decay, the learning rate annealed to 0 over every step
    of the run by a cosine (no warm-up), the last incomplete batch of each epoch dropped."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"


RECIPES = {"scratch": Recipe(lr=0.1), "finetune": Recipe(lr=0.01)}


@dataclass(frozen=True)
class Sizing:
    """How big the study is: the data subsets, the input side, the epochs per regime and for the checkpoint."""

    data: str  # "mnist" or "digits" (scikit-learn's 8x8 digits, upsampled)
    train: int
    val: int
    test: int
    size: int  # input side in pixels
    scratch_epochs: int
    finetune_epochs: int
    pretrain_epochs: int
    probe_batch: int = 256  # the fixed training batch the gradient ratios are measured on

    def epochs(self, regime: str) -> int:
        return self.scratch_epochs if regime == "scratch" else self.finetune_epochs


# The full study, sized for about an hour on two (shared) CPU cores (docs/depth-study.md): MNIST's first 4k training
# images, the last 1k of its training set for validation, the first 5k of its test set, 28x28.
FULL = Sizing("mnist", train=4_000, val=1_000, test=5_000, size=28, scratch_epochs=6, finetune_epochs=3,
              pretrain_epochs=3)  # fmt: skip
# --quick: scikit-learn's digits upsampled to 16x16, a few hundred images, one epoch per stage; for CI.
QUICK = Sizing("digits", train=512, val=256, test=256, size=16, scratch_epochs=1, finetune_epochs=1,
               pretrain_epochs=1, probe_batch=128)  # fmt: skip


def with_overrides(sizing: Sizing, **overrides: int | None) -> Sizing:
    """``sizing`` with the given fields replaced (``None``: kept)."""
    return replace(sizing, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class DepthConfig:
    out: Path
    models: tuple[str, ...] = DEFAULT_MODELS
    variants: tuple[str, ...] = VARIANTS
    regimes: tuple[str, ...] = REGIMES
    seeds: int = 1
    sizing: Sizing = FULL
    recipes: dict[str, Recipe] = field(default_factory=lambda: dict(RECIPES))
    quick: bool = False  # recorded in the setup; the sizing says what --quick means
    data_dir: str | None = None
    resume: bool = False
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for what, given, known in (("model", self.models, MODELS), ("variant", self.variants, VARIANTS),
                                   ("regime", self.regimes, REGIMES)):  # fmt: skip
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise StudyError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(known)}")  # fmt: skip
        if self.seeds < 1:
            raise StudyError("--seeds must be at least 1")

    def setup(self) -> dict[str, Any]:
        """What a result depends on besides (model, regime, variant, seed): a resumed study must have the same."""
        return {"sizing": asdict(self.sizing), "recipes": {k: asdict(v) for k, v in self.recipes.items()},
                "dropout": DROPOUT, "channels": list(CHANNELS), "stem_width": STEM_WIDTH,
                "pretrain_classes": PRETRAIN_CLASSES, "quick": self.quick}  # fmt: skip


def build(name: str, variant: str, num_classes: int = 10) -> nn.Module:
    """The unpatched network of ``variant`` (GAAF variants are patched by the caller, after any checkpoint load)."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    block, layers = MODELS[name]
    extra = DROPOUT if variant == "dropout" else {}
    return ResNet(BasicBlock if block == "basic" else Bottleneck, layers, num_classes=num_classes, in_chans=1,
                  channels=CHANNELS, stem_width=STEM_WIDTH, **extra)  # fmt: skip


def patch_variant(model: nn.Module, variant: str) -> nn.Module:
    """``model`` as ``variant`` trains it: the GAAF variants patched (paper gain or the default auto gain)."""
    if variant == "gaaf-paper":
        return patch(model, shapes="paper")
    if variant == "gaaf-auto":
        return patch(model)
    return model
