"""Fine-tune a checkpoint with GAAF and deploy the weights into the unpatched model (Python API).

Shows the whole round trip: train a tiny timm ``resnet10t`` plainly for a few steps on digits (upsampled to
3x32x32), save its state_dict, build a fresh model, load it, ``gaaf.patch`` it, fine-tune with SGD at lr 0.01
(the plain learning rate: the default ``gain="auto"`` keeps the gradient scale), then load the fine-tuned
state_dict with ``strict=True`` into a freshly built, never-patched model and check the eval outputs are
bit-identical. ``gaaf.unpatch`` gives the same model back in place. The same flow from the command line is
``gaaf-patch finetune`` (README).

Run from the repository root:

    python examples/04_finetune_and_deploy.py
"""

import tempfile
from pathlib import Path

import timm
import torch
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch import data


def build() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=10)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    split = data.digits()
    images = nn.functional.interpolate(split.images, size=(32, 32), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous(), split.labels


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (32,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = load_digits()
    probe = images[:16]

    with tempfile.TemporaryDirectory() as tmp:
        # 1. a plain checkpoint to start from
        pre = build()
        loss = train(pre, images, labels, steps=15, lr=0.05, seed=0)
        print(f"plain pre-training: last loss {loss:.3f}")
        torch.save(pre.state_dict(), Path(tmp) / "pre.pt")

        # 2. a fresh model, the checkpoint, the patch, fine-tuning at the plain learning rate
        model = build()
        model.load_state_dict(torch.load(Path(tmp) / "pre.pt", weights_only=True), strict=True)
        gaaf.patch(model)
        print("report:", gaaf.report(model).summary())
        scale = gaaf.measure_gradient_scale(model, images[:8])
        print(f"gradient scale patched / plain: input x{scale.input:.3g}, params x{scale.params:.3g}")
        assert scale.safe, scale.warning()
        loss = train(model, images, labels, steps=15, lr=0.01, seed=1)
        print(f"GAAF fine-tuning: last loss {loss:.3f}")
        torch.save(model.state_dict(), Path(tmp) / "ft.pt")

        # 3. deploy: the fine-tuned weights load with strict=True into the plain, never-patched model
        deployed = build()
        deployed.load_state_dict(torch.load(Path(tmp) / "ft.pt", weights_only=True), strict=True)
    assert gaaf.report(deployed).summary()["replaced"] == 0

    model.eval()
    deployed.eval()
    with torch.no_grad():
        out_patched, out_deployed = model(probe), deployed(probe)
    assert torch.equal(out_patched, out_deployed), "deployed outputs differ from the patched model's"
    print("patched vs deployed (fresh, unpatched) eval outputs bit-identical: True")

    # 4. or undo the patch in place
    gaaf.unpatch(model)
    assert not gaaf.report(model), "unpatch should leave nothing patched"
    with torch.no_grad():
        assert torch.equal(model(probe), out_deployed)
    print("unpatched in place, outputs unchanged: True")
    acc = (out_deployed.argmax(1) == labels[:16]).float().mean().item()
    print(f"accuracy on 16 training images after 30 steps: {acc:.2f}")
    print("ok")


if __name__ == "__main__":
    main()
