"""``finetune``: load a checkpoint, patch, train with GAAF, and save weights that load into the unpatched model.

The order matters and is fixed here:

1. build the model (:func:`gaaf_patch.models.build_model`) and size its classifier to the checkpoint's, so that the
   checkpoint loads *strictly* (a checkpoint of another architecture fails here, naming the keys that differ);
2. replace the classifier for ``num_classes`` when asked (fresh weights, everything else from the checkpoint);
3. patch (:func:`gaaf_patch.patch`) - before DistributedDataParallel wraps the model and before ``torch.compile``,
   so both see the GAAF modules and the optimizer gets the very parameters the checkpoint filled;
4. train, evaluate and write an atomic checkpoint after every epoch; on the last one, check the deployment path
   (:mod:`.deploy`): the saved ``state_dict`` loads with ``strict=True`` into a freshly built *unpatched* model,
   whose outputs on a held-out batch are compared with the patched model's (bit-identical in ``exact`` mode).

The options and the checks that need neither model nor data are in :mod:`.options`.

``--compile`` is ``torch.compile`` of the already patched model (after DDP wrapping, as PyTorch recommends), rather
than :func:`gaaf_patch.compile` of the unpatched one: the sites are then exactly the ones ``patch`` reported and
saved in ``gaaf_config``, the same model object is evaluated eagerly and saved, and DDP's graph splitting applies
unchanged. Inductor still compiles the GAAF backward (Dynamo traces the ``autograd.Function``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import data as _data
from ..api import patch as _patch
from ..errors import one_line
from ..models import CheckpointError, build_model, load_state_dict_strict, read_checkpoint
from ..report import report
from . import dist
from .checkpoint import atomic_save, capture_rng, restore_rng
from .deploy import deploy_check
from .head import HeadError, checkpoint_classes, num_outputs, replace_classifier
from .inputs import InputAdapter, model_input_size, normalization
from .loop import Precision, Totals, evaluate, logits_of, progress_bar, train_epoch
from .options import AMP_CHOICES, EMBEDDED_DATA, SCHEDULES, FinetuneError, FinetuneOptions, check_options

__all__ = ["FinetuneOptions", "FinetuneResult", "FinetuneError", "finetune", "EMBEDDED_DATA"]

DIGITS_HOLDOUT = 0.2


@dataclass
class FinetuneResult:
    """What a run did: per-epoch metrics, where the checkpoint is, and the deployment check."""

    history: list[dict[str, Any]]
    out: Path | None
    start_epoch: int
    num_classes: int
    input_size: tuple[int, ...]
    gaaf_config: dict[str, Any] | None
    patch_summary: dict[str, Any] | None
    deploy: dict[str, Any] | None
    world_size: int = 1
    digests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.deploy is None or bool(self.deploy.get("ok"))


# ------------------------------------------------------------------------------------------------------------- model


def _load_model(opts: FinetuneOptions) -> tuple[nn.Module, Any, bool]:
    """The model with the checkpoint's weights (or the resumed run's) and the classifier asked for; and whether its
    classifier was replaced (the deployment model is then built with that many classes)."""
    model = build_model(opts.model, None, opts.input_size)
    source = opts.resume or opts.checkpoint
    ckpt = read_checkpoint(source) if source else None
    replaced = False
    if ckpt is not None:
        n = checkpoint_classes(model, ckpt.state_dict)
        if n is not None and n != num_outputs(model):
            replace_classifier(model, n)
            replaced = True
        try:
            load_state_dict_strict(model, ckpt.state_dict)
        except CheckpointError as e:
            raise CheckpointError(f"{source} is not a checkpoint of {opts.model}: {e}") from None
    if opts.num_classes is not None and opts.num_classes != num_outputs(model):
        if opts.resume:
            raise FinetuneError(
                f"--num-classes {opts.num_classes} differs from the resumed run's {num_outputs(model)} classes"
            )
        replace_classifier(model, opts.num_classes)
        replaced = True
    return model, ckpt, replaced


def _classes(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """How many classes the model scores: its classifier's outputs, else the width of one eval-mode forward (a
    user's model with no recognisable classifier, trained with the classes it has)."""
    try:
        return num_outputs(model)
    except HeadError:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return int(logits_of(model(torch.zeros(2, *input_size))).shape[-1])
        except Exception as e:  # noqa: BLE001 - the model's own error, reported as a usage problem
            raise FinetuneError(
                f"cannot tell how many classes {type(model).__name__} scores on input {list(input_size)}: "
                f"{type(e).__name__}: {one_line(e, 200)}; set --input-size"
            ) from None
        finally:
            model.train(was)


# -------------------------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    train: Any
    val: Any
    num_classes: int
    prepare: InputAdapter
    name: str


