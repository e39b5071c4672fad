"""Probes of what dropout and GAAF do to a model's training signal."""

from .variance import SiteNoise, eq6_variance, net_variance

__all__ = ["SiteNoise", "eq6_variance", "net_variance"]
