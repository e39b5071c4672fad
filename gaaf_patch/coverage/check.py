"""One model of the sweep: build it, patch it with ``strip_dropout=True``, and check what a patch promises.

(a) eval outputs bit-identical to the unpatched model's (exact mode; :func:`gaaf_patch.verify.all_bit_equal`);
(b) no activation left unreplaced, counted independently of the report (:mod:`.count`: module instances, whole-model
fx nodes where the model traces; at run time, :func:`gaaf_patch.audit.audit`: no native activation op ran outside
GAAF in a train-mode forward and backward unless the report explains it), and nothing in ``report.unreached``;
(c) the train-mode forward deterministic after stripping (two forwards under different RNG seeds agree bit for bit;
drop-path modules, which ``strip_dropout`` keeps, held in eval mode) and no random op the report does not explain in
the audit; (d) a train-mode backward runs and reaches the input; (e) ``state_dict`` keys unchanged.

The unpatched model is run first in train mode, then in eval mode (the reference), both on the same seeded batch.
If it rejects the small input, it is rebuilt at its native size; if it fails there too, or if it has more
parameters than the sweep allows, it is skipped with the reason: a model that does not run unpatched says nothing
about the patch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..api import patch
from ..audit import audit
from ..errors import one_line
from ..models import output_tensors as _tensors
from ..report import report
from ..verify import all_bit_equal
from . import count, zoo
from .status import FAIL, PASS, SKIP, droppath_held

__all__ = ["Result", "check", "check_model", "PASS", "FAIL", "SKIP"]

CHECKS = ("a_exact", "b_complete", "c_deterministic", "d_backward", "e_state_dict")
SEED = 0
BATCH = 2
DEFAULT_MAX_PARAMS = 200_000_000  # the default sweep skips models larger than this (listed, not failures)


@dataclass
class Result:
    """What checking one model found. ``status``: ``pass`` (every check), ``fail`` (``reason`` says which and why)
    or ``skip`` (too large, or the unpatched model itself does not run: not counted against the patch)."""

    source: str
    family: str
    name: str
    status: str = FAIL
    reason: str = ""
    params: int | None = None
    input_size: list[int] | list[str] | None = None  # C, H, W; a Hugging Face model: "input_ids [2, 8]", ...
    replaced: int = 0
    stripped: int = 0
    gates: int = 0
    unreached: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(CHECKS))
    leftover_modules: list[dict[str, Any]] = field(default_factory=list)
    leftover_fx: list[dict[str, Any]] | None = None
    fx_error: str = ""
    # gaaf_patch.audit's findings (Finding.to_dict(): module, kind, op, phase, count, explained)
    leftover_runtime: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def family_id(self) -> str:
        return zoo.Entry(self.source, self.family, self.name).family_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        return cls(**d)

    def misses(self) -> dict[str, int]:
        """Leftovers that are not gates, per counting method (fx: -1 when the model does not trace whole; runtime:
        the audit's silent activation findings)."""
        return {
            "modules": sum(not x["gate"] for x in self.leftover_modules),
            "fx": -1 if self.leftover_fx is None else sum(not x["gate"] for x in self.leftover_fx),
            "runtime": len(self.silent("activation")),
        }

    def silent(self, kind: str) -> list[dict[str, Any]]:
        """The audit's findings of ``kind`` (``activation`` or ``random``) that the report does not explain."""
        return [f for f in self.leftover_runtime if f.get("kind") == kind and f.get("explained") is None]


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e, 200)}"


def _forward(model: nn.Module, x: Tensor, seed: int) -> list[Tensor]:
    torch.manual_seed(seed)
    return _tensors(model(x))


