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
``sigmoid``, ``addcmul``). Everything is plain torch ops, traceable by Dynamo/AOTAutograd. For an activation
without PyTorch kernel, the generic out-of-place ``dy (phi'(x) + s(x))`` from :mod:`gaaf_patch.activations` is
used; with grad enabled in backward (``create_graph=True``) its differentiable twin, whose derivative is the
formula's (:mod:`gaaf_patch.double_backward`). On CPU, the fused kernel
(:mod:`gaaf_patch.kernels`) does the whole backward in one pass where it can.

This module holds no fact of any activation or shape: PyTorch's kernel, what is saved, the kernel's codes are read
off the activation's record (:mod:`gaaf_patch.activations`), the in-place forms and the kernel's codes of a shape
off its family's :class:`~gaaf_patch.shapes.registry.FastPath` (:mod:`gaaf_patch.shapes.library`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from . import activations as _acts
from . import double_backward as _double_backward
from . import fused as _fused
from . import gain as _gain
from . import kernels as _kernels
from .activations import Activation
from .shapes import ShapeFn, resolve

Mode = Literal["exact", "sawtooth"]
MODES = ("exact", "sawtooth")
DEFAULT_K = 10_000.0

__all__ = ["gaaf", "sawtooth", "GAAFFunction", "MODES", "DEFAULT_K"]


def _opmath(t: Tensor) -> Tensor:
    """float32 for half types, the tensor itself otherwise: where the shape and derivative are computed."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sawtooth(x: Tensor, K: float = DEFAULT_K) -> Tensor:
    """g(x) = (x K - floor(x K) - 0.5) / K, in float32 (float64 for float64 input)."""
    xk = (x if x.dtype == torch.float64 else x.float()) * K  # a fresh tensor: the rest is in place
    return xk.sub_(torch.floor(xk)).sub_(0.5).div_(K)


def output_determines_dphi(act: Activation, params: Mapping[str, Any]) -> bool:
    """Whether ``dy phi'(x)`` can be computed from the output alone (``Activation.dphi_from_output``)."""
    return act.output_determines_dphi(params)


def _shape_term(shape: ShapeFn, x: Tensor, owned: bool) -> tuple[Tensor | None, float]:
    """``(s~, h)`` with ``s(x) = h s~(x)``; ``s~`` is a fresh tensor, or None when ``s`` is zero.

    The family's in-place form (``ShapeFn.fast``) where it has one, else the shape called as is. ``owned``: ``x`` is
    a temporary of ours, and may be overwritten.
    """
    if shape.fast is not None and shape.fast.term is not None:
        return shape.fast.term(x, owned, shape.params)
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
    return t, (act.phi(t, **params) if act.saves_output else None)


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


# The fused C++ kernel (gaaf_patch.kernels); the phi' codes are the activations', the shape codes the families'.
_KERNEL_DTYPES = (torch.float32, torch.float64)
_KERNEL_OP: list[Any] = []  # torch.ops.gaaf_patch.backward.default, once built
# (id(act), id(shape), from_output, x given) -> (act, shape, plan): what to call, worked out once per site kind. The
# entry keeps the objects alive, so an id cannot be reused while its entry exists; the table is emptied when it
# reaches _PLANS_MAX (shapes made on the fly, e.g. gaaf(x, "tanh", "gauss(width=3)") in a loop, stay bounded).
_PLANS: dict[tuple[int, int, bool, bool], tuple[Activation, ShapeFn, tuple | None]] = {}
_PLANS_MAX = 1024


def _kernel_plan(act: Activation, shape: ShapeFn, from_output: bool, given_x: bool) -> tuple | None:
    """``(phi' code, shape code, a, b, c, h, PyTorch's dy*phi' first?)`` for the kernel, or None (plain ops)."""
    kernel = shape.fast.kernel if shape.fast is not None else None
    if act.native is None or kernel is None:
        return None
    fam = kernel(shape.params)
    t_is_output = from_output and not given_x  # else t = x: saved (input), or recomputed after a fused BatchNorm
    code = act.kernel_y if t_is_output else act.kernel_x
    if code is not None:  # the kernel computes phi' itself
        return (code, *fam, False)
    if t_is_output:
        return None
    return (_kernels.GIVEN, *fam, True)


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
    double backward, for shapes whose family has no kernel code (``FastPath.kernel``: gauss, shifted-sigmoid and band
    have one), or when the kernel is off or cannot be built. ``delta``: the auto gain, whose coefficient the kernel
    works out itself (from a sample of what it reads) except for activations with their own PyTorch kernel, where it
    is computed here.
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
        return op(gy, x, act.native(gy, saved, params) if given else None, code, fam, a, b, c3, h, u, v, d, n)
    if not given:  # t = what was saved: the output (tanh, sigmoid in exact mode) or the input
        return op(gy, saved, None, code, fam, a, b, c3, h, u, v, d, n)
    # PyTorch's own dy * phi'(x), then the shape
    return op(gy, saved, act.native(gy, saved, params), code, fam, a, b, c3, h, u, v, d, n)


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
    if torch.is_grad_enabled():  # double backward (create_graph=True): this result is differentiated in turn
        return _double_backward.differentiable_backward(saved, gy, from_output, act, shape, params, x, delta)
    dx = _kernel_backward(saved, gy, from_output, act, shape, params, x, delta)
    if dx is not None:
        return dx
    c = None
    if delta is not None:
        c = _blend_coefficient(saved if x is None else x, from_output and x is None, act, shape, params, delta)
    t = _opmath(saved)
    g = gy if gy.dtype == t.dtype else gy.to(t.dtype)
    native = act.native
    if x is not None:
        if native is None:
            return (_multiplier(x, False, act, shape, params, c) * g).to(gy.dtype)
        out = native(g, t, params)
        s, h = _shape_term(shape, x, owned=True)
        out = _add_shape(out, g, s, h, act, c)
        return out if out.dtype == gy.dtype else out.to(gy.dtype)
    if native is None:  # no PyTorch kernel for the activation: out of place
        return (_multiplier(saved, from_output, act, shape, params, c) * g).to(gy.dtype)
    # dy phi'(x): one fused kernel; tanh's and sigmoid's take the output, recomputed when x was saved (sawtooth)
    out = native(g, act.phi(t, **params) if act.saves_output and not from_output else t, params)
    if from_output:
        fast = shape.fast
        if fast is not None and fast.zero:
            s, h = None, 0.0
        else:  # s(+-inf) = 0 exactly: the inverse needs no clamp. The inverses return a new tensor.
            exact = fast is not None and fast.zero_at_infinity and act.exact_inverse is not None
            x = act.exact_inverse(t) if exact else act.inverse(t)
            s, h = _shape_term(shape, x, owned=True)
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
        ctx.from_output = act.saves_output and mode == "exact"
        # After a fused BatchNorm (or a residual add of such outputs; gaaf_patch.fused), a ReLU-family site keeps
        # its output (which the next layer keeps anyway) and recomputes x in backward from what others keep.
        keep = mode == "exact" and act.output_determines_dphi(params)
        ctx.src = _fused.source_of(x, _keeps_output) if keep else None
        ctx.save_for_backward(y if ctx.from_output or ctx.src is not None else x)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        (saved,) = ctx.saved_tensors
        x = None if ctx.src is None else _fused.recompute_input(ctx.src)
        dx = _backward(saved, gy, ctx.from_output, ctx.act, ctx.shape, ctx.params, x, ctx.delta)
        return dx, None, None, None, None, None, None, None


def _keeps_output(node: Any) -> bool:
    """Whether an autograd node is a GAAF site's that saved its output (an operand :mod:`gaaf_patch.fused` may read)."""
    return isinstance(node, GAAFFunction._backward_cls) and (node.from_output or node.src is not None)


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
