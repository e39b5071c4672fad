"""Moved to tests/helpers.py, the one module of shared test code. Only until the test modules that still import
from here (test_compile, test_compose, test_fuse, test_kernels, test_perf_invariants, test_variance) import from
tests.helpers; then this file goes."""

from tests.helpers import EveryForm, SmallCNN, mlp

__all__ = ["EveryForm", "SmallCNN", "mlp"]
