"""EMA of weights, clipping and the non-finite policy of the Keras AccumOptimizer.

Against the NumPy oracle in `reference.py` (docs/semantics.md, points 7 to
11): the EMA moves after updates only, the first update copies, the shadows
are float32, `ema_overwrite_frequency` and `finalize_variable_values` write it
into the model, swapping it in and out (context manager and callback) is
bit-exact; clipping acts once per update on the merged gradient;
`on_nonfinite` "skip", "raise" and "ignore" at every position of a window.

Keras's SGD writes momentum as `m = mu * m - lr * g; w = w + m`, the oracle in
torch's form: equal up to float32 rounding, hence rtol=1e-5/atol=1e-6.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
from keras import ops

try:  # tests/ on sys.path (pytest's default "prepend" import mode, no __init__.py)
    import cases
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import cases
    from tests import reference as ref
from keras_driver import BACKEND, MODES, TRACED_MODES, flusher, stepper, to_tensors
from keras_driver import small_data as _data
from keras_driver import small_model as _make_model

import keras_accum
from keras_accum import AccumOptimizer

RTOL, ATOL = 1e-5, 1e-6


# -- helpers --------------------------------------------------------------------


def _variables(params, dtype="float32"):
    return [keras.Variable(np.array(p), dtype=dtype, name=f"v{i}") for i, p in enumerate(params)]


def _tensors(grads, dtype="float32"):
    return to_tensors(grads, dtype)


def _cast_like_stored(values, dtype):
    """float32 arrays rounded through `dtype` (what a variable of `dtype` stores)."""
    return [np.array(ops.convert_to_numpy(ops.cast(ops.cast(v, dtype), "float32"))) for v in values]


def _values(variables):
    return [np.array(v.numpy(), dtype=np.float32) for v in variables]


def _ema(opt):
    return [np.array(e.numpy()) for e in opt.ema_variables]


def _close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


def _same(actual, expected, what=""):
    """Bit-exact equality (NaN equal to NaN)."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"{what}[{i}]")


def _assert_matches_oracle(opt, variables, oracle, what=""):
    """Params, EMA, counters and last_grad_norm against the oracle."""
    _close(_values(variables), oracle.params, what=f"{what} params")
    assert int(opt.iterations.numpy()) == oracle.iterations, what
    assert int(opt.micro_steps.numpy()) == oracle.micro_steps, what
    assert int(opt.skipped_updates.numpy()) == oracle.skipped_updates, what
    assert int(opt.window_steps.numpy()) == oracle.window_steps, what
    if oracle.last_grad_norm is not None:
        np.testing.assert_allclose(
            float(opt.last_grad_norm.numpy()), oracle.last_grad_norm, RTOL, ATOL, err_msg=what
        )
    # Before the first update the shadows have no meaning yet (the first update copies).
    if oracle.use_ema and oracle.iterations > 0:
        _close(_ema(opt), oracle.ema, what=f"{what} ema")


def _stepper(opt, variables, mode):
    return stepper(opt, variables, mode)


def _flusher(opt, variables, mode):
    return flusher(opt, variables, mode)


def _np_predict(weights, x):
    k1, b1, k2, b2 = weights
    return np.tanh(x @ k1 + b1) @ k2 + b2


def _train_on_batches(model, x, y, n_batches, batch_size=8):
    for k in range(n_batches):
        model.train_on_batch(
            x[k * batch_size : (k + 1) * batch_size], y[k * batch_size : (k + 1) * batch_size]
        )


# -- the oracle, in lockstep ----------------------------------------------------


_LOCKSTEP_MODES = [(0.0, "eager"), (0.9, "eager")] + [(0.9, m) for m in TRACED_MODES if m in MODES]


