"""The paper's measurements, on any model, patched or not.

- :class:`GradientInfo`: gradient information per layer (eq. 5), cheap enough for every training step;
- :class:`NetValues`: net (pre-activation) histograms and the fraction in the saturation area per site;
- :class:`NodeCorrelations`: Pearson correlations between node values per layer, counts above thresholds (Table 1);
- :func:`net_variance`: the net variance dropout induces per site, from repeated masks and by eq. 6 (Table 3);
- :func:`forward_over`: one no-grad pass over a data set, for the probes attached at the time;
- :mod:`~gaaf_patch.analysis.plots`: the paper's figures from these results.

Every probe is hook-based: attach it with ``with`` and its hooks are gone when the block ends, so a model carries no
cost when it is not measured. Results are plain dicts of floats and numpy arrays. Sites are chosen by module type,
GAAF site or name (:func:`~gaaf_patch.analysis.sites.select`).
"""

from .correlations import THRESHOLDS, NodeCorrelations, correlation_counts
from .gradients import GradientInfo
from .netvalues import DEFAULT_SATURATION, NetValues
from .sites import forward_over, select
from .variance import SiteNoise, eq6_variance, net_variance

__all__ = [
    "GradientInfo",
    "NetValues",
    "NodeCorrelations",
    "forward_over",
    "select",
    "correlation_counts",
    "net_variance",
    "eq6_variance",
    "SiteNoise",
    "THRESHOLDS",
    "DEFAULT_SATURATION",
]
