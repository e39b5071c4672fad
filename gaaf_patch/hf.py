"""Hugging Face transformers models, built from a shrunk default config or a local ``save_pretrained`` directory.

``hf:MODEL_TYPE`` builds ``AutoModel.from_config(AutoConfig.for_model(MODEL_TYPE))`` with its sizes shrunk (a few
layers, a narrow width, small images), random weights, so any architecture can be patched and checked in seconds
on a CPU; ``overrides`` (the CLI's ``--config key=value``) set config fields after shrinking. ``hf:DIR`` loads a
model saved with ``save_pretrained`` (never from the hub: ``local_files_only``), as the class it was saved from.
:func:`example_inputs` makes the keyword inputs the model's forward takes (``input_ids``, ``pixel_values``,
``input_values``, ...); :func:`runnable_inputs` the first of the likely layouts the model runs on.

Shrinking keeps a config valid: per-layer lists follow the layer count (one layer of each kind kept), special
token ids stay in the vocabulary, backbone outputs and multimodal rotary sections follow the new sizes, and the
config's own validators (which ``save_pretrained`` runs) are satisfied where they name the value they want.

transformers is an optional dependency (``pip install gaaf-patch[hf]``): importing this module without it is fine,
calling it raises a :class:`HFError` that says so.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GaafError, one_line

__all__ = [
    "HFError",
    "HF_PREFIX",
    "build",
    "shrunk_config",
    "example_inputs",
    "example_candidates",
    "runnable_inputs",
    "parse_overrides",
    "model_types",
]

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
    "depth": 2, "d_head": 8, "num_frames": 4, "window_size": 2, "max_source_positions": 64,
    "max_target_positions": 64, "codebook_dim": 32,
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


def _get(config: Any, key: str) -> Any:
    try:  # heterogeneous configs raise their own error for a per-layer attribute read globally
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001
        return None


def _set(config: Any, key: str, value: Any) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # noqa: BLE001 - a read-only or per-layer field keeps its value
        pass


def _sub_configs(config: Any) -> list[Any]:
    """The configs nested in ``config`` (``text_config``, ``vision_config``, T5Gemma's ``encoder``...)."""
    return [v for k, v in vars(config).items() if not k.startswith("__") and hasattr(v, "to_dict") and v is not config]


def _token_ids(config: Any, seen: set[int]) -> list[int]:
    if id(config) in seen:
        return []
    seen.add(id(config))
    own = [v for k, v in vars(config).items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)]
    return own + [i for sub in _sub_configs(config) for i in _token_ids(sub, seen)]


def _cap(key: str) -> int | None:
    if key in SHRINK:
        return SHRINK[key]
    if key.endswith("hidden_size"):  # out_hidden_size, text_hidden_size...: they must match the shrunk widths
        return SHRINK["hidden_size"]
    if key.endswith("intermediate_size"):
        return SHRINK["intermediate_size"]
    return None


def _shrink(config: Any, min_vocab: int, seen: set[int] | None = None) -> None:
    """Shrink ``config`` and its nested configs in place (see the module's ``SHRINK`` and :func:`_per_layer`)."""
    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    layers_before = {k: _get(config, k) for k in _LAYER_COUNTS}
    for key in list(vars(config)) + [k for k in SHRINK if k not in vars(config)]:
        cap = _cap(key)
        value = _get(config, key)
        if cap is not None and isinstance(value, int) and not isinstance(value, bool) and value > cap:
            _set(config, key, min(value, max(cap, min_vocab)) if "vocab_size" in key else cap)
    # Per-stage lists (tuples in some configs): one block and one head per stage (a head divides any width).
    for keys, make in (
        (("depths", "num_layers_per_stage", "num_heads", "num_attention_heads", "heads"), lambda i: 1),
        (("hidden_sizes", "embed_dims", "dims", "embed_dim_per_stage"), lambda i: 16 * 2**i),
    ):
        for key in keys:
            value = _get(config, key)
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                _set(config, key, type(value)(make(i) for i in range(len(value))))
    _per_layer(config, layers_before)
    _backbone_outputs(config, layers_before)
    _mrope(config)
    for sub in _sub_configs(config):
        _shrink(sub, min_vocab, seen)


_MAX_CYCLE = 8  # layers kept at most for a cycled pattern of layer kinds
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers", "depth")