@pytest.mark.parametrize(
    "momentum, mode",
    _LOCKSTEP_MODES,
    ids=[("sgd" if m == 0.0 else "momentum") + ("" if mode == "eager" else f"-{mode}") for m, mode in _LOCKSTEP_MODES],
)
@pytest.mark.parametrize("case", cases.CASES, ids=[c.id for c in cases.CASES])
def test_lockstep_with_oracle(case, momentum, mode):
    """Every micro-step: params, EMA, counters, last_grad_norm equal the oracle's.

    "eager": `jit_compile=False` (`test_keras_xla_mixed.py` checks that the
    optimizer's own jitted step gives the same numbers); "xla_function" (a
    user's `tf.function(jit_compile=True)`) and "jax_jit" (a user's `jax.jit`
    of `stateless_apply`): the window decided at run time, the flush too.
    With EMA, the shadows must not move on the micro-steps between updates
    (bit-exact).
    """
    params = cases.make_params()
    stream = cases.make_stream(case)
    variables = _variables(params)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=momentum), jit_compile=False, **case.kwargs
    )
    opt.build(variables)
    step = _stepper(opt, variables, mode)
    oracle = ref.RefAccum(params, ref.RefSGD(0.1, momentum), **case.kwargs)
    use_ema = oracle.use_ema
    previous_ema = None
    for k, (grads, weight) in enumerate(stream):
        closed = oracle.step(grads, weight)
        if case.weights is None:
            step(_tensors(grads))
        else:
            # A tensor inside tf.function: a Python float would retrace per value.
            step(_tensors(grads), weight if mode == "eager" else ops.convert_to_tensor(weight, "float32"))
        _assert_matches_oracle(opt, variables, oracle, what=f"micro-step {k + 1}")
        if use_ema:
            ema = _ema(opt)
            assert all(e.dtype == np.float32 for e in ema)
            if previous_ema is not None and not closed:
                _same(ema, previous_ema, what=f"EMA moved on non-update micro-step {k + 1}")
            previous_ema = ema
    if case.flush_at_end:
        assert oracle.flush() is True
        assert _flusher(opt, variables, mode)() in (True, None)  # None: traced
        _assert_matches_oracle(opt, variables, oracle, what="after flush")
    assert oracle.iterations == case.n_updates  # the table row means what it says


# -- EMA ------------------------------------------------------------------------


def test_ema_first_update_copies_then_moves_after_updates_only():
    # w0 = 1, SGD(lr=1), merge_grad=2, m = 0.5, mean reduction.
    v = keras.Variable(np.array([1.0], np.float32))
    opt = AccumOptimizer(
        keras.optimizers.SGD(1.0), merge_grad=2, use_ema=True, ema_momentum=0.5, jit_compile=False
    )
    expected = [
        # (grad, weight after, ema after)
        (1.0, 1.0, None),  # micro-step: nothing moves
        (3.0, -1.0, -1.0),  # update 1: w = 1 - (1+3)/2 = -1; first update copies: ema = -1
        (0.5, -1.0, -1.0),  # micro-step: EMA stays
        (1.5, -2.0, -1.5),  # update 2: w = -1 - 1 = -2; ema = 0.5*-1 + 0.5*-2 = -1.5
        (4.0, -2.0, -1.5),  # micro-step: EMA stays
    ]
    for g, w_after, ema_after in expected:
        opt.apply_gradients([(ops.convert_to_tensor([g], "float32"), v)])
        np.testing.assert_array_equal(v.numpy(), [w_after])
        if ema_after is not None:
            np.testing.assert_array_equal(opt.ema_variables[0].numpy(), [ema_after])
    assert opt.ema_variables[0].dtype == "float32"


@pytest.mark.parametrize("frequency", [1, 2, 3])
def test_ema_overwrite_frequency_overwrites_right_after_every_fth_update(frequency):
    params = cases.make_params()
    variables = _variables(params)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9),
        merge_grad=2,
        use_ema=True,
        ema_momentum=0.5,
        ema_overwrite_frequency=frequency,
        jit_compile=False,
    )
    stream = cases.make_stream(cases.AccumCase("s", merge_grad=2, n_micro=12))
    for k, (grads, _) in enumerate(stream):
        opt.apply(_tensors(grads), variables)
        update = (k + 1) // 2 if (k + 1) % 2 == 0 else None
        # Update 1 copies the weights into the EMA anyway: look from update 2 on.
        if update is None or update < 2:
            continue
        equal = all(np.array_equal(w, e) for w, e in zip(_values(variables), _ema(opt)))
        assert equal == (update % frequency == 0), f"update {update}"
    assert int(opt.iterations.numpy()) == 6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finalize_variable_values_writes_the_ema(dtype):
    variables = _variables(cases.make_params(), dtype)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1), merge_grad=2, use_ema=True, ema_momentum=0.5, jit_compile=False
    )
    for grads, _ in cases.make_stream(cases.AccumCase("s", merge_grad=2, n_micro=6)):
        opt.apply(_tensors(grads, dtype), variables)
    raw = _values(variables)
    ema = _ema(opt)
    assert all(e.dtype == np.float32 for e in ema)
    assert not all(np.array_equal(r, e) for r, e in zip(raw, ema))  # the test means something
    opt.finalize_variable_values(variables)
    expected = _cast_like_stored(ema, dtype)
    _same(_values(variables), expected, what="finalized weights")


# -- clipping -------------------------------------------------------------------

