"""How GAAF's gradient gain grows with depth, paper gain against the auto gain: ``python -m benchmarks.depth``.

::

    python -m benchmarks.depth                        # every model below, at init and after a short training
    python -m benchmarks.depth --quick --out /tmp/d   # 3 small models at 64x64 + one tiny trained one (< 30 s)
    python -m benchmarks.depth --models resnet50,tv:resnet152 --no-trained

For every model, three copies of the same randomly initialised weights (seeded) run one train-mode forward and
backward on the same seeded input batch, each under the same forked and re-seeded RNG (dropout and drop-path draw
the same masks; the forwards are checked bit for bit): the plain model, ``gaaf_patch.patch(m, gain="paper")``
(``phi' + s``) and ``gaaf_patch.patch(m)`` (``gain="auto"``, the default). The loss is
:func:`gaaf_patch.measure_gradient_scale`'s, the mean of the squared outputs. Measured, as ratios patched / plain:

- whole network: the norm of the gradient on the input and the norm of the gradient on all parameters (the same
  numbers ``measure_gradient_scale`` returns, computed here in the same pass as the per-stage ones);
- per depth: the norm of the gradient on the output of each stage, block or block group (forward hooks on the
  stage modules; each hooked output is passed on as a clone, so an in-place op downstream cannot change which
  tensor the gradient is taken of). The stage list is timm's ``feature_info`` (``layer1..4`` and the stem for
  ResNets, every block for ViTs), else a ``stages`` / ``layers`` / ``blocks`` / ``features`` / ``encoder.layers``
  container or torchvision's ``layer1..4``; a model with none of these is measured whole, and its entry says so.
  Stages are ordered as the forward calls them; the relative depth of stage ``k`` of ``n`` is ``k/n`` and the
  input sits at depth 0, so the plot reads from the input (left) to the loss (right).

Models: every model of the coverage sweep (gaaf_patch/coverage/zoo.py: one per timm / torchvision family, built by
its ``build`` at the sweep's 64x64 where the model takes it, else at 128, else at its own size; over 200M parameters
skipped as the sweep does), then a depth list of ResNets 18-152, EfficientNets B0-B3 and other deep networks, each
at its own input size (224x224 for most; EfficientNet-B1..B3 and Inception-v3 larger). Batch 4. A model whose
classifier starts at zero sends no gradient back at init (nothing to compare; ``zero_gradient``): it is measured
again with that classifier redrawn (``head_reinit``).

After training (``--no-trained`` skips it): a few models are trained briefly from scratch on scikit-learn's digits
(gaaf_patch/data.py, 8x8 upsampled to 3x32x32, the ViT to 3x64x64, SGD with momentum), their ``state_dict`` saved
to a temporary folder and loaded into a freshly built model (``strict=True``), which is then measured as above on
held-out digits, next to the same architecture at its initial weights on the same batch. Training and held-out
accuracy say whether it learnt.

One torch thread by default (``--threads``): on a shared 2-core machine two threads ran 10-40x slower.

Results: ``<out>/depth-<date>-cpu.json`` (every number, rewritten atomically after each model so an interrupted run
keeps what it measured) and ``<out>/depth-<date>-cpu.png`` (ratio against relative depth, log scale, with the
target band ``gaaf_patch.gradscale.SAFE``), and a table on stdout (``--markdown FILE`` writes it as markdown).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaaf_patch
from gaaf_patch import gain as _gain
from gaaf_patch.coverage import zoo
from gaaf_patch.gradscale import SAFE
from gaaf_patch.models import build_model, output_tensors
from gaaf_patch.modules import GAAF

SEED = 0
BATCH = 4
ZOO_SIZES: tuple[int | None, ...] = (64, 128, None)  # the sweep's size, then a larger one, then the model's own
MAX_PARAMS = 200_000_000  # the coverage sweep's default limit
GAINS = ("paper", "auto")
# (spec, input size): the depth list, at each model's own size (None: timm's pretrained_cfg, torchvision's crop).
DEPTH_MODELS: tuple[tuple[str, int | None], ...] = (
    ("resnet18", None),
    ("resnet34", None),
    ("resnet50", None),
    ("resnet101", None),
    ("resnet152", None),
    ("efficientnet_b0", None),
    ("efficientnet_b1", None),
    ("efficientnet_b2", None),
    ("efficientnet_b3", None),
    ("mobilenetv3_large_100", None),
    ("regnety_008", None),
    ("densenet121", None),
    ("inception_v3", None),
    ("vit_tiny_patch16_224", None),
    ("deit_tiny_patch16_224", None),
    ("swin_tiny_patch4_window7_224", None),
    ("tv:resnet152", None),
)
TRAINED_MODELS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "densenet121",
    "vit_tiny_patch16_224",
    "mobilenetv3_large_100",
)
QUICK_MODELS: tuple[tuple[str, int], ...] = (("test_efficientnet", 64), ("test_vit", 64), ("resnet50", 64))
QUICK_TRAINED = ("test_resnet",)


@dataclass(frozen=True)
class TrainConfig:
    size: int = 32
    steps: int = 150
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip: float = 5.0  # gradient-norm clipping: a from-scratch ViT under SGD spikes early without it
    measure_batch: int = 8  # held-out digits measured on; BatchNorm over 4 samples of a 1x1 map says little


QUICK_TRAIN = TrainConfig(steps=30, batch=32)
# transformers under SGD: a smaller step; the depthwise nets learn slowly at 0.05 in so few steps
LR = {"vit_tiny_patch16_224": 0.03, "test_vit": 0.03, "mobilenetv3_large_100": 0.1, "efficientnet_b0": 0.1}
SIZE = {"vit_tiny_patch16_224": 64}  # 16x16 patches: 4x4 tokens at 64 (2x2 at 32)
STEPS = {"vit_tiny_patch16_224": 300}  # a ViT from scratch under SGD learns slowest


# ---------------------------------------------------------------------------------------------------------------------
# measuring


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _ratio(a: float, b: float) -> float | None:
    """``a / b``; ``None`` where it says nothing: no gradient in the plain run, or a non-finite norm."""
    return _finite(a / b) if b > 0 and math.isfinite(b) else None


def stage_names(model: nn.Module) -> tuple[list[str], str]:
    """The modules whose outputs are the model's stages (any order; the forward orders them) and where they came
    from; ``([], "none")`` when the model exposes no stage list."""

    def resolve(name: str) -> str | None:
        for n in (name, name.replace("_", ".")):
            try:
                model.get_submodule(n)
                return n
            except AttributeError:
                continue
        return None

    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(d, dict) and "module" in d for d in info):
        names = [n for n in (resolve(str(d["module"])) for d in info) if n is not None]
        names = list(dict.fromkeys(names))
        if len(names) >= 2:
            return names, "timm feature_info"
    for attr in ("stages", "layers", "blocks", "features", "encoder.layers"):
        try:
            box = model.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(box, (nn.Sequential, nn.ModuleList)) and len(box) >= 2:
            return [f"{attr}.{n}" for n, _ in box.named_children()], f"container {attr}"
    layers = [n for n, _ in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    if len(layers) >= 2:
        return layers, "children layer1..N"
    return [], "none"


def grad_norms(model: nn.Module, x: Tensor, seed: int, stages: Sequence[str]) -> dict[str, Any]:
    """One train-mode forward and backward of ``model`` on ``x`` (loss: mean of squared outputs, RNG forked and
    seeded with ``seed``): gradient norms on the input, on all parameters and on each stage's output."""
    model.train()
    captured: dict[str, list[Tensor]] = {}

    def hook(name: str) -> Callable[..., Any]:
        def fn(module: nn.Module, args: Any, out: Any) -> Any:
            if isinstance(out, Tensor) and out.is_floating_point() and out.requires_grad:
                captured.setdefault(name, []).append(out)
                return out.clone()  # downstream in-place ops act on the clone, not on the tensor measured
            ts = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
            if ts:
                captured.setdefault(name, []).extend(ts)
            return None

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in stages]
    xr = x.detach().clone().requires_grad_()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            outs = [o for o in output_tensors(model(xr)) if o.is_floating_point() and o.requires_grad]
    finally:
        for h in handles:
            h.remove()
    if not outs:
        raise ValueError("the model output has no differentiable tensor")
    loss = sum(o.float().square().mean() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    order = list(captured)  # insertion order: the order the forward first called each stage
    flat = [t for n in order for t in captured[n]]
    grads = torch.autograd.grad(loss, [xr, *params, *flat], allow_unused=True)

    def norm(gs: Sequence[Tensor | None]) -> float | None:
        gs = [g for g in gs if g is not None]
        return math.sqrt(sum(g.double().square().sum().item() for g in gs)) if gs else None

    stage_norms: dict[str, float | None] = {}
    i = 1 + len(params)
    for n in order:
        k = len(captured[n])
        stage_norms[n] = norm(grads[i : i + k])
        i += k
    return {
        "input": norm(grads[:1]) or 0.0,
        "params": norm(grads[1 : 1 + len(params)]) or 0.0,
        "stages": stage_norms,
        "outputs": [o.detach() for o in outs],
        "loss": float(loss.detach()),
    }


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b, strict=True)
    )


