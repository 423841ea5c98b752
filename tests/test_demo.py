"""`keras-accum-demo`: its claims hold and its first line comes first.

The demo's figures are checked against its own large-batch run (the plain
optimizer on batches of k * b), which is the oracle the demo prints.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--epochs", "1", "--samples", "64"]


def test_torch_demo_matches_large_batch(capsys):
    pytest.importorskip("torch")
    from keras_accum.demo import main

    assert main(["--framework", "torch", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "MATCH: accumulation reproduces large-batch training" in out
    assert "updates: 2 from 8 micro-steps (large batch: 2 updates)" in out
    for label in ("EMA:", "Clipping:", "Skip:"):
        assert label in out


@pytest.mark.slow
def test_keras_demo_prints_no_framework_noise_and_labels_the_builtin_gap():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "keras_accum.demo", *SMALL],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("keras_accum demo (keras): AccumOptimizer(merge_grad=4)")
    assert any("Keras's built-in gradient_accumulation_steps=4 vs large batch" in s for s in lines)
    assert "MATCH: accumulation reproduces large-batch training" in lines
