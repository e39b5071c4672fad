"""benchmarks/hf_overhead.py, one repeat at the tiny size: it measures what it says (the three runners are the plain
model with its dropout, the same without, and the patched one), and the JSON it writes names the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks import hf_overhead  # noqa: E402


def test_one_repeat_writes_ratios_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "hf.json"
    assert hf_overhead.main(["--models", "bert", "--repeats", "1", "--inner", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python -m benchmarks.hf_overhead") and doc["size"] == "tiny"
    r = doc["results"]["bert"]
    for runner in ("gaaf", "plain_nodrop"):
        assert math.isfinite(r[runner]["ratio"]) and r[runner]["ratio"] > 0
    # BERT's shrunk config has 2 layers: 2 GELU + the pooler's tanh replaced; every Dropout module stripped
    assert r["replaced"] == 3
    assert r["stripped"] >= 5 and r["runtime_scopes"] >= 1
