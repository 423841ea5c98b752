"""The torch EMA (keras_accum/torch/_ema.py) against the contract's formula."""

from __future__ import annotations

import numpy as np
import torch

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum.torch import AccumOptimizer

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref


def test_ema_of_an_infinite_weight_follows_the_formula_not_lerp():
    """docs/semantics.md, point 9: `ema = m * ema + (1 - m) * w`, also for inf.

    Under `on_nonfinite="ignore"` an inf gradient makes a weight -inf; the
    formula keeps the EMA at -inf from then on (as the Keras side does),
    where `lerp` gave NaN (`ema + (1 - m) * (w - ema)` is `inf - inf`).
    Expected: the NumPy oracle.
    """
    grads = [[np.array([0.5, 1.0], np.float32)], [np.array([np.inf, 1.0], np.float32)]]
    grads += [[np.array([0.25, -1.0], np.float32)]] * 3
    kwargs = dict(use_ema=True, ema_momentum=0.9, on_nonfinite="ignore")
    oracle = ref.RefAccum([np.ones(2, np.float32)], ref.RefSGD(0.1), **kwargs)
    p = torch.nn.Parameter(torch.ones(2))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=0.1), **kwargs)
    for g in grads:
        oracle.step(g)
        p.grad = torch.tensor(g[0])
        opt.step()
        expected = oracle.ema[0]
        ema = opt.state[p]["ema"].numpy()
        np.testing.assert_array_equal(np.isnan(ema), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(ema), np.isinf(expected))
        np.testing.assert_allclose(ema, expected, rtol=1e-6)
    assert np.isneginf(oracle.ema[0][0]) and np.isneginf(opt.state[p]["ema"][0].item())
