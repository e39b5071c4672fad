"""The GAAF operation: ``phi_new(x) = phi(x) + g(x) s(x)`` with gradient ``phi'(x) + s(x)``.

``g(x) = (x K - floor(x K) - 0.5) / K`` is a sawtooth of amplitude ``1/(2K)`` and slope 1 (Hahn & Choi, eq. 7-8).
Two modes:

- ``exact`` (default): the forward is ``phi(x)`` itself, bit for bit (the K -> infinity limit), the backward
  ``phi'(x) + s(x)``. A model trained this way deploys unpatched with nothing changed.
- ``sawtooth``: the literal equations with a finite ``K``. ``g`` is computed in float32 (float64 for float64
  inputs) whatever the input dtype: in float16, ``x K`` overflows for ``|x| > 6.5``.

Both use one :class:`torch.autograd.Function`. It saves one tensor: the output for activations that can be inverted
(tanh, sigmoid, as PyTorch does), else the input. The ``g s'`` term of the literal derivative (below
``max|s'|/(2K)``) is dropped, as in the paper.

Backward, fast path (every built-in activation; see docs/performance.md): ``dx = dy phi'(x) + h dy s~(x)``, where
``dy phi'(x)`` is PyTorch's own fused backward kernel for the activation (``tanh_backward``, ``threshold_backward``,
``gelu_backward``, ...: one kernel, PyTorch's conventions at the kinks by construction) and ``s = h s~`` is evaluated
in place on one fresh buffer, then added by one ``addcmul_``. The built-in shape families have an in-place
evaluation (``gauss`` through ``exp2``, about 3x cheaper than ``exp`` on CPU); any other shape is called as is. For
tanh, 4 kernels are added to PyTorch's 1 (``atanh``, square, scale+``exp2``, ``addcmul``); for ReLU 4 (add, mul,
``sigmoid``, ``addcmul``). Everything is plain torch ops, traceable by Dynamo/AOTAutograd. With grad enabled in
backward (``create_graph=True``) or for an activation that is not a registered one, the generic out-of-place
``dy (phi'(x) + s(x))`` from :mod:`gaaf_patch.activations` is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from . import activations as _acts
from . import fused as _fused
from . import gain as _gain
from . import kernels as _kernels
from .activations import Activation
from .shapes import ShapeFn, resolve
from .shapes import library as _lib

Mode = Literal["exact", "sawtooth"]
MODES = ("exact", "sawtooth")
DEFAULT_K = 10_000.0

__all__ = ["gaaf", "sawtooth", "GAAFFunction", "MODES", "DEFAULT_K"]

_LOG2E = 1.0 / math.log(2.0)
_aten = torch.ops.aten


def _opmath(t: Tensor) -> Tensor:
    """float32 for half types, the tensor itself otherwise: where the shape and derivative are computed."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sawtooth(x: Tensor, K: float = DEFAULT_K) -> Tensor:
    """g(x) = (x K - floor(x K) - 0.5) / K, in float32 (float64 for float64 input)."""
    xk = (x if x.dtype == torch.float64 else x.float()) * K  # a fresh tensor: the rest is in place
    return xk.sub_(torch.floor(xk)).sub_(0.5).div_(K)


# ---------------------------------------------------------------------------------------------------------------------
# dy * phi'(x): PyTorch's own backward kernel of each built-in activation. ``t`` is what the Function saved: the
# output for tanh and sigmoid, the input otherwise.

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

_NATIVE: dict[str, Callable[[Tensor, Tensor, Mapping[str, Any]], Tensor]] = {
    "relu": lambda g, t, p: _aten.threshold_backward(g, t, 0),
    "relu6": lambda g, t, p: _aten.hardtanh_backward(g, t, 0.0, 6.0),
    "leaky_relu": lambda g, t, p: _aten.leaky_relu_backward(g, t, p["negative_slope"], False),
    "elu": lambda g, t, p: _aten.elu_backward(g, p["alpha"], 1.0, 1.0, False, t),
    "selu": lambda g, t, p: _aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, t),
    "celu": lambda g, t, p: _aten.elu_backward(g, p["alpha"], 1.0, 1.0 / p["alpha"], False, t),
    # PyTorch's tanh-approximate gelu_backward cancels badly in float32 for x < -4 (1e-6 off); the library's is not
    "gelu": lambda g, t, p: (
        _aten.gelu_backward(g, t)
        if p["approximate"] == "none"
        else _acts.ACTIVATIONS["gelu"].dphi(t, None, **p).mul_(g)
    ),
    "silu": lambda g, t, p: _aten.silu_backward(g, t),
    "mish": lambda g, t, p: _aten.mish_backward(g, t),
    "softplus": lambda g, t, p: _aten.softplus_backward(g, t, p["beta"], p["threshold"]),
    "tanh": lambda g, t, p: _aten.tanh_backward(g, t),
    "hardtanh": lambda g, t, p: _aten.hardtanh_backward(g, t, p["min_val"], p["max_val"]),
    "sigmoid": lambda g, t, p: _aten.sigmoid_backward(g, t),
    "hardsigmoid": lambda g, t, p: _aten.hardsigmoid_backward(g, t),
    "hardswish": lambda g, t, p: _aten.hardswish_backward(g, t),
}


