"""The depth benchmark's models at init (:mod:`benchmarks.depth`): each built by the coverage sweep's builder
(gaaf_patch/coverage/zoo.py) at the first input size it runs at, measured, and measured again with a zero-initialised
classifier redrawn (that head sends no gradient back, so there would be nothing to compare).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.depth_measure import SEED, measure
from gaaf_patch.coverage import zoo
from gaaf_patch.errors import one_line

__all__ = ["entry_for", "build_at", "HEAD_INIT", "reinit_zero_head", "init_entry"]


@functools.cache
def _families(source: str) -> dict[str, str]:
    fams = zoo.timm_families() if source == zoo.TIMM else zoo.torchvision_families()
    return {name: fam for fam, names in fams.items() for name in names}


def entry_for(spec: str) -> zoo.Entry:
    source, name = (zoo.TORCHVISION, spec[3:]) if spec.startswith("tv:") else (zoo.TIMM, spec)
    fam = _families(source).get(name)
    if fam is None:
        raise ValueError(f"no {source} model {name!r}")
    return zoo.Entry(source, fam, name)


def _input(shape: Sequence[int], batch: int, seed: int = SEED) -> Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _runs(model: nn.Module, x: Tensor) -> bool:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()
            torch.manual_seed(SEED)
            model(x[:2])
        return True
    except Exception:  # noqa: BLE001 - the model rejects this input size: try the next
        return False


def build_at(entry: zoo.Entry, sizes: Sequence[int | None], batch: int) -> tuple[nn.Module, Tensor, list[str]]:
    """``entry`` built by the zoo's builder at the first of ``sizes`` its unpatched model runs at (seeded), with a
    seeded batch; raises with every size's failure."""
    errors = []
    for s in sizes:
        torch.manual_seed(SEED)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, shape = zoo.build(entry, s)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{s}: build {type(e).__name__}")
            continue
        x = _input(shape, batch)
        if _runs(model, x):
            return model, x, errors
        errors.append(f"{s or 'native'}: does not run at {list(shape)}")
    raise RuntimeError("; ".join(errors))


HEAD_INIT = "trunc_normal_(std=0.02), seed 0"


def reinit_zero_head(model: nn.Module) -> list[str]:
    """A zero-initialised classifier (the last ``nn.Linear`` whose weight is all zeros: torchvision's ViT, timm's
    Hiera, gMLP, Sequencer) drawn again at small random values, so the gradient reaches the network; its name."""
    for name, m in reversed(list(model.named_modules())):
        if isinstance(m, nn.Linear) and not bool(m.weight.detach().any()):
            torch.manual_seed(SEED)
            with torch.no_grad():
                nn.init.trunc_normal_(m.weight, std=0.02)
            return [name]
    return []


def init_entry(spec: str, group: str, sizes: Sequence[int | None], batch: int, max_params: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": spec, "group": group}
    try:
        entry = entry_for(spec)
        row["family"] = entry.family_id
        n = zoo.meta_params(entry)
        if n is not None and n > max_params:
            row.update(status="skip", params=n, reason=f"over {max_params / 1e6:.0f}M parameters ({n / 1e6:.0f}M)")
            return row
        model, x, tried = build_at(entry, sizes, batch)
        row.update(params=sum(p.numel() for p in model.parameters()), input_size=list(x.shape[1:]), batch=len(x))
        if tried:
            row["size_fallback"] = tried
        row.update(measure(model, x))
        if row["zero_gradient"]:
            names = reinit_zero_head(model)
            if names:
                row["head_reinit"] = {"modules": names, "init": HEAD_INIT, **measure(model, x)}
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one model's failure is recorded, the run goes on
        row.update(status="error", reason=f"{type(e).__name__}: {one_line(e, 300)}")
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 2)
    return row
