"""Fine-tuning with GAAF: take a checkpoint, patch it, train, and ship weights that load into the unpatched model.

``finetune(FinetuneOptions(model="resnet50", checkpoint="r50.pt", data="digits", num_classes=10))`` does what
``gaaf-patch finetune`` does (docs/finetune.md). The parts are usable on their own: :func:`replace_classifier`,
:class:`InputAdapter`, :func:`atomic_save`.
"""

from .checkpoint import atomic_save, capture_rng, restore_rng, state_digest
from .head import HeadError, find_classifier, num_outputs, replace_classifier
from .inputs import InputAdapter, model_input_size, normalization
from .interrupt import Interrupted, handle_interrupts
from .options import EMBEDDED_DATA, FinetuneError, FinetuneOptions
from .run import FinetuneResult, finetune

__all__ = [
    "finetune",
    "FinetuneOptions",
    "FinetuneResult",
    "FinetuneError",
    "Interrupted",
    "handle_interrupts",
    "EMBEDDED_DATA",
    "HeadError",
    "find_classifier",
    "num_outputs",
    "replace_classifier",
    "InputAdapter",
    "model_input_size",
    "normalization",
    "atomic_save",
    "capture_rng",
    "restore_rng",
    "state_digest",
]
