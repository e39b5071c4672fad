"""A patched Hugging Face model trained by ``transformers.Trainer`` on one process, under DDP, or under FSDP2.

A tiny BERT for sequence classification (a shrunk default config: random weights, nothing downloaded) is patched
with ``gaaf.patch(model, strip_dropout=True)`` BEFORE the Trainer sees it: Trainer (through Accelerate) then wraps
it in DistributedDataParallel or shards it with ``fully_shard``, and the patch must read the model's own modules, not
the wrappers. Trainer trains it on a synthetic task (is token 7 in the sequence?) with the same global batch
whatever the number of processes (per-device batch = GLOBAL_BATCH / world size), then ``trainer.save_model`` writes
a ``save_pretrained`` directory (under FSDP it gathers the full state dict through Accelerate first). Rank 0 loads
that directory into the PLAIN class (strict: no missing or unexpected keys) and checks that its eval logits are
bit-identical to the patched model's in eval mode (GAAF changes the backward only).

Run from the repository root (needs ``pip install 'gaaf-patch[hf]'``; on a CPU the processes talk over gloo):

    python examples/10_hf_trainer_distributed.py
    torchrun --standalone --nproc-per-node 2 examples/10_hf_trainer_distributed.py          # DDP
    torchrun --standalone --nproc-per-node 2 examples/10_hf_trainer_distributed.py --fsdp   # FSDP2

``--fsdp`` passes Trainer's ``fsdp``/``fsdp_config`` arguments (FSDP2, full state dict on save). Accelerate turns
FSDP on only on GPU-like devices: on a CPU the script stops with the reason (``NO_FSDP`` below) instead of quietly
training with DDP.

``--out DIR`` keeps the saved model and a ``result.pt`` (final weights, eval logits, report counts) that
``tests/test_hf_distributed.py`` compares across the three launches; ``--gain paper`` patches with the paper's
batch-independent gain (the default auto gain picks a coefficient per batch, so each rank picks its own from its
part of the global batch: docs/distributed.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import accelerate
import torch
import transformers
from torch.distributed.fsdp import FSDPModule
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import gaaf_patch as gaaf
from gaaf_patch.hf import shrunk_config

# Why --fsdp stops on a CPU rather than quietly training with DDP. accelerate/state.py (AcceleratorState) switches to
# DistributedType.FSDP only for the MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON types; a CPU run is MULTI_CPU, so the
# plugin Trainer builds from `fsdp`/`fsdp_config` is dropped, trainer.is_fsdp_enabled is False and Accelerate wraps
# the model in DDP. Sharding it with fully_shard before the Trainer does not help: Accelerate still wraps it in DDP,
# whose first broadcast fails on the DTensor parameters (NotImplementedError: c10d.broadcast_.default has no
# sharding strategy).
NO_FSDP = (
    "Trainer did not enable FSDP: Accelerate turns its FSDP plugin on only for multi-process GPU-like runs "
    "(DistributedType MULTI_GPU/XPU/NPU/HPU/..., not MULTI_CPU), so on a CPU it would train with DDP instead"
)
TOKEN = 7  # the label: whether this token occurs in the sequence
GLOBAL_BATCH = 16


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 12, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.ids[: n // 2, 0] = TOKEN  # half the sequences carry the token at least once
        self.labels = (self.ids == TOKEN).any(1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def build(gain: str | None = None) -> BertForSequenceClassification:
    """The same initial weights on every rank and in every launch (seeded before the model is built)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(shrunk_config("bert", {"num_labels": 2, "vocab_size": 64}))
    return gaaf.patch(model, strip_dropout=True, gain=gain)  # first: before Trainer/Accelerate wraps it


