"""Sharded fine-tuning with FSDP2: patch, shard, train, checkpoint, resume, export, deploy into the plain model.

Run: python examples/09_fsdp.py   (it relaunches itself under torchrun with 2 CPU processes, gloo)
or:  torchrun --standalone --nproc-per-node 2 examples/09_fsdp.py

Each rank patches a small residual MLP whose blocks sit in ``layers`` (so ``fsdp.shard`` wraps them one by one, as
it would a timm ViT's ``blocks`` or a Llama's ``model.layers``), trains a few steps on its half of each global
batch, saves a sharded checkpoint halfway, and exports one plain state_dict; then a second job resumes from the
checkpoint and must end with the same bytes. See docs/distributed.md.

The command line does the same for a timm/torchvision/HF checkpoint on an image data set:
    torchrun --standalone --nproc-per-node 2 -m gaaf_patch.cli finetune resnet10t --checkpoint pre.pt --fsdp --out run
(shards in run/, resumable with --resume run; the plain state_dict for the unpatched model in run.pt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.finetune import fsdp, state_digest

STEPS, SAVE_AT = 6, 3


class Residual(nn.Module):
    def __init__(self, d: int = 32, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(16, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.stem(x))
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def rank_main(out: Path, resume: bool) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a dead rank fails the others within 60 s
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = gaaf.patch(Residual())  # 1. patch the plain model
    fsdp.shard(model)  # 2. fully_shard layers.0, layers.1, layers.2, then the root
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # 3. optimizer over the shards
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g)
    torch.manual_seed(2)
    start = fsdp.load_sharded(model, opt, out / "ckpt")["step"] if resume else 0
    for step in range(start, STEPS):
        idx = torch.randperm(128)[:32].chunk(world)[rank]  # the same global batch on every rank, each takes half
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        if step + 1 == SAVE_AT and not resume:
            fsdp.save_sharded(model, opt, {"step": step + 1}, out / "ckpt")
    state = fsdp.export_state_dict(model)  # rank 0 gets the full dict
    if rank == 0:
        torch.save(state, out / ("resumed.pt" if resume else "final.pt"))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.14 + gloo + DeviceMesh may abort at interpreter exit otherwise (docs/distributed.md)


def launch(out: Path, resume: bool) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    root = str(Path(__file__).resolve().parents[1])  # the gaaf_patch this script was started with
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(cmd + (["--resume"] if resume else []), check=True, env=env)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        launch(out, resume=False)
        launch(out, resume=True)
        final = torch.load(out / "final.pt", weights_only=True)
        resumed = torch.load(out / "resumed.pt", weights_only=True)
        assert state_digest(final) == state_digest(resumed), "the resumed run ended with other weights"
        print(f"resumed from step {SAVE_AT}: same weights ({state_digest(final)[:12]})")

        torch.manual_seed(0)
        plain = Residual()  # built without gaaf-patch or FSDP
        plain.load_state_dict(final, strict=True)
        patched = gaaf.patch(Residual())
        patched.load_state_dict(final, strict=True)
        x = torch.randn(8, 16)
        assert torch.equal(plain.eval()(x), patched.eval()(x))
        print("exported state_dict: strict load into the plain model, identical outputs")
    print("ok")


if __name__ == "__main__":
    if "RANK" in os.environ:
        rank_main(Path(sys.argv[1]), resume="--resume" in sys.argv[2:])
    else:
        main()