def _per_layer(config: Any, before: dict[str, Any]) -> None:
    """Per-layer lists (``layer_types``, ``mlp_layer_types``, ...) whose length was a layer count that shrank keep
    one layer of each kind (the first of each distinct combination across the lists, then the first others) and
    the layer count follows them: two linear-attention layers of a hybrid model would leave no attention layer."""
    for key, old in before.items():
        new = _get(config, key)
        if not (isinstance(old, int) and isinstance(new, int) and new < old):
            continue
        names = [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == old and not k.startswith("_")]
        # a shorter pattern the layers cycle through (RecurrentGemma's block_types): keep one full cycle
        cycles = [
            v for k, v in vars(config).items() if k.endswith("_types") and isinstance(v, list) and new < len(v) < old
        ]
        if not names and cycles:
            _set(config, key, min(max(map(len, cycles)), _MAX_CYCLE))
        if not names:
            continue
        lists = [getattr(config, k) for k in names]
        combos = [tuple(map(str, col)) for col in zip(*lists, strict=True)]
        keep = sorted({combos.index(c) for c in combos})
        keep = sorted(keep + [i for i in range(old) if i not in keep][: max(0, new - len(keep))])
        _set(config, key, len(keep))
        for k, values in zip(names, lists, strict=True):
            _set(config, k, [values[i] for i in keep])


def _backbone_outputs(config: Any, before: dict[str, Any]) -> None:
    """A ViT-like backbone config keeps ``stage_names`` and ``out_features`` (``stage12``) of its full depth: the
    stages follow the layer count, the outputs are reset to the last stage (what ``from_pretrained`` recomputes)."""
    verify = getattr(config, "verify_out_features_out_indices", None)
    if verify is None:
        return
    names, old, new = (
        vars(config).get("stage_names"),
        before.get("num_hidden_layers"),
        _get(config, "num_hidden_layers"),
    )
    if isinstance(old, int) and isinstance(new, int) and new != old:
        if names == ["stem"] + [f"stage{i}" for i in range(1, old + 1)]:
            config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, new + 1)]
    try:
        verify()
    except Exception:  # noqa: BLE001 - stale after shrinking: the default is the last stage
        try:
            config.set_output_features_output_indices(out_features=None, out_indices=None)
        except Exception:  # noqa: BLE001
            pass


def _mrope(config: Any) -> None:
    """Multimodal rotary sections (``mrope_section``) must sum to half the rotary width, which shrank."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = _get(config, key)
        sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        if not (isinstance(sections, list) and sections and all(isinstance(v, int) for v in sections)):
            continue
        heads = _get(config, "num_attention_heads") or 1
        head_dim = _get(config, "head_dim") or (_get(config, "hidden_size") or 0) // heads
        half = int(head_dim * float(rope.get("partial_rotary_factor", _get(config, "partial_rotary_factor") or 1.0)))
        half //= 2
        if half < len(sections) or sum(sections) == half:
            continue
        scaled = [max(1, s * half // sum(sections)) for s in sections]
        scaled[-1] += half - sum(scaled)
        if scaled[-1] >= 1:
            rope["mrope_section"] = scaled


# A validator's message that names a field and the value it must have: "`a.b` (64) must equal `c` (32)".
_MUST = re.compile(r"`([\w.]+)` \((\d+)\) (?:must|should) (?:be )?(?:equal|match)(?: to)? [^(]*\((\d+)\)")


def _repair(config: Any, tries: int = 8) -> None:
    """Run the config's own validation (``save_pretrained`` does, so a model saved from an invalid config cannot be
    reloaded); where a validator names a field and the value it must have, set it and validate again."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    for _ in range(tries):
        try:
            validate()
            return
        except Exception as e:  # noqa: BLE001 - huggingface_hub's StrictDataclassClassValidationError and others
            found = _MUST.search(str(e))
            if found is None:
                raise HFError(f"the shrunk config does not validate ({one_line(e, 200)})") from e
            *path, field = found.group(1).split(".")
            target = config
            for part in path:
                target = _get(target, part)
            if target is None or _get(target, field) == int(found.group(3)):
                raise HFError(f"the shrunk config does not validate ({one_line(e, 200)})") from e
            _set(target, field, int(found.group(3)))
    raise HFError("the shrunk config does not validate")


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
    # Special token ids (padding, image placeholders...) stay inside the shrunk vocabulary.
    _shrink(config, max(_token_ids(config, set()), default=0) + 1)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise HFError(f"hf:{model_type}: the config has no field {key!r}")
        setattr(config, key, value)
    try:
        _repair(config)
    except HFError as e:
        raise HFError(f"hf:{model_type}: {e}") from e
    return config


