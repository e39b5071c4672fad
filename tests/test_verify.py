"""gaaf_patch.verify against hand-made references: tensors one ULP apart, NaN in the same or another place, and
models whose forward and input gradient are known in closed form (a fixed linear map, and a wrapper that doubles the
gradient without touching the forward)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import gaaf_patch as gaaf
from gaaf_patch.errors import GaafError
from gaaf_patch.verify import (
    NO_GRADIENT,
    SAWTOOTH_RTOL,
    UncheckableError,
    VerificationFailed,
    all_bit_equal,
    bit_equal,
    compare_outputs,
    max_abs_diff,
    verify,
)

NAN, INF = float("nan"), float("inf")
W = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])  # d sum(x @ W.T) / dx = W.sum(0) = [4, -1.75, -0.5]


def _ulp_up(t: Tensor) -> Tensor:
    return torch.nextafter(t, torch.full_like(t, INF))


# ------------------------------------------------------------------------------------------------------ comparisons


def test_one_ulp_apart_is_not_bit_equal_and_the_diff_is_that_ulp():
    a = torch.tensor([1.0, -2.5, 3e-8, 0.0])
    b = a.clone()
    b[0] = _ulp_up(b[0])
    assert bit_equal(a, a.clone()) and not bit_equal(a, b)
    assert max_abs_diff([a], [b]) == 2.0**-23  # one float32 ULP of 1.0
    assert max_abs_diff([b], [a]) == 2.0**-23


def test_nan_equals_nan_only_in_the_same_place():
    a = torch.tensor([1.0, NAN, 2.0])
    assert bit_equal(a, a.clone()) and max_abs_diff([a], [a.clone()]) == 0.0
    moved = torch.tensor([NAN, 1.0, 2.0])
    assert not bit_equal(a, moved) and math.isnan(max_abs_diff([a], [moved]))
    finite = torch.tensor([1.0, 5.0, 2.0])
    assert not bit_equal(a, finite) and math.isnan(max_abs_diff([finite], [a]))  # NaN where the original is finite


def test_shape_dtype_and_integer_tensors():
    a = torch.tensor([1.0, 2.0])
    assert not bit_equal(a, a.double()) and not bit_equal(a, a[None])
    i = torch.tensor([1, 2, 3])
    assert bit_equal(i, i.clone()) and not bit_equal(i, torch.tensor([1, 2, 4]))
    assert all_bit_equal([a, i], [a.clone(), i.clone()])
    assert not all_bit_equal([a, i], [a.clone()])  # one output missing
    assert max_abs_diff([torch.empty(0)], [torch.empty(0)]) == 0.0


def test_compare_outputs_exact_and_relative():
    ref = torch.tensor([4.0, -1.0, 0.5])
    one_ulp = ref.clone()
    one_ulp[1] = _ulp_up(one_ulp[1])
    exact = compare_outputs([ref], [one_ulp])
    assert (exact.ok, exact.check, exact.tolerance, exact.bit_identical) == (False, "bit-identical", 0.0, False)
    assert exact.max_abs_diff == 2.0**-24  # one ULP just above -1.0
    assert compare_outputs([ref], [ref.clone()]).ok

    # relative to max(1, max|ref|) = 4: tolerance 4e-3
    near, far = ref + torch.tensor([0.0, 3e-3, 0.0]), ref + torch.tensor([0.0, 5e-3, 0.0])
    c = compare_outputs([ref], [near], SAWTOOTH_RTOL)
    assert c.ok and c.check == "allclose" and c.tolerance == pytest.approx(4e-3) and not c.bit_identical
    assert not compare_outputs([ref], [far], SAWTOOTH_RTOL).ok
    small = torch.tensor([0.1, 0.2])  # below 1 the tolerance does not shrink further
    assert compare_outputs([small], [small], 1e-3).tolerance == pytest.approx(1e-3)
    nan_moved = compare_outputs([torch.tensor([NAN, 1.0])], [torch.tensor([1.0, NAN])], 1.0)
    assert not nan_moved.ok and math.isnan(nan_moved.max_abs_diff)  # no tolerance passes it


# ----------------------------------------------------------------------------------------------------------- models


class Linear(nn.Module):
    """``x @ weight.T`` with a fixed weight; ``perturb`` changes the output after the fact."""

    def __init__(self, weight: Tensor = W, perturb=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.perturb = perturb

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T
        return y if self.perturb is None else self.perturb(y)


class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class DoubleGrad(nn.Module):
    """The same forward as ``inner``; the input gradient doubled (a stand-in for a patch: forward kept, backward
    changed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(_DoubleGrad.apply(x))


def test_forward_kept_gradient_changed_passes_with_the_known_difference():
    v = verify(Linear(), DoubleGrad(Linear()), (4, 3), replaced=True)
    assert v.ok and v.output_ok and v.gradient_ok
    assert (v.output_check, v.output_max_abs_diff, v.output_tolerance) == ("bit-identical", 0.0, 0.0)
    assert v.gradient_expect == "differ"
    assert v.gradient_max_abs_diff == 4.0  # |2g - g| = |W.sum(0)| = [4, 1.75, 0.5]
    assert v.to_dict()["gradient"] == {"ok": True, "expect": "differ", "max_abs_diff": 4.0}


def test_the_gradient_verdict_follows_whether_sites_were_replaced():
    same = verify(Linear(), Linear(), (4, 3), replaced=False)
    assert same.ok and same.gradient_expect == "equal" and same.gradient_max_abs_diff == 0.0
    assert not verify(Linear(), Linear(), (4, 3), replaced=True).gradient_ok  # replaced, yet nothing changed
    assert not verify(Linear(), DoubleGrad(Linear()), (4, 3), replaced=False).gradient_ok  # changed, nothing replaced


def test_a_forward_one_ulp_off_fails_exact_and_passes_sawtooth():
    off = DoubleGrad(Linear(perturb=_ulp_up))
    exact = verify(Linear(), off, (4, 3), "exact", replaced=True)
    assert not exact.output_ok and not exact.ok and 0 < exact.output_max_abs_diff < 1e-5
    saw = verify(Linear(), off, (4, 3), "sawtooth", replaced=True)
    assert saw.ok and saw.output_check == "allclose" and saw.output_tolerance >= SAWTOOTH_RTOL


def test_nan_outputs_pass_only_where_the_original_has_them():
    def nan_at(i):
        return lambda y: y.index_fill(1, torch.tensor([i]), NAN)

    same = verify(Linear(perturb=nan_at(0)), DoubleGrad(Linear(perturb=nan_at(0))), (4, 3), replaced=True)
    assert same.output_ok and same.output_max_abs_diff == 0.0  # an overflowing init overflows identically
    for mode in ("exact", "sawtooth"):
        moved = verify(Linear(perturb=nan_at(0)), DoubleGrad(Linear(perturb=nan_at(1))), (4, 3), mode, replaced=True)
        assert not moved.output_ok and math.isnan(moved.output_max_abs_diff)


def test_an_output_that_does_not_depend_on_the_input_is_not_a_gradient_failure():
    zero = torch.zeros_like(W)
    v = verify(Linear(zero), DoubleGrad(Linear(zero)), (4, 3), replaced=True)
    assert v.ok and v.gradient_expect == NO_GRADIENT


def test_errors_say_whose_fault_it_is():
    with pytest.raises(UncheckableError, match=r"batch of shape \[2, 5\].*--input-size") as info:
        verify(Linear(), Linear(), (2, 5))  # the original itself rejects the input
    assert isinstance(info.value, GaafError) and isinstance(info.value, ValueError)

    def broken(y):
        raise RuntimeError("the patch broke me")

    with pytest.raises(VerificationFailed, match="fails where the original runs: RuntimeError: the patch broke me"):
        verify(Linear(), Linear(perturb=broken), (2, 3))
    with pytest.raises(VerificationFailed, match="different structure"):
        verify(Linear(), Linear(perturb=lambda y: (y, y)), (2, 3))
    with pytest.raises(UncheckableError, match="no differentiable tensor"):
        verify(Linear(perturb=lambda y: y.argmax(1)), Linear(perturb=lambda y: y.argmax(1)), (2, 3))


def test_a_real_patch_reads_replaced_from_the_report_and_leaves_the_callers_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(4)  # saturate the tanh: GAAF's gradient differs only there
    patched = gaaf.patch(copy.deepcopy(model))
    state = torch.get_rng_state()
    v = verify(model, patched, (16, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert v.ok and v.gradient_expect == "differ" and v.output_check == "bit-identical"
    assert verify(model, copy.deepcopy(model), (16, 4)).gradient_expect == "equal"  # nothing replaced
    assert verify(model, patched, (16, 4)).to_dict() == v.to_dict()  # seeded: the same batch every time
