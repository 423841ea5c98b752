"""Keras AccumOptimizer: a step is whole or it never happened, on every backend.

Each test failed on the version before it was written; the numbers are
float64 NumPy arithmetic of the contract (docs/semantics.md), or a plain
large-batch run.

- whatever raises inside a micro-step or a flush (the inner optimizer
  included) leaves the window, its counters and the weights as they were,
  and the retried step gives the contract's numbers (points 2 and 8);
- a growing loss scale: the window is unscaled by the scale it was
  accumulated at, not by the one the update grows it to (point 16);
- traced steps (`train_on_batch`, `fit`) and eager `apply_gradients` mixed,
  and `stateless_apply` called outside `jax.jit`: the window's position is
  the state's, never a host copy that a cached traced step left behind.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from keras_driver import BACKEND, small_data, small_model, values

from keras_accum import AccumOptimizer


class _FailsOnce(keras.optimizers.SGD):
    """SGD whose `apply` raises on the call numbered `fail_at` (1-based), before any write."""

    def __init__(self, learning_rate, fail_at):
        super().__init__(learning_rate)
        self.fail_at = fail_at
        self.calls = 0

    def apply(self, grads, trainable_variables=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("inner optimizer failed")
        return super().apply(grads, trainable_variables)


def _window_state(opt):
    """The window as its variables hold it: accumulators, counters, update scalars."""
    state = [opt._seen, opt._window_weight, opt._window_steps, opt._micro_steps]
    state += [opt._last_grad_norm, opt._skipped_updates, *opt._accumulators]
    return values(state)


def _same(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"[{i}]")


GRADS = [np.array([1.0, -2.0]), np.array([3.0, 0.5]), np.array([-1.0, 4.0])]
LR = 0.5


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("merge_grad", [1, 2, 3])
def test_inner_failure_at_the_update_leaves_the_window_and_the_retry_is_exact(
    merge_grad, jit_compile
):
    """The update's inner step raises once: nothing moved; the same micro-step
    again gives the mean of the window, as if the failure never happened."""
    v = keras.Variable(np.zeros(2), dtype="float32")
    opt = AccumOptimizer(
        _FailsOnce(LR, fail_at=1), merge_grad=merge_grad, jit_compile=jit_compile
    )
    opt.build([v])
    grads = GRADS[:merge_grad]
    for g in grads[:-1]:
        opt.apply([ops.convert_to_tensor(g, "float32")], [v])
    before, weights = _window_state(opt), values([v])
    with pytest.raises(RuntimeError, match="inner optimizer failed"):
        opt.apply([ops.convert_to_tensor(grads[-1], "float32")], [v])
    _same(_window_state(opt), before)
    _same(values([v]), weights)
    opt.apply([ops.convert_to_tensor(grads[-1], "float32")], [v])
    expected = -LR * np.mean(grads, axis=0)
    np.testing.assert_allclose(values([v])[0], expected, rtol=1e-6)
    assert int(ops.convert_to_numpy(opt.window_steps)) == 0
    assert int(ops.convert_to_numpy(opt.iterations)) == 1
    # The next window starts from zeros.
    for g in grads:
        opt.apply([ops.convert_to_tensor(g, "float32")], [v])
    np.testing.assert_allclose(values([v])[0], 2 * expected, rtol=1e-6)


def test_inner_failure_in_flush_leaves_the_window_and_the_retry_is_exact():
    v = keras.Variable(np.zeros(2), dtype="float32")
    opt = AccumOptimizer(_FailsOnce(LR, fail_at=1), merge_grad=4)
    for g in GRADS[:2]:
        opt.apply([ops.convert_to_tensor(g, "float32")], [v])
    before = _window_state(opt)
    with pytest.raises(RuntimeError, match="inner optimizer failed"):
        opt.flush()
    _same(_window_state(opt), before)
    _same(values([v]), [np.zeros(2, np.float32)])
    assert opt.flush() is True
    np.testing.assert_allclose(values([v])[0], -LR * np.mean(GRADS[:2], axis=0), rtol=1e-6)
    assert int(ops.convert_to_numpy(opt.window_steps)) == 0


@pytest.mark.parametrize("jit_compile", [True, False])
def test_a_failed_micro_step_under_raise_and_weights_retried_is_counted_once(jit_compile):
    """`on_nonfinite="raise"` and micro-step weights: the inner failure at the
    update, then the retry: the weighted mean of the window, counted once."""
    v = keras.Variable(np.zeros(2), dtype="float32")
    opt = AccumOptimizer(
        _FailsOnce(LR, fail_at=1), merge_grad=2, on_nonfinite="raise", jit_compile=jit_compile
    )
    opt.apply([ops.convert_to_tensor(GRADS[0], "float32")], [v], weight=3.0)
    with pytest.raises(RuntimeError, match="inner optimizer failed"):
        opt.apply([ops.convert_to_tensor(GRADS[1], "float32")], [v], weight=1.0)
    opt.apply([ops.convert_to_tensor(GRADS[1], "float32")], [v], weight=1.0)
    expected = -LR * (3.0 * GRADS[0] + GRADS[1]) / 4.0
    np.testing.assert_allclose(values([v])[0], expected, rtol=1e-6)
    assert float(ops.convert_to_numpy(opt.window_weight)) == 0.0


def _fit_modes():
    return {"tensorflow": [False, True], "jax": [True, False], "torch": [False]}[BACKEND]


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", _fit_modes())
@pytest.mark.parametrize("merge_grad", [1, 2])
def test_loss_scale_growing_every_window_unscales_by_the_windows_own_scale(
    merge_grad, jit_compile
):
    """A LossScaleOptimizer that doubles its scale after every good window
    (`dynamic_growth_steps=1`): each window is divided by the scale its
    gradients were scaled with, so `fit` equals plain SGD on the large batch."""
    x, y = small_data(32)
    ours, large = small_model(), small_model()
    scaled = keras.optimizers.LossScaleOptimizer(
        AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=merge_grad),
        initial_scale=4.0,
        dynamic_growth_steps=1,
    )
    ours.compile(optimizer=scaled, loss="mse", jit_compile=jit_compile)
    large.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    ours.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    large.fit(x, y, batch_size=4 * merge_grad, epochs=1, shuffle=False, verbose=0)
    updates = 32 // (4 * merge_grad)
    assert float(ops.convert_to_numpy(scaled.dynamic_scale)) == 4.0 * 2**updates
    for a, b in zip(values(ours.trainable_variables), values(large.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def _constant_gradient_model():
    """`mae` of a bias-free Dense(1) on all-ones rows, targets far above: every
    batch's gradient is -1 for each of the 3 weights, whatever they are."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]
    )
    x = np.ones((2, 3), np.float32)
    y = np.full((2, 1), 1e4, np.float32)
    return model, x, y