def _datasets(opts: FinetuneOptions, model: nn.Module, input_size: tuple[int, ...]) -> _Data:
    if opts.data in EMBEDDED_DATA:
        if opts.data == "digits":
            train, val = _data.holdout(_data.digits(), DIGITS_HOLDOUT)
            name = f"digits ({len(train)} train / {len(val)} held out)"
        else:
            train = _data.mnist(opts.data_dir, train=True, download=opts.download)
            val = _data.mnist(opts.data_dir, train=False, download=opts.download)
            name = f"MNIST ({len(train)} train / {len(val)} test)"
        channels = input_size[0] if len(input_size) == 3 else 1
        prepare = InputAdapter(input_size, normalization(model, channels) if len(input_size) == 3 else None)
        n = max(train.num_classes, val.num_classes)
        return _Data(_data.SplitDataset(train), _data.SplitDataset(val), n, prepare, name)
    root = Path(opts.data).expanduser()
    if not root.is_dir():
        raise _data.DataError(f"--data {opts.data}: no such folder (or use one of {', '.join(EMBEDDED_DATA)})")
    if len(input_size) != 3:
        raise FinetuneError(f"an image folder needs an image model; --input-size is {','.join(map(str, input_size))}")
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, *input_size[1:])}, model=model)
    train, val, classes = _data.image_folders(
        root, create_transform(**cfg, is_training=True), create_transform(**cfg, is_training=False)
    )
    return _Data(train, val, len(classes), InputAdapter(input_size), f"{root} ({len(train)} train / {len(val)} val)")


def _loaders(opts: FinetuneOptions, ds: _Data, d: dist.Dist) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    """Shuffled, rank-sharded training batches (the sampler is seeded: the order depends on seed and epoch only, so
    a resumed run sees the batches the uninterrupted one would), and an unpadded shard of the held-out set."""
    sampler = DistributedSampler(ds.train, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=opts.seed)
    tensors = isinstance(ds.train, _data.SplitDataset)
    kw: dict[str, Any] = {"pin_memory": d.device.type == "cuda"}
    if tensors:
        kw["collate_fn"] = _data.SplitDataset.collate
    else:
        kw["num_workers"] = opts.workers
        kw["persistent_workers"] = opts.workers > 0
    # a last batch of one sample breaks BatchNorm in training mode; drop the remainder when there is more than it
    drop_last = len(sampler) > opts.batch_size
    train = DataLoader(ds.train, batch_size=opts.batch_size, sampler=sampler, drop_last=drop_last, **kw)
    val_indices = list(range(d.rank, len(ds.val), d.world_size))
    val = DataLoader(ds.val, batch_size=opts.batch_size, sampler=val_indices, **kw)
    return train, sampler, val


# ---------------------------------------------------------------------------------------------------- training parts