# Two variables a, b of shape (2,); merge_grad=2, mean; SGD(lr=1) from zeros, so
# the weights after one update are minus the clipped merged gradient. Each row
# is worked out by hand, and per-micro-step clipping would give another answer.
CLIP_CASES = [
    # merged a = ([3, 0.2] + [-1, 0]) / 2 = [1, 0.1] -> clipvalue 0.5 -> [0.5, 0.1]
    # (per micro-step: ([0.5, 0.2] + [-0.5, 0]) / 2 = [0, 0.1]); norm sqrt(1 + 0.01).
    pytest.param(
        {"clipvalue": 0.5},
        [([3.0, 0.2], [0.0, 0.0]), ([-1.0, 0.0], [0.0, 0.0])],
        ([-0.5, -0.1], [0.0, 0.0]),
        np.sqrt(1.0 + 0.01),
        id="clipvalue",
    ),
    # merged a = [3, 4] (norm 5) -> clipnorm 1 -> [0.6, 0.8]; b = [0, 0.5] (norm 0.5) untouched.
    # Per micro-step: a = ([0.6, 0.8] + 0) / 2 = [0.3, 0.4].
    pytest.param(
        {"clipnorm": 1.0},
        [([6.0, 8.0], [0.0, 1.0]), ([0.0, 0.0], [0.0, 0.0])],
        ([-0.6, -0.8], [0.0, -0.5]),
        np.sqrt(25.0 + 0.25),
        id="clipnorm",
    ),
    # merged a = [3, 0], b = [0, 4]: global norm 5 -> global_clipnorm 1 -> scale 0.2
    # (per variable it would be [1, 0], [0, 1]).
    pytest.param(
        {"global_clipnorm": 1.0},
        [([6.0, 0.0], [0.0, 8.0]), ([0.0, 0.0], [0.0, 0.0])],
        ([-0.6, 0.0], [0.0, -0.8]),
        5.0,
        id="global_clipnorm",
    ),
    # clipvalue first: a = [3, -4] -> [1, -1], b = [0, 0]; then global norm sqrt(2) -> 1.
    pytest.param(
        {"clipvalue": 1.0, "global_clipnorm": 1.0},
        [([6.0, -8.0], [0.0, 0.0]), ([0.0, 0.0], [0.0, 0.0])],
        ([-(2**-0.5), 2**-0.5], [0.0, 0.0]),
        5.0,
        id="clipvalue_then_global_clipnorm",
    ),
    # Below the threshold nothing is clipped: merged a = [0.3, 0.4], norm 0.5 < 1.
    pytest.param(
        {"global_clipnorm": 1.0},
        [([0.6, 0.8], [0.0, 0.0]), ([0.0, 0.0], [0.0, 0.0])],
        ([-0.3, -0.4], [0.0, 0.0]),
        0.5,
        id="global_clipnorm_inactive",
    ),
]


@pytest.mark.parametrize(("clip", "micro_grads", "expected", "norm"), CLIP_CASES)
def test_clipping_acts_once_on_the_merged_gradient(clip, micro_grads, expected, norm):
    variables = _variables([np.zeros(2, np.float32), np.zeros(2, np.float32)])
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=2, jit_compile=False, **clip)
    for grads in micro_grads:
        opt.apply(_tensors([np.array(g, np.float32) for g in grads]), variables)
    _close(_values(variables), [np.array(e, np.float32) for e in expected])
    # The norm of the merged gradient before clipping.
    np.testing.assert_allclose(float(opt.last_grad_norm.numpy()), norm, rtol=RTOL)
    assert int(opt.iterations.numpy()) == 1


# -- non-finite gradients --------------------------------------------------------

#: One clean window before the case's stream, so that momentum, EMA and the
#: schedule have state that a bad window could disturb.
_PREFIX = cases.make_stream(cases.AccumCase("prefix", merge_grad=4, n_micro=4), seed=7)


def _nonfinite_optimizer(case, jit_compile):
    learning_rate = 0.1
    if case.on_nonfinite == "skip":
        # 0.1 at updates 0 and 1, then 0.05. The skip stream has two updates
        # (prefix, last window), so it matches the oracle's constant 0.1 only
        # if the skipped window did not advance the schedule. (Only here: with
        # a changing rate Keras's momentum form and the oracle's torch form
        # part by more than rounding.)
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.05])
    return AccumOptimizer(
        keras.optimizers.SGD(learning_rate, momentum=0.9),
        use_ema=True,
        ema_momentum=0.5,
        jit_compile=jit_compile,
        **case.kwargs,
    )


