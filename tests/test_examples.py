"""Smoke test: every script in examples/ runs to completion and prints its final ``ok``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 120
# Scripts that need an optional dependency (skipped without it) or more time than the others.
NEEDS = {"08_hf_trainer.py": "transformers", "10_hf_trainer_distributed.py": "transformers"}
# transformers' import and Trainer's set-up, on a shared CI core
TIMEOUTS = {"08_hf_trainer.py": 300, "10_hf_trainer_distributed.py": 300}


def test_examples_found():
    assert len(EXAMPLES) >= 7, EXAMPLES
    assert "08_hf_trainer.py" in {p.name for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path):
    if script.name in NEEDS:
        pytest.importorskip(NEEDS[script.name])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUTS.get(script.name, TIMEOUT_S),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{output[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].strip() == "ok", f"{script.name} did not print 'ok' last:\n{output[-4000:]}"


def test_example_scripts_are_standalone():
    for script in EXAMPLES:
        text = script.read_text()
        assert text.lstrip().startswith('"""'), f"{script.name}: no top docstring"
        assert 'if __name__ == "__main__":' in text, f"{script.name}: no __main__ guard"
        assert f"python examples/{script.name}" in text, f"{script.name}: docstring does not say how to run it"


def test_timm_train_script_doc():
    doc = ROOT / "examples" / "07_timm_train_script.md"
    assert doc.is_file()
    assert "gaaf.patch" in doc.read_text()


def test_examples_readme_lists_every_example():
    readme = (ROOT / "examples" / "README.md").read_text()
    for script in EXAMPLES:
        assert script.name in readme, f"examples/README.md does not mention {script.name}"
