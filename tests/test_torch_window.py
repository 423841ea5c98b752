"""Where the torch window lives (keras_accum/torch/_window.py): flush, weights.

Each window is checked against the NumPy oracle of the contract
(`tests/reference.py`), never against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum.torch import AccumOptimizer

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref


@pytest.mark.parametrize("weighted", [False, True], ids=["grad", "weight"])
def test_flush_in_the_epoch_loop_applies_each_window_once(weighted):
    """The documented epoch loop: step() and zero_grad() per micro-batch, flush() per epoch.

    3 micro-batches an epoch, merge_grad=2, every gradient 1, SGD(lr=1): each
    update moves the weight by -1 (the oracle's), and after each flush every
    accumulator is clear (docs/semantics.md, point 2). The flushed window
    was left in `.grad`, where the next epoch's first backward added to it:
    the updates moved -1, -1, -1.5, -1.
    """
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=2)
    oracle = ref.RefAccum([np.zeros(1, np.float32)], ref.RefSGD(1.0), merge_grad=2)
    moves, last = [], 0.0
    for _ in range(3):
        for _ in range(3):
            p.sum().backward()
            opt.step(weight=1.0 if weighted else None)
            opt.zero_grad()
            oracle.step([np.ones(1, np.float32)], 1.0)
            if float(p.detach()) != last:
                moves.append(float(p.detach()) - last)
                last = float(p.detach())
        assert opt.flush() is True
        oracle.flush()
        moves.append(float(p.detach()) - last)
        last = float(p.detach())
        assert p.grad is None
        assert opt.window_steps == 0 and opt.window_weight == 0.0
        assert not any("accumulator" in s for s in opt.state.values())
        np.testing.assert_array_equal(p.detach().numpy(), oracle.params[0])
    assert moves == [-1.0] * 6
    assert opt.iterations == oracle.iterations == 6


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"accumulator_dtype": torch.float64}, {"on_nonfinite": "raise"}],
    ids=["grad", "float64_buffers", "raise"],
)
def test_a_first_weight_mid_window_is_refused_in_every_mode(kwargs):
    """docs/semantics.md, point 15: pass `weight` from a window's first micro-step on.

    The rule holds in every mode, not only where the window lives in `.grad`
    (side buffers accepted it, weighing the earlier micro-steps 1). The
    refused micro-step changes nothing; the window goes on without weights.
    """
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=3, **kwargs)
    p.sum().backward()
    opt.step()
    opt.zero_grad()
    (2.0 * p).sum().backward()
    before = {k: v.clone() for k, v in opt.state.get(p, {}).items()}
    with pytest.raises(
        RuntimeError,
        match=r"first passed at window position 2 of 3: pass `weight` from the first "
        r"micro-step of a window on \(e\.g\. always\).*Nothing was changed",
    ):
        opt.step(weight=2.0)
    assert (opt.window_steps, opt.micro_steps, opt.window_weight) == (1, 1, 1.0)
    assert {k: v for k, v in opt.state.get(p, {}).items()}.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v)
    opt.step()
    opt.zero_grad()
    (3.0 * p).sum().backward()
    opt.step()
    # (1 + 2 + 3) / 3, as the oracle: no weight was taken.
    torch.testing.assert_close(p.detach(), torch.full((2,), -2.0, dtype=p.dtype))
