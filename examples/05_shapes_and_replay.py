"""Choose the shape function per activation and per layer, pick sites, and replay the configuration.

Shows: registering a custom shape family with ``gaaf.shapes.register`` (so it has a name, prints as a spec such as
``bump(width=2.0)`` and can be saved), ``shapes=`` overrides keyed by activation name (``"tanh"``) and by module-name
pattern (``"block2.*"``, which wins over the activation key), a ``filter_fn`` that leaves one site alone, saving the
patch configuration to JSON, and replaying it on a freshly built model with the README's idiom
``gaaf.patch(model, **gaaf.PatchConfig.from_dict(cfg).__dict__)``. The two reports must match.

Note: ``filter_fn`` is code, not configuration: it is not in the saved config, so pass it again when replaying.
A custom shape must be registered (imported) in the process that replays the config.

Run from the repository root:

    python examples/05_shapes_and_replay.py
"""

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import gaaf_patch as gaaf


# s(x) = exp(-|x| / width): a custom shape family, registered under a name with its default parameter.
@gaaf.shapes.register("bump", width=2.0)
def bump(x: torch.Tensor, width: float) -> torch.Tensor:
    """exp(-|x| / width): extra gradient that decays slowly into the saturation."""
    return torch.exp(-x.abs() / width)


class Block(nn.Module):
    def __init__(self, width: int, act: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = Block(16, nn.Tanh())
        self.block2 = Block(16, nn.Tanh())
        self.block3 = Block(16, nn.ReLU())
        self.head = Block(16, nn.ReLU())  # left alone by the filter below
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.block3(self.block2(self.block1(x)))))


def not_head(module: nn.Module, name: str) -> bool:
    """filter_fn(module, name): True for the sites to patch."""
    return not name.startswith("head")


def sites(model: nn.Module) -> list[tuple[str, str, str, str]]:
    return [(r["name"], r["activation"], r["shape"], r["gain"]) for r in gaaf.report(model).replaced]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = gaaf.patch(
        Net(),
        shapes={
            "tanh": "bump(width=3)",  # every tanh ...
            "block2.*": "gauss(width=2)",  # ... except under block2 (a pattern beats an activation key)
            "relu": "relu_keras",  # a registered alternative for ReLU
        },
        filter_fn=not_head,
    )
    for name, act, shape, gain in sites(model):
        print(f"  {name:<12} {act:<5} {shape:<40} gain={gain}")
    shapes = {name: shape for name, _act, shape, _gain in sites(model)}
    assert shapes == {
        "block1.act": "bump(width=3.0)",
        "block2.act": "gauss(width=2.0)",
        "block3.act": gaaf.shapes.get("relu_keras").spec,
    }, shapes
    assert "head.act" not in shapes, "filter_fn should leave head.act alone"

    # Save the configuration: it is in the report (and PatchConfig.to_dict() gives the same form).
    cfg = gaaf.report(model).config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gaaf_config.json"
        path.write_text(json.dumps(cfg, indent=2))
        print(f"saved config: {path.read_text()}")
        loaded = json.loads(path.read_text())

    # Replay on a freshly built model (filter_fn is code: pass it again).
    config = gaaf.PatchConfig.from_dict(loaded)
    assert config.to_dict() == cfg
    fresh = gaaf.patch(Net(), **config.__dict__, filter_fn=not_head)
    assert sites(fresh) == sites(model), "replayed patch differs"
    assert gaaf.report(fresh).config == cfg
    assert gaaf.report(fresh).summary() == gaaf.report(model).summary()
    print("replayed report matches:", gaaf.report(fresh).summary())

    # Same weights, same patch: same gradients.
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(32, 16) * 3
    grads = []
    for m in (model, fresh):
        xi = x.clone().requires_grad_(True)
        m(xi).square().mean().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1]), "replayed model's gradient differs"
    print("ok")


if __name__ == "__main__":
    main()
