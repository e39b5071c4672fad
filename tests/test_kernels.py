"""The fused C++ CPU backward (gaaf_patch.kernels): same gradients as the plain ops, used only where it may be.

The rest of the suite already runs through the kernel (it is on by default); here the two paths are compared on
whole models and awkward inputs, and the fallbacks (off, unbuildable, traced) are checked.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gaaf_patch
from gaaf_patch import gaaf, kernels, ops
from gaaf_patch.activations import ACTIVATIONS
from gaaf_patch.shapes import get as get_shape
from tests.helpers import SmallCNN, mlp

F64 = torch.float64

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="the C++ kernel is off or cannot be built here (GAAF_KERNELS, compiler)"
)


def _weights(t: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view_as(t)


def _grads(fn, *inputs, kernel: bool):
    previous = kernels.set_enabled(kernel)
    try:
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if out.dim() == 0 else _weights(out))
        return [t.grad for t in leaves]
    finally:
        kernels.set_enabled(previous)


def _reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """phi'(x) + s(x) in float64, from the library's formulas (not from PyTorch's kernels nor ours)."""
    act = ACTIVATIONS[name]
    xd = x.detach().double()
    return act.dphi(xd, act.phi(xd, **act.params()), **act.params()) + get_shape(name)(xd)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))  # the kernel's own phi' codes and PyTorch's kernel + shape
def test_kernel_equals_plain_ops_and_the_float64_formula(name, mode, dtype):
    torch.manual_seed(0)
    x = (torch.randn(37, 129) * 4).to(dtype)  # odd sizes: vector tails
    gk = _grads(lambda t: gaaf(t, name, mode=mode), x, kernel=True)[0]
    gp = _grads(lambda t: gaaf(t, name, mode=mode), x, kernel=False)[0]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gk, gp, **tol)
    want = _reference(name, x) * _weights(x.double())
    # PyTorch's hardsigmoid_backward multiplies by float32's 1/6 even in float64 (3e-8 off)
    f64_tol = 1e-7 if name == "hardsigmoid" else 1e-9
    torch.testing.assert_close(
        gk.double(), want, rtol=1e-5 if dtype != F64 else f64_tol, atol=1e-5 if dtype != F64 else f64_tol
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "name", [n for n, a in ACTIVATIONS.items() if a.kernel_x is not None or a.kernel_y is not None]
)
@pytest.mark.parametrize("mode", ["exact", "sawtooth"])
@pytest.mark.parametrize(
    "spec",
    [
        "gauss(width=3.0, center=0.5, scale=2.0, height=0.7)",
        "shifted_sigmoid(slope=2.0, shift=1.0, height=0.5)",
        "band(lo=-1.0, hi=2.0, slope=3.0, margin=0.25)",
    ],
)
def test_every_family_code_with_every_parameter(spec, mode, name, dtype):
    """Each family's kernel code and constants (its FastPath) against the plain ops, every parameter off default."""
    torch.manual_seed(1)
    x = (torch.randn(37, 129) * 3).to(dtype)
    gk = _grads(lambda t: gaaf(t, name, spec, mode=mode), x, kernel=True)[0]
    gp = _grads(lambda t: gaaf(t, name, spec, mode=mode), x, kernel=False)[0]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gk, gp, **tol)


@needs_kernel
def test_saturated_and_special_values():
    # tanh(+-20) = +-1 exactly in float32: atanh = +-inf, s = exp2(-inf) = 0, phi' = 0: the gradient is exactly 0
    x = torch.tensor([-20.0, -1.0, 0.0, 1.0, 20.0, float("nan")])
    g = _grads(lambda t: gaaf(t, "tanh"), x, kernel=True)[0]
    gp = _grads(lambda t: gaaf(t, "tanh"), x, kernel=False)[0]
    assert g[0] == 0 and g[4] == 0
    assert torch.isnan(g[5]) and torch.isnan(gp[5])
    torch.testing.assert_close(g[:5], gp[:5])
    # relu at exactly 0: PyTorch's convention phi'(0) = 0, so only the shape's sigmoid(2.5) remains
    x = torch.tensor([-3.0, 0.0, 3.0, float("nan")])
    g = _grads(lambda t: gaaf(t, "relu"), x, kernel=True)[0]
    gp = _grads(lambda t: gaaf(t, "relu"), x, kernel=False)[0]
    w = _weights(x)
    assert g[1] == pytest.approx(w[1].item() * torch.sigmoid(torch.tensor(2.5)).item(), rel=1e-6)
    torch.testing.assert_close(g[:3], gp[:3])
    assert torch.isnan(g[3]) and torch.isnan(gp[3])