def _reference(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Run the unpatched model in train mode (it must take the input there too), then in eval mode: the reference.
    Train first: its batch-norm updates then come before both eval forwards."""
    with torch.no_grad():
        model.train()
        _forward(model, x, SEED)
        model.eval()
        return _forward(model, x, SEED)


def _prepare(entry: zoo.Entry, size: int | None, result: Result) -> tuple[nn.Module, Tensor, list[Tensor]] | None:
    """Build the model and run it unpatched; ``None`` (a skip, with the reason) if it does not run."""
    errors = []
    for s in [size, None] if size is not None else [None]:
        torch.manual_seed(SEED)
        try:
            model, shape = zoo.build(entry, s)
        except Exception as e:  # noqa: BLE001 - any build failure is the model's, reported as a skip
            errors.append(f"build: {_why(e)}")
            continue
        x = torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(SEED))
        try:
            ref = _reference(model, x)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{list(shape)}: {_why(e)}")
            continue
        return model, x, ref
    result.status, result.reason = SKIP, "the unpatched model does not run: " + "; ".join(errors)
    return None


def _timed(result: Result, fn: Any, *args: Any) -> Result:
    t0 = time.perf_counter()
    try:
        fn(*args, result)
    except Exception as e:  # noqa: BLE001 - a crash of the patched model is a failure with its reason
        result.status, result.reason = FAIL, result.reason or _why(e)
    result.seconds = time.perf_counter() - t0
    return result


def check(entry: zoo.Entry, size: int | None = 64, max_params: int | None = None) -> Result:
    """Build ``entry`` and run checks (a)-(e) on it (see the module docstring; a Hugging Face model type: the checks
    of :mod:`.hf`, ``size`` and ``max_params`` unused); never raises."""
    if entry.source == zoo.HF:
        from .hf import check_hf

        return _timed(Result(entry.source, entry.family, entry.name), lambda result: check_hf(entry.family, result))
    return _timed(Result(entry.source, entry.family, entry.name), _check_entry, entry, size, max_params)


def check_model(model: nn.Module, input_size: tuple[int, ...], name: str = "model") -> Result:
    """Checks (a)-(e) on a model of your own (patched in place); ``input_size`` is per sample (``C, H, W``)."""
    result = Result("user", "user", name)

    def run(result: Result) -> None:
        x = torch.randn((BATCH, *input_size), generator=torch.Generator().manual_seed(SEED))
        _patch_and_verify(model, x, _reference(model, x), result)

    return _timed(result, run)


def _check_entry(entry: zoo.Entry, size: int | None, max_params: int | None, result: Result) -> None:
    if max_params is not None:
        n = zoo.meta_params(entry)
        if n is not None and n > max_params:
            result.params, result.status = n, SKIP
            which = "the default sweep" if max_params == DEFAULT_MAX_PARAMS else "this sweep"
            result.reason = f"too large for {which} ({n / 1e6:.0f}M > {max_params / 1e6:.0f}M parameters)"
            return
    prepared = _prepare(entry, size, result)
    if prepared is not None:
        _patch_and_verify(*prepared, result)


def _patch_and_verify(model: nn.Module, x: Tensor, ref: list[Tensor], result: Result) -> None:
    result.params = sum(p.numel() for p in model.parameters())
    result.input_size = list(x.shape[1:])
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch(model, strip_dropout=True)
    rep = report(model)
    result.replaced, result.stripped, result.gates = len(rep.replaced), len(rep.stripped), len(rep.skipped)
    result.unreached = list(rep.unreached)
    checks = result.checks
    checks["e_state_dict"] = list(model.state_dict()) == keys

    model.eval()
    with torch.no_grad():
        checks["a_exact"] = all_bit_equal(_forward(model, x, SEED), ref)

    result.leftover_modules = [o.to_dict() for o in count.leftover_modules(model, rep)]
    fx_left, result.fx_error = count.leftover_fx(model)
    result.leftover_fx = None if fx_left is None else [o.to_dict() for o in fx_left]

    model.train()
    xg = x.clone().requires_grad_(True)
    out = _forward(model, xg, SEED + 1)
    floats = [o for o in out if o.is_floating_point() and o.requires_grad]
    try:
        sum(o.float().sum() for o in floats).backward()
        checks["d_backward"] = bool(floats) and xg.grad is not None
    except Exception as e:  # noqa: BLE001
        checks["d_backward"] = False
        result.reason = f"backward: {_why(e)}"
    if checks["d_backward"]:  # the audit runs the same step on a copy, recording what ran outside GAAF
        result.leftover_runtime = [f.to_dict() for f in audit(model, x).findings]
    with torch.no_grad(), droppath_held(model):
        first = _forward(model, x, SEED + 2)
        checks["c_deterministic"] = all_bit_equal(_forward(model, x, SEED + 3), first) and not result.silent("random")

    misses = result.misses()
    checks["b_complete"] = (
        not result.unreached and misses["modules"] == 0 and misses["fx"] <= 0 and not misses["runtime"]
    )
    failed = [k for k, v in checks.items() if not v]
    result.status = PASS if not failed else FAIL
    if failed and not result.reason:
        result.reason = _explain(result, failed)


def _explain(result: Result, failed: list[str]) -> str:
    why = []
    for k in failed:
        if k == "b_complete":
            parts = [f"{u['name']}: {u.get('reason', '')}" for u in result.unreached[:3]]
            parts += [f"{m['what']} at {m['where']}" for m in result.leftover_modules if not m["gate"]][:3]
            parts += [f"fx {m['what']} at {m['where']}" for m in result.leftover_fx or [] if not m["gate"]][:3]
            ran = result.silent("activation")[:3]
            parts += [f"ran {f['op']} x{f['count']} in {f['module'] or '<root>'}" for f in ran]
            why.append("not fully patched: " + "; ".join(parts))
        else:
            why.append({
                "a_exact": "eval output differs from the unpatched model",
                "c_deterministic": "train-mode forward not deterministic after stripping dropout"
                + "".join(f"; ran {f['op']} in {f['module'] or '<root>'}" for f in _unexplained_noise(result)[:3]),
                "d_backward": "backward does not reach the input",
                "e_state_dict": "state_dict keys changed",
            }[k])  # fmt: skip
    return "; ".join(why)


def _unexplained_noise(result: Result) -> list[dict[str, Any]]:
    """Silent random ops, then the audit's sampling draws (explained as part of a model, but this sweep compares
    two seeds: a draw makes the forward differ)."""
    return result.silent("random") + [f for f in result.leftover_runtime if f.get("kind") == "draw"]
