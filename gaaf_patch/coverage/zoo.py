"""The zoo a coverage sweep runs over: timm's registry and torchvision's classification models, grouped in families.

A timm family is the module a model is defined in (``timm.list_modules()``: ``resnet``, ``vision_transformer``,
...); a torchvision family is its builder's module (``resnet``, ``swin_transformer``, ...). The default sweep takes
one representative per family, the cheapest one: the registry has no parameter counts, so a few candidates picked
by their names (``test_*``, ``atto`` < ``tiny`` < ``small`` < ``base``..., smaller numbers first) are built on the
``meta`` device (no memory, no init cost) and the smallest by parameter count wins (counts are cached per library
version in ``~/.cache/gaaf-patch``).

Models are built with random weights (``pretrained=False``, nothing is downloaded) at a small input size where the
architecture allows one: ``img_size`` is passed to timm models built for a fixed size; if the unpatched model
rejects the small input, the sweep falls back to the size the model's config declares.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Entry",
    "entry_for",
    "timm_families",
    "torchvision_families",
    "representatives",
    "entries",
    "hf_entries",
    "build",
    "native_size",
]

TIMM, TORCHVISION, HF = "timm", "torchvision", "hf"
# Candidates per family built on the meta device to find the cheapest (the name heuristic alone errs in ~10 of 98 families).
CANDIDATES = 6
_SIZE_WORDS = {
    "test": 0, "atto": 1, "femto": 2, "pico": 3, "nano": 4, "xxxs": 4, "xxs": 5, "xxtiny": 5, "xs": 6, "xtiny": 6,
    "slim": 7, "tiny": 7, "ti": 7, "t": 7, "mini": 7, "b0": 7, "small": 8, "s": 8, "light": 8, "lite": 8,
    "base": 10, "b": 10, "m": 10, "medium": 10, "large": 12, "l": 12, "xl": 13, "xlarge": 13, "huge": 14, "h": 14,
    "giant": 15, "g": 15,
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One model of the zoo: its library (``timm`` / ``torchvision`` / ``hf``), family and name. A Hugging Face
    entry's family is its model type (``bert``), its name the base class once built (``BertModel``)."""

    source: str
    family: str
    name: str

    @property
    def spec(self) -> str:
        """The spelling ``gaaf-patch patch`` takes: ``resnet18``, ``tv:resnet18`` or ``hf:bert``."""
        if self.source == HF:
            return f"hf:{self.family}"
        return self.name if self.source == TIMM else f"tv:{self.name}"

    @property
    def family_id(self) -> str:
        if self.source == HF:
            return f"hf:{self.family}"
        return self.family if self.source == TIMM else f"tv:{self.family}"


def timm_families() -> dict[str, list[str]]:
    """timm's families (the module a model is registered in) and their models, from the registry."""
    import timm

    return {m: list(timm.list_models(module=m)) for m in timm.list_modules()}


def torchvision_families() -> dict[str, list[str]]:
    """torchvision's classification models by builder module (``resnet``, ``vgg``, ...)."""
    import torchvision
    from torchvision.models import get_model_builder

    out: dict[str, list[str]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        out.setdefault(get_model_builder(name).__module__.rsplit(".", 1)[-1], []).append(name)
    return out


def _name_cost(name: str) -> tuple:
    """A guess at a model's size from its name: size words first, then the numbers in it, then its length."""
    toks = re.split(r"[_.]", name.lower())
    words = [re.match(r"[a-z]*", t).group() for t in toks]  # type: ignore[union-attr]
    size = min((_SIZE_WORDS[t] for t in toks + words if t in _SIZE_WORDS), default=9)
    nums = [int(x) for t in toks for x in re.findall(r"\d+", t)]
    return (size, len(name), nums[:2])


def meta_params(entry: Entry) -> int | None:
    """Parameter count of ``entry``: torchvision's weights metadata says it; a timm model is built on the meta
    device (no memory, no init). ``None`` if that fails."""
    if entry.source == TORCHVISION:
        try:
            import torchvision

            return int(torchvision.models.get_model_weights(entry.name).DEFAULT.meta["num_params"])
        except Exception:  # noqa: BLE001 - a model without weights metadata: build it on the meta device
            pass
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _construct(entry, {})
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a count is only a hint for ordering
        return None


def cache_path(source: str) -> Path:
    """Where parameter counts are kept between sweeps, per library version (``$XDG_CACHE_HOME/gaaf-patch``)."""
    import importlib

    version = importlib.import_module(source).__version__
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gaaf-patch"
    return root / f"params-{source}-{version}.json"


def _load(path: Path) -> dict[str, int | None]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def representatives(
    source: str, families: dict[str, list[str]], candidates: int = CANDIDATES, cache: Path | None = None
) -> list[Entry]:
    """The cheapest model of each family: the ``candidates`` likeliest by name, compared by parameter count.

    Building ~600 models on the meta device takes minutes on a small machine; ``cache`` (a JSON file) keeps the
    counts for the next sweep. A cache that cannot be written is only slower."""
    known = _load(cache) if cache else {}
    reps = []
    for fam, names in sorted(families.items()):
        picks = sorted(names, key=_name_cost)[:candidates]
        for n in picks:
            if n not in known:
                known[n] = meta_params(Entry(source, fam, n))
        best = min(picks, key=lambda n: (known[n] is None, known[n] or 0, _name_cost(n)))
        reps.append(Entry(source, fam, best))
    if cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, sort_keys=True))
        except OSError:
            pass
    return reps