def test_traced_and_eager_micro_steps_mixed_keep_the_window_position():
    """`train_on_batch` (a traced step, cached after its first call) and eager
    `apply_gradients` alternate in windows of 2: every window holds one of each,
    so each update moves the kernel by `-lr * mean(-1, 3)`."""
    model, x, y = _constant_gradient_model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    model.compile(optimizer=opt, loss="mae")
    g = [ops.full((3, 1), 3.0)]
    for _ in range(3):
        model.train_on_batch(x, y)
        opt.apply_gradients(zip(g, model.trainable_variables))
    assert int(ops.convert_to_numpy(opt.window_steps)) == 0
    assert int(ops.convert_to_numpy(opt.iterations)) == 3
    np.testing.assert_allclose(values(model.trainable_variables)[0], 1.0 - 3 * 0.1 * 1.0, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="stateless_apply is JAX's")
def test_stateless_apply_outside_jit_does_not_move_the_windows_position():
    """`stateless_apply` called eagerly returns new values and writes nothing:
    the next `apply` is still at the position the variables hold."""
    v = keras.Variable(np.zeros(2), dtype="float32")
    opt = AccumOptimizer(keras.optimizers.SGD(LR), merge_grad=2)
    opt.build([v])
    g = [ops.convert_to_tensor(GRADS[0], "float32")]
    opt.apply(g, [v])  # position 1 of 2
    state = [x.value for x in opt.variables]
    new_weights, _ = opt.stateless_apply(state, g, [v.value])  # would close: not written
    np.testing.assert_allclose(np.asarray(new_weights[0]), -LR * GRADS[0], rtol=1e-6)
    assert int(ops.convert_to_numpy(opt.window_steps)) == 1
    opt.apply([ops.convert_to_tensor(GRADS[1], "float32")], [v])  # closes the window
    np.testing.assert_allclose(values([v])[0], -LR * (GRADS[0] + GRADS[1]) / 2, rtol=1e-6)
    assert int(ops.convert_to_numpy(opt.window_steps)) == 0


class _FailsAtBatch(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError("a callback failed")


@pytest.mark.slow
def test_a_fit_that_raised_leaves_no_train_end_flush_behind():
    """`FlushWindow(on="train_end")` in a `fit` that raises
    mid-epoch (Keras then calls no `on_train_end`): a later `fit` without the callback
    keeps its open window, as any `fit` without it does."""
    from keras_accum.keras.callbacks import FlushWindow

    x, y = small_data(12)
    model = small_model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=4)
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(RuntimeError, match="a callback failed"):
        model.fit(
            x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
            callbacks=[FlushWindow(on="train_end"), _FailsAtBatch(batch=1)],
        )
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(ops.convert_to_numpy(opt.window_steps)) != 0


class _RaisesInTraining(keras.layers.Layer):
    def call(self, x, training=None):
        if training:
            raise ValueError("the train step failed")
        return x


@pytest.mark.parametrize("flush", [False, True])
def test_a_fit_whose_first_step_raises_raises_that_error(flush):
    """The end of `fit` (`finalize_variable_values`: the EMA written, a
    `FlushWindow(on="train_end")`) after a train step that raised: the step's
    error reaches the user, not one of ours. Keras's JAX `fit` calls it with
    the state still out of the variables; it read them and raised `TypeError`."""
    from keras_accum.keras.callbacks import FlushWindow

    x, y = small_data(8)
    model = keras.Sequential([keras.Input((5,)), _RaisesInTraining(), keras.layers.Dense(2)])
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, use_ema=True)
    model.compile(optimizer=opt, loss="mse")
    callbacks = [FlushWindow(on="train_end")] if flush else []
    with pytest.raises(ValueError, match="the train step failed"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=callbacks)
