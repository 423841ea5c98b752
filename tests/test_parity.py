"""The Keras AccumOptimizer and the torch mirror give the same numbers.

Same MLP, same initial weights, same data, same configuration (SGD with
momentum, merge_grad=4, global_clipnorm, EMA): the weights and the EMA agree
within 1e-5 after several windows, and so do the counters. The Keras side
trains with `train_on_batch` (the mean squared error of each micro-batch), on
whichever Keras backend runs the test.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keras_accum import AccumOptimizer as KerasAccum  # noqa: E402
from keras_accum.torch import AccumOptimizer as TorchAccum  # noqa: E402

CONFIG = dict(merge_grad=4, global_clipnorm=0.5, use_ema=True, ema_momentum=0.9)


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (2.0 * np.sin(x @ rng.normal(size=(5, 1)))).astype("float32")
    return x, y


def _keras_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )


def _torch_model(keras_model):
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    k1, b1, k2, b2 = keras_model.get_weights()
    with torch.no_grad():
        for layer, kernel, bias in ((model[0], k1, b1), (model[2], k2, b2)):
            layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
            layer.bias.copy_(torch.from_numpy(bias))
    return model


def _torch_weights(model):
    # Copies: `.numpy()` shares memory with the parameter.
    return [
        model[0].weight.detach().numpy().T.copy(),
        model[0].bias.detach().numpy().copy(),
        model[2].weight.detach().numpy().T.copy(),
        model[2].bias.detach().numpy().copy(),
    ]


def test_keras_and_torch_agree_on_weights_ema_and_counters():
    x, y = _data()
    kmodel = _keras_model()
    tmodel = _torch_model(kmodel)
    kopt = KerasAccum(keras.optimizers.SGD(0.1, momentum=0.9), **CONFIG)
    topt = TorchAccum(torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9), **CONFIG)
    kmodel.compile(optimizer=kopt, loss="mse")

    for i in range(0, len(x), 8):  # 12 micro-batches of 8: 3 updates
        xb, yb = x[i : i + 8], y[i : i + 8]
        kmodel.train_on_batch(xb, yb)

        tloss = torch.mean((tmodel(torch.from_numpy(xb)) - torch.from_numpy(yb)) ** 2)
        tloss.backward()
        topt.step()
        topt.zero_grad()

    assert int(kopt.iterations.numpy()) == topt.iterations == 3
    assert int(kopt.micro_steps.numpy()) == topt.micro_steps == 12
    # Clipping was active: the merged gradient's norm exceeded global_clipnorm.
    assert float(kopt.last_grad_norm.numpy()) > CONFIG["global_clipnorm"]
    np.testing.assert_allclose(
        float(kopt.last_grad_norm.numpy()), float(topt.last_grad_norm), rtol=1e-5
    )
    for a, b in zip(kmodel.get_weights(), _torch_weights(tmodel)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with kopt.swap_ema_weights(), topt.swap_ema_weights():
        kema, tema = kmodel.get_weights(), _torch_weights(tmodel)
    for a, b in zip(kema, tema):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The EMA differs from the weights (it really averaged something).
    assert max(np.abs(a - b).max() for a, b in zip(kema, kmodel.get_weights())) > 1e-4