@pytest.mark.parametrize(
    "case, mode",
    [
        pytest.param(case, mode, id=f"{case.id}-{mode}")
        for case in cases.NONFINITE_CASES
        for mode in MODES
        # "raise" inside XLA or jax.jit fails at trace time (tested below).
        if not (mode in TRACED_MODES and case.on_nonfinite == "raise")
    ],
)
def test_nonfinite_policy(case, mode):
    """An inf or NaN at each position of a window, under each policy and each way of calling.

    `mode`: "eager" (jit_compile=False), "jit" (the optimizer's own XLA step),
    "function" (inside a user's tf.function, without XLA), "xla_function"
    (inside a user's `tf.function(jit_compile=True)`).
    """
    params = cases.make_params()
    variables = _variables(params)
    opt = _nonfinite_optimizer(case, jit_compile=mode == "jit")
    oracle = ref.RefAccum(
        params, ref.RefSGD(0.1, 0.9), use_ema=True, ema_momentum=0.5, **case.kwargs
    )
    opt.build(variables)  # one trace in "function" mode (building in it traces twice)
    step = _stepper(opt, variables, mode)
    for grads, _ in _PREFIX:
        oracle.step(grads)
        step(_tensors(grads))
    _assert_matches_oracle(opt, variables, oracle, what="after the clean prefix window")
    assert int(opt.iterations.numpy()) == 1

    before = {
        "weights": _values(variables),
        "inner": [np.array(v.numpy()) for v in opt.inner_optimizer.variables],
        "ema": _ema(opt),
    }
    stream = [g for g, _ in case.stream()]
    bad = len(_PREFIX) + case.position + 1  # 1-based micro-step holding the inf/NaN

    if case.on_nonfinite == "raise":
        for k, grads in enumerate(stream):
            if k == case.position:
                with pytest.raises(FloatingPointError, match=rf"micro-step {bad}\b"):
                    oracle.step(grads)
                if mode == "function":
                    import tensorflow as tf

                    with pytest.raises(tf.errors.InvalidArgumentError) as info:
                        step(_tensors(grads))
                    assert re.search(rf"micro-step\D*\b{bad}\b", str(info.value)), info.value
                else:
                    with pytest.raises(FloatingPointError, match=rf"micro-step {bad}\b"):
                        step(_tensors(grads))
                # Nothing of the bad micro-step was accumulated.
                assert int(opt.micro_steps.numpy()) == bad - 1
                _close(
                    [np.array(a.numpy()) for a in opt._accumulators],
                    oracle.accumulators,
                    what="accumulators after the raise",
                )
                _assert_matches_oracle(opt, variables, oracle, what="after the raise")
                continue  # the user drops the bad micro-batch and goes on
            oracle.step(grads)
            step(_tensors(grads))
        _assert_matches_oracle(opt, variables, oracle, what="end")
        assert all(np.isfinite(w).all() for w in _values(variables))
        return

    window, rest = stream[: case.merge_grad], stream[case.merge_grad :]
    for grads in window:
        oracle.step(grads)
        step(_tensors(grads))
    if case.on_nonfinite == "skip":
        # The whole window is discarded: nothing moved, bit for bit.
        _same(_values(variables), before["weights"], what="weights after a skipped window")
        _same(
            [np.array(v.numpy()) for v in opt.inner_optimizer.variables],
            before["inner"],
            what="inner optimizer state (momentum, iterations) after a skipped window",
        )
        _same(_ema(opt), before["ema"], what="EMA after a skipped window")
        assert int(opt.iterations.numpy()) == 1
        assert int(opt.skipped_updates.numpy()) == 1
        assert not np.isfinite(float(opt.last_grad_norm.numpy()))
        # The next window starts clean: accumulators reset by assignment.
        for acc in opt._accumulators:
            np.testing.assert_array_equal(acc.numpy(), np.zeros(acc.shape, np.float32))
        assert float(opt.window_weight.numpy()) == 0.0
    for grads in rest:
        oracle.step(grads)
        step(_tensors(grads))
    _assert_matches_oracle(opt, variables, oracle, what="end")
    finite = all(np.isfinite(w).all() for w in _values(variables))
    if case.on_nonfinite == "skip":
        assert finite and np.isfinite(float(opt.last_grad_norm.numpy()))
        assert int(opt.iterations.numpy()) == 2 and int(opt.skipped_updates.numpy()) == 1
        assert all(np.isfinite(e).all() for e in _ema(opt))
        # Momentum in Keras's form: m = -lr * b for a constant learning rate (0.1 here).
        _close(
            [np.array(m.numpy()) for m in opt.inner_optimizer.momentums],
            [-0.1 * oracle.inner.momentum_buffers[i] for i in range(len(params))],
            what="momentum slots",
        )
    else:  # "ignore": the values were passed on
        assert not finite
        assert int(opt.iterations.numpy()) == 3 and int(opt.skipped_updates.numpy()) == 0


