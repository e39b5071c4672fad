"""gaaf-patch: Gradient Acceleration in Activation Functions (Hahn & Choi, arXiv 1806.09783) as a model pass.

``model = gaaf_patch.patch(model)`` replaces the activations of any PyTorch model by GAAF activations: same
forward (bit for bit in the default ``exact`` mode), gradient ``phi'(x) + s(x)`` where the activation saturates.
"""

from . import analysis, shapes
from .activations import ACTIVATIONS
from .api import PatchError, patch, unpatch
from .audit import Audit, audit
from .backend import compile
from .calibrate import calibrate
from .config import PatchConfig
from .errors import GaafError
from .gradscale import GradientScale, measure_gradient_scale
from .modules import GAAF, StrippedDropout
from .ops import gaaf
from .report import Report, report
from .version import __version__  # noqa: F401 - the package version

__all__ = [
    "patch",
    "unpatch",
    "compile",
    "calibrate",
    "measure_gradient_scale",
    "GradientScale",
    "report",
    "audit",
    "Audit",
    "gaaf",
    "GAAF",
    "StrippedDropout",
    "PatchConfig",
    "PatchError",
    "GaafError",
    "Report",
    "shapes",
    "ACTIVATIONS",
    "analysis",
]