def measure(base: nn.Module, x: Tensor, seed: int = SEED) -> dict[str, Any]:
    """Plain, paper-gain and auto-gain copies of ``base`` (left untouched) on ``x``: whole-network and per-stage
    gradient-norm ratios patched / plain."""
    names, source = stage_names(base)
    runs: dict[str, dict[str, Any]] = {}
    sites: dict[str, Any] = {}
    for variant in ("plain", *GAINS):
        model = copy.deepcopy(base)
        if variant != "plain":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gaaf_patch.patch(model, gain=variant)
            gaaf_sites = [m for m in model.modules() if isinstance(m, GAAF)]
            sites[variant] = len(gaaf_sites)
            if variant == "auto":
                deltas = {m.delta for m in gaaf_sites}
                sites["auto_delta"] = deltas.pop() if len(deltas) == 1 else sorted(d for d in deltas if d is not None)
        runs[variant] = grad_norms(model, x, seed, names)
        del model
    plain = runs["plain"]
    # stages reached by the gradient in every run, in the plain forward's order
    order = [n for n in plain["stages"] if all(runs[v]["stages"].get(n) is not None for v in runs)]
    stages = []
    for k, n in enumerate(order, 1):
        row: dict[str, Any] = {"name": n, "depth": k / len(order), "plain": plain["stages"][n]}
        for g in GAINS:
            row[g] = runs[g]["stages"][n]
            row[f"{g}_ratio"] = _ratio(runs[g]["stages"][n], plain["stages"][n])
        stages.append(row)
    whole = {
        g: {
            "input": _ratio(runs[g]["input"], plain["input"]),
            "params": _ratio(runs[g]["params"], plain["params"]),
        }
        for g in GAINS
    }
    norms = {
        v: {"input": _finite(r["input"]), "params": _finite(r["params"]), "loss": _finite(r["loss"])}
        for v, r in runs.items()
    }
    auto_stage = [s["auto_ratio"] for s in stages if s["auto_ratio"] is not None]
    # a zero-initialised head (torchvision's ViT) sends no gradient back at init: nothing to compare
    zero = plain["input"] == 0 and plain["params"] == 0
    return {
        "stage_source": source if stages else "none: whole network only",
        "stages": stages,
        "whole": whole,
        "norms": norms,
        "sites": sites,
        "forward_identical": {g: _same(plain["outputs"], runs[g]["outputs"]) for g in GAINS},
        "auto_stage_range": [min(auto_stage), max(auto_stage)] if auto_stage else None,
        "zero_gradient": zero,
        "in_target": None if zero else in_target(whole["auto"]),
    }


