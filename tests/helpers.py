"""What more than one test module needs, in one place: toy models with every activation form, references written
independently of gaaf_patch (the torch functions, the default shapes as float64 formulas, an activation-site count
taken from the ops a forward runs), and the measuring helpers of the compile and memory tests.

A test module imports from here, never from another test module.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gaaf_patch.repro.models import mlp as _paper_mlp

# ---------------------------------------------------------------------------------------------------------------------
# Toy models


class EveryForm(nn.Module):
    """Module, functional, method and in-place forms, a gate, functional and module dropout."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.se = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())  # a gate: its output multiplies x
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.l1(x)))  # module, inplace
        x = F.gelu(x, approximate="tanh") + torch.tanh(x)  # functional
        y = x.relu_()  # method, inplace; x is read again below
        x = x * self.se(x) + y
        x = F.dropout(x, 0.2, self.training)
        x = self.drop(self.l2(x)).tanh()  # method
        return self.l3(F.leaky_relu(x, 0.2) + torch._C._nn.gelu(x) + F.silu(x, inplace=False))


def mlp(act: type[nn.Module] = nn.Tanh, dropout: float = 0.0, sizes=(784, 512, 256, 256, 10)) -> nn.Sequential:
    """The paper's MNIST MLP (784-512-256-256-10, tanh by default): the library's own builder."""
    return _paper_mlp(act, dropout, sizes)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1).relu())


class FunctionalTanhGeluRelu(nn.Module):
    """Three functional activations, one of them on a reduction of the input: the reduced-precision tests feed it
    inputs up to +-60000, which overflow float16 on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.gelu(self.b(torch.tanh(self.a(x)))) + F.relu(x.sum(1, keepdim=True)))


# ---------------------------------------------------------------------------------------------------------------------
# References: PyTorch's own functions, and the default shapes written out as formulas (not gaaf_patch's code)

TORCH_FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
}


def _relu_family_shape(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-5 * (x + 0.5)))  # the paper's ReLU shape: a sigmoid of slope 5, shifted by 0.5


DEFAULT_SHAPE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda x: torch.exp(-(x**2) / 4),  # the paper's tanh shape
    "sigmoid": lambda x: 0.25 * torch.exp(-(x**2) / 16),  # tanh's, for sigmoid(x) = (1 + tanh(x / 2)) / 2
    "relu": _relu_family_shape,
    "gelu": _relu_family_shape,
    "silu": _relu_family_shape,
    "leaky_relu": _relu_family_shape,
    "elu": _relu_family_shape,
    "softplus": _relu_family_shape,
}


def reference_gradient(name: str, x: torch.Tensor) -> torch.Tensor:
    """phi'(x) + s(x) in float64: PyTorch's autograd of the torch function plus the default shape's formula."""
    xd = x.detach().to(torch.float64).requires_grad_()
    (dphi,) = torch.autograd.grad(TORCH_FN[name](xd).sum(), xd)
    return dphi + DEFAULT_SHAPE[name](xd.detach())


# ---------------------------------------------------------------------------------------------------------------------
# Activation sites counted from the ops a forward runs, without gaaf_patch

# ATen activation ops (their in-place forms end in "_"); a sigmoid-like op whose output a mul reads is a gate.
ACTIVATION_OPS = frozenset(
    ["relu", "gelu", "silu", "hardswish", "sigmoid", "hardsigmoid", "tanh", "elu", "leaky_relu", "hardtanh", "mish"]
    + ["softplus", "celu", "selu", "relu6"]
)
GATE_OPS = frozenset(["sigmoid", "hardsigmoid"])


@dataclass
class SiteCount:
    """Activation sites of one eval forward: ``by_activation`` counts the non-gate sites per ATen op name."""

    by_activation: Counter = field(default_factory=Counter)
    gates: int = 0

    @property
    def sites(self) -> int:
        return sum(self.by_activation.values())


