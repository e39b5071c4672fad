"""``gaaf-patch finetune MODEL``: the flags of :class:`gaaf_patch.finetune.FinetuneOptions`, one to one.

Ctrl-C (SIGINT) exits with 130 and SIGTERM with 143, each with one line saying which checkpoint ``--resume``
continues from (one is written after every epoch, atomically: an interrupt never leaves a torn one).

Once ``--fsdp`` has sharded a model the process leaves with ``os._exit`` once its work is done and its output
flushed: with gloo, torch 2.14 aborts about a third of the processes that created a ``DeviceMesh`` (which
``fully_shard`` does) at interpreter exit ("terminate called without an active exception"), which would turn a
finished run into a failed one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from . import render
from .common import PROG, Subparsers, add_model_arguments, add_patch_options, input_size, patch_kwargs, positive_int

NAME = "finetune"


def add_parser(sub: Subparsers) -> None:
    from ..finetune.options import AMP_CHOICES, EMBEDDED_DATA, SCHEDULES

    p = sub.add_parser(
        NAME,
        help="load a checkpoint, patch it, fine-tune with GAAF, save weights for the unpatched model",
        description="Fine-tune MODEL from --checkpoint with GAAF activations; the saved state_dict loads with "
        "strict=True into the unpatched model. Under 'torchrun --nproc-per-node N' it trains with "
        "DistributedDataParallel (--batch-size is per process), or with --fsdp sharded by FSDP2.",
    )
    add_model_arguments(p)
    add_patch_options(p)
    p.add_argument("--no-patch", action="store_true", help="train unpatched (the baseline to compare GAAF with)")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", default="digits", metavar="DIR|" + "|".join(EMBEDDED_DATA),
        help="an image-folder tree (DIR/train + DIR/val, or class folders), digits (bundled, the default) or mnist",
    )  # fmt: skip
    d.add_argument("--data-dir", metavar="DIR", help="where MNIST is (default $GAAF_DATA_DIR)")
    d.add_argument("--download", action="store_true", help="download MNIST when it is not there")
    d.add_argument("--input-size", type=input_size, metavar="C,H,W", help="model input (default: the model's)")
    d.add_argument("--workers", type=int, default=4, help="image-folder loader processes (default 4)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=3, help="total epochs, also when resuming (default 3)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="per process (default 64)")
    t.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01; see docs/finetune.md)")
    t.add_argument(
        "--opt", default="sgd", help="timm optimizer name: sgd (Nesterov momentum), adamw, ... (default sgd)"
    )
    t.add_argument("--momentum", type=float, default=0.9, help="(default 0.9)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="(default 0)")
    t.add_argument("--sched", choices=SCHEDULES, default="cosine", help="per-step learning-rate schedule")
    t.add_argument(
        "--amp", nargs="?", const="auto", choices=AMP_CHOICES,
        help="mixed precision: bf16 on the CPU; on CUDA bf16 where supported, else fp16 with loss scaling",
    )  # fmt: skip
    t.add_argument("--compile", action="store_true", help="torch.compile the patched model (Inductor)")
    t.add_argument("--seed", type=int, default=0, help="(default 0)")
    t.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda")
    s = p.add_argument_group("distributed (under torchrun)")
    s.add_argument(
        "--fsdp", action="store_true",
        help="shard with FSDP2 (fully_shard per block, then the root) instead of DDP; needs torchrun with 2+ "
        "processes; --out is then a folder of shards and the exported state_dict goes to OUT.pt",
    )  # fmt: skip
    s.add_argument(
        "--fsdp-reshard-after-forward", choices=("on", "off"), default="on",
        help="on: free gathered weights after each block's forward (less memory); off: keep them for the backward",
    )  # fmt: skip
    s.add_argument(
        "--dist-timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long a process waits for the others in a collective before the job stops (default 600)",
    )  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument(
        "--out", metavar="PATH",
        help="checkpoint written after every epoch (default MODEL-gaaf.pt; with --fsdp a folder, MODEL-gaaf)",
    )  # fmt: skip
    o.add_argument(
        "--resume", metavar="PATH", help="continue from a checkpoint (file or --fsdp folder) this command wrote"
    )
    o.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --out (without it, an existing --out other than the --resume file is refused)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.fsdp:
        return _run(args)
    from ..errors import GaafError, one_line
    from ..finetune import sharded

    try:
        code = _run(args)
        if not sharded.meshes_made():
            return code
    except GaafError as e:  # as app.main prints it: this process does not return there
        if not sharded.meshes_made():
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        if not sharded.meshes_made():
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001 - a bug: its traceback, as app.main shows it
        if not sharded.meshes_made():
            raise
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see the module docstring


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..finetune import FinetuneOptions, Interrupted, finetune, handle_interrupts
    from ..finetune.interrupt import Terminated

    opts = FinetuneOptions(
        model=args.model, data=args.data, checkpoint=args.checkpoint, num_classes=args.num_classes,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, opt=args.opt, momentum=args.momentum,
        weight_decay=args.weight_decay, sched=args.sched, input_size=args.input_size, data_dir=args.data_dir,
        download=args.download, workers=args.workers, amp=args.amp, compile=args.compile,
        patch=None if args.no_patch else patch_kwargs(args), out=args.out, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed, device=args.device, fsdp=args.fsdp,
        fsdp_reshard_after_forward=args.fsdp_reshard_after_forward == "on", dist_timeout=args.dist_timeout,
    )  # fmt: skip
    console = Console(highlight=False)
    with handle_interrupts():
        try:
            result = finetune(opts, console)
        except KeyboardInterrupt as e:
            if not isinstance(e, Interrupted):  # stopped before the run began
                e = Interrupted(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT, None, 0, opts.epochs)
            print(f"{PROG}: {e}", file=sys.stderr)
            return e.exit_code
        if result.out is None:
            return 0
        render.print_deployment(console, args.model, str(result.out), result.deploy)
        return 0 if result.ok else 1