def in_target(ratios: dict[str, float | None]) -> bool:
    lo, hi = SAFE
    return all(r is not None and lo <= r <= hi for r in ratios.values())


# ---------------------------------------------------------------------------------------------------------------------
# models


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
        row.update(status="error", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# after training


@functools.cache
def digits_at(size: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's digits (gaaf_patch.data), 80/20 split, upsampled to ``3 x size x size``, normalised."""
    from gaaf_patch import data

    train, held = data.holdout(data.digits(), 0.2, seed=0)

    def up(images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).sub_(0.5).div_(0.5)

    return (up(train.images), train.labels), (up(held.images), held.labels)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def train(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, lr: float, seed: int = SEED) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        losses.append(loss.item())
    refresh_norm_stats(model, x, cfg.batch, gen)
    tail = losses[-10:]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "norm_stats_refresh_batches": REFRESH_BATCHES,
    }


REFRESH_BATCHES = 20


@torch.no_grad()
def refresh_norm_stats(model: nn.Module, x: Tensor, batch: int, gen: torch.Generator) -> None:
    """BatchNorm running statistics re-estimated on the final weights (train-mode forwards, no gradient): after a
    short run at momentum 0.1 they still mix in the first steps' statistics, and eval-mode accuracy reads them."""
    model.train()
    for _ in range(REFRESH_BATCHES):
        model(x[torch.randint(0, len(x), (batch,), generator=gen)])


def trained_entry(spec: str, cfg: TrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    size = SIZE.get(spec, cfg.size)
    (xtr, ytr), (xte, yte) = digits_at(size)
    shape = (3, size, size)
    lr = LR.get(spec, cfg.lr)
    if spec in STEPS and cfg.steps == TrainConfig.steps:  # the defaults' per-model override; --train-steps wins
        cfg = TrainConfig(**{**cfg.__dict__, "steps": STEPS[spec]})
    row: dict[str, Any] = {"model": spec, "input_size": list(shape), "batch": cfg.measure_batch}
    try:
        torch.manual_seed(SEED)
        model = build_model(spec, num_classes=10, input_size=shape)
        row["params"] = sum(p.numel() for p in model.parameters())
        init_state = copy.deepcopy(model.state_dict())
        xm = xte[: cfg.measure_batch]
        row["init"] = measure(model, xm)
        row["train"] = {
            "steps": cfg.steps,
            "batch": cfg.batch,
            "lr": lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "clip_grad_norm": cfg.clip,
            **train(model, xtr, ytr, cfg, lr),
        }
        row["train"]["train_acc"] = accuracy(model, xtr, ytr)
        row["train"]["heldout_acc"] = accuracy(model, xte, yte)
        with tempfile.TemporaryDirectory(prefix="gaaf-depth-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            torch.save(model.state_dict(), path)
            torch.manual_seed(SEED + 1)  # another init, so the load has to bring the trained weights
            fresh = build_model(spec, num_classes=10, input_size=shape)
            state = torch.load(path, weights_only=True)
            fresh.load_state_dict(state, strict=True)
        moved = max(
            float((v.float() - init_state[k].float()).abs().max())
            for k, v in state.items()
            if v.is_floating_point() and v.numel()
        )
        row["checkpoint"] = {"keys": len(state), "strict": True, "max_abs_change_from_init": moved}
        del model, state
        row["trained"] = measure(fresh, xm)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# output


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def save_json(results: dict[str, Any], path: Path) -> None:
    """``results`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(results), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; this is a results file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(r: float | None) -> str:
    if r is None:
        return "overflow"
    if abs(r) < 10:
        return f"{r:.3f}" if abs(r) >= 1e-3 or r == 0 else f"{r:.2e}"
    return f"{r:.0f}" if abs(r) < 1e4 else f"{r:.2e}"


def _ratios_text(whole: dict[str, Any]) -> str:
    """``paper P/I auto P/I``: the whole-network ratios (parameters / input) of one measurement, for the log."""
    return " ".join(f"{g} {_fmt(whole[g]['params'])}/{_fmt(whole[g]['input'])}" for g in ("paper", "auto"))


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per measurement: model, when, input, paper params / input ratio, auto params / input ratio, auto
    per-stage range, in target."""
    rows = []

    def add(model: str, when: str, size: Any, m: dict[str, Any]) -> None:
        w = m["whole"]
        rng = m.get("auto_stage_range")
        if m["zero_gradient"]:
            rows.append([model, when, "x".join(map(str, size[1:])), *["n/a"] * 4, "", "n/a: plain gradient is 0"])
            return
        rows.append(
            [
                model,
                when,
                "x".join(map(str, size[1:])) if size else "",
                _fmt(w["paper"]["params"]),
                _fmt(w["paper"]["input"]),
                _fmt(w["auto"]["params"]),
                _fmt(w["auto"]["input"]),
                f"{_fmt(rng[0])}-{_fmt(rng[1])}" if rng else "whole only",
                "yes" if m["in_target"] else "NO",
            ]
        )

    for r in results["init"]:
        if r["status"] == "ok":
            add(r["model"], "init", r["input_size"], r)
            if "head_reinit" in r:
                add(r["model"], "init, zero head redrawn", r["input_size"], r["head_reinit"])
        else:
            rows.append([r["model"], "init", "", r["status"], r.get("reason", "")[:60], "", "", "", ""])
    for r in results.get("trained", []):
        if r["status"] == "ok":
            acc = f"trained (acc {r['train']['train_acc']:.2f})"
            add(r["model"], "init (digits)", r["input_size"], r["init"])
            add(r["model"], acc, r["input_size"], r["trained"])
        else:
            rows.append([r["model"], "trained", "", r["status"], r.get("reason", "")[:60], "", "", "", ""])
    return rows


COLUMNS = (
    "model",
    "weights",
    "input",
    "params paper",
    "input paper",
    "params auto",
    "input auto",
    "auto per stage",
    "auto in [0.5, 2]",
)


def markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5 + ["---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GAAF gradient-norm ratio patched / plain (target [{SAFE[0]}, {SAFE[1]}])")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "weights", "input") else "right", no_wrap=c == "model")
    for row in table_rows(results):
        t.add_row(*row, style="bold red" if row[-1] == "NO" else None)
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results.get("trained", []) if r["status"] == "ok"]
    panels = [("init, gain='paper'", "paper"), ("init, gain='auto' (default)", "auto")]
    fig, axes = plt.subplots(1, 3 if trained else 2, figsize=(19 if trained else 13, 6.5), squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20")

    def curve(m: dict[str, Any], gain: str) -> tuple[list[float], list[float]]:
        xs, ys = [0.0], [m["whole"][gain]["input"]]
        for s in m["stages"]:
            xs.append(s["depth"])
            ys.append(s[f"{gain}_ratio"])
        pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b is not None and b > 0]
        return [a for a, _ in pts], [b for _, b in pts]

    ok = [r for r in results["init"] if r["status"] == "ok"]
    for ax, (title, g) in zip(axes, panels, strict=False):
        ci = 0
        for r in ok:
            if r["zero_gradient"] and "head_reinit" not in r:
                continue
            xs, ys = curve(r.get("head_reinit", r), g)
            if r["group"] != "zoo":
                ax.plot(xs, ys, "-o", ms=3, lw=1.6, color=colors(ci % 20), label=f"{r['model']} ({r['input_size'][1]})")
                ci += 1
            else:
                ax.plot(xs, ys, "-", lw=0.6, color="0.6", alpha=0.6)
        ax.plot([], [], "-", lw=0.6, color="0.6", label="coverage zoo (one model per family)")
        ax.set_title(title)
    if trained:
        ax = axes[2]
        for i, r in enumerate(trained):
            c = colors(i % 20)
            for g, style in (("paper", "--"), ("auto", "-o")):
                xs, ys = curve(r["trained"], g)
                acc = r["train"]["train_acc"]
                label = f"{r['model']} ({r['input_size'][1]}, acc {acc:.2f})" if g == "auto" else None
                ax.plot(xs, ys, style, ms=3, lw=1.4, color=c, label=label)
        ax.plot([], [], "--", color="k", label="gain='paper'")
        ax.plot([], [], "-", color="k", label="gain='auto'")
        batch = trained[0]["batch"]
        ax.set_title(f"after a short training on digits (checkpoint reloaded; {batch} held-out images)", fontsize=10)
    axes[1].set_ylim(0.25, 4.0)  # the auto gain stays near 1: show the band's edges
    for ax in axes:
        ax.set_yscale("log")
        ax.axhspan(*SAFE, color="tab:green", alpha=0.15, label=f"target [{SAFE[0]}, {SAFE[1]}]")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("relative depth (0: input, 1: last stage)")
        ax.set_ylabel("gradient norm, patched / plain")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, loc="upper right", ncol=1)
    fig.suptitle(
        f"GAAF gradient scale with depth, batch {results['settings']['batch']}, seed {results['settings']['seed']} "
        f"(torch {results['machine']['torch']}, commit {results['machine']['git_commit'] or '?'})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results["init"] if r["status"] == "ok"]
    tr = [r for r in results.get("trained", []) if r["status"] == "ok"]
    heads = [r for r in ok if "head_reinit" in r]

    def out(rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return [{"model": n, **m["whole"]["auto"]} for n, m in rows if m["in_target"] is False]

    return {
        "init_measured": len(ok),
        "init_skipped": [r["model"] for r in results["init"] if r["status"] == "skip"],
        "init_errors": [r["model"] for r in results["init"] if r["status"] == "error"],
        "init_auto_in_target": sum(r["in_target"] is True for r in ok),
        "init_zero_gradient": [r["model"] for r in ok if r["zero_gradient"]],
        "init_auto_out_of_target": out(
            [(r["model"], r) for r in ok] + [(f"{r['model']} (head redrawn)", r["head_reinit"]) for r in heads]
        ),
        "init_head_redrawn": [r["model"] for r in heads],
        "init_head_redrawn_auto_in_target": sum(r["head_reinit"]["in_target"] is True for r in heads),
        "init_whole_network_only": [r["model"] for r in ok if not r["stages"]],
        "forward_not_identical": [r["model"] for r in ok if not all(r["forward_identical"].values())],
        "trained_measured": len(tr),
        "trained_auto_in_target": sum(r["trained"]["in_target"] is True for r in tr),
        "trained_auto_out_of_target": out([(r["model"], r["trained"]) for r in tr]),
        "trained_errors": [r["model"] for r in results.get("trained", []) if r["status"] == "error"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated model specs (timm names, tv:NAME); default: all")
    p.add_argument("--quick", action="store_true", help="3 small models at 64x64 and one tiny trained model")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    p.add_argument("--no-trained", dest="trained", action="store_false", help="skip the after-training part")
    p.add_argument("--trained-models", default=None, help="comma-separated models for the after-training part")
    p.add_argument("--train-steps", type=int, default=None, help="SGD steps per trained model (default 150)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"measuring batch (default {BATCH})")
    p.add_argument("--size", type=int, default=None, help="input size for every model (default: per model)")
    p.add_argument("--no-zoo", action="store_true", help="the depth list only, not the coverage sweep's models")
    p.add_argument("--max-params", type=int, default=MAX_PARAMS, help="skip larger models (the sweep's 200M)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default); on a shared 2-core machine 2 threads ran 10-40x slower "
        "than 1 (OpenMP threads spinning against other processes)",
    )
    p.add_argument("--tag", default="cpu", help="file name suffix: depth-<date>-<tag>.json")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    return p.parse_args(argv)


def _sizes(size: int | None) -> tuple[int | None, ...]:
    return (None,) if size is None else (size, None)


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, tuple[int | None, ...]]], list[str]]:
    """``(spec, group, sizes to try)`` for the init part, and the trained part's models. ``--models``: those only
    (depth-list models at their size, any other at the zoo's sizes), without listing the zoo."""
    depth = dict(DEPTH_MODELS)
    if args.quick:
        init = [(s, "quick", (n,)) for s, n in QUICK_MODELS]
        trained = list(QUICK_TRAINED)
    elif args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        init = [(s, "depth", _sizes(depth[s])) if s in depth else (s, "selected", ZOO_SIZES) for s in wanted]
        trained = [s for s in TRAINED_MODELS if s in wanted]
    else:
        init = [] if args.no_zoo else [(e.spec, "zoo", ZOO_SIZES) for e in zoo.entries() if e.spec not in depth]
        init += [(s, "depth", _sizes(n)) for s, n in DEPTH_MODELS]
        trained = list(TRAINED_MODELS)
    if args.trained_models is not None:
        trained = [m.strip() for m in args.trained_models.split(",") if m.strip()]
    if args.size:
        init = [(s, g, _sizes(args.size)) for s, g, _ in init]
    if not args.trained:
        trained = []
    return init, trained


def _kernels_state() -> str:
    from gaaf_patch import kernels

    try:
        return "C++ kernel" if kernels.available() else "plain torch ops (no C++ kernel)"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def worktree_changes() -> list[str]:
    """``git status --porcelain`` of the tracked files: what the commit hash does not say about the code measured."""
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return out.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.run import machine_info

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    json_path, png_path = out / f"depth-{date}-{args.tag}.json", out / f"depth-{date}-{args.tag}.png"
    init_plan, trained_plan = plan(args)
    cfg = QUICK_TRAIN if args.quick else TrainConfig()
    if args.train_steps:
        cfg = TrainConfig(**{**cfg.__dict__, "steps": args.train_steps})
    results: dict[str, Any] = {
        "benchmark": "depth",
        "command": ["python", "-m", "benchmarks.depth", *(sys.argv[1:] if argv is None else argv)],
        "machine": {**machine_info(torch.get_num_threads()), "worktree_changes": worktree_changes()},
        "settings": {
            "seed": SEED,
            "batch": args.batch,
            "target": list(SAFE),
            "loss": "sum over output tensors of mean(output^2), train mode (gaaf_patch.measure_gradient_scale's)",
            "gains": {"paper": "gaaf_patch.patch(m, gain='paper')", "auto": "gaaf_patch.patch(m) (gain='auto')"},
            "kernels": _kernels_state(),
            "auto_budget": _gain.BUDGET,
            "auto_max_delta": _gain.MAX_DELTA,
            "zoo_sizes_tried": [s or "native" for s in ZOO_SIZES],
            "max_params": args.max_params,
            "train": {
                **cfg.__dict__,
                "data": "sklearn digits, 80/20 holdout (seed 0), bilinear to 3xSxS, (x-0.5)/0.5",
                "lr_overrides": LR,
                "size_overrides": SIZE,
                "steps_overrides": STEPS,
            },
        },
        "models": [s for s, _, _ in init_plan],
        "trained_models": trained_plan,
        "init": [],
        "trained": [],
    }
    for i, (spec, group, sizes) in enumerate(init_plan, 1):
        row = init_entry(spec, group, sizes, args.batch, args.max_params)
        results["init"].append(row)
        if row["status"] == "ok" and row["zero_gradient"]:
            msg = "no gradient in the plain model (nothing to compare)"
        elif row["status"] == "ok":
            msg = f"{_ratios_text(row['whole'])} {len(row['stages'])} stages"
        else:
            msg = f"{row['status']}: {row.get('reason', '')[:100]}"
        print(f"[{i}/{len(init_plan)}] {spec} ({row['seconds']:.1f} s): {msg}", flush=True)
        save_json(results, json_path)
    if trained_plan:
        for spec in trained_plan:
            row = trained_entry(spec, cfg)
            results["trained"].append(row)
            if row["status"] == "ok":
                acc = f"acc {row['train']['train_acc']:.3f}/{row['train']['heldout_acc']:.3f}"
                msg = f"{acc} {_ratios_text(row['trained']['whole'])}"
            else:
                msg = f"{row['status']}: {row.get('reason', '')[:100]}"
            print(f"[trained] {spec} ({row['seconds']:.1f} s): {msg}", flush=True)
            save_json(results, json_path)
    results["summary"] = summarize(results)
    results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["files"] = {"json": str(json_path), "png": str(png_path)}
    save_json(results, json_path)
    plot(results, png_path)
    print_table(results)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    s = results["summary"]
    print(
        f"{results['wall_s']:.0f} s; auto in target: {s['init_auto_in_target']}/"
        f"{s['init_measured'] - len(s['init_zero_gradient'])} at init, "
        f"{s['init_head_redrawn_auto_in_target']}/{len(s['init_head_redrawn'])} with a zero head redrawn, "
        f"{s['trained_auto_in_target']}/{s['trained_measured']} trained; {json_path}, {png_path}"
    )
    return results


if __name__ == "__main__":
    main()