def _native(act: Activation) -> Callable[[Tensor, Tensor, Mapping[str, Any]], Tensor] | None:
    """The fused ``dy phi'`` of a registered activation (not of a look-alike someone built by hand)."""
    return _NATIVE.get(act.name) if _acts.ACTIVATIONS.get(act.name) is act else None


# Activations whose phi' the output determines exactly (sign or range of y = sign or range of x), with PyTorch's
# convention at the kinks: their native backward, given the output, equals the one given the input.
_OUTPUT_DETERMINES_DPHI = frozenset({"relu", "relu6", "leaky_relu"})


def output_determines_dphi(act: Activation, params: Mapping[str, Any]) -> bool:
    """Whether ``dy phi'(x)`` can be computed from the output alone (a positive leaky slope keeps the sign)."""
    return act.name in _OUTPUT_DETERMINES_DPHI and params.get("negative_slope", 1.0) > 0


# ---------------------------------------------------------------------------------------------------------------------
# s(x) = h * s~(x): the built-in families evaluated in place on one buffer.


def _is_gauss(shape: ShapeFn) -> bool:
    return shape.fn is _lib.gauss and shape.params.get("width", 0) > 0


def _scaled_square(z: Tensor, k: float, owned: bool) -> Tensor:
    """``k z^2``: one pass on CPU (``addcmul(0, z, z, value=k)``, the 0 broadcast), into ``z`` when ``owned``.

    The 0 is made here, not kept as a module constant: a real tensor would break tracing under fake tensors.
    """
    if z.device.type == "cpu":
        zero = z.new_zeros(())
        return torch.addcmul(zero, z, z, value=k, out=z) if owned else torch.addcmul(zero, z, z, value=k)
    return (z.mul_(z) if owned else torch.mul(z, z)).mul_(k)


def _shape_term(shape: ShapeFn, x: Tensor, owned: bool) -> tuple[Tensor | None, float]:
    """``(s~, h)`` with ``s(x) = h s~(x)``; ``s~`` is a fresh tensor, or None when ``s`` is zero.

    ``owned``: ``x`` is a temporary of ours, and may be overwritten.
    """
    fn, p = shape.fn, shape.params
    if fn is _lib.zero:
        return None, 0.0
    if _is_gauss(shape):
        # exp(-((x - c) / scale)^2 / width) as exp2(k (x - c)^2), k = -log2(e) / (width scale^2): 2 passes (3 with a
        # center) instead of 4-6; exp2 is also about 3x cheaper than exp on CPU. Same value to a few ulps.
        z = x
        if p["center"] != 0:
            z, owned = (z.sub_(p["center"]) if owned else torch.sub(z, p["center"])), True
        k = -_LOG2E / (p["width"] * p["scale"] * p["scale"])
        return _scaled_square(z, k, owned).exp2_(), float(p["height"])
    if fn is _lib.shifted_sigmoid:
        z = x.add_(p["shift"]) if owned else torch.add(x, p["shift"])
        return z.mul_(p["slope"]).sigmoid_(), float(p["height"])
    s = shape(x)
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    elif s is x:  # an identity-like user shape: the callers write into s, never into what backward saved
        s = s.clone()
    return s, 1.0


