"""The classifier of a model: which module it is, how many classes it has, and how to give it another number.

timm models say which module is their classifier (``get_classifier``) and replace it themselves
(``reset_classifier``). Other models (torchvision, a user's ``file.py:factory``) are asked through the attribute
their classifier is conventionally kept in (:data:`HEAD_ATTRS`); the last ``nn.Linear`` under it is the one replaced.
A model that has none of them is refused with the names that were looked for, rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import GaafError

__all__ = ["HeadError", "HEAD_ATTRS", "find_classifier", "num_outputs", "replace_classifier", "checkpoint_classes"]

# torchvision: resnet/regnet/inception ``fc``; vgg/alexnet/mobilenet/efficientnet/convnext/densenet ``classifier``;
# swin ``head``; vit ``heads``. timm: ``fc``/``classifier``/``head`` (through get_classifier). Pretrainedmodels:
# ``last_linear``.
HEAD_ATTRS = ("fc", "classifier", "head", "heads", "last_linear")


class HeadError(GaafError, ValueError):
    """A model whose classifier cannot be found or replaced."""


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of the layer that produces the class scores.

    timm: ``model.get_classifier()``, or the last module with a weight under it. Others: the last ``nn.Linear`` under
    the first of :data:`HEAD_ATTRS` the model has.
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            with_weight = [
                (n, m) for n, m in head.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
            ]
            if with_weight:
                base = _name_of(model, head)
                sub, module = with_weight[-1]
                if base is not None:
                    return ".".join(p for p in (base, sub) if p), module
    for attr in HEAD_ATTRS:
        sub = getattr(model, attr, None)
        if not isinstance(sub, nn.Module):
            continue
        linears = [(n, m) for n, m in sub.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            name, module = linears[-1]
            return ".".join(p for p in (attr, name) if p), module
    raise HeadError(
        f"cannot find the classifier of {type(model).__name__}: it is not a timm model and has no nn.Linear under "
        f"any of the attributes {', '.join(HEAD_ATTRS)}; give the model one of them, or leave out --num-classes"
    )


def num_outputs(model: nn.Module) -> int:
    """The number of classes the classifier produces (0 for a timm model built without one)."""
    _, head = find_classifier(model)
    return int(head.weight.shape[0])


def checkpoint_classes(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """How many classes the checkpoint's classifier has, read off its weight under the model's classifier name."""
    try:
        name, _ = find_classifier(model)
    except HeadError:
        return None
    weight = state_dict.get(f"{name}.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None


def replace_classifier(model: nn.Module, num_classes: int) -> str:
    """Give ``model`` a freshly initialised classifier with ``num_classes`` outputs, in place; returns its name.

    Same device and dtype as the old one. timm models do it themselves (``reset_classifier``, which also keeps their
    pooling consistent); for other models the ``nn.Linear`` :func:`find_classifier` found is swapped.
    """
    if num_classes < 1:
        raise HeadError(f"num_classes must be positive, got {num_classes}")
    name, old = find_classifier(model)
    weight = old.weight
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        model.to(device=weight.device)  # a new head is built on the CPU in float32
        name, new = find_classifier(model)
        if new.weight.dtype != weight.dtype:
            new.to(weight.dtype)
        return name
    if not isinstance(old, nn.Linear):
        raise HeadError(f"the classifier {name} is a {type(old).__name__}; only nn.Linear classifiers can be replaced")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=weight.device, dtype=weight.dtype)
    model.set_submodule(name, new)
    return name
