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

import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import patch as _patch
from ..errors import GaafError, one_line
from ..models import CheckpointError, build_model, load_state_dict_strict, read_checkpoint
from ..report import report
from . import dist, resume, sharded
from .checkpoint import atomic_save, capture_rng, remove_stray_temps, restore_rng, seeded
from .deploy import deploy_check
from .head import HeadError, checkpoint_classes, num_outputs, replace_classifier
from .inputs import model_input_size, output_width
from .interrupt import Interrupted, Terminated, raise_if_received, received
from .loaders import datasets, loaders, worker_message
from .loop import NonFiniteLoss, Precision, Totals, evaluate, progress_bar, train_epoch
from .options import AMP_CHOICES, EMBEDDED_DATA, FinetuneError, FinetuneOptions, check_options, is_sharded

__all__ = ["FinetuneOptions", "FinetuneResult", "FinetuneError", "finetune", "EMBEDDED_DATA"]


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
    replaced = False
    if opts.fsdp and opts.resume:  # the weights load later, as shards, into the sharded model
        ckpt: Any = sharded.read_checkpoint(opts.resume)
        n = ckpt.extra.get("num_classes")
        if ckpt.extra.get("replaced") and n is not None and n != num_outputs(model):
            replace_classifier(model, n)
        replaced = bool(ckpt.extra.get("replaced"))
    else:
        ckpt = read_checkpoint(source) if source else None
    if ckpt is not None and ckpt.state_dict is not None:
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
    user's model with no recognisable classifier, trained with the classes it has). The forward runs either way: it
    checks that the model takes ``input_size``."""
    width = output_width(model, input_size)
    try:
        return num_outputs(model)
    except HeadError:
        return width


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


# --------------------------------------------------------------------------------------------------------------- run


def finetune(opts: FinetuneOptions, console: Any = None) -> FinetuneResult:
    """Run the fine-tuning ``opts`` describes (see the module docstring for the order of the steps).

    Under ``torchrun`` every process calls this; only the first prints and writes the checkpoint. The caller's
    random state is left as it was: the run seeds forked generators from ``opts.seed``. Ctrl-C (or SIGTERM under
    :func:`.interrupt.handle_interrupts`) raises :class:`.interrupt.Interrupted`, naming the last checkpoint.
    """
    check_options(opts)
    if is_sharded(opts):
        sharded.check_sharded_options(opts)
    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    saved = _Saved(Path(opts.resume) if opts.resume else None, 0, opts.epochs)
    d = dist.setup(opts.device, opts.dist_timeout)
    failed = True
    try:
        with seeded(opts.seed, [d.device]):
            result = _run(opts, d, console, saved)
        failed = False
        return result
    except KeyboardInterrupt as e:
        dist.stopped_by_another_rank(d, e, own=False)
        signum = received() or (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        raise Interrupted(signum, saved.path, saved.epoch, opts.epochs) from None
    except Exception as e:
        dist.stopped_by_another_rank(d, e, own=_translate(e) is not None)
        signum = received()
        if signum is not None:  # the interrupt's exception was dropped (raised in a __del__); this followed it
            raise Interrupted(signum, saved.path, saved.epoch, opts.epochs) from None
        error = _translate(e)
        if d.enabled:  # the others read this line when their next collective breaks (dist.failure_elsewhere)
            dist.record_failure(d, one_line(error, 300) if error is not None else f"{type(e).__name__}: {one_line(e)}")
            if error is not None:
                raise FinetuneError(f"rank {d.rank} of {d.world_size}: {one_line(error, 500)}") from e
        if error is not None and error is not e:
            raise error from e
        raise
    finally:
        dist.teardown(d, failed)


def _translate(e: Exception) -> Exception | None:
    """The one-line error a failure is shown as (None: a bug, shown with its traceback)."""
    message = worker_message(e)  # raised in a loader worker: its message is the last line of PyTorch's
    if isinstance(e, GaafError):
        return type(e)(message) if message is not None else e
    if isinstance(e, OSError):  # an image that cannot be read, a full disk: the environment's, not a bug
        return FinetuneError(
            f"input/output error: {type(e).__name__}: {message or one_line(e, 300)}; check that the files "
            "--data and --data-dir name are readable and that there is free space"
        )
    return None


@dataclass
class _Saved:
    """The last good checkpoint a run can be resumed from: the ``--resume`` file until this run writes its own."""

    path: Path | None
    epoch: int
    epochs: int

    def where(self) -> str:
        if self.path is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.path} (epoch {self.epoch}) is unchanged"


def _say(d: dist.Dist, console: Any, text: str) -> None:
    if d.is_main:
        console.print(text, soft_wrap=True, markup=False)


def _run(opts: FinetuneOptions, d: dist.Dist, console: Any, saved: _Saved) -> FinetuneResult:
    model, ckpt, replaced = _load_model(opts)
    input_size = model_input_size(model, opts.input_size)
    if opts.resume and ckpt is not None:
        resume.check_resumable(opts, ckpt.extra, input_size)
        saved.epoch = int(ckpt.extra["epoch"])
    out = opts.out_path
    if d.is_main:
        for p in remove_stray_temps(opts.export_path if opts.fsdp else out):
            _say(d, console, f"removed {p}, the temporary file of a checkpoint write that was killed")
    ds = datasets(opts, model, input_size)
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
    batches = loaders(opts, ds, d)
    steps = len(batches.train)
    if steps == 0:
        raise FinetuneError(f"no training batch: {ds.name} is too small for {d.world_size} process(es)")
    precision = _precision(opts.amp, d.device)
    amp_dtype = precision.dtype
    if opts.fsdp:  # patch, then shard, then the optimizer (on the sharded parameters)
        policy, precision = sharded.mixed_precision(precision, model)
        sharded.shard_model(opts, model, policy)
        _say(d, console, f"sharded with FSDP2 over {d.world_size} processes"
             + (f"; parameters in {str(amp_dtype).removeprefix('torch.')}" if amp_dtype is not None else ""))  # fmt: skip
    optimizer = _optimizer(opts, model)
    scaler = precision.scaler()

    start_epoch, history = 0, []
    if opts.resume and ckpt is not None:
        load = sharded.loader(model, optimizer, ckpt.path) if opts.fsdp else None  # with each rank's random state
        start_epoch, history, scheduler, rebuilt = resume.restore_training(
            opts, ckpt.extra, optimizer, scaler, steps, load
        )
        if not opts.fsdp:
            restore_rng(ckpt.extra["rng"])
        lr = optimizer.param_groups[0]["lr"]
        _say(d, console, f"resumed after epoch {start_epoch} of {opts.epochs}"
             + (f"; schedule rebuilt for --lr {opts.lr:g} and --epochs {opts.epochs} (lr now {lr:.3g})" if rebuilt
                else ""))  # fmt: skip
    else:
        scheduler = resume.make_scheduler(opts, optimizer, steps)

    train_model: nn.Module = model
    if d.enabled and not opts.fsdp:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if opts.compile:
        train_model = torch.compile(train_model)

    deploy, digests = None, []
    for epoch in range(start_epoch, opts.epochs):
        raise_if_received()  # an interrupt whose exception Python dropped still ends the run
        dist.inject_fault(d, epoch + 1)
        batches.set_epoch(epoch)
        try:
            with progress_bar(console, d.is_main) as bar:
                tr = train_epoch(
                    train_model, batches.train, steps, ds.prepare, optimizer, precision, scaler, d, bar,
                    f"epoch {epoch + 1}/{opts.epochs}", scheduler,
                )  # fmt: skip
        except NonFiniteLoss as e:
            raise FinetuneError(
                f"training diverged: {e}; nothing of this epoch was saved and {saved.where()}; lower --lr "
                f"(now {opts.lr:g}) or check the data and the patch options"
            ) from None
        dist.sync_buffers(d, model)
        val = batches.val
        if opts.fsdp:  # every rank runs as many forwards
            val = sharded.even_batches(val, len(val.dataset), d.world_size, opts.batch_size)
        ev = evaluate(model, val, ds.prepare, precision, d)
        row = _row(epoch + 1, tr, ev, optimizer)
        history.append(row)
        _say(d, console, f"epoch {epoch + 1}/{opts.epochs}: train loss {tr.loss:.4f} acc {tr.acc:.2%} "
             f"({tr.images_per_second:,.0f} img/s) | val loss {ev.loss:.4f} acc {ev.acc:.2%} "
             f"({int(ev.correct)}/{int(ev.count)})")  # fmt: skip
        digests = [] if opts.fsdp else dist.replica_digests(d, model)  # FSDP's shards differ by design
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {d.world_size} replicas' weights differ after epoch {epoch + 1}: {digests}")
        last = epoch + 1 == opts.epochs
        exported = None
        if last and (d.is_main or opts.fsdp):
            with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):  # not the run's RNG
                batch = ds.prepare(next(iter(batches.val))[0].to(d.device))
                n = classes if replaced else None
                if opts.fsdp:  # collective: every rank gathers and runs the forward, rank 0 checks
                    exported, deploy = sharded.export(opts, model, batch, n, amp_dtype, d.is_main)
                else:
                    deploy = deploy_check(opts, model, n, batch, precision)
        if d.is_main or opts.fsdp:
            state = {
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch + 1,
                "steps_per_epoch": steps,
                "gaaf_config": gaaf_config,
                "model": opts.model,
                "num_classes": classes,
                "input_size": list(input_size),
                "data_source": resume.data_source(opts),
                "args": opts.to_dict(),
                "history": history,
                "replicas": {"world_size": d.world_size, "digests": digests},
                "deploy_check": deploy,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if opts.fsdp:  # collective; the model, optimizer and random states go in as shards
                sharded.save(model, optimizer, {**state, "replaced": replaced}, out, saved.where())
                if exported is not None and d.is_main:
                    sharded.write_export(exported, opts.export_path, saved.where())
            else:
                state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), **state,
                         "rng": capture_rng()}  # fmt: skip
                _save(state, out, saved)
        saved.path, saved.epoch = out, epoch + 1
    if start_epoch >= opts.epochs:
        _say(d, console, f"nothing to do: the resumed run already completed {start_epoch} epoch(s) of {opts.epochs}")
        out = None
    if opts.fsdp and out is not None:
        out = opts.export_path  # what the run ships: one plain state_dict
    return FinetuneResult(
        history, out if d.is_main else None, start_epoch, classes, input_size, gaaf_config, summary,
        deploy, d.world_size, digests,
    )  # fmt: skip


def _save(state: dict[str, Any], out: Path, saved: _Saved) -> None:
    try:
        atomic_save(state, out)
    except (OSError, RuntimeError) as e:  # torch.save reports some write failures as RuntimeError
        raise FinetuneError(
            f"cannot write the checkpoint {out}: {one_line(e)}; {saved.where()}; free space or choose another --out"
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
