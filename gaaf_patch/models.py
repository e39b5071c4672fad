"""Building a model from a command-line spelling and loading a checkpoint into it, for the CLI's subcommands.

Four spellings, randomly initialised unless they name saved weights (this never downloads anything: a patch is
checked on the architecture, and trained weights come from ``--checkpoint`` or a local directory):

- ``resnet50``: a timm model (``timm.create_model(name, pretrained=False)``);
- ``tv:resnet18``: a torchvision model (``torchvision.models.get_model(name, weights=None)``);
- ``hf:bert``: a Hugging Face transformers base model from its shrunk default config (``config`` overrides fields),
  or ``hf:path/to/dir`` saved with ``save_pretrained`` (:mod:`gaaf_patch.hf`);
- ``path/to/file.py:factory``: ``factory()`` from a Python file, for models that are in neither library.

Errors are :class:`ModelSpecError` / :class:`CheckpointError` (both ``ValueError``) with a one-line message, so a
caller can print them as they are.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GaafError, one_line
from .hf import HF_PREFIX

__all__ = [
    "ModelSpecError",
    "CheckpointError",
    "Checkpoint",
    "build_model",
    "default_input_size",
    "read_checkpoint",
    "load_checkpoint",
    "load_state_dict_strict",
    "output_tensors",
]

TORCHVISION_PREFIX = "tv:"
DEFAULT_INPUT_SIZE = (3, 224, 224)
# Where a checkpoint keeps its weights, in the order they are looked for: the trained weights first (what a patch
# is fine-tuned from), the EMA copy only when it is all there is.
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes DDP and torch.compile add to every key of a saved state_dict.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ModelSpecError(GaafError, ValueError):
    """A model spelling that names no model (the message suggests the closest names)."""


class CheckpointError(GaafError, ValueError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


def build_model(
    spec: str,
    num_classes: int | None = None,
    input_size: tuple[int, ...] | None = None,
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model ``spec`` names, randomly initialised, with ``num_classes`` outputs when given.

    ``input_size`` (``C, H, W``) is passed on as ``img_size`` to the timm models that are built for one input size
    (ViTs and the like, ``fixed_input_size`` in their config), so that a smaller test input still fits them.
    ``config``: Hugging Face config fields to set (``hf:`` models only).
    """
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model name")
    if spec.startswith(HF_PREFIX):
        return _hf_model(spec[len(HF_PREFIX) :], num_classes, config)
    if config:
        raise ModelSpecError(f"--config sets fields of a Hugging Face config: only for hf:MODEL, not {spec!r}")
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX) :], num_classes, input_size)
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return _file_model(Path(path), factory, num_classes)
    if spec.endswith(".py"):
        raise ModelSpecError(f"name the function that builds the model: {spec}:FACTORY")
    return _timm_model(spec, num_classes, input_size)


def _hf_model(name: str, num_classes: int | None, config: Mapping[str, Any] | None) -> nn.Module:
    from .hf import build

    if not name.strip():
        raise ModelSpecError("hf: names a transformers model type (hf:bert) or a save_pretrained directory")
    if num_classes is not None:
        raise ModelSpecError(
            "--num-classes: hf: builds a base model (no classifier head); save a model with its head with "
            "save_pretrained and patch hf:DIR"
        )
    return build(name.strip(), dict(config or {}))


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _all_names() -> list[str]:
    import timm
    import torchvision

    return list(timm.list_models()) + [TORCHVISION_PREFIX + n for n in torchvision.models.list_models()]


def _timm_model(name: str, num_classes: int | None, input_size: tuple[int, ...] | None) -> nn.Module:
    import timm

    if ":" in name:  # hf-hub:..., local-dir:... fetch a config (and possibly weights) from elsewhere
        raise ModelSpecError(
            f"model {name!r}: only plain timm names, tv:NAME, hf:MODEL and FILE.py:FACTORY are supported "
            "(nothing is downloaded)"
        )
    if not timm.is_model(name):
        raise ModelSpecError(f"unknown model {name!r}{_suggest(name, _all_names())}")
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    cfg = _timm_cfg(name)
    if input_size is not None and len(input_size) == 3 and cfg is not None and getattr(cfg, "fixed_input_size", False):
        if tuple(input_size) != tuple(cfg.input_size or ()):
            try:
                return timm.create_model(name, img_size=tuple(input_size[1:]), **kwargs)
            except TypeError:  # the architecture takes no img_size; the forward will say what input it wants
                pass
    return timm.create_model(name, **kwargs)


