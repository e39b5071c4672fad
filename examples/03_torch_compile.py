"""GAAF inside ``torch.compile``: the ``"gaaf"`` Dynamo backend and ``gaaf.compile``.

Shows: ``torch.compile(model, backend="gaaf")`` (registered at install through an entry point) and
``gaaf.compile(model, strip_dropout=True)`` on a tiny CNN. The compiled model's gradients match eager
``gaaf.patch`` to float rounding and differ from the plain model's, while the forward stays the plain one.
The model itself is left unpatched by both. The model is tiny to keep Inductor's compile time short.

Run from the repository root:

    python examples/03_torch_compile.py
"""

import copy

import torch
from torch import nn

import gaaf_patch as gaaf


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(self.drop(x.flatten(1)))


def input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, gradient of a fixed loss with respect to the input)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), x.grad


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(16, 1, 8, 8) * 3  # scaled up so that tanh saturates somewhere

    # 1. The Dynamo backend, default options (exact mode, auto gain, dropout kept). Eval mode: dropout is off.
    model.eval()
    plain_out, plain_grad = input_grad(model, x)
    eager = gaaf.patch(copy.deepcopy(model)).eval()
    eager_out, eager_grad = input_grad(eager, x)
    compiled = torch.compile(model, backend="gaaf")
    comp_out, comp_grad = input_grad(compiled, x)

    assert gaaf.report(model).summary()["replaced"] == 0, "torch.compile leaves the model itself unpatched"
    assert torch.allclose(comp_out, plain_out, rtol=1e-5, atol=1e-6), "the forward is the plain one"
    assert torch.allclose(comp_grad, eager_grad, rtol=1e-4, atol=1e-6), "compiled and eager GAAF disagree"
    assert not torch.allclose(comp_grad, plain_grad, rtol=1e-3, atol=1e-6), "GAAF did not change the gradient"
    print(
        f"backend='gaaf'   : |compiled - eager GAAF| = {(comp_grad - eager_grad).abs().max().item():.2e}, "
        f"|compiled - plain| = {(comp_grad - plain_grad).abs().max().item():.2e}"
    )
    assert torch.equal(eager_out, plain_out), "eager exact mode is bit-identical"

    # 2. gaaf.compile with options: dropout stripped, train mode (BatchNorm uses batch statistics).
    model.train()
    compiled2 = gaaf.compile(model, strip_dropout=True)
    comp2_out, comp2_grad = input_grad(compiled2, x)
    eager2 = gaaf.patch(copy.deepcopy(model), strip_dropout=True).train()
    eager2_out, eager2_grad = input_grad(eager2, x)
    assert gaaf.report(eager2).summary()["stripped"] == 1
    assert torch.allclose(comp2_out, eager2_out, rtol=1e-5, atol=1e-6), "dropout should be stripped in both"
    assert torch.allclose(comp2_grad, eager2_grad, rtol=1e-4, atol=1e-6), "compiled and eager GAAF disagree"
    # the plain reference without dropout: a deterministic train-mode pass
    plain2 = copy.deepcopy(model)
    plain2.drop = nn.Identity()
    _, plain2_grad = input_grad(plain2, x)
    assert not torch.allclose(comp2_grad, plain2_grad, rtol=1e-3, atol=1e-6), "GAAF did not change the gradient"
    print(
        f"gaaf.compile(...): |compiled - eager GAAF| = {(comp2_grad - eager2_grad).abs().max().item():.2e}, "
        f"|compiled - plain| = {(comp2_grad - plain2_grad).abs().max().item():.2e}"
    )

    # parameter gradients flow too: one optimizer step on the compiled model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    nn.functional.cross_entropy(compiled2(x), torch.arange(16) % 10).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()

    print("ok")


if __name__ == "__main__":
    main()
