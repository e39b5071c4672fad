"""Hugging Face transformers models, built from a shrunk default config or a local ``save_pretrained`` directory.

``hf:MODEL_TYPE`` builds ``AutoModel.from_config(AutoConfig.for_model(MODEL_TYPE))`` with its sizes shrunk (a few
layers, a narrow width, small images), random weights, so any architecture can be patched and checked in seconds
on a CPU; ``overrides`` (the CLI's ``--config key=value``) set config fields after shrinking. ``hf:DIR`` loads a
model saved with ``save_pretrained`` (never from the hub: ``local_files_only``). :func:`example_inputs` makes the
keyword inputs the model's forward takes (``input_ids``, ``pixel_values``, ``input_values``, ...).

transformers is an optional dependency (``pip install gaaf-patch[hf]``): importing this module without it is fine,
calling it raises a :class:`HFError` that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GaafError, one_line

__all__ = ["HFError", "HF_PREFIX", "build", "shrunk_config", "example_inputs", "parse_overrides", "model_types"]

HF_PREFIX = "hf:"

# Config fields set to at most these values (only where the config has them). Widths stay divisible by the head
# counts; depth-like fields keep at least what the architecture needs (one layer of each kind).
SHRINK: dict[str, int] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "n_embed": 32, "projection_dim": 32,
    "intermediate_size": 64, "d_ff": 64, "n_inner": 64, "ffn_dim": 64, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "hidden_dim": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "num_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "d_kv": 8, "head_dim": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 1024, "max_position_embeddings": 512, "image_size": 32, "patch_size": 8,
}  # fmt: skip
_SEQ = 8
_BATCH = 2


class HFError(GaafError, ValueError):
    """A Hugging Face model that cannot be built or loaded, or transformers missing."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise HFError("hf: models need transformers: pip install 'gaaf-patch[hf]'") from e
    return transformers


def model_types() -> list[str]:
    """Every transformers model type that has a base model class (``AutoModel``), sorted."""
    _transformers()
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["num_hidden_layers=4", "hidden_act=gelu_new"]`` -> a dict; values are read as JSON when they parse."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HFError(f"--config takes KEY=VALUE, not {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _shrink(config: Any, seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, cap in SHRINK.items():
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            try:
                setattr(config, key, cap)
            except (AttributeError, TypeError, ValueError):
                pass
    for key in ("depths", "num_layers_per_stage"):
        value = getattr(config, key, None)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            setattr(config, key, [1] * len(value))
    for key in ("hidden_sizes", "embed_dims", "dims", "embed_dim_per_stage"):
        value = getattr(config, key, None)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            setattr(config, key, [16 * 2**i for i in range(len(value))])
    for key in ("layer_types",):  # per-layer lists must keep the layer count
        value = getattr(config, key, None)
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(value, list) and isinstance(layers, int) and len(value) > layers:
            setattr(config, key, value[:layers])
    for key in dir(config):
        if key.endswith("_config") and not key.startswith("_"):
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                _shrink(sub, seen)


def shrunk_config(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """``AutoConfig.for_model(model_type)`` with its sizes shrunk (see ``SHRINK``) and ``overrides`` applied."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError as e:
        import difflib

        close = difflib.get_close_matches(model_type, model_types(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise HFError(f"hf:{model_type}: not a transformers model type{hint}") from e
    _shrink(config)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise HFError(f"hf:{model_type}: the config has no field {key!r}")
        setattr(config, key, value)
    return config


def build(spec: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The base model ``spec`` names (``MODEL_TYPE`` or a ``save_pretrained`` directory), in eval mode."""
    transformers = _transformers()
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise HFError(f"hf:{spec}: no config.json in that directory (save it with save_pretrained)")
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **(overrides or {}))
            model = transformers.AutoModel.from_pretrained(path, config=config, local_files_only=True)
        else:
            config = shrunk_config(spec, overrides)
            torch.manual_seed(0)
            model = transformers.AutoModel.from_config(config)
    except HFError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot build this one"
        raise HFError(f"hf:{spec}: cannot build the model ({type(e).__name__}: {one_line(e, 200)})") from e
    return model.eval()


def example_inputs(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> dict[str, Any]:
    """Keyword inputs for ``model``'s forward, sized from its config (token ids below the vocabulary size, images of
    the configured size, a short waveform); decoder inputs for encoder-decoder models."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    text = getattr(config, "text_config", None) or config
    vocab = int(getattr(text, "vocab_size", None) or 100)
    inputs: dict[str, Any] = {}
    if name == "input_ids":
        inputs["input_ids"] = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)
    elif name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = int(getattr(vision, "num_channels", 3))
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen)
    elif name == "input_values":
        inputs["input_values"] = torch.randn(batch, 4000, generator=gen)
    elif name == "input_features":
        bins = int(getattr(config, "num_mel_bins", 80))
        inputs["input_features"] = torch.randn(batch, bins, 3000, generator=gen)
    else:
        raise HFError(f"{type(model).__name__}: no example input for main input {name!r}")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)
    return inputs
