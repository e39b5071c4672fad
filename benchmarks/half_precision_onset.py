"""Where exact-mode tanh and sigmoid lose ``s(x)`` in float16 and bfloat16 (docs/shapes.md, "Precision note").

GAAF keeps only the output ``y`` of tanh and sigmoid, as PyTorch does, and evaluates ``s`` at the ``x`` recovered from
it. In half precision ``y`` is rounded to the dtype, so the recovered ``x`` drifts from the true one as ``y``
approaches its saturation value, and is infinite (``s = 0``) once ``y`` rounds to it exactly. For every representable
``x`` of the dtype in ``[0, 12]`` (and ``[-12, 0]``), this script runs GAAF's real backward (exact mode, the paper's
gain ``phi' + s``) and PyTorch's own, and reports, walking outwards from 0:

- ``s off 10%`` / ``s off 50%``: the first ``|x|`` where the ``s`` part of the gradient GAAF returns (its gradient
  minus PyTorch's, both in the dtype) is off by more than 10% / 50% of the true ``s(x)`` (float64);
- ``s lost``: the first ``|x|`` where less than 10% of ``s(x)`` is left (0 for tanh, whose inverse has no clamp;
  sigmoid's clamped inverse leaves about 3e-8);
- ``y saturates``: the first ``|x|`` where ``phi(x)`` rounds to its limit (1, or 0 for sigmoid's negative side);

with the true ``s`` there, to say how much gradient is at stake. Run from the repository root::

    python -m benchmarks.half_precision_onset
"""

from __future__ import annotations

import platform

import torch

from gaaf_patch import gaaf
from gaaf_patch.shapes import get as get_shape

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LIMIT = 12.0


def representable(dtype: torch.dtype, side: float) -> torch.Tensor:
    """Every value of ``dtype`` in [0, LIMIT] (side +1) or [-LIMIT, 0] (side -1), walking outwards from 0."""
    bits = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).float()
    x = x[torch.isfinite(x) & (x >= 0) & (x <= LIMIT)].unique()  # sorted
    return (x * side).to(dtype)


def first(mask: torch.Tensor, x: torch.Tensor) -> float | None:
    hit = mask.nonzero()
    return None if len(hit) == 0 else float(x[hit[0, 0]])


def measure(name: str, dtype: torch.dtype, side: float) -> dict[str, float | None]:
    torch_fn = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]
    x = representable(dtype, side)
    a = x.clone().requires_grad_()
    gaaf(a, name).backward(torch.ones_like(a))
    b = x.clone().requires_grad_()
    torch_fn(b).backward(torch.ones_like(b))
    s_got = a.grad.double() - b.grad.double()  # GAAF's s part, as it reaches the caller
    s_true = get_shape(name)(x.double())
    y = torch_fn(x).double()
    limit = 0.0 if (name == "sigmoid" and side < 0) else side
    err = (s_got - s_true).abs()
    return {
        "s_off_10": first(err > 0.1 * s_true, x),
        "s_off_50": first(err > 0.5 * s_true, x),
        "s_lost": first(s_got < 0.1 * s_true, x),
        "y_saturates": first(y == limit, x),
        "s_true": s_true,
        "x": x,
    }


def at(m: dict, key: str) -> str:
    """``|x|`` and the true ``s`` there."""
    v = m[key]
    if v is None:
        return f"{'none in range':>22}"
    i = int((m["x"].double() == v).nonzero()[0, 0])
    return f"{abs(v):6.3f} (s = {float(m['s_true'][i]):.2g})".rjust(22)


def main() -> None:
    print(f"# torch {torch.__version__}, {platform.machine()}, CPU; exact mode, gain paper (phi' + s), default shapes")
    print(
        f"# every representable x of the dtype in [0, {LIMIT:g}] and [-{LIMIT:g}, 0]; |x| where, and the true s(x) there"
    )
    head = f"{'activation':<10} {'dtype':<9} {'side':<5}"
    print(f"{head} {'s off 10%':>22} {'s off 50%':>22} {'s lost':>22} {'y saturates':>22}")
    for name in ("tanh", "sigmoid"):
        for label, dtype in DTYPES.items():
            for side in (1.0, -1.0):
                m = measure(name, dtype, side)
                cols = " ".join(at(m, k) for k in ("s_off_10", "s_off_50", "s_lost", "y_saturates"))
                print(f"{name:<10} {label:<9} {'x>0' if side > 0 else 'x<0':<5} {cols}")


if __name__ == "__main__":
    main()