def _x_y(t: Tensor, from_output: bool, act: Activation, params: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from what was saved (opmath dtype): the output through the inverse, or the input."""
    if from_output:
        return act.inverse(t), t
    return t, (act.phi(t, **params) if act.inverse is not None else None)


def _multiplier(
    saved: Tensor,
    from_output: bool,
    act: Activation,
    shape: ShapeFn,
    params: Mapping[str, Any],
    c: Tensor | float | None = None,
) -> Tensor:
    """phi'(x) + s(x) (or the auto blend ``phi' + c s~ (slope - phi')``), from the saved input, or from the output
    through the activation's inverse (generic path)."""
    x, y = _x_y(_opmath(saved), from_output, act, params)
    dphi = act.dphi(x, y, **params)
    if c is None:
        return dphi + shape(x)
    s, _h = _shape_term(shape, x, owned=False)
    return dphi if s is None else dphi + c * s * (act.slope - dphi)


def _blend_coefficient(
    saved: Tensor, from_output: bool, act: Activation, shape: ShapeFn, params: Mapping[str, Any], delta: float
) -> Tensor | float:
    """The auto gain's ``c`` for this batch (gaaf_patch.gain), from a sample of what backward has."""
    x, y = _x_y(_opmath(_gain.sample(saved)), from_output, act, params)
    dphi = act.dphi(x, y, **params)
    s, _h = _shape_term(shape, x, owned=False)
    if s is None:
        return 0.0
    return _gain.coefficient(dphi, s.mul_(dphi.neg().add_(act.slope)), delta)


# The fused C++ kernel (gaaf_patch.kernels): its codes for phi' and for the shape family.
_K_TANH_Y, _K_SIGMOID_Y, _K_RELU, _K_GIVEN, _K_TANH_X, _K_SIGMOID_X = 0, 1, 2, 3, 4, 5
_K_GAUSS, _K_SHIFTED_SIGMOID, _K_BAND = 0, 1, 2
_KERNEL_DTYPES = (torch.float32, torch.float64)
_KERNEL_OP: list[Any] = []  # torch.ops.gaaf_patch.backward.default, once built
# (id(act), id(shape), from_output, x given) -> (act, shape, plan): what to call, worked out once per site kind. The
# entry keeps the objects alive, so an id cannot be reused while its entry exists; the table is emptied when it
# reaches _PLANS_MAX (shapes made on the fly, e.g. gaaf(x, "tanh", "gauss(width=3)") in a loop, stay bounded).
_PLANS: dict[tuple[int, int, bool, bool], tuple[Activation, ShapeFn, tuple | None]] = {}
_PLANS_MAX = 1024


def _kernel_plan(act: Activation, shape: ShapeFn, from_output: bool, given_x: bool) -> tuple | None:
    """``(phi' code, shape code, a, b, c, h, PyTorch's dy*phi' first?)`` for the kernel, or None (plain ops)."""
    native, p = _native(act), shape.params
    if native is None:
        return None
    if _is_gauss(shape):
        k = -_LOG2E / (p["width"] * p["scale"] * p["scale"])
        fam = (_K_GAUSS, k, float(p["center"]), 0.0, float(p["height"]))
    elif shape.fn is _lib.shifted_sigmoid:
        fam = (_K_SHIFTED_SIGMOID, float(p["slope"]), float(p["shift"]), 0.0, float(p["height"]))
    elif shape.fn is _lib.band:
        fam = (_K_BAND, float(p["slope"]), float(p["lo"] - p["margin"]), float(p["hi"] + p["margin"]), 1.0)
    else:
        return None
    if act.name == "relu" and (given_x or not from_output):
        return (_K_RELU, *fam, False)  # t = x: phi' = [x > 0], as threshold_backward
    if act.name in ("tanh", "sigmoid") and not given_x:  # the output saved (exact mode) or the input (sawtooth)
        codes = {(True, "tanh"): _K_TANH_Y, (True, "sigmoid"): _K_SIGMOID_Y}
        return (codes.get((from_output, act.name), _K_TANH_X if act.name == "tanh" else _K_SIGMOID_X), *fam, False)
    if from_output and not given_x:
        return None
    return (_K_GIVEN, *fam, True)


def _kernel_backward(
    saved: Tensor,
    gy: Tensor,
    from_output: bool,
    act: Activation,
    shape: ShapeFn,
    params,
    x: Tensor | None,
    delta: float | None = None,
) -> Tensor | None:
    """The whole backward in one fused CPU pass (two for activations with their own PyTorch kernel), or None.

    None (use the plain ops) off the CPU, for half types, under tracing (fake or functional tensors, Dynamo), in
    double backward, for shapes other than the gauss, shifted-sigmoid and band families, or when the kernel is off
    or cannot be built. ``delta``: the auto gain, whose coefficient the kernel works out itself (from a sample of
    what it reads) except for activations with their own PyTorch kernel, where it is computed here.
    """
    if not (
        saved.is_cpu
        and type(saved) is Tensor
        and type(gy) is Tensor
        and saved.dtype in _KERNEL_DTYPES
        and gy.dtype == saved.dtype
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        return None
    key = (id(act), id(shape), from_output, x is not None)
    entry = _PLANS.get(key)
    if entry is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        entry = _PLANS[key] = (act, shape, _kernel_plan(act, shape, from_output, x is not None))
    plan = entry[2]
    if plan is None:
        return None
    if not _KERNEL_OP:
        if not _kernels.available():
            return None
        _KERNEL_OP.append(torch.ops.gaaf_patch.backward.default)
    elif not _kernels.enabled():
        return None
    code, fam, a, b, c3, h, given = plan
    u, v, d = 1.0, 0.0, -1.0  # the paper's form: + h s~
    if delta is not None:  # the auto blend: + c s~ (slope - phi')
        u, v = act.slope, 1.0
        if given:  # the kernel sees dy phi', not phi': c from the library's formula
            h = float(
                _blend_coefficient(saved if x is None else x, from_output and x is None, act, shape, params, delta)
            )
        else:
            d = delta
    op, n = _KERNEL_OP[0], _gain.SAMPLES
    if x is not None:  # recomputed after a fused BatchNorm; saved = the output, whose sign is x's
        return op(gy, x, _native(act)(gy, saved, params) if given else None, code, fam, a, b, c3, h, u, v, d, n)
    if not given:  # t = what was saved: the output (tanh, sigmoid in exact mode) or the input
        return op(gy, saved, None, code, fam, a, b, c3, h, u, v, d, n)
    # PyTorch's own dy * phi'(x), then the shape
    return op(gy, saved, _native(act)(gy, saved, params), code, fam, a, b, c3, h, u, v, d, n)


def _add_shape(out: Tensor, g: Tensor, s: Tensor | None, h: float, act: Activation, c: Tensor | float | None) -> Tensor:
    """``out = dy phi'`` plus the shape term, in place: ``h dy s~`` (paper) or ``c s~ (slope dy - dy phi')`` (auto)."""
    if s is None:
        return out
    if c is None:
        return out.addcmul_(g, s, value=h)
    return out.addcmul_(torch.mul(g, act.slope).sub_(out), s.mul_(c))


def _backward(
    saved: Tensor,
    gy: Tensor,
    from_output: bool,
    act: Activation,
    shape: ShapeFn,
    params,
    x: Tensor | None = None,
    delta: float | None = None,
) -> Tensor:
    """dx = dy (phi'(x) + s(x)) in the opmath dtype, returned in ``gy``'s dtype.

    ``x``: the input, recomputed from a fused BatchNorm (``saved`` is then the output of a ReLU-family activation,
    whose ``phi'`` the output determines exactly). ``delta``: the auto gain's energy allowance (gaaf_patch.gain);
    None for the paper's ``phi' + s``.
    """
    dx = _kernel_backward(saved, gy, from_output, act, shape, params, x, delta)
    if dx is not None:
        return dx
    c = None
    if delta is not None:
        c = _blend_coefficient(saved if x is None else x, from_output and x is None, act, shape, params, delta)
    t = _opmath(saved)
    g = gy if gy.dtype == t.dtype else gy.to(t.dtype)
    native = _native(act)
    if x is not None:
        if native is None or torch.is_grad_enabled():
            return (_multiplier(x, False, act, shape, params, c) * g).to(gy.dtype)
        out = native(g, t, params)
        s, h = _shape_term(shape, x, owned=True)
        out = _add_shape(out, g, s, h, act, c)
        return out if out.dtype == gy.dtype else out.to(gy.dtype)
    if native is None or torch.is_grad_enabled():
        # unknown activation, or double backward: out of place, differentiable
        return (_multiplier(saved, from_output, act, shape, params, c) * g).to(gy.dtype)
    # dy phi'(x): one fused kernel; tanh's and sigmoid's take the output, recomputed when x was saved (sawtooth)
    out = native(g, act.phi(t, **params) if act.inverse is not None and not from_output else t, params)
    if from_output:
        # gauss(+-inf) = 0 exactly, so tanh's atanh needs no clamp there; the registered inverses return a new tensor
        if shape.fn is not _lib.zero:
            x = torch.atanh(t) if act.name == "tanh" and _is_gauss(shape) else act.inverse(t)
            s, h = _shape_term(shape, x, owned=True)
        else:
            s, h = None, 0.0
    else:
        s, h = _shape_term(shape, t, owned=False)
    out = _add_shape(out, g, s, h, act, c)
    return out if out.dtype == gy.dtype else out.to(gy.dtype)


def _forward(
    x: Tensor, act: Activation, shape: ShapeFn, mode: str, K: float, params: Mapping[str, Any], phi=None
) -> Tensor:
    y = act.phi(x, **params) if phi is None else phi(x)
    if mode == "sawtooth":
        xo = x if x.dtype == torch.float64 else x.float()
        g = sawtooth(x, K)
        s, h = _shape_term(shape, xo, owned=xo is not x)
        if s is not None:
            g = g.mul_(s) if h == 1 else g.mul_(s).mul_(h)
            y = g.add_(y).to(y.dtype)  # phi + g s, rounded once to the input's dtype
    return y


class GAAFFunction(torch.autograd.Function):
    """``y = phi(x) [+ g(x) s(x)]``, ``dx = dy * (phi'(x) + s(x))``; saves one tensor."""

    @staticmethod
    def forward(ctx, x, act, shape, mode, K, params, phi=None, delta=None):  # noqa: D102
        y = _forward(x, act, shape, mode, K, params, phi)
        ctx.act, ctx.shape, ctx.params, ctx.delta = act, shape, params, delta
        # The output suffices only in exact mode: in sawtooth mode it carries g(x) s(x), and inverting it would
        # evaluate phi' + s at a shifted x (by up to 1/(2K phi'(x)), large in the saturation).
        ctx.from_output = act.inverse is not None and mode == "exact"
        # After a fused BatchNorm (or a residual add of such outputs; gaaf_patch.fused), a ReLU-family site keeps
        # its output (which the next layer keeps anyway) and recomputes x in backward from what others keep.
        ctx.src = _fused.source_of(x) if mode == "exact" and output_determines_dphi(act, params) else None
        ctx.save_for_backward(y if ctx.from_output or ctx.src is not None else x)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        (saved,) = ctx.saved_tensors
        x = None if ctx.src is None else _fused.recompute_input(ctx.src)
        dx = _backward(saved, gy, ctx.from_output, ctx.act, ctx.shape, ctx.params, x, ctx.delta)
        return dx, None, None, None, None, None, None, None


def apply(
    x: Tensor,
    act: Activation,
    shape: ShapeFn,
    mode: str,
    K: float,
    params: Mapping[str, Any],
    phi=None,
    delta: float | None = None,
) -> Tensor:
    """GAAF on already-validated arguments (the hot path used by :class:`gaaf_patch.GAAF`).

    ``phi``, when given, computes the forward instead of ``act.phi`` (a timm module whose formula differs from the
    torch function in the last bit): exact mode stays bit-identical to the module it replaced. ``delta``: the auto
    gain's per-site energy allowance (exact mode only; gaaf_patch.gain), None for the paper's ``phi' + s``.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return GAAFFunction.apply(x, act, shape, mode, K, params, phi, delta)
    return _forward(x, act, shape, mode, K, params, phi)


def check_mode(mode: str, K: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not (isinstance(K, (int, float)) and not isinstance(K, bool) and math.isfinite(K) and K > 0):
        raise ValueError(f"K must be a finite positive number, got {K!r}")


def gaaf(
    x: Tensor,
    activation: str = "relu",
    shape: str | ShapeFn | Any | None = None,
    *,
    mode: Mode = "exact",
    K: float = DEFAULT_K,
    delta: float | None = None,
    **params: Any,
) -> Tensor:
    """Apply the GAAF version of ``activation`` to ``x``.

    ``shape`` defaults to the activation's registered default (``gaaf_patch.shapes.get(activation)``); ``params``
    are the activation's own (``negative_slope=0.1``, ``approximate="tanh"``, ...). ``delta``: None (default) is
    the paper's gradient ``phi' + s``; a number is the depth-safe auto gain with that energy allowance
    (gaaf_patch.gain; exact mode only).
    """
    act = _acts.get(activation)
    check_mode(mode, K)
    delta = check_gain(mode, delta)
    shape_fn = resolve(shape if shape is not None else activation)
    return apply(x, act, shape_fn, mode, float(K), act.params(params), delta=delta)


def check_gain(mode: str, delta: float | None) -> float | None:
    """A validated energy allowance; the auto gain is an exact-mode gradient (sawtooth is the paper's literal form)."""
    delta = _gain.check_delta(delta)
    if delta is not None and mode != "exact":
        raise ValueError("the auto gain (delta) needs mode='exact'; mode='sawtooth' is the paper's literal form")
    return delta