@needs_kernel
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_layouts(layout):
    torch.manual_seed(0)
    base = torch.randn(2, 5, 7, 3) * 3
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(1, 3)
    else:
        x = base[:, ::2]
    for name in ("tanh", "relu", "gelu"):
        leaf_k = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        gy = torch.randn_like(leaf_k)
        gaaf(leaf_k, name).backward(gy)
        previous = kernels.set_enabled(False)
        try:
            leaf_p = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            gaaf(leaf_p, name).backward(gy)
        finally:
            kernels.set_enabled(previous)
        torch.testing.assert_close(leaf_k.grad, leaf_p.grad, rtol=1e-5, atol=2e-6)
        if layout == "channels_last":
            assert leaf_k.grad.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_whole_model_gradients_match_plain_ops(model):
    torch.manual_seed(0)
    net = mlp(nn.Tanh, sizes=(32, 64, 64, 10)) if model == "mlp" else SmallCNN()
    x = torch.randn(8, 32) if model == "mlp" else torch.randn(4, 3, 16, 16)
    patched = gaaf_patch.patch(net)  # the CNN's ReLUs after BatchNorms take the fused-BatchNorm path
    twin = copy.deepcopy(patched)
    previous = kernels.set_enabled(True)
    try:
        patched(x).square().sum().backward()
        kernels.set_enabled(False)
        twin(x).square().sum().backward()
    finally:
        kernels.set_enabled(previous)
    for (n, a), b in zip(patched.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


@needs_kernel
def test_not_used_for_half_types_double_backward_or_other_shapes():
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def run(fn, x):
        calls.clear()
        x = x.detach().requires_grad_()
        y = fn(x)
        with Spy():
            y.backward(torch.ones_like(y))
        return list(calls)

    assert "backward" in run(lambda t: gaaf(t, "tanh"), torch.randn(8))
    assert "backward" not in run(lambda t: gaaf(t, "tanh"), torch.randn(8, dtype=torch.bfloat16))
    assert "backward" in run(lambda t: gaaf(t, "relu6"), torch.randn(8))  # the band shape
    assert "backward" not in run(lambda t: gaaf(t, "tanh", "zero"), torch.randn(8))
    assert "backward" not in run(lambda t: gaaf(t, "tanh", lambda z: torch.cos(z)), torch.randn(8))
    x = torch.randn(8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(gaaf(x, "tanh").sum(), x, create_graph=True)  # double backward: plain, differentiable
    g.sum().backward()
    assert torch.isfinite(x.grad).all()


@needs_kernel
def test_compiled_graphs_use_plain_ops():
    torch.manual_seed(0)
    m = gaaf_patch.patch(mlp(nn.Tanh, sizes=(16, 8, 8, 4)))
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    torch._dynamo.reset()
    try:
        torch.compile(m, backend=backend, fullgraph=True)(torch.randn(4, 16)).sum().backward()
    finally:
        torch._dynamo.reset()
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "aten.tanh_backward.default" in targets
    assert not any("gaaf_patch" in t for t in targets)


def test_off_switch_in_a_fresh_process():
    code = (
        "import torch, gaaf_patch\n"
        "from gaaf_patch import kernels\n"
        "x = torch.randn(64, requires_grad=True)\n"
        "gaaf_patch.gaaf(x, 'tanh').sum().backward()\n"
        "print(kernels.enabled(), kernels.available(), torch.isfinite(x.grad).all().item())\n"
    )
    env = {**os.environ, "GAAF_KERNELS": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def test_unbuildable_kernel_warns_once_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    monkeypatch.setattr(kernels, "_name", lambda: "gaaf_patch_test_broken")
    monkeypatch.setattr(kernels, "_state", {"loaded": None})
    monkeypatch.setattr(ops, "_KERNEL_OP", [])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("GAAF_KERNELS", raising=False)
    previous = kernels.set_enabled(True)
    try:
        x = torch.randn(16, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="could not build gaaf_patch's CPU kernel.*GAAF_KERNELS=off"):
            gaaf(x, "tanh").sum().backward()
        want = 1 - torch.tanh(x.detach()) ** 2 + get_shape("tanh")(x.detach())
        torch.testing.assert_close(x.grad, want)
        x.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gaaf(x, "tanh").sum().backward()  # no second warning, no second build
        assert kernels.available() is False
        monkeypatch.setattr(kernels, "_state", {"loaded": None})
        monkeypatch.setenv("GAAF_KERNELS", "on")
        with pytest.raises(kernels.KernelBuildError, match="install a C\\+\\+ compiler"):
            kernels.available()
    finally:
        kernels.set_enabled(previous)


def test_cli_kernels_command(capsys):
    from gaaf_patch.cli import main

    previous = kernels.set_enabled(False)
    try:
        assert main(["kernels"]) == 2
        assert "GAAF_KERNELS=off" in capsys.readouterr().err
    finally:
        kernels.set_enabled(previous)
    if not kernels.available():
        pytest.skip("the C++ kernel cannot be built here")
    assert main(["kernels"]) == 0
    assert "gaaf_patch CPU kernel ready: " in capsys.readouterr().out


@needs_kernel
def test_plan_table_stays_bounded_for_shapes_made_on_the_fly(monkeypatch):
    monkeypatch.setattr(ops, "_PLANS", {})
    monkeypatch.setattr(ops, "_PLANS_MAX", 8)
    x = torch.randn(16, requires_grad=True)
    for width in range(1, 30):  # a new ShapeFn object every call
        gaaf(x, "tanh", f"gauss(width={width})").sum().backward()
        want = 1 - torch.tanh(x.detach()) ** 2 + torch.exp(-(x.detach() ** 2) / width)
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
        x.grad = None
    assert 0 < len(ops._PLANS) <= 8


def test_the_cache_key_follows_the_torch_installation(monkeypatch, tmp_path):
    """Issue 14, item 12: two virtualenvs with the same torch version rebuilt each other's kernel (one cache
    folder, different include paths); the key now names the installation the binary is built against."""
    here = kernels._name()
    assert kernels._name() == here  # stable in one environment
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert kernels._name() != here
    monkeypatch.undo()
    copy_of_source = tmp_path / "other-checkout" / "gaaf_cpu.cpp"  # the same text elsewhere: torch's build file
    copy_of_source.parent.mkdir()  # names the source by its path, so a shared folder would rebuild back and forth
    copy_of_source.write_bytes(kernels._SOURCE.read_bytes())
    monkeypatch.setattr(kernels, "_SOURCE", copy_of_source)
    assert kernels._name() != here


def test_every_build_is_announced_even_when_the_library_exists(tmp_path, monkeypatch, capsys):
    """Issue 14, item 12: the notice was printed only when no library file existed, so a rebuild over an earlier
    one (a changed build file, a cut-short build) stalled a training script's first batch without a word. Now it is
    printed whenever ninja has work to do, and only then. torch's build is replaced by what it does: write the
    build file, run ninja in the folder."""
    import shutil

    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        pytest.skip("ninja is not on PATH")
    name = "gaaf_patch_test_notice"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_name", lambda: name)
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.so").write_bytes(b"an earlier build")
    ran = []
    monkeypatch.setattr(cpp_extension, "_run_ninja_build", lambda d, verbose, error_prefix: ran.append(d))

    def load(**kwargs):
        (folder / "build.ninja").write_text("rule touch\n  command = touch $out\nbuild out.txt: touch\n")
        cpp_extension._run_ninja_build(str(folder), False, error_prefix="x")

    monkeypatch.setattr(cpp_extension, "load", load)
    kernels.build()
    assert ran == [str(folder)]
    err = capsys.readouterr().err
    assert err.startswith("gaaf_patch: compiling the CPU backward kernel") and err.count("\n") == 1
    subprocess.run(["ninja"], cwd=folder, check=True, capture_output=True)  # now up to date: nothing to announce
    kernels.build()
    assert len(ran) == 2 and capsys.readouterr().err == ""
    assert cpp_extension._run_ninja_build is not load  # torch's function is put back after the build