@pytest.mark.parametrize("mode", [m for m in TRACED_MODES if m in MODES] or ["none"])
def test_raise_inside_a_traced_step_fails_at_trace_time(mode):
    """XLA drops assertions and a jitted JAX step cannot raise on a value: refused."""
    if mode == "none":
        pytest.skip(f"no traced micro-step on the {BACKEND} backend")
    variables = _variables(cases.make_params())
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, on_nonfinite="raise")
    opt.build(variables)
    step = _stepper(opt, variables, mode)
    grads = _tensors(cases.make_stream(cases.AccumCase("s", merge_grad=2, n_micro=1))[0][0])
    with pytest.raises(RuntimeError, match="`on_nonfinite='raise'` cannot raise inside"):
        step(grads)
    assert int(opt.micro_steps.numpy()) == 0


@pytest.mark.slow
def test_raise_inside_jit_compiled_fit_fails_at_trace_time():
    if BACKEND == "torch":
        pytest.skip("torch.compile runs the check eagerly, at a graph break")
    x, y = _data(16)
    model = _make_model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, on_nonfinite="raise")
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    before = _values(model.trainable_weights)
    with pytest.raises(RuntimeError, match="`on_nonfinite='raise'` cannot raise inside"):
        model.fit(x, y, batch_size=8, verbose=0)
    if BACKEND == "jax":
        # Keras's JAX trainer takes the weights out of the variables before its
        # first step and puts them back after its last: an error while its step
        # is traced (any error: ours, or a model's) leaves them out.
        return
    _same(_values(model.trainable_weights), before, what="weights")


# -- swapping the EMA in and out -------------------------------------------------


def _trained_ema_variables(dtype):
    """Variables of varied magnitudes after 3 updates, their EMA well apart from them.

    Varied magnitudes make add/subtract swapping (Keras's own callback) come
    back changed in the last bits, which a copy never does.
    """
    rng = np.random.default_rng(3)
    params = [
        (rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3, s)).astype(np.float32)
        for s in cases.SHAPES
    ]
    variables = _variables(params, dtype)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.5, momentum=0.9),
        merge_grad=2,
        use_ema=True,
        ema_momentum=0.7,
        jit_compile=False,
    )
    for grads, _ in cases.make_stream(cases.AccumCase("s", merge_grad=2, n_micro=6), seed=5):
        opt.apply(_tensors(grads, dtype), variables)
    return variables, opt


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swap_ema_weights_context_manager_is_bit_exact(dtype):
    variables, opt = _trained_ema_variables(dtype)
    raw = [np.array(v.numpy()) for v in variables]
    ema = _ema(opt)
    shown = [np.array(ops.convert_to_numpy(ops.cast(e, dtype))) for e in ema]
    assert not all(np.array_equal(r, s) for r, s in zip(raw, shown))
    for _ in range(3):  # round trips do not drift
        with opt.swap_ema_weights():
            _same([np.array(v.numpy()) for v in variables], shown, what="swapped in")
        _same([np.array(v.numpy()) for v in variables], raw, what="swapped out")
        _same(_ema(opt), ema, what="EMA after the swap")
    # An error inside the block puts the raw weights back.
    with pytest.raises(ZeroDivisionError):
        with opt.swap_ema_weights():
            _ = 1 / 0
    _same([np.array(v.numpy()) for v in variables], raw, what="after an error")
    # Training after the swap goes on from the raw weights.
    oracle_like = _trained_ema_variables(dtype)
    grads, _ = cases.make_stream(cases.AccumCase("s", merge_grad=2, n_micro=2), seed=9)[0]
    for vs, o in ((variables, opt), oracle_like):
        o.apply(_tensors(grads, dtype), vs)
        o.apply(_tensors(grads, dtype), vs)
    _same(_values(variables), _values(oracle_like[0]), what="training after swapping")