def _timm_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name, allow_unregistered=True)
    except Exception:  # a config is only a hint here
        return None


def _torchvision_model(name: str, num_classes: int | None, input_size: Sequence[int] | None = None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        candidates = [TORCHVISION_PREFIX + n for n in known]
        raise ModelSpecError(f"unknown torchvision model {name!r}{_suggest(TORCHVISION_PREFIX + name, candidates)}")
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_size is not None and len(input_size) == 3 and input_size[1] == input_size[2]:
        try:  # torchvision's ViTs are built for one size, given as image_size (timm's: img_size)
            return torchvision.models.get_model(name, image_size=int(input_size[1]), **kwargs)
        except TypeError:  # the architecture takes any size
            pass
    return torchvision.models.get_model(name, **kwargs)


def _file_model(path: Path, factory: str, num_classes: int | None) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"no such file: {path}")
    if not factory.isidentifier():
        raise ModelSpecError(f"{factory!r} is not a function name; write {path}:FACTORY")
    module_name = f"_gaaf_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ModelSpecError(f"importing {path} failed: {type(e).__name__}: {one_line(e)}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelSpecError(f"{path} has no function {factory!r}{_suggest(factory, names) or f'; it has {names}'}")
    try:
        model = fn() if num_classes is None else fn(num_classes=num_classes)
    except Exception as e:
        raise ModelSpecError(f"{path}:{factory}() failed: {type(e).__name__}: {one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The per-sample input shape the model was designed for: timm's ``pretrained_cfg`` says, else ``3, 224, 224``."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else getattr(cfg, "input_size", None)
        if size:
            return tuple(int(s) for s in size)
    return DEFAULT_INPUT_SIZE


@dataclass
class Checkpoint:
    """A checkpoint's weights, the key they were found under (``""``: the file is a bare state_dict), and whatever
    else the file holds next to them (a ``gaaf_config``, the model name, ...)."""

    state_dict: dict[str, torch.Tensor]
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gaaf_config(self) -> dict[str, Any] | None:
        cfg = self.extra.get("gaaf_config")
        return cfg if isinstance(cfg, dict) else None


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a plain state_dict, a timm-style training checkpoint or a ``gaaf-patch --out`` file, on the CPU.

    Only tensors and plain containers are unpickled (``weights_only``): a checkpoint is data, not code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(path, e)}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), "")
    weights = obj[key] if key else obj
    extra = {k: v for k, v in obj.items() if k != key} if key else {}
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}{f' [{key!r}]' if key else ''} is not a state_dict: {len(bad)} entries are not "
            f"tensors ({', '.join(map(str, bad[:3]))}); expected a state_dict or a dict with one of {STATE_DICT_KEYS}"
        )
    return Checkpoint(_strip_wrappers(dict(weights)), key, extra)


def _unreadable(path: Path, e: Exception) -> str:
    """Why ``path`` did not load, in words to act on: torch's own errors for an empty file and for one that is not a
    checkpoint at all are ``EOFError:`` and ``KeyError: 101``."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        return one_line(err)
    if not head:
        return "the file is empty (0 bytes: a copy or a write that did not finish?); pass a file torch.save wrote"
    if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):  # zip archive, pickle
        return (
            f"not a file torch.save writes (a zip archive or a pickle; it starts with {head!r}); pass a checkpoint "
            "torch.save wrote, or a .safetensors file"
        )
    return f"{type(e).__name__}: {one_line(e)}"


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with a one-line error that names the keys that differ.

    Missing, unexpected and wrongly shaped keys are all checked before loading, so nothing is half-loaded.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = [
        _listing(what, keys)
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model: {one_line(e)}") from e


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> Checkpoint:
    """Read ``path`` and load its weights into ``model`` strictly; returns what was read."""
    ckpt = read_checkpoint(path)
    load_state_dict_strict(model, ckpt.state_dict)
    return ckpt


def _listing(what: str, keys: list[str], first: int = 3) -> str:
    more = f", ... (+{len(keys) - first} more)" if len(keys) > first else ""
    return f"{len(keys)} {what} key(s): {', '.join(keys[:first])}{more}"


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in a fixed order: a tensor, a (named) tuple or list, or a dict of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in output_tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []
