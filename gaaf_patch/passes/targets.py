"""What the passes match: tables of activation and dropout forms, as modules, functions and tensor methods.

Tables, not if-chains: a new form is one row. Each function row names the activation, the positional names of its
parameters after the input (to read ``F.leaky_relu(x, 0.2)``), and whether the call is in place. The same tables
serve the eager passes (``torch.fx`` graphs of user modules) and the Dynamo backend (Dynamo graphs).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import probe


@dataclass(frozen=True)
class FnForm:
    activation: str
    positional: tuple[str, ...] = ()  # parameter names after the input, in call order
    inplace: bool = False  # always in place (relu_, x.tanh_())


def _fn_rows() -> dict[Callable[..., Any], FnForm]:
    rows: dict[Callable[..., Any], FnForm] = {
        F.relu: FnForm("relu", ("inplace",)),
        torch.relu: FnForm("relu"),
        torch.relu_: FnForm("relu", inplace=True),
        F.relu_: FnForm("relu", inplace=True),
        F.relu6: FnForm("relu6", ("inplace",)),
        F.leaky_relu: FnForm("leaky_relu", ("negative_slope", "inplace")),
        torch._C._nn.leaky_relu: FnForm("leaky_relu", ("negative_slope",)),
        torch._C._nn.leaky_relu_: FnForm("leaky_relu", ("negative_slope",), inplace=True),
        F.elu: FnForm("elu", ("alpha", "inplace")),
        torch._C._nn.elu: FnForm("elu", ("alpha",)),
        F.selu: FnForm("selu", ("inplace",)),
        torch.selu: FnForm("selu"),
        F.celu: FnForm("celu", ("alpha", "inplace")),
        torch.celu: FnForm("celu", ("alpha",)),
        F.gelu: FnForm("gelu", ("approximate",)),  # F.gelu is torch._C._nn.gelu
        F.silu: FnForm("silu", ("inplace",)),
        torch._C._nn.silu: FnForm("silu"),
        F.mish: FnForm("mish", ("inplace",)),
        torch._C._nn.mish: FnForm("mish"),
        F.softplus: FnForm("softplus", ("beta", "threshold")),  # F.softplus is torch._C._nn.softplus
        torch.tanh: FnForm("tanh"),
        F.tanh: FnForm("tanh"),
        torch.tanh_: FnForm("tanh", inplace=True),
        F.hardtanh: FnForm("hardtanh", ("min_val", "max_val", "inplace")),
        torch._C._nn.hardtanh: FnForm("hardtanh", ("min_val", "max_val")),
        torch.sigmoid: FnForm("sigmoid"),
        F.sigmoid: FnForm("sigmoid"),
        torch.sigmoid_: FnForm("sigmoid", inplace=True),
        F.hardsigmoid: FnForm("hardsigmoid", ("inplace",)),
        torch._C._nn.hardsigmoid: FnForm("hardsigmoid"),
        F.hardswish: FnForm("hardswish", ("inplace",)),
        torch._C._nn.hardswish: FnForm("hardswish"),
    }
    return rows


FUNCTIONS: dict[Callable[..., Any], FnForm] = _fn_rows()

METHODS: dict[str, FnForm] = {
    "relu": FnForm("relu"),
    "relu_": FnForm("relu", inplace=True),
    "tanh": FnForm("tanh"),
    "tanh_": FnForm("tanh", inplace=True),
    "sigmoid": FnForm("sigmoid"),
    "sigmoid_": FnForm("sigmoid", inplace=True),
}


@dataclass(frozen=True)
class ModuleForm:
    activation: str
    params: Callable[[nn.Module], dict[str, Any]] = lambda m: {}
    own_phi: bool = False  # forward the original module (non-inplace copy): its math is not the torch function's


def _module_rows() -> dict[type, ModuleForm]:
    rows: dict[type, ModuleForm] = {
        nn.ReLU: ModuleForm("relu"),
        nn.ReLU6: ModuleForm("relu6"),
        nn.LeakyReLU: ModuleForm("leaky_relu", lambda m: {"negative_slope": m.negative_slope}),
        nn.ELU: ModuleForm("elu", lambda m: {"alpha": m.alpha}),
        nn.SELU: ModuleForm("selu"),
        nn.CELU: ModuleForm("celu", lambda m: {"alpha": m.alpha}),
        nn.GELU: ModuleForm("gelu", lambda m: {"approximate": m.approximate}),
        nn.SiLU: ModuleForm("silu"),
        nn.Mish: ModuleForm("mish"),
        nn.Softplus: ModuleForm("softplus", lambda m: {"beta": m.beta, "threshold": m.threshold}),
        nn.Tanh: ModuleForm("tanh"),
        nn.Hardtanh: ModuleForm("hardtanh", lambda m: {"min_val": m.min_val, "max_val": m.max_val}),
        nn.Sigmoid: ModuleForm("sigmoid"),
        nn.Hardsigmoid: ModuleForm("hardsigmoid"),
        nn.Hardswish: ModuleForm("hardswish"),
    }
    try:  # timm's own classes are not subclasses of torch's
        from timm.layers import activations as ta
        from timm.layers import activations_me as tme

        rows.update(
            {
                ta.GELU: ModuleForm("gelu"),
                ta.GELUTanh: ModuleForm("gelu", lambda m: {"approximate": "tanh"}),
                ta.Sigmoid: ModuleForm("sigmoid"),
                ta.Tanh: ModuleForm("tanh"),
                ta.Swish: ModuleForm("silu", own_phi=True),
                ta.QuickGELU: ModuleForm("quick_gelu", own_phi=True),
                ta.Mish: ModuleForm("mish", own_phi=True),
                ta.HardSwish: ModuleForm("hardswish", own_phi=True),
                ta.HardSigmoid: ModuleForm("hardsigmoid", own_phi=True),
                tme.SwishMe: ModuleForm("silu", own_phi=True),
                tme.MishMe: ModuleForm("mish", own_phi=True),
                tme.HardSwishMe: ModuleForm("hardswish", own_phi=True),
                tme.HardSigmoidMe: ModuleForm("hardsigmoid", own_phi=True),
            }
        )
    except ImportError:
        pass
    return rows


MODULES: dict[type, ModuleForm] = _module_rows()


def module_form(m: nn.Module) -> ModuleForm | None:
    """The row for ``m``: its class, or a subclass that does not override ``forward``; else, for a module called
    like an activation, the activation its values show (:mod:`.probe`), forwarding the module itself."""
    for cls in type(m).__mro__:
        if cls in MODULES:
            return MODULES[cls] if type(m).forward is cls.forward else None
    found = probe.identify(m)
    if found is None or found == probe.IDENTITY:
        return None
    name, params = found
    return ModuleForm(name, lambda _m, p=params: dict(p), own_phi=True)


DROPOUT_MODULES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

DROPOUT_FUNCTIONS: set[Callable[..., Any]] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.dropout_,
    torch.alpha_dropout,
    torch.feature_alpha_dropout,
    torch.feature_dropout,
}

SDPA = F.scaled_dot_product_attention
SDPA_DROPOUT_INDEX = 4  # (query, key, value, attn_mask, dropout_p, ...)


def _droppath_modules() -> tuple[type, ...]:
    found: list[type] = []
    try:
        from timm.layers import DropPath

        found.append(DropPath)
    except ImportError:
        pass
    try:
        from torchvision.ops import StochasticDepth

        found.append(StochasticDepth)
    except ImportError:
        pass
    return tuple(found)


DROPPATH_MODULES: tuple[type, ...] = _droppath_modules()
# Any other library's stochastic depth (Hugging Face defines one per model: BeitDropPath, ConvNextDropPath, ...) is
# recognised by its class name, with its rate in ``drop_prob`` / ``p``: a rule, not a list.
_DROPPATH_NAME = re.compile(r"DropPath|StochasticDepth")
# Float attributes a forward reads as a random layer-skipping probability (Hugging Face's LayerDrop).
LAYERDROP_ATTRS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")


# Any other library's dropout module (SEW-D's StableDropout) is recognised by its class name ending in "Dropout",
# with its rate in ``p`` / ``drop_prob`` / ``drop_rate``, holding no parameters, buffers or children and called on
# one tensor: replaced like nn.Dropout. timm's PatchDropout (rate in ``prob``; it drops tokens) does not match.
_DROPOUT_NAME = re.compile(r"Dropout$")


def is_named_dropout(module: nn.Module) -> bool:
    """A dropout module of another library, recognised by the rule above (not torch's own, not DropPath)."""
    if isinstance(module, DROPOUT_MODULES) or not _DROPOUT_NAME.search(type(module).__name__) or is_droppath(module):
        return False
    if module._modules or module._parameters or module._buffers or drop_rate(module) is None:
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def is_droppath(module: nn.Module) -> bool:
    return isinstance(module, DROPPATH_MODULES) or bool(_DROPPATH_NAME.search(type(module).__name__))


def drop_rate(module: nn.Module) -> float | None:
    """The drop probability a dropout-like module holds (``p``, ``drop_prob``, ``drop_rate``), if any."""
    for attr in ("p", "drop_prob", "drop_rate"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _dropblock_modules() -> tuple[type, ...]:
    try:
        from timm.layers import DropBlock2d

        return (DropBlock2d,)
    except ImportError:
        return ()


DROPOUT_MODULES = DROPOUT_MODULES + _dropblock_modules()

# Names that, seen in the source of a forward we could not trace, mean an activation or dropout may hide there.
SUSPECT_NAMES: frozenset[str] = frozenset(
    {getattr(f, "__name__", "") for f in FUNCTIONS} | set(METHODS) | {"dropout", "alpha_dropout"}
) - {""}


def is_activation_node(node: Any) -> bool:
    """Whether an fx node calls an activation in function or method form (the rows above)."""
    if node.op == "call_function":
        return callable(node.target) and node.target in FUNCTIONS
    return node.op == "call_method" and node.target in METHODS


def read_params(form: FnForm, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
    """(activation params, inplace) from a call's arguments after the input."""
    given = dict(zip(form.positional, args, strict=False))
    given.update(kwargs)
    inplace = bool(given.pop("inplace", False)) or form.inplace
    return given, inplace