@pytest.mark.slow
def test_swap_ema_callback_evaluates_and_predicts_on_ema_and_restores():
    x, y = _data(64)
    model = _make_model()
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9),
        merge_grad=2,
        use_ema=True,
        ema_momentum=0.5,
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    _train_on_batches(model, x, y, 7)  # 3 updates and an open window; no finalize
    raw = _values(model.trainable_weights)
    ema = _ema(opt)
    assert not all(np.array_equal(r, e) for r, e in zip(raw, ema))
    callback = keras_accum.SwapEMAWeights()

    loss_raw = model.evaluate(x, y, batch_size=16, verbose=0)
    loss_ema = model.evaluate(x, y, batch_size=16, verbose=0, callbacks=[callback])
    np.testing.assert_allclose(loss_raw, np.mean((_np_predict(raw, x) - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(loss_ema, np.mean((_np_predict(ema, x) - y) ** 2), rtol=1e-5)
    _same(_values(model.trainable_weights), raw, what="raw weights after evaluate")

    pred = model.predict(x, batch_size=16, verbose=0, callbacks=[callback])
    np.testing.assert_allclose(pred, _np_predict(ema, x), rtol=1e-5, atol=1e-6)
    _same(_values(model.trainable_weights), raw, what="raw weights after predict")
    _same(_ema(opt), ema, what="EMA after evaluate and predict")


def _failing_batches(x, y=None):
    """Three good batches, then the data source fails.

    Keras peeks at the first batches of a generator before evaluation begins;
    the third one and the failure come from inside the compiled test (or
    predict) function, after the callback swapped the EMA in.
    """
    for k in range(3):
        batch = slice(8 * k, 8 * k + 8)
        yield (x[batch], y[batch]) if y is not None else (x[batch],)
    raise ValueError("data source failed")


class _FirstBatchLogs(keras.callbacks.Callback):
    """Keeps the logs of the first evaluation or prediction batch; can fail at batch 1."""

    def __init__(self, fail_at_batch_1=False):
        super().__init__()
        self.fail_at_batch_1 = fail_at_batch_1
        self.logs = None

    def _record(self, batch, logs=None):
        if self.logs is None:
            self.logs = dict(logs or {})
        if self.fail_at_batch_1 and batch == 1:
            raise RuntimeError("callback failed")

    on_test_batch_end = on_predict_batch_end = _record


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure",
    [
        "evaluate_data",
        "predict_data",
        "evaluate_callback",
        "predict_callback",
    ],
)
def test_swap_ema_callback_restores_raw_weights_when_evaluation_raises(failure):
    x, y = _data(32)
    model = _make_model()
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2, use_ema=True, ema_momentum=0.5
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    _train_on_batches(model, x, y, 4)
    raw = _values(model.trainable_weights)
    ema = _ema(opt)
    assert not all(np.array_equal(r, e) for r, e in zip(raw, ema))
    method, source = failure.split("_")
    first = _FirstBatchLogs(fail_at_batch_1=source == "callback")
    callbacks = [keras_accum.SwapEMAWeights(), first]
    if source == "data":
        data = [_failing_batches(x, y) if method == "evaluate" else _failing_batches(x)]
        kwargs = {}
        # The generator's error may reach us wrapped by tf.data (InvalidArgumentError).
        errors = (ValueError,)
        if BACKEND == "tensorflow":
            import tensorflow as tf

            errors += (tf.errors.OpError,)
        raises = pytest.raises(errors, match="data source failed")
    else:
        data = [x, y] if method == "evaluate" else [x]
        kwargs = {"batch_size": 8}
        raises = pytest.raises(RuntimeError, match="callback failed")
    with raises:
        getattr(model, method)(*data, verbose=0, callbacks=callbacks, **kwargs)
    if BACKEND == "jax":
        # Keras's JAX trainer keeps the weights in its state during a call and
        # writes them back only at its end (or on a callback's request): after
        # an error, nothing wrote them back yet.
        model.jax_state_sync()
    # It failed while evaluating on the EMA: the first batch was computed with it.
    expected = _np_predict(ema, x[:8])
    if method == "evaluate":
        np.testing.assert_allclose(first.logs["loss"], np.mean((expected - y[:8]) ** 2), rtol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(first.logs["outputs"]), expected, RTOL, ATOL)
    _same(_values(model.trainable_weights), raw, what=f"raw weights after {failure}")
    _same(_ema(opt), ema, what=f"EMA after {failure}")
    # And the model still evaluates on the EMA afterwards.
    loss_ema = model.evaluate(x, y, verbose=0, callbacks=[keras_accum.SwapEMAWeights()])
    np.testing.assert_allclose(loss_ema, np.mean((_np_predict(ema, x) - y) ** 2), rtol=1e-5)


class _RecordEpochEnd(keras.callbacks.Callback):
    """Records the raw weights and the EMA at each epoch end (before fit's finalize)."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.raw, self.ema = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.raw.append(_values(self.model.trainable_weights))
        self.ema.append(_ema(self.opt))


@pytest.mark.slow
def test_swap_ema_callback_in_fit_validation_leaves_training_unchanged():
    x, y = _data(64)
    runs = {}
    for with_callback in (False, True):
        model = _make_model()
        opt = AccumOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2, use_ema=True, ema_momentum=0.5
        )
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        record = _RecordEpochEnd(opt)
        callbacks = [keras_accum.SwapEMAWeights(), record] if with_callback else [record]
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
            validation_data=(x, y), callbacks=callbacks,
        )  # fmt: skip
        runs[with_callback] = (history.history, record, _values(model.trainable_weights))
    (h0, r0, w0), (h1, r1, w1) = runs[False], runs[True]
    # Evaluating on the EMA in between does not touch training, bit for bit.
    assert h0["loss"] == h1["loss"]
    for epoch in range(2):
        _same(r1.raw[epoch], r0.raw[epoch], what=f"raw weights at epoch {epoch}")
        _same(r1.ema[epoch], r0.ema[epoch], what=f"EMA at epoch {epoch}")
        # Validation with the callback saw the EMA, without it the raw weights.
        np.testing.assert_allclose(
            h1["val_loss"][epoch], np.mean((_np_predict(r1.ema[epoch], x) - y) ** 2), rtol=1e-5
        )
        np.testing.assert_allclose(
            h0["val_loss"][epoch], np.mean((_np_predict(r0.raw[epoch], x) - y) ** 2), rtol=1e-5
        )
    _same(w1, w0, what="final weights")


@keras.saving.register_keras_serializable(package="keras_accum_tests")
class SubclassedNet(keras.Model):
    """The two Dense layers of `_make_model`, as a subclassed model.

    The output layer's attribute, `zz_out`, sorts after `optimizer`: Keras
    walks a subclassed model's attributes in sorted order when it saves and
    loads, so the optimizer's state must not rely on being loaded last.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.zz_out = keras.layers.Dense(2)

    def call(self, x):
        return self.zz_out(self.hidden(x))


def _make_any_model(kind):
    if kind == "sequential":
        return _make_model()
    keras.utils.set_random_seed(1)
    model = SubclassedNet()
    model(np.zeros((1, 5), np.float32))  # builds the layers
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_save_while_swapped_resumes_training_from_raw_weights(tmp_path, kind):
    """A `.keras` file saved inside `swap_ema_weights()` holds the EMA as model
    weights and `_ema_swapped=1`; a fresh model loaded from it must train from
    the raw weights, exactly as the uninterrupted run."""
    x, y = _data(128)
    model = _make_any_model(kind)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=4, use_ema=True, ema_momentum=0.5
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    _train_on_batches(model, x, y, 10)  # 2 updates and a window of 2 left open
    raw = _values(model.trainable_weights)
    ema = _ema(opt)
    assert not all(np.array_equal(r, e) for r, e in zip(raw, ema))
    path = str(tmp_path / "swapped.keras")
    with opt.swap_ema_weights():
        model.save(path)
    _same(_values(model.trainable_weights), raw, what="raw weights after the swap")

    # The uninterrupted run: go on from the raw weights.
    model.fit(x[80:], y[80:], batch_size=8, shuffle=False, verbose=0)
    expected = _values(model.trainable_weights)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, AccumOptimizer)
    _same(_values(loaded.trainable_weights), raw, what="weights right after loading")
    loaded.fit(x[80:], y[80:], batch_size=8, shuffle=False, verbose=0)
    _close(_values(loaded.trainable_weights), expected, rtol=1e-6, atol=0, what="resumed weights")


# -- model.fit with EMA and clipping equals the large-batch run ---------------------


@pytest.mark.slow
def test_fit_with_ema_and_clipping_matches_large_batch():
    x, y = _data(64)
    config = {"use_ema": True, "ema_momentum": 0.5, "global_clipnorm": 0.1}
    runs = {}
    for merge_grad, batch_size in ((4, 8), (1, 32)):
        model = _make_model()
        opt = AccumOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=merge_grad, **config
        )
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        record = _RecordEpochEnd(opt)
        model.fit(
            x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=[record]
        )
        runs[merge_grad] = (opt, record, _values(model.trainable_weights))
    (acc_opt, acc_rec, acc_final), (big_opt, big_rec, big_final) = runs[4], runs[1]
    assert int(acc_opt.iterations.numpy()) == int(big_opt.iterations.numpy()) == 4
    assert int(acc_opt.micro_steps.numpy()) == 16
    # Clipping was active: the merged norm before clipping exceeds the threshold.
    assert float(acc_opt.last_grad_norm.numpy()) > 0.1
    np.testing.assert_allclose(
        float(acc_opt.last_grad_norm.numpy()), float(big_opt.last_grad_norm.numpy()), RTOL, ATOL
    )
    for epoch in range(2):
        _close(acc_rec.raw[epoch], big_rec.raw[epoch], what=f"raw weights at epoch {epoch}")
        _close(acc_rec.ema[epoch], big_rec.ema[epoch], what=f"EMA at epoch {epoch}")
    _close(acc_final, big_final, what="final weights")
    # fit called finalize_variable_values: the final weights are the EMA, not the raw weights.
    _same(acc_final, _ema(acc_opt), what="final weights vs EMA")
    assert not all(np.array_equal(f, r) for f, r in zip(acc_final, acc_rec.raw[-1]))