def build(spec: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The model ``spec`` names, in eval mode: a model type's base model (``AutoModel``) from its shrunk config, or
    the model saved in a ``save_pretrained`` directory, as the class it was saved from (``config.architectures``: a
    fine-tuned classifier keeps its head) when transformers has it, else its base model."""
    transformers = _transformers()
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise HFError(f"hf:{spec}: no config.json in that directory (save it with save_pretrained)")
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **(overrides or {}))
            names = getattr(config, "architectures", None) or []
            cls = getattr(transformers, names[0], None) if names else None
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                cls = transformers.AutoModel
            model = cls.from_pretrained(path, config=config, local_files_only=True)
        elif "/" in spec or spec.startswith((".", "~")):
            raise HFError(f"hf:{spec}: no such directory (hf:DIR takes a save_pretrained directory)")
        else:
            config = shrunk_config(spec, overrides)
            torch.manual_seed(0)
            model = transformers.AutoModel.from_config(config)
    except HFError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot build this one"
        raise HFError(f"hf:{spec}: cannot build the model ({type(e).__name__}: {one_line(e, 200)})") from e
    return model.eval()


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _int(config: Any, *keys: str, default: int) -> int:
    for key in keys:
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _main_inputs(model: nn.Module, name: str, batch: int, seq: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """Candidates for the main input, likeliest first (audio and video layouts differ from model to model)."""
    config = model.config
    if name == "input_ids":
        text = getattr(config, "text_config", None) or config
        vocab = _int(text, "vocab_size", default=100)
        return [{"input_ids": torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)}]
    if name in ("pixel_values", "pixel_values_videos"):
        vision = getattr(config, "vision_config", None) or config
        size = _get(vision, "image_size") or 32
        size = size if isinstance(size, int) else int(size[0])
        channels = _int(vision, "num_channels", "in_channels", default=3)
        frames = _int(vision, "num_frames", default=4)
        image = {name: torch.randn(batch, channels, size, size, generator=gen)}
        video = {name: torch.randn(batch, frames, channels, size, size, generator=gen)}
        return [video, image] if name.endswith("videos") else [image, video]
    if name == "input_values":
        channels = _int(config, "audio_channels", "num_channels", default=1)
        wave = torch.randn(batch, 4000, generator=gen)
        return [{name: wave}, {name: wave[:, None].expand(batch, channels, 4000).contiguous()}]
    if name == "input_features":
        bins = _int(config, "num_mel_bins", "feature_size", "input_feat_size", "num_mel_filters", default=80)
        frames = 2 * _int(config, "max_source_positions", default=50)  # Whisper wants all of them: 3000
        return [
            {name: torch.randn(batch, bins, frames, generator=gen)},
            {name: torch.randn(batch, 64, bins, generator=gen)},
        ]
    raise HFError(f"{type(model).__name__}: no example input for main input {name!r}")


def example_candidates(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> list[dict[str, Any]]:
    """Keyword inputs ``model``'s forward may take, likeliest first: :func:`example_inputs` is the first, and
    :func:`runnable_inputs` the first one the model runs on."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    params = _forward_params(model)
    extra: dict[str, Any] = {}
    # Text-and-image models (CLIP, SigLIP, BLIP, OWL-ViT...) take both: their main input alone fails.
    if name == "input_ids" and "pixel_values" in params and _get(config, "vision_config") is not None:
        extra.update(_main_inputs(model, "pixel_values", batch, seq, gen)[0])
    if name != "input_ids" and "input_ids" in params and _get(config, "text_config") is not None:
        extra.update(_main_inputs(model, "input_ids", batch, seq, gen)[0])
    if _get(config, "is_encoder_decoder") and "decoder_input_ids" in params:
        text = getattr(config, "text_config", None) or config
        vocab = _int(text, "vocab_size", default=100)
        extra["decoder_input_ids"] = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)
    return [{**main, **extra} for main in _main_inputs(model, name, batch, seq, gen)]


def example_inputs(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> dict[str, Any]:
    """Keyword inputs for ``model``'s forward, sized from its config (token ids below the vocabulary size, images of
    the configured size, a short waveform); decoder inputs for encoder-decoder models, images with the text of
    text-and-image models. Not run: :func:`runnable_inputs` tries the alternatives."""
    return example_candidates(model, batch, seq)[0]


def runnable_inputs(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> dict[str, Any]:
    """The first of :func:`example_candidates` the model runs on (eval mode, no gradient; nothing of the model
    changes); :class:`HFError` with the first candidate's error when it runs on none."""
    first: Exception | None = None
    was = model.training
    model.eval()
    try:
        for inputs in example_candidates(model, batch, seq):
            try:
                with torch.no_grad():
                    model(**inputs)
                return inputs
            except Exception as e:  # noqa: BLE001 - the next layout may fit
                first = first or e
    finally:
        model.train(was)
    raise HFError(
        f"{type(model).__name__} does not run on its example inputs ({type(first).__name__}: {one_line(first, 200)})"
    )