def _precision(amp: str | None, device: torch.device) -> Precision:
    if amp is None:
        return Precision(device.type, None)
    if amp not in AMP_CHOICES:
        raise FinetuneError(f"--amp {amp}: use one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        amp = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise FinetuneError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return Precision(device.type, torch.bfloat16 if amp == "bf16" else torch.float16)


def _optimizer(opts: FinetuneOptions, model: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(
            model, opt=opts.opt, lr=opts.lr, weight_decay=opts.weight_decay, momentum=opts.momentum
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise FinetuneError(f"--opt {opts.opt}: {one_line(e)} (e.g. sgd, adamw, lamb)") from None


def _scheduler(opts: FinetuneOptions, optimizer: torch.optim.Optimizer, steps: int):
    if opts.sched not in SCHEDULES:
        raise FinetuneError(f"--sched {opts.sched}: use one of {', '.join(SCHEDULES)}")
    if opts.sched == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, opts.epochs * steps))


# --------------------------------------------------------------------------------------------------------------- run


def finetune(opts: FinetuneOptions, console: Any = None) -> FinetuneResult:
    """Run the fine-tuning ``opts`` describes (see the module docstring for the order of the steps).

    Under ``torchrun`` every process calls this; only the first prints and writes the checkpoint. The caller's
    random state is left as it was: the run seeds a forked generator from ``opts.seed``.
    """
    check_options(opts)
    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    d = dist.setup(opts.device)
    try:
        devices = [d.device] if d.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(opts.seed)
            return _run(opts, d, console)
    except OSError as e:  # an image that cannot be read, a full disk: the environment's, not a bug
        raise FinetuneError(
            f"input/output error: {type(e).__name__}: {one_line(e, 300)}; check that the files --data and "
            "--data-dir name are readable and that there is free space"
        ) from e
    finally:
        dist.teardown(d)


def _say(d: dist.Dist, console: Any, text: str) -> None:
    if d.is_main:
        console.print(text, soft_wrap=True, markup=False)


def _run(opts: FinetuneOptions, d: dist.Dist, console: Any) -> FinetuneResult:
    model, ckpt, replaced = _load_model(opts)
    input_size = model_input_size(model, opts.input_size)
    ds = _datasets(opts, model, input_size)
    classes = _classes(model, input_size)
    if classes < ds.num_classes:
        raise FinetuneError(
            f"the model's classifier has {classes} outputs but {ds.name} has {ds.num_classes} classes; "
            f"pass --num-classes {ds.num_classes}"
        )
    source = opts.resume or opts.checkpoint
    _say(d, console, f"{opts.model}: {'loaded ' + str(source) if source else 'random init (no --checkpoint)'}"
         f"; {classes} classes; input {'x'.join(map(str, input_size))}; data {ds.name}")  # fmt: skip

    summary = gaaf_config = None
    if opts.patch is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="gaaf-patch:")  # unreached sites are in the summary
            _patch(model, **opts.patch)
        rep = report(model)
        summary, gaaf_config = rep.summary(), rep.config
        acts = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_activation"].items()))
        _say(d, console, f"patched: replaced {summary['replaced']}{f' ({acts})' if acts else ''}, "
             f"stripped {summary['stripped']}, unreached {summary['unreached']}")  # fmt: skip
    else:
        _say(d, console, "not patched (--no-patch): plain training, the baseline")
    if ckpt is not None and opts.resume and ckpt.extra.get("gaaf_config") != gaaf_config:
        _say(d, console, f"note: the resumed run was patched with {ckpt.extra.get('gaaf_config')}; now {gaaf_config}")

    model.to(d.device)
    train_loader, sampler, val_loader = _loaders(opts, ds, d)
    if len(train_loader) == 0:
        raise FinetuneError(f"no training batch: {ds.name} is too small for {d.world_size} process(es)")
    optimizer = _optimizer(opts, model)
    scheduler = _scheduler(opts, optimizer, len(train_loader))
    precision = _precision(opts.amp, d.device)
    scaler = precision.scaler()

    start_epoch, history = 0, []
    if opts.resume and ckpt is not None:
        extra = ckpt.extra
        missing = [k for k in ("optimizer", "epoch", "rng") if k not in extra]
        if missing:
            raise CheckpointError(f"--resume {opts.resume}: not a fine-tuning checkpoint (no {', '.join(missing)})")
        optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None and extra.get("scheduler"):
            scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        start_epoch, history = int(extra["epoch"]), list(extra.get("history") or [])
        restore_rng(extra["rng"])
        _say(d, console, f"resumed after epoch {start_epoch} of {opts.epochs}")

    train_model: nn.Module = model
    if d.enabled:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if opts.compile:
        train_model = torch.compile(train_model)

    deploy, digests = None, []
    out = opts.out_path
    for epoch in range(start_epoch, opts.epochs):
        sampler.set_epoch(epoch)
        with progress_bar(console, d.is_main) as bar:
            tr = train_epoch(
                train_model, train_loader, len(train_loader), ds.prepare, optimizer, precision, scaler, d, bar,
                f"epoch {epoch + 1}/{opts.epochs}", scheduler,
            )  # fmt: skip
        dist.sync_buffers(d, model)
        ev = evaluate(model, val_loader, ds.prepare, precision, d)
        row = _row(epoch + 1, tr, ev, optimizer)
        history.append(row)
        _say(d, console, f"epoch {epoch + 1}/{opts.epochs}: train loss {tr.loss:.4f} acc {tr.acc:.2%} "
             f"({tr.images_per_second:,.0f} img/s) | val loss {ev.loss:.4f} acc {ev.acc:.2%} "
             f"({int(ev.correct)}/{int(ev.count)})")  # fmt: skip
        digests = dist.replica_digests(d, model)
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {d.world_size} replicas' weights differ after epoch {epoch + 1}: {digests}")
        last = epoch + 1 == opts.epochs
        if last and d.is_main:
            with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):  # not the run's RNG
                batch = ds.prepare(next(iter(val_loader))[0].to(d.device))
                deploy = deploy_check(opts, model, classes if replaced else None, batch, precision)
        if d.is_main:
            state = {
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch + 1,
                "rng": capture_rng(),
                "gaaf_config": gaaf_config,
                "model": opts.model,
                "num_classes": classes,
                "input_size": list(input_size),
                "args": opts.to_dict(),
                "history": history,
                "replicas": {"world_size": d.world_size, "digests": digests},
                "deploy_check": deploy,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _save(state, out)
    if start_epoch >= opts.epochs:
        _say(d, console, f"nothing to do: the resumed run already completed {start_epoch} epoch(s) of {opts.epochs}")
        out = None
    return FinetuneResult(
        history, out if d.is_main else None, start_epoch, classes, input_size, gaaf_config, summary,
        deploy, d.world_size, digests,
    )  # fmt: skip


def _save(state: dict[str, Any], out: Path) -> None:
    try:
        atomic_save(state, out)
    except (OSError, RuntimeError) as e:  # torch.save reports some write failures as RuntimeError
        raise FinetuneError(
            f"cannot write the checkpoint {out}: {one_line(e)}; free space or choose another --out"
        ) from e


def _row(epoch: int, tr: Totals, ev: Totals, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": tr.loss,
        "train_acc": tr.acc,
        "val_loss": ev.loss,
        "val_acc": ev.acc,
        "val_correct": int(ev.correct),
        "val_count": int(ev.count),
        "images_per_second": tr.images_per_second,
        "train_seconds": tr.seconds,
        "lr": optimizer.param_groups[0]["lr"],
    }