@pytest.mark.parametrize("momentum", [0.5, 0.0])
def test_before_the_first_update_the_ema_is_the_weights(momentum):
    """A built optimizer, no update yet: swapping in (e.g. a validation pass before
    the first update) shows the raw weights, never the zero-initialised shadows,
    and `finalize_variable_values` writes nothing."""
    params = cases.make_params()
    variables = _variables(params)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1), merge_grad=4, use_ema=True, ema_momentum=momentum,
        jit_compile=False,
    )
    opt.build(variables)
    grads = cases.make_stream(cases.AccumCase("s", merge_grad=4, n_micro=2))
    for g, _ in grads:
        opt.apply(_tensors(g), variables)  # an open window, no update
    raw = _values(variables)
    with opt.swap_ema_weights():
        _same(_values(variables), raw, what="swapped in before the first update")
    _same(_values(variables), raw, what="swapped out")
    opt.finalize_variable_values(variables)
    _same(_values(variables), raw, what="finalized before the first update")
    # The first update still copies: the EMA is then the updated weights.
    oracle = ref.RefAccum(params, ref.RefSGD(0.1), merge_grad=4, use_ema=True,
                          ema_momentum=momentum)
    for g, _ in cases.make_stream(cases.AccumCase("s", merge_grad=4, n_micro=4)):
        oracle.step(g)
    for g, _ in cases.make_stream(cases.AccumCase("s", merge_grad=4, n_micro=4))[2:]:
        opt.apply(_tensors(g), variables)
    _close(_ema(opt), oracle.ema, what="EMA after the first update")


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
@pytest.mark.parametrize(
    "merge_grad, scale",
    [(1, 2.0**70), (4, 2.0**70), (2, 2.0**63)],
    ids=["merge1-2**70", "merge4-2**70", "merge2-2**63"],
)
def test_finite_gradients_whose_squares_overflow_are_clipped_by_their_norm(
    clip, merge_grad, scale
):
    """|g| > 1.8e19: `g ** 2` overflows float32 although the norm is a finite float32.
    The norm (and the window sum's: two micro-steps of 2**63 sum to 2**64, whose
    square overflows where the merged 2**63's does not) is taken without overflow,
    so the clip applies the right scale instead of a zero update."""
    shapes = [(3, 2), (2,)]
    rng = np.random.default_rng(11)
    micro = [
        [(scale * rng.uniform(0.5, 1.0, s) * rng.choice([-1, 1], s)).astype(np.float32) for s in shapes]
        for _ in range(merge_grad)
    ]
    variables = _variables([np.zeros(s, np.float32) for s in shapes])
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=merge_grad, jit_compile=False,
                         **{clip: 1.0})
    for grads in micro:
        opt.apply(_tensors(grads), variables)
    merged = [np.mean([m[i].astype(np.float64) for m in micro], axis=0) for i in range(len(shapes))]
    norms = [np.sqrt(np.sum(g**2)) for g in merged]
    total = np.sqrt(sum(n**2 for n in norms))
    sums = [np.sum([m[i] for m in micro], axis=0, dtype=np.float32) for i in range(len(shapes))]
    with np.errstate(over="ignore"):
        squares = np.sum([np.sum(x * x, dtype=np.float32) for x in sums], dtype=np.float32)
    assert np.isfinite(np.float32(total)) and not np.isfinite(squares)  # what the test is about
    if clip == "global_clipnorm":
        expected = [-g / total for g in merged]
    else:
        expected = [-g / n for g, n in zip(merged, norms)]
    assert int(opt.iterations.numpy()) == 1 and int(opt.skipped_updates.numpy()) == 0
    np.testing.assert_allclose(float(opt.last_grad_norm.numpy()), total, rtol=1e-6)
    _close(_values(variables), [e.astype(np.float32) for e in expected], rtol=1e-5, atol=1e-7)
