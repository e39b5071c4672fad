"""Patch a timm model with one line and check what the patch did.

Shows: ``gaaf.patch(model, strip_dropout=True)`` on timm's ``resnet18`` (random init, no download), the report of
what changed, that the eval-mode forward is bit-identical to the unpatched model (exact mode) while the gradient
differs, and the train-mode gradient-norm ratio patched / plain: about 1 with the default ``gain="auto"``, much
larger with the paper's gradient (``shapes="paper"``).

Run from the repository root:

    python examples/01_patch_timm_model.py
"""

import copy

import timm
import torch

import gaaf_patch as gaaf


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    plain = copy.deepcopy(model)  # the unpatched reference

    gaaf.patch(model, strip_dropout=True)  # the one line
    rep = gaaf.report(model)
    print("report:", rep.summary())
    assert rep.summary()["replaced"] > 0, "nothing was patched"
    assert type(model) is type(plain), "the model keeps its class"
    assert model.state_dict().keys() == plain.state_dict().keys(), "state_dict keys unchanged"

    batch = torch.randn(8, 3, 64, 64)

    # Eval forward: bit for bit the same (mode="exact", the default).
    model.eval()
    plain.eval()
    with torch.no_grad():
        out_patched, out_plain = model(batch), plain(batch)
    assert torch.equal(out_patched, out_plain), "eval outputs differ from the unpatched model"
    print("eval outputs bit-identical: True")

    # Backward: GAAF adds gradient where activations saturate, so the input gradient changes.
    grads = []
    for m in (model, plain):
        x = batch.clone().requires_grad_(True)
        m(x).square().mean().backward()
        grads.append(x.grad)
    assert not torch.equal(grads[0], grads[1]), "the patch did not change the gradient"
    rel = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    print(f"input gradient differs: relative difference {rel:.3g}")

    # Gradient-norm ratio patched / plain, train mode: about 1 with the default depth-safe gain.
    scale_auto = gaaf.measure_gradient_scale(model, batch)
    print(f"gain='auto' : input x{scale_auto.input:.3g}, params x{scale_auto.params:.3g}, safe={scale_auto.safe}")
    assert scale_auto.safe, scale_auto.warning()

    # The paper's gradient phi' + s on the same model: it compounds with depth.
    gaaf.unpatch(model)
    gaaf.patch(model, strip_dropout=True, shapes="paper")
    scale_paper = gaaf.measure_gradient_scale(model, batch)
    print(f"shapes='paper': input x{scale_paper.input:.3g}, params x{scale_paper.params:.3g}, safe={scale_paper.safe}")
    assert scale_paper.input > 10 * scale_auto.input, "the paper's gain should be much larger on resnet18"
    if scale_paper.warning():
        print(scale_paper.warning())

    print("ok")


if __name__ == "__main__":
    main()