def arguments(out: Path, world: int, steps: int, fsdp: bool) -> TrainingArguments:
    fsdp_args = {}
    if fsdp:
        # FSDP2 (fully_shard) on every BertLayer (the model's _no_split_modules), full state dict for save_model
        fsdp_args = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT"}}
    return TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=GLOBAL_BATCH // world,  # the same global batch whatever the world size
        max_steps=steps,
        learning_rate=0.1,
        # SGD with momentum: linear in the gradient, so the rounding of the 2-rank gradient reduction stays at
        # rounding size (AdamW's g / sqrt(v) magnifies it where a gradient is near zero)
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        disable_tqdm=True,
        seed=0,  # the sampler's permutation: the same global batches in every launch
        dataloader_drop_last=True,
        # BERT's forward takes **kwargs, so Trainer passes it num_items_in_batch and, trusting the loss to be a sum
        # over the global batch divided by it, multiplies the loss by the world size. BERT's classification loss
        # ignores num_items_in_batch (a per-rank mean), so that would double every gradient on 2 ranks. DDP and FSDP
        # already average the gradients over ranks: a per-rank mean loss needs no scaling.
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,  # every parameter is used: skip DDP's extra graph traversal
        **fsdp_args,
    )


def run(out: Path, steps: int = 8, fsdp: bool = False, gain: str | None = None) -> dict | None:
    """Patch, train, save, deploy; on rank 0 returns (and writes to ``out/result.pt``) what the launches compare."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build(gain)
    args = arguments(out, world, steps, fsdp)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(256))
    if fsdp and not trainer.is_fsdp_enabled:
        main_process = trainer.accelerator.is_main_process
        raise SystemExit(f"{NO_FSDP} (accelerate {accelerate.__version__})" if main_process else 1)
    trainer.train()
    # what Accelerate did to the model: FSDP2 shards in place (the modules become FSDPModule), DDP wraps it
    sharded = sum(isinstance(m, FSDPModule) for m in model.modules())
    wrapper = type(trainer.model_wrapped).__name__

    saved = out / "model"
    trainer.save_model(str(saved))  # every rank: under FSDP the full state dict is gathered here
    held_out = Synthetic(32, seed=1)
    model.eval()  # under FSDP every rank runs the forward (it gathers the shards)
    with torch.no_grad():
        logits = model(input_ids=held_out.ids).logits
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None

    rep = gaaf.report(model)
    plain, info = BertForSequenceClassification.from_pretrained(saved, output_loading_info=True)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    assert not missing and not unexpected, info
    assert not any(isinstance(m, gaaf.GAAF) for m in plain.modules())  # the plain class, never patched
    # from_pretrained maps the file into memory at unaligned offsets, where the CPU kernels may round
    # differently; a copy holds the same weights in aligned memory
    plain = copy.deepcopy(plain).eval()
    with torch.no_grad():
        same = torch.equal(plain(input_ids=held_out.ids).logits, logits)
    kind = "FSDP2" if fsdp else "DDP" if world > 1 else "one process"
    print(f"{kind}, {world} process(es) x batch {GLOBAL_BATCH // world}, {steps} steps")
    print(f"trained as {wrapper}, {sharded} modules sharded with fully_shard")
    print(f"patched: {len(rep.replaced)} GAAF sites, {len(rep.stripped)} dropout sites stripped")
    print(f"saved with trainer.save_model, reloaded into the plain {type(plain).__name__} (strict)")
    print(f"eval logits bit-identical to the patched model's: {same}")
    assert same
    result = {
        "world": world,
        "fsdp": fsdp,
        "state": {k: v.clone() for k, v in plain.state_dict().items()},
        "logits": logits,
        "replaced": len(rep.replaced),
        "stripped": len(rep.stripped),
        "sharded": sharded,
        "wrapper": wrapper,
    }
    torch.save(result, out / "result.pt")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gain", choices=["auto", "paper"], default=None, help="GAAF gain (default: auto)")
    p.add_argument("--out", type=Path, help="keep the saved model and result.pt here (default: a temporary dir)")
    a = p.parse_args(argv)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        result = run(a.out, a.steps, a.fsdp, a.gain)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # a per-rank directory: only rank 0 reads it back
            result = run(Path(tmp), a.steps, a.fsdp, a.gain)
    if result is not None:
        print("ok")
    if torch.distributed.is_initialized():  # (by Accelerate, under torchrun)
        # DDP on gloo exits cleanly; tests/finetune/test_fsdp.py needs os._exit only once a DeviceMesh exists
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
