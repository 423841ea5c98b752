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
    # Measured by the demo, not asserted by it: the EMA changed at the updates only.
    assert "EMA:      moved at 2 of the 2 updates and at 0 of the 6 micro-steps between" in out
    for label in ("Clipping:", "Skip:"):
        assert label in out


def test_help_explains_every_option(capsys):
    from keras_accum.demo import _parser, main

    undocumented = [a.option_strings for a in _parser()._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--framework", "--merge-grad", "--micro-batch", "--epochs", "--samples",
                   "--seed", "--no-builtin"):
        assert option in out
    assert "(default: 4)" in out and "examples:" in out


def test_torch_hint_installs_the_build_for_the_machine_first(monkeypatch, capsys):
    """Without torch the demo says how to install it without pulling CUDA by accident."""
    from keras_accum.demo import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(["--framework", "torch"]) == 2
    err = capsys.readouterr().err
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in err
    assert 'pip install "keras_accum[torch]"' in err
    assert "e.g. `pip install torch`" not in err


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
    # What the built-in does differently, as measured (tests/test_keras_builtin_claims.py):
    # the schedule and the EMA; not the clipping (once per update on one device).
    assert "the cosine decays 4x too fast" in result.stdout
    assert "moves the EMA on every micro-step" in result.stdout
    assert "clips each micro-batch" not in result.stdout
    assert "it clips the merged mean once" in result.stdout
    assert any(s.startswith("EMA:      moved at 2 of the 2 updates and at 0 of the 6") for s in lines)
    assert "MATCH: accumulation reproduces large-batch training" in lines
