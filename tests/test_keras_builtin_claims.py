"""What Keras's built-in `gradient_accumulation_steps` and `use_ema` do, measured.

The README's comparison table, the table "Differences from Keras's built-in"
in docs/semantics.md and the demo's explanation state these facts about
Keras's own optimizers. Each test measures one of them and asserts what was
measured, so a Keras release that changes the behaviour fails here and the
documents get corrected.

Backend-generic: `keras`, `keras.ops` and NumPy only (no TensorFlow, JAX or
torch import), so that CI runs this file under `KERAS_BACKEND=tensorflow`,
`jax` and `torch` (Keras picks its backend at the first import, so one process
per backend). Where the backends differ, the expected value is per backend.

Measured with Keras 3.15.1 (TensorFlow 2.21, JAX 0.10, torch 2.13, CPU):

    python tests/test_keras_builtin_claims.py    # prints every figure for $KERAS_BACKEND

This file does not import keras_accum: it is about Keras alone.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
K = 4  # gradient_accumulation_steps in every measurement


def _var(value=0.0, shape=(1,)):
    return keras.Variable(np.full(shape, value, "float32"), dtype="float32")


def _np(v):
    return np.array(keras.ops.convert_to_numpy(v))


def _apply(opt, grads, variables):
    opt.apply([keras.ops.convert_to_tensor(np.asarray(g, "float32")) for g in grads], variables)


# ------------------------------------------------------------ measurements
def schedule_steps_seen(updates=3):
    """The step the learning-rate schedule is called with at each update.

    SGD on `v` with gradient 1 and `ExponentialDecay(1, decay_steps=1,
    decay_rate=0.5)`: the update's step size is `0.5 ** step`, so
    `-log2(step size)` is the step the schedule saw.
    """
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    opt = keras.optimizers.SGD(schedule, gradient_accumulation_steps=K)
    v = _var()
    seen, before = [], _np(v)[0]
    for _ in range(updates * K):
        _apply(opt, [np.ones(1)], [v])
        after = _np(v)[0]
        if after != before:
            seen.append(int(round(-np.log2(before - after))))
        before = after
    return seen


def _sentinel_steps(opt, v, micro_steps):
    """Before each micro-step the EMA is set to 100 (far from the weights, near 0);
    returns, per micro-step, (the EMA moved, the EMA was written into the weights)."""
    ema = opt._model_variables_moving_average[0]
    out = []
    for _ in range(micro_steps):
        ema.assign(np.full((1,), 100.0, "float32"))
        _apply(opt, [np.ones(1)], [v])
        moved = _np(ema)[0] != 100.0
        written = abs(_np(v)[0]) > 10
        out.append((bool(moved), bool(written)))
        if written:  # put the weights back near 0 for the next micro-step
            v.assign(np.zeros((1,), "float32"))
    return out


def _ema_opt(**kwargs):
    opt = keras.optimizers.SGD(0.01, gradient_accumulation_steps=K, use_ema=True,
                               ema_momentum=0.5, **kwargs)
    v = _var()
    opt.build([v])
    return opt, v


def ema_moves(windows=2):
    """Per micro-step: did the EMA of the weights move?"""
    opt, v = _ema_opt()
    return [moved for moved, _ in _sentinel_steps(opt, v, windows * K)]


def ema_overwrites(frequency=2, windows=3):
    """1-based micro-steps at which `ema_overwrite_frequency` wrote the EMA into the weights."""
    opt, v = _ema_opt(ema_overwrite_frequency=frequency)
    steps = _sentinel_steps(opt, v, windows * K)
    return [i + 1 for i, (_, written) in enumerate(steps) if written]


def clipped_update(clip, grads=(3.0, -3.0, 3.0, -1.0)):
    """The weight change of one window of SGD(1.0) with the micro-gradients `grads`."""
    opt = keras.optimizers.SGD(1.0, gradient_accumulation_steps=K, **{clip: 1.0})
    v = _var()
    for g in grads:
        _apply(opt, [np.full(1, g)], [v])
    return float(-_np(v)[0])


def nonfinite_window(bad=np.inf):
    """One non-finite element in micro-step 2 of the first window, then finite windows.

    Returns the weights and the accumulators after the poisoned window's
    update and after the next micro-step (a finite gradient).
    """
    opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=K)
    v = _var(shape=(2,))
    grads = [np.ones(2)] * K
    grads[1] = np.array([bad, 1.0])
    for g in grads:
        _apply(opt, [g], [v])
    after_update = (_np(v), _np(opt._accumulated_gradients[0]))
    _apply(opt, [np.ones(2)], [v])
    after_next = (_np(v), _np(opt._accumulated_gradients[0]))
    return after_update, after_next


def iterations_after(micro_steps=10):
    opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=K)
    v = _var()
    for _ in range(micro_steps):
        _apply(opt, [np.ones(1)], [v])
    return int(_np(opt.iterations)), int(_np(opt._iterations))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


def _data(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")


def open_window_at_epoch_end():
    """`fit` with 6 micro-batches an epoch and K=4: where do the 2 left over go?

    Returns (updates after 1 epoch, accumulator sum after 1 epoch, updates
    after 2 more epochs, whether the optimizer has any way to apply the
    window now).
    """
    x, y = _data(24)
    model = _model()
    opt = keras.optimizers.SGD(0.01, gradient_accumulation_steps=K)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    one = int(_np(opt.iterations)), float(sum(np.abs(_np(a)).sum() for a in opt._accumulated_gradients))
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    return one + (int(_np(opt.iterations)), hasattr(opt, "flush"))


def load_other_configuration(tmp_path, saved_steps, loading_steps):
    """Saves a model trained with `saved_steps` and loads it into one with `loading_steps`.

    Returns (the warnings' texts, whether the loading optimizer's state changed,
    whether it now equals the saved state).
    """
    x, y = _data(16)

    def trained(steps):
        model = _model()
        model.compile(optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=steps),
                      loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return model

    saved = trained(saved_steps)
    path = str(tmp_path / "saved.weights.h5")
    saved.save_weights(path)
    model = trained(loading_steps)
    before = [_np(v) for v in model.optimizer.variables]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    after = [_np(v) for v in model.optimizer.variables]
    changed = any(not np.array_equal(a, b) for a, b in zip(before, after))
    saved_state = [_np(v) for v in saved.optimizer.variables]
    equal_saved = len(saved_state) == len(after) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(after, saved_state)
    )
    return [str(w.message) for w in caught], changed, equal_saved


def swap_ema_weights_round_trip():
    """Elements changed by `keras.callbacks.SwapEMAWeights` swapping in and out."""
    x, y = _data(64)
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9),
                  loss="mse")
    noisy = x + rng.normal(size=x.shape).astype("float32")
    for i in range(0, 64, 8):  # not fit: fit writes the EMA into the weights at the end
        model.train_on_batch(noisy[i : i + 8], y[i : i + 8])
    before = [np.array(w) for w in model.get_weights()]
    callback = keras.callbacks.SwapEMAWeights()
    callback.set_model(model)
    callback.on_test_begin()
    callback.on_test_end()
    after = model.get_weights()
    changed = sum(int(np.sum(a != b)) for a, b in zip(after, before))
    return changed, sum(a.size for a in before)


def builtin_vs_large_batch(schedule=False, ema=False, clip=True, epochs=2):
    """Largest weight difference, built-in accumulation (K micro-batches of 8) vs
    the plain optimizer on batches of 8K, same data, initial weights and settings."""
    x, y = _data(256)

    def train(accumulate):
        lr = keras.optimizers.schedules.CosineDecay(3e-3, 40) if schedule else 3e-3
        kwargs = {"global_clipnorm": 1.0} if clip else {}
        if ema:
            kwargs.update(use_ema=True, ema_momentum=0.9)
        if accumulate:
            kwargs["gradient_accumulation_steps"] = K
        model = _model(seed=3)
        model.compile(optimizer=keras.optimizers.Adam(lr, **kwargs), loss="mse")
        model.fit(x, y * 5, batch_size=8 if accumulate else 8 * K, epochs=epochs,
                  shuffle=False, verbose=0)
        return model.get_weights()

    return max(float(np.max(np.abs(a - b))) for a, b in zip(train(True), train(False)))


# ------------------------------------------------------------------- tests
def test_schedule_is_called_with_the_micro_step_count():
    """Update n (1-based) evaluates the schedule at micro-step n*K - 1, not at n - 1."""
    assert schedule_steps_seen() == [K - 1, 2 * K - 1, 3 * K - 1]


def test_ema_moves_on_every_micro_step():
    """The EMA update runs at each micro-step, not once per update (in the first
    window, while `iterations` is 0, it copies the weights each time)."""
    assert ema_moves(windows=2) == [True] * (2 * K)


def test_ema_overwrite_frequency_is_evaluated_on_every_micro_step():
    """`ema_overwrite_frequency=2` writes the EMA into the weights at every
    micro-step of every second window (micro-steps 5 to 8), not once per
    second update: `(iterations + 1) % f == 0` holds for a whole window."""
    assert ema_overwrites(frequency=2, windows=3) == [5, 6, 7, 8]


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_clipping_acts_once_on_the_merged_mean(clip):
    """Micro-gradients 3, -3, 3, -1 (mean 0.5) with a clip of 1.0: the step is
    0.5, the mean unclipped; clipping each micro-gradient first would give 0."""
    assert clipped_update(clip) == pytest.approx(0.5, abs=1e-7)
    # 4, 4, 4, -4: the mean, 2, is clipped to 1 (each clipped first: 0.5).
    assert clipped_update(clip, (4.0, 4.0, 4.0, -4.0)) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_one_nonfinite_gradient_reaches_the_weights(bad):
    """No skip: the window is applied and that weight goes non-finite (the other
    element stays finite). The accumulator is reset by `_foreach_mul_(acc, 0)`
    on the torch backend (NaN from then on) and by assigning zeros on
    TensorFlow and JAX (clean for the next window)."""
    (weights, acc), (weights_next, acc_next) = nonfinite_window(bad)
    assert not np.isfinite(weights[0]) and np.isfinite(weights[1])
    if BACKEND == "torch":
        # 0 * inf and 0 * nan are NaN: that element's accumulator stays NaN for good.
        assert np.isnan(acc[0]) and acc[1] == 0
        assert np.isnan(acc_next[0]) and acc_next[1] == 1
    else:
        assert (acc == 0).all()
        np.testing.assert_array_equal(acc_next, [1.0, 1.0])
    assert not np.isfinite(weights_next[0])


def test_iterations_is_micro_steps_floor_divided():
    assert iterations_after(10) == (10 // K, 10)


@pytest.mark.slow
def test_an_open_window_is_carried_into_the_next_epoch_and_never_applied_at_the_end():
    """6 micro-batches an epoch: after one epoch 1 update and 2 micro-batches
    left in the accumulators; they join the next epoch's first window (3
    updates from 18 micro-batches); no method applies them at the end."""
    updates_1, left_1, updates_3, has_flush = open_window_at_epoch_end()
    assert updates_1 == 1 and left_1 > 0
    assert updates_3 == 18 // K
    assert not has_flush


@pytest.mark.slow
def test_state_of_another_configuration_warns_and_is_not_loaded(tmp_path):
    """Saved with accumulation (K=4), loaded into an optimizer without: Keras
    warns ("Skipping variable loading for optimizer ...") and loads nothing."""
    messages, changed, _ = load_other_configuration(tmp_path, K, None)
    assert any("Skipping variable loading for optimizer" in m for m in messages), messages
    assert not changed


@pytest.mark.slow
def test_state_of_another_accumulation_count_loads_silently(tmp_path):
    """Saved with K=4, loaded into K=2: the same variables, so Keras loads the
    state without a word, a window of 4 into an optimizer that merges 2."""
    messages, changed, equal_saved = load_other_configuration(tmp_path, K, 2)
    assert not any("Skipping" in m for m in messages), messages
    assert changed and equal_saved


@pytest.mark.slow
def test_swap_ema_weights_is_bit_exact_only_off_tensorflow():
    """TensorFlow: SwapEMAWeights swaps by add/subtract, and some weights come
    back changed in the last bit; JAX and torch swap by copying: bit-exact."""
    changed, total = swap_ema_weights_round_trip()
    if BACKEND == "tensorflow":
        assert 0 < changed <= total
    else:
        assert changed == 0


@pytest.mark.slow
def test_builtin_equals_the_large_batch_without_schedule_and_ema():
    """With a constant learning rate and no EMA, the built-in (global_clipnorm on)
    reproduces the large batch to round-off: the demo's gap comes from the
    schedule and the EMA, not from clipping or the mean."""
    assert builtin_vs_large_batch(schedule=False, ema=False) < 1e-5
    assert builtin_vs_large_batch(schedule=True, ema=False) > 1e-3
    assert builtin_vs_large_batch(schedule=False, ema=True) > 1e-3


def _report():
    import tempfile
    from pathlib import Path

    print(f"Keras {keras.__version__}, backend {BACKEND}, K={K}")
    print("schedule step seen at updates 1-3:", schedule_steps_seen())
    print("EMA moved at micro-steps 1-8:", ema_moves())
    print("ema_overwrite_frequency=2 wrote the EMA at micro-steps:", ema_overwrites())
    for clip in ("clipnorm", "global_clipnorm", "clipvalue"):
        print(f"{clip}=1, grads 3,-3,3,-1 -> step", clipped_update(clip),
              "; grads 4,4,4,-4 -> step", clipped_update(clip, (4.0, 4.0, 4.0, -4.0)))
    for bad in (np.inf, np.nan):
        (w, acc), (w2, acc2) = nonfinite_window(bad)
        print(f"{bad} in micro-step 2: weights {w}, accumulator {acc}; next micro-step: "
              f"weights {w2}, accumulator {acc2}")
    print("iterations, raw counter after 10 micro-steps:", iterations_after(10))
    print("open window: (updates after 1 epoch, |accumulators|, updates after 3, has flush):",
          open_window_at_epoch_end())
    with tempfile.TemporaryDirectory() as d:
        print("load K=4 into no accumulation:", load_other_configuration(Path(d), K, None))
        print("load K=4 into K=2:", load_other_configuration(Path(d), K, 2))
    print("SwapEMAWeights round trip: elements changed / total:", swap_ema_weights_round_trip())
    for schedule, ema in ((False, False), (True, False), (False, True), (True, True)):
        print(f"built-in vs large batch, schedule={schedule}, ema={ema}: "
              f"{builtin_vs_large_batch(schedule=schedule, ema=ema):.3g}")


if __name__ == "__main__":
    _report()