def count_activation_sites(model: nn.Module, x: torch.Tensor) -> SiteCount:
    """The activation sites an eval forward of ``model`` on ``x`` reaches, counted from the ATen ops it runs.

    A site is one activation op at one place in one module's code: the op is keyed by the innermost module running
    and its rank among that module's activation ops in the call, so a module called twice (torchvision's ResNet
    blocks call one ReLU twice) is one site, as is a module shared by several parents. A sigmoid or hardsigmoid whose
    output is multiplied by a tensor is a gate (a squeeze-excite scale), counted apart.
    """
    stack: list[list] = [[None, 0]]  # [module, activation ops so far in this call]
    kinds: dict[tuple, str] = {}
    gates: set[tuple] = set()
    gate_outputs: dict[int, tuple[torch.Tensor, tuple]] = {}  # id -> (tensor kept alive, its site)

    def pre(module, args):
        stack.append([module, 0])

    def post(module, args, out):
        stack.pop()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            if name in ACTIVATION_OPS:
                frame = stack[-1]
                key = (id(frame[0]), frame[1])
                frame[1] += 1
                kinds[key] = name
                if name in GATE_OPS:
                    gate_outputs[id(out)] = (out, key)
            elif name == "mul":
                for a in args:
                    found = gate_outputs.get(id(a))
                    if found is not None and found[0] is a:
                        gates.add(found[1])
            return out

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post),
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), Ops():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    count = SiteCount(gates=len(gates))
    count.by_activation.update(kind for key, kind in kinds.items() if key not in gates)
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Measuring helpers: Inductor's kernels, the fused BatchNorm's reference, the storages autograd saves


def _kernels(code: str) -> int:
    """Kernels Inductor generated (C++ on CPU, Triton on GPU) in one output module."""
    return len(re.findall(r"^(?:cpp_fused|triton_)\w* = async_compile\.", code, flags=re.M))


def kernel_counts(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """backend -> [forward, backward] kernels Inductor generates for ``model`` under "inductor", under "gaaf" (the
    auto gain) and under the gaaf backend with the paper's gain ("paper")."""
    from torch._inductor.utils import run_fw_bw_and_get_code

    from gaaf_patch.backend import GAAFBackend
    from gaaf_patch.config import PatchConfig

    counts = {}
    # no graph caches, so the code is generated (and seen) again; the C++ compiler's cache still saves time
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for name, backend in (
            ("inductor", "inductor"),
            ("gaaf", "gaaf"),
            ("paper", GAAFBackend(PatchConfig(gain="paper"))),
        ):
            torch._dynamo.reset()
            compiled = torch.compile(copy.deepcopy(model), backend=backend)
            _, code = run_fw_bw_and_get_code(lambda c=compiled: c(x.clone().requires_grad_()))
            assert len(code) == 2, "expected one forward and one backward module"
            counts[name] = [_kernels(c) for c in code]
    return counts


def assert_fused(counts: dict[str, list[int]], sites: int) -> None:
    """The paper's gain adds no kernel; the auto gain adds one small reduction per site to the backward (the blend
    coefficient's moments on a sample, which the pointwise kernel then reads)."""
    assert all(n > 0 for n in counts["inductor"]), counts
    assert counts["paper"][0] <= counts["inductor"][0] and counts["paper"][1] <= counts["inductor"][1], counts
    assert counts["gaaf"][0] <= counts["inductor"][0], counts
    assert counts["gaaf"][1] <= counts["inductor"][1] + sites, counts


def unfused(model: nn.Module) -> nn.Module:
    """A patched copy with every fused BatchNorm put back to its plain class: the unfused reference."""
    from gaaf_patch import fused

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, fused.BatchNormRecompute):
            m.__class__ = next(k for k, v in fused.FUSABLE.items() if v is type(m))
    return ref


def saved_storages(model: nn.Module, x: torch.Tensor) -> dict[int, int]:
    """data_ptr -> bytes of every distinct non-parameter storage autograd keeps for ``model(x).sum()`` (the
    benchmark's probe, :func:`benchmarks.memory.saved_storages`)."""
    from benchmarks.memory import saved_storages as probe

    return probe(model, lambda: model(x).sum())


def write_image_folder(root, per_class: int, height: int, width: int):
    """An image-folder tree of generated PNGs under ``root``: classes ``cat`` and ``dog`` of ``per_class`` images
    each, the dog ones brighter (a learnable difference), seeded."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i in range(per_class):
            pixels = (torch.rand(height, width, 3, generator=g) * 80 + 120 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def load_checkpoint(path) -> dict:
    """A finetune checkpoint as the tests read it: on the CPU, tensors only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def finetune_fails(args, capsys) -> str:
    """``gaaf-patch finetune ARGS`` run in-process: exit 2 with exactly one line on stderr, no traceback; that line."""
    from gaaf_patch.cli import main

    code = main(["finetune", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err