def entries(
    all_models: bool = False,
    timm_zoo: bool = True,
    torchvision_zoo: bool = True,
    families: list[str] | None = None,
    cache: bool = True,
) -> list[Entry]:
    """The models a sweep checks: every model (``all_models``) or one per family; ``families`` narrows it down
    (timm family names, ``tv:NAME`` for torchvision's). ``cache``: keep parameter counts in :func:`cache_path`."""
    out: list[Entry] = []
    seen: set[str] = set()
    for source, on, get in ((TIMM, timm_zoo, timm_families), (TORCHVISION, torchvision_zoo, torchvision_families)):
        if not on:
            continue
        fams = get()
        prefix = "tv:" if source == TORCHVISION else ""
        seen |= {prefix + f for f in fams}
        if families is not None:
            fams = {f: ms for f, ms in fams.items() if prefix + f in families}
        if all_models:
            out += [Entry(source, f, n) for f, ms in sorted(fams.items()) for n in ms]
        else:
            # torchvision's families are small (15 models at most): count them all, names mislead (regnet_x_8gf)
            n = CANDIDATES if source == TIMM else max(map(len, fams.values()), default=0)
            out += representatives(source, fams, n, cache=cache_path(source) if cache else None)
    unknown = sorted(set(families or ()) - seen)
    if unknown:
        raise ValueError(
            f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; see timm.list_modules()"
        )
    return out


def _construct(entry: Entry, kwargs: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():  # torchvision's notes on its init defaults, timm's deprecations: not ours
        warnings.simplefilter("ignore")
        return _construct_noisy(entry, kwargs)


def _construct_noisy(entry: Entry, kwargs: dict[str, Any]) -> nn.Module:
    if entry.source == TIMM:
        import timm

        return timm.create_model(entry.name, pretrained=False, **kwargs)
    import torchvision

    return torchvision.models.get_model(entry.name, weights=None, **kwargs)


def native_size(entry: Entry, model: nn.Module | None = None) -> tuple[int, int, int]:
    """The per-sample input the model was designed for: timm's ``pretrained_cfg``, torchvision's weights' crop."""
    if entry.source == TIMM:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return tuple(size) if size else (3, 224, 224)  # type: ignore[return-value]
    try:
        import torchvision

        crop = torchvision.models.get_model_weights(entry.name).DEFAULT.transforms().crop_size[0]
        return (3, int(crop), int(crop))
    except Exception:  # noqa: BLE001 - a model without weights enum: the usual size
        return (3, 224, 224)


def _fixed_size(entry: Entry) -> bool:
    if entry.source == TIMM:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(entry.name, allow_unregistered=True)
        return bool(getattr(cfg, "fixed_input_size", False))
    return entry.name.startswith("vit_")  # torchvision's ViTs: a fixed position embedding


def build(entry: Entry, size: int | None) -> tuple[nn.Module, tuple[int, int, int]]:
    """``entry`` with random weights, and the per-sample input to check it on: ``size`` square when the
    architecture allows it (``img_size``/``image_size`` passed on for fixed-size models), else its native size.
    ``size=None``: the native size."""
    if size is not None and _fixed_size(entry):
        kw = {"img_size": size} if entry.source == TIMM else {"image_size": size}
        try:
            model = _construct(entry, kw)
            return model, (native_size(entry, model)[0], size, size)
        except (TypeError, AssertionError, ValueError, RuntimeError):
            size = None  # the architecture takes no smaller size: build it as designed
    model = _construct(entry, {})
    native = native_size(entry, model)
    return model, native if size is None else (native[0], size, size)


def hf_entries(model_types: list[str] | None = None) -> list[Entry]:
    """One entry per transformers model type with a base model class (``model_types``: only these), sorted."""
    from ..hf import model_types as all_types

    known = all_types()
    unknown = sorted(set(model_types or ()) - set(known))
    if unknown:
        raise ValueError(f"no transformers model type {', '.join(map(repr, unknown))} with a base model class")
    return [Entry(HF, t, t) for t in (known if model_types is None else sorted(set(model_types)))]


def entry_for(spec: str) -> Entry:
    """The entry of one model named as ``gaaf-patch patch`` takes it: ``resnet18``, ``tv:resnet18`` or ``hf:bert``."""
    if spec.startswith("hf:"):
        return hf_entries([spec[3:]])[0]
    source, name = (TORCHVISION, spec[3:]) if spec.startswith("tv:") else (TIMM, spec)
    fams = timm_families() if source == TIMM else torchvision_families()
    for fam, names in fams.items():
        if name in names:
            return Entry(source, fam, name)
    raise ValueError(f"no {source} model {name!r}")
