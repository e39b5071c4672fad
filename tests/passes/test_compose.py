"""``gaaf_patch.patch`` composes with the rest of PyTorch: torch.compile, DDP, autocast, state_dict save/load and
torch.export.

Each test checks numbers against the eager patched (or the unpatched) model, and that GAAF is still at work where it
should be: a gradient that differs from the unpatched model's shows the ``s(x)`` term survived the composition.
Models: tests/toys (module swaps: ``mlp``; functional rewrites through ``PatchedForward``: ``SmallCNN``, whose
``F.adaptive_avg_pool2d(...).relu()`` is rewritten, and ``EveryForm``, with every form of activation).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gaaf_patch
from gaaf_patch.passes.runtime import PatchedForward
from tests.helpers import EveryForm, SmallCNN, mlp


def _grads(model: nn.Module, x: torch.Tensor):
    """Output, input gradient and parameter gradients of ``(model(x) ** 2).sum()``."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


class ModuleAndFunctionalForms(nn.Module):
    """A module-form tanh (swapped) and functional relu/tanh in ``forward`` (rewritten: ``PatchedForward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.l1(x))
        return self.l2(F.relu(h - 0.5) + torch.tanh(3 * h))


def _small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(sizes=(12, 16, 16, 4))


def _x(*shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * scale  # large: tanh saturates


def _functional_sites(model: nn.Module) -> int:
    return sum(isinstance(m.__dict__.get("forward"), PatchedForward) for m in model.modules())


def test_torch_compile_of_a_patched_model_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = ModuleAndFunctionalForms()
    patched = gaaf_patch.patch(copy.deepcopy(plain))
    assert _functional_sites(patched) == 1 and len(gaaf_patch.report(patched).replaced) == 3
    compiled = torch.compile(copy.deepcopy(patched), backend="inductor")
    x = _x(8, 12)
    eager, comp, ref = _grads(patched, x), _grads(compiled, x), _grads(plain, x)
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp[1], eager[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(comp[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (comp[1] - ref[1]).abs().max() > 1e-3  # the compiled backward is GAAF's, not the activations' own
    torch._dynamo.reset()


def test_ddp_wraps_a_patched_model(tmp_path):
    """Patched, then wrapped: DDP's hooks average GAAF gradients like any other (one gloo process, in-process; the
    two-process run is tests/finetune/test_finetune.py::test_torchrun_two_processes_end_with_identical_weights)."""
    model = gaaf_patch.patch(SmallCNN())
    assert _functional_sites(model) == 1
    x = _x(4, 3, 8, 8)
    eager = _grads(model, x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapped = _grads(ddp, x)
    finally:
        dist.destroy_process_group()
    assert torch.equal(wrapped[0], eager[0]) and torch.equal(wrapped[1], eager[1])
    for a, b in zip(wrapped[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(gaaf_patch.PatchError, match="patch model.module before wrapping"):
        gaaf_patch.patch(ddp)


@pytest.mark.parametrize("make", [_small_mlp, SmallCNN], ids=["module-swap", "functional"])
def test_autocast_bf16_cpu(make):
    plain = make()
    patched = gaaf_patch.patch(copy.deepcopy(plain))
    x = _x(4, 12) if isinstance(plain, nn.Sequential) else _x(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new, ref = _grads(patched, x), _grads(plain, x)
    assert new[0].dtype == torch.bfloat16
    assert torch.equal(new[0], ref[0])  # exact mode: the forward is the activation itself, also in bf16
    assert all(g.isfinite().all() for g in (new[1], *new[2]))
    assert not torch.equal(new[1], ref[1])  # and the backward is GAAF's


@pytest.mark.parametrize("make", [_small_mlp, SmallCNN, EveryForm], ids=["module-swap", "functional", "every-form"])
def test_state_dict_round_trip_into_the_unpatched_model(make):
    torch.manual_seed(0)
    plain = make()
    patched = gaaf_patch.patch(copy.deepcopy(plain), strip_dropout=True)
    with torch.no_grad():
        for p in patched.parameters():
            p.add_(0.01)  # something the unpatched model does not have yet
    buf = io.BytesIO()
    torch.save(patched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert list(state) == list(plain.state_dict())  # same keys, same order: GAAF modules hold no state
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(state, strict=True)
    x = _x(4, 12) if make is _small_mlp else _x(4, 3, 8, 8) if make is SmallCNN else _x(4, 16)
    fresh.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), patched(x))
    patched.load_state_dict(plain.state_dict(), strict=True)  # and back into the patched one


def _targets(ep: torch.export.ExportedProgram) -> list[str]:
    # functionalized (in-place relu_ and relu are one op there): the graph a deployment runtime sees
    ep = ep.run_decompositions({})
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    "make, shape, functional",
    [(_small_mlp, (2, 12), 0), (SmallCNN, (2, 3, 8, 8), 1), (EveryForm, (4, 16), 1)],
    ids=["module-swap", "functional", "every-form"],
)
def test_torch_export_of_an_eval_mode_patch_is_the_original_graph(make, shape, functional):
    torch.manual_seed(0)
    plain = make().eval()
    patched = gaaf_patch.patch(copy.deepcopy(plain)).eval()
    assert _functional_sites(patched) == functional and gaaf_patch.report(patched).replaced
    x = _x(*shape)
    ref, ep = torch.export.export(plain, (x,)), torch.export.export(patched, (x,))
    targets = _targets(ep)
    assert targets == _targets(ref) and len(targets) >= 4
    assert not any("gaaf" in t.lower() or "autograd_function" in t for t in targets)
    assert torch.equal(ep.module()(x), plain(x))
