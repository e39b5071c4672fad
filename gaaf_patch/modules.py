"""The modules a patch leaves in a model: :class:`GAAF` for an activation, :class:`StrippedDropout` for dropout.

Both remember what they replaced (outside the module tree, so ``state_dict`` keys do not change) and describe the
site they sit at, so the report is read off the model itself and ``unpatch`` can put everything back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from . import activations as _acts
from . import ops
from .shapes import ShapeFn, resolve

__all__ = ["GAAF", "StrippedDropout", "Site"]


@dataclass(frozen=True)
class Site:
    """Where a replacement sits: qualified name, form (module / function / method), what was there."""

    name: str
    form: str
    target: str  # what the original code called: a class name, ``torch.nn.functional.relu``, ``.relu_``, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NOT_SCRIPTABLE = (
    "torch.jit.script cannot compile a gaaf-patched model (GAAF is an autograd Function with Python-side state; "
    "TorchScript is deprecated): use torch.compile (gaaf.compile(model) or backend='gaaf') or torch.export"
)


def refuse_script(*_args: Any) -> None:
    """``__prepare_scriptable__``: torch.jit.script calls it first; one clear error instead of a parser's."""
    from .errors import GaafError

    raise GaafError(NOT_SCRIPTABLE)


class GAAF(nn.Module):
    """A GAAF activation: ``phi(x) [+ g(x) s(x)]`` forward, ``phi'(x) + s(x)`` backward.

    ``GAAF("tanh")`` uses tanh's default shape; ``GAAF("leaky_relu", "relu_keras", negative_slope=0.1)`` picks one.
    """

    delta: float | None = None  # GAAF modules pickled before the auto gain existed load with the paper's form

    def __init__(
        self,
        activation: str,
        shape: str | ShapeFn | Any | None = None,
        *,
        mode: ops.Mode = "exact",
        K: float = ops.DEFAULT_K,
        site: Site | None = None,
        original: Any = None,
        phi: Any = None,
        delta: float | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        ops.check_mode(mode, K)
        # The auto gain's energy allowance (gaaf_patch.gain; None: the paper's phi' + s). ``patch`` sets it from the
        # number of sites in the model; a plain attribute, not state.
        self.delta = ops.check_gain(mode, delta)
        self.act = _acts.get(activation)
        self.params = self.act.params(params)
        self.shape = resolve(shape if shape is not None else activation)
        self.mode, self.K = mode, float(K)
        self.site = site
        # A non-inplace copy of a timm activation whose formula differs from torch's in the last bit; kept out of the
        # module tree like the original (no state, and the passes must not see it).
        object.__setattr__(self, "phi", phi)
        # Kept out of the module tree: it holds no state, and state_dict keys must not change.
        object.__setattr__(self, "_gaaf_original", original)

    @property
    def activation(self) -> str:
        return self.act.name

    def forward(self, x: Tensor) -> Tensor:
        return ops.apply(x, self.act, self.shape, self.mode, self.K, self.params, self.phi, self.delta)

    def extra_repr(self) -> str:
        p = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{self.act.name}{p}, shape={self.shape!r}, gain={self.gain}, mode={self.mode}" + (
            f", K={self.K:g}" if self.mode == "sawtooth" else ""
        )

    @property
    def gain(self) -> str:
        """``auto(delta=...)``: the depth-safe blend (gaaf_patch.gain); ``paper``: ``phi' + s``."""
        return "paper" if self.delta is None else f"auto(delta={self.delta:.4g})"

    __prepare_scriptable__ = refuse_script

    def describe(self) -> dict[str, Any]:
        """The report entry for this site."""
        site = self.site.to_dict() if self.site else {"name": "", "form": "module", "target": ""}
        return {
            **site,
            "activation": self.act.name,
            "params": dict(self.params),
            "shape": self.shape.spec,
            "gain": self.gain,
            "mode": self.mode,
            "K": self.K,
        }


class StrippedDropout(nn.Identity):
    """Identity standing where dropout was. ``p`` is 0, so code that reads ``self.attn_drop.p`` (timm's fused
    attention passes it to ``scaled_dot_product_attention``) stops dropping too."""

    p = 0.0
    inplace = False

    def __init__(self, site: Site, original: Any, original_p: float | None = None) -> None:
        super().__init__()
        self.site = site
        self.original_p = original_p
        object.__setattr__(self, "_gaaf_original", original)

    def extra_repr(self) -> str:
        return f"was {self.site.target}" + (f"(p={self.original_p})" if self.original_p is not None else "")

    def describe(self) -> dict[str, Any]:
        return {**self.site.to_dict(), "p": self.original_p}


def original_of(module: nn.Module) -> Any:
    return module.__dict__.get("_gaaf_original")
