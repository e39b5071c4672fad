"""Shared fixtures. ``mnist_dir`` skips (with the reason) when real MNIST is not on disk: CI has it via
``GAAF_DATA_DIR`` (set by .ci/run from ../shared/data); a laptop without it skips rather than downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaaf_patch import data

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    for where in (data.data_dir(), _SHARED):
        if data.mnist_available(where):
            return where
    pytest.skip(f"MNIST not on disk (looked in {data.data_dir()} and {_SHARED}); set {data.ENV} to run this test")
