"""Keras AccumOptimizer: accumulation against the NumPy oracle and large-batch runs.

The spine (as in Keras's own optimizer_test): k micro-steps through the
wrapper equal one inner step on the merged gradient that the oracle computes,
for every inner optimizer, over several windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from cases import CASES, make_params, make_stream
from keras import ops
from keras_driver import BACKEND, make_variables, replay_inner, run_stream
from reference import RecordingInner, RefAccum, RefSGD

import keras_accum
from keras_accum import AccumOptimizer

if BACKEND == "tensorflow":
    import tensorflow as tf

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _sched():
    return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.9)


# One line per inner optimizer; each makes a fresh instance.
INNER = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "sgd_momentum_schedule": lambda: keras.optimizers.SGD(_sched(), momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_schedule": lambda: keras.optimizers.Adam(_sched()),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "lion": lambda: keras.optimizers.Lion(0.01),
    "adafactor": lambda: keras.optimizers.Adafactor(0.1),
    "ftrl": lambda: keras.optimizers.Ftrl(0.1),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "muon": lambda: keras.optimizers.Muon(0.01),
    "schedule_free_adamw": lambda: keras.optimizers.ScheduleFreeAdamW(0.01),
    # v0 with Adam; v1 and v2 share an SGD with momentum.
    "multi": lambda: keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.1, momentum=0.9), {"v0": keras.optimizers.Adam(0.01)}
        )
    ),
}

SPINE_CASES = [c for c in CASES if not c.config]


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("inner_id", list(INNER))
@pytest.mark.parametrize("case", SPINE_CASES[:4] + SPINE_CASES[6:8], ids=lambda c: c.id)
def test_micro_steps_equal_one_inner_step_on_merged_gradient(inner_id, case):
    """Spine: the wrapper equals the plain inner optimizer fed the oracle's merged gradients."""
    params, stream = make_params(), make_stream(case)
    oracle = RefAccum(params, RecordingInner(), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    if case.flush_at_end:
        oracle.flush()

    opt = AccumOptimizer(INNER[inner_id](), jit_compile=False, **case.kwargs)
    got = run_stream(opt, make_variables(params), stream, flush=case.flush_at_end)

    plain = INNER[inner_id]()
    ref_vars = make_variables(params)
    plain.build(ref_vars)
    want = replay_inner(plain, ref_vars, oracle.handed)
    _assert_close(got, want)
    assert int(opt.iterations.numpy()) == oracle.iterations == int(plain.iterations.numpy())
    assert int(opt.micro_steps.numpy()) == oracle.micro_steps == case.n_micro


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("case", [c for c in CASES if not c.config], ids=lambda c: c.id)
def test_case_table_against_oracle_sgd(case, momentum):
    """Every accumulation row, end to end against RefAccum(RefSGD)."""
    params, stream = make_params(), make_stream(case)
    oracle = RefAccum(params, RefSGD(0.1, momentum=momentum), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    if case.flush_at_end:
        oracle.flush()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=momentum), jit_compile=False, **case.kwargs)
    got = run_stream(opt, make_variables(params), stream, flush=case.flush_at_end)
    _assert_close(got, oracle.params)
    assert int(opt.iterations.numpy()) == oracle.iterations
    assert int(opt.window_steps.numpy()) == oracle.window_steps
    np.testing.assert_allclose(opt.window_weight.numpy(), oracle.window_weight)


@pytest.mark.tensorflow
@pytest.mark.parametrize("compiled", ["function", "eager_nojit"])
def test_tf_function_and_eager_loops_match_oracle(compiled):
    case = next(c for c in CASES if c.id == "merge4_none_whole_window")
    params, stream = make_params(), make_stream(case)
    oracle = RefAccum(params, RefSGD(0.1, momentum=0.9), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=compiled != "eager_nojit", **case.kwargs
    )
    got = run_stream(opt, make_variables(params), stream, compiled=compiled if compiled == "function" else None)
    _assert_close(got, oracle.params)


def test_unseen_variable_keeps_its_inner_state():
    """A variable without gradient in a whole window: weight AND momentum slot untouched."""
    params = make_params()
    v = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2)
    g = [ops.ones(x.shape) for x in v]
    opt.apply(g, v)
    opt.apply(g, v)  # window 1: every variable moves, Adam slots filled
    before_w = v[2].numpy().copy()
    slots_before = [s.numpy().copy() for s in opt.inner_optimizer.variables]
    opt.apply([g[0], g[1], None], v)
    opt.apply([g[0], None, None], v)  # v1 seen at step 1 of the window, v2 never
    np.testing.assert_array_equal(v[2].numpy(), before_w)
    changed = [
        not np.array_equal(a, s.numpy())
        for a, s in zip(slots_before, opt.inner_optimizer.variables)
    ]
    names = [s.path for s in opt.inner_optimizer.variables]
    assert not any(c for c, n in zip(changed, names) if "v2" in n), names
    assert any(c for c, n in zip(changed, names) if "v1" in n)
    assert int(opt.iterations.numpy()) == 2


def test_merge_grad_1_is_bit_identical_to_inner_optimizer():
    for make in (INNER["adam_schedule"], INNER["sgd_momentum_nesterov"], INNER["adamw"]):
        params = make_params()
        stream = make_stream(CASES[2])
        wrapped = AccumOptimizer(make(), merge_grad=1, jit_compile=False)
        got = run_stream(wrapped, make_variables(params), stream)
        plain = make()
        ref_vars = make_variables(params)
        for grads, _ in stream:
            plain.apply([ops.convert_to_tensor(g) for g in grads], ref_vars)
        for a, b in zip(got, ref_vars):
            np.testing.assert_array_equal(a, b.numpy())


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )


FIT_INNER = {
    "sgd_momentum_schedule": lambda: keras.optimizers.SGD(_sched(), momentum=0.9),
    "adam_schedule": lambda: keras.optimizers.Adam(_sched()),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "inner_id,steps_per_execution,jit",
    [("sgd_momentum_schedule", 1, False), ("adam_schedule", 2, False), ("adamw", 1, True)],
)
def test_fit_merge4_batch8_equals_batch32(inner_id, steps_per_execution, jit):
    if BACKEND == "torch" and steps_per_execution > 1:
        pytest.skip("Keras's torch trainer runs one step per execution")
    x, y = _data()
    small = _model()
    small.compile(
        optimizer=AccumOptimizer(FIT_INNER[inner_id](), merge_grad=4),
        loss="mse",
        steps_per_execution=steps_per_execution,
        jit_compile=jit,
    )
    small.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    large = _model()
    large.compile(optimizer=FIT_INNER[inner_id](), loss="mse", jit_compile=jit)
    large.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(small.get_weights(), large.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(small.optimizer.iterations.numpy()) == int(large.optimizer.iterations.numpy()) == 4
    assert int(small.optimizer.micro_steps.numpy()) == 16
    # The schedule saw the update count: the learning rates agree.
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(small.optimizer.learning_rate)),
        float(ops.convert_to_numpy(large.optimizer.learning_rate)),
    )


@pytest.mark.slow
def test_learning_rate_callbacks_drive_the_inner_optimizer():
    x, y = _data()
    model = _model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    model.compile(optimizer=opt, loss="mse")
    sched = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5**epoch)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[sched, plateau])
    # LearningRateScheduler set 0.05 at epoch 1; the plateau (never "improving"
    # with min_delta=1e9 after its first epoch) then halved it to 0.025.
    np.testing.assert_allclose(float(opt.inner_optimizer.learning_rate.numpy()), 0.025, rtol=1e-6)
    np.testing.assert_allclose(float(ops.convert_to_numpy(opt.learning_rate)), 0.025, rtol=1e-6)


def test_flush_uses_true_divisor_and_empty_flush_is_noop():
    params = make_params()
    v = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=4)
    g = [ops.convert_to_tensor(np.full(p.shape, k, "float32")) for k, p in zip((1.0, 2.0, 3.0), params)]
    opt.apply(g, v, weight=1.0)
    opt.apply(g, v, weight=3.0)
    assert opt.flush() is True
    # mean of identical gradients is the gradient itself: w <- w - 1.0 * g
    for p, x, k in zip(params, v, (1.0, 2.0, 3.0)):
        np.testing.assert_allclose(x.numpy(), p - k, rtol=1e-6)
    snapshot = [x.numpy().copy() for x in v]
    assert opt.flush() is False
    for s, x in zip(snapshot, v):
        np.testing.assert_array_equal(s, x.numpy())
    assert int(opt.iterations.numpy()) == 1


@pytest.mark.tensorflow
def test_flush_inside_tf_function():
    case = next(c for c in CASES if c.id == "merge4_flush_open_window")
    params, stream = make_params(), make_stream(case)
    oracle = RefAccum(params, RefSGD(0.1), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    oracle.flush()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), **case.kwargs)
    v = make_variables(params)
    run_stream(opt, v, stream)
    tf.function(opt.flush)()
    _assert_close([x.numpy() for x in v], oracle.params)


# ---------------------------------------------------------------- serialisation
def test_get_config_round_trip():
    opt = AccumOptimizer(
        keras.optimizers.Adam(_sched()), merge_grad=3, reduction="sum", global_clipnorm=1.0
    )
    config = opt.get_config()
    json.dumps(keras.saving.serialize_keras_object(opt))
    clone = AccumOptimizer.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert isinstance(restored, AccumOptimizer) and restored.merge_grad == 3


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras
    import keras_accum
    sys.path.insert(0, {here!r})
    from test_keras_accum import _data, _resume_batches
    mode, path, out = sys.argv[1:4]
    x, y = _data()
    if mode == "keras":
        model = keras.models.load_model(path)
        opt = model.optimizer
    else:
        import tensorflow as tf
        from test_keras_accum import _model
        model = _model(seed=1)
        opt = keras_accum.AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4)
        model.compile(optimizer=opt, loss="mse")
        opt.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=opt).restore(path).assert_consumed()
    for xb, yb in _resume_batches(x, y)[6:]:
        model.train_on_batch(xb, yb)
    np.savez(out, *model.get_weights(), it=int(opt.iterations.numpy()),
             micro=int(opt.micro_steps.numpy()))
    """
)


def _resume_batches(x, y):
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keras", pytest.param("checkpoint", marks=pytest.mark.tensorflow)])
def test_mid_window_save_and_resume_in_fresh_process_is_bit_identical(mode, tmp_path):
    x, y = _data()
    batches = _resume_batches(x, y)

    def fresh():
        model = _model(seed=1)
        model.compile(
            optimizer=AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4), loss="mse"
        )
        return model

    straight = fresh()
    for xb, yb in batches:
        straight.train_on_batch(xb, yb)

    model = fresh()
    for xb, yb in batches[:6]:  # 1 update and 2 micro-steps of an open window
        model.train_on_batch(xb, yb)
    assert int(model.optimizer.window_steps.numpy()) == 2
    if mode == "keras":
        path = str(tmp_path / "m.keras")
        model.save(path)
    else:
        path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
            str(tmp_path / "ckpt")
        )
    out = str(tmp_path / "out.npz")
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT.format(here=HERE))
    # The checkout under test, whatever keras_accum the interpreter has installed.
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, str(script), mode, path, out], check=True, env=env)
    got = np.load(out)
    for i, w in enumerate(straight.get_weights()):
        np.testing.assert_array_equal(got[f"arr_{i}"], w)
    assert int(got["it"]) == int(straight.optimizer.iterations.numpy()) == 4
    assert int(got["micro"]) == 16


def _trained_model(merge_grad, path):
    x, y = _data()
    model = _model()
    model.compile(
        optimizer=AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=merge_grad), loss="mse"
    )
    model.fit(x[:24], y[:24], batch_size=8, verbose=0)
    model.save(path)
    return model


def test_loading_differently_configured_state_raises_and_loads_nothing(tmp_path):
    path = str(tmp_path / "m.keras")
    _trained_model(4, path)
    # Same variables, another window length: refused, and nothing is assigned.
    other = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    model = _model(seed=3)
    other.build(model.trainable_variables)
    store = {}
    keras.models.load_model(path).optimizer.save_own_variables(store)
    before = [v.numpy().copy() for v in other.variables]
    with pytest.raises(ValueError, match="merge_grad: saved 4, this optimizer 2"):
        other.load_own_variables(store)
    for b, v in zip(before, other.variables):
        np.testing.assert_array_equal(b, v.numpy())
    # A store with the wrong number of variables: an error, never a warning and a skip.
    store.pop(str(len(store) - 2))
    same = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=4)
    same.build(model.trainable_variables)
    with pytest.raises(ValueError, match="variables"):
        same.load_own_variables(store)


@pytest.mark.tensorflow
def test_checkpoint_from_differently_configured_optimizer_raises(tmp_path):
    model = _model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=4)
    opt.build(model.trainable_variables)
    path = tf.train.Checkpoint(optimizer=opt).write(str(tmp_path / "ckpt"))
    other = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=4, reduction="sum")
    other.build(model.trainable_variables)
    with pytest.raises(ValueError, match="reduction: saved 'mean', this optimizer 'sum'"):
        tf.train.Checkpoint(optimizer=other).restore(path)


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"merge_grad": 0}, ValueError, "`merge_grad` must be an int >= 1. Received: merge_grad=0"),
        ({"merge_grad": -2}, ValueError, "Received: merge_grad=-2"),
        ({"merge_grad": 2.5}, TypeError, "Received: merge_grad=2.5"),
        ({"merge_grad": "4"}, TypeError, "Received: merge_grad='4'"),
        ({"merge_grad": True}, TypeError, "Received: merge_grad=True"),
        ({"reduction": "avg"}, ValueError, "`reduction` must be one of .*Received: reduction='avg'"),
        ({"accumulator_dtype": "int8"}, ValueError, "Received: accumulator_dtype='int8'"),
        ({"accumulator_dtype": None}, TypeError, "Received: accumulator_dtype=None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AccumOptimizer("sgd", **kwargs)


@pytest.mark.parametrize(
    "optimizer,error,match",
    [
        (42, TypeError, "`optimizer` must be a `keras.optimizers.Optimizer`.*Received: optimizer=42"),
        ("no_such_optimizer", ValueError, "Received: optimizer='no_such_optimizer'"),
        (
            lambda: keras.optimizers.SGD(gradient_accumulation_steps=4),
            ValueError,
            "already has `gradient_accumulation_steps=4`",
        ),
        (lambda: keras.optimizers.Adam(use_ema=True), ValueError, "already has `use_ema=True`"),
        (lambda: keras.optimizers.Adam(clipnorm=1.0), ValueError, "already has `clipnorm=1.0`"),
        (lambda: keras.optimizers.Adam(clipvalue=1.0), ValueError, "already has `clipvalue=1.0`"),
        (
            lambda: keras.optimizers.Adam(global_clipnorm=1.0),
            ValueError,
            "already has `global_clipnorm=1.0`",
        ),
        (lambda: AccumOptimizer("sgd"), ValueError, "already an AccumOptimizer"),
        (
            lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            ValueError,
            "LossScaleOptimizer",
        ),
    ],
)
def test_bad_inner_optimizer(optimizer, error, match):
    if callable(optimizer):
        optimizer = optimizer()
    with pytest.raises(error, match=match):
        AccumOptimizer(optimizer, merge_grad=2)


@pytest.mark.parametrize(
    "feature,value,ours",
    [
        ("gradient_accumulation_steps", 2, "merge_grad=2"),
        ("use_ema", True, "use_ema=True"),
        ("global_clipnorm", 1.0, "global_clipnorm=1.0"),
    ],
)
def test_inner_feature_refusal_names_our_argument_and_the_one_liner(feature, value, ours):
    """The refusal says what to pass to AccumOptimizer (our name, not Keras's),
    and both ways out it names work."""
    inner = keras.optimizers.Adam(**{feature: value})
    with pytest.raises(ValueError) as caught:
        AccumOptimizer(inner, merge_grad=4)
    message = str(caught.value)
    assert f"Pass `{ours}` to AccumOptimizer and leave `{feature}` off the inner" in message
    assert "`AccumOptimizer.from_keras_optimizer(optimizer)`" in message
    assert f"Received: optimizer with {feature}={value!r}" in message
    name = ours.split("=")[0]
    assert AccumOptimizer(keras.optimizers.Adam(), **{name: value}).get_config()[name] == value
    assert AccumOptimizer.from_keras_optimizer(inner).get_config()[name] == value


def test_gradient_list_length_mismatch_raises_and_changes_nothing():
    params = make_params()
    v = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    opt.apply([ops.ones(x.shape) for x in v], v)
    state = [x.numpy().copy() for x in opt.variables]
    with pytest.raises(ValueError, match=r"Received: len\(grads\)=2 for 3 variables"):
        opt.apply([ops.ones(x.shape) for x in v[:2]], v)
    with pytest.raises(ValueError, match=r"Received: len\(grads\)=2 for 3 variables"):
        opt.apply([ops.ones(x.shape) for x in v[:2]])
    with pytest.raises(ValueError, match="Received: weight=-1"):
        opt.apply([ops.ones(x.shape) for x in v], v, weight=-1)
    for s, x in zip(state, opt.variables):
        np.testing.assert_array_equal(s, x.numpy())
    for p, x in zip(params, v):
        np.testing.assert_array_equal(p, x.numpy())


def test_import_keras_accum_imports_no_other_framework():
    """`import keras_accum` imports no framework that `import keras` did not: on
    JAX or torch no TensorFlow, on TensorFlow or JAX no torch."""
    code = textwrap.dedent(
        """
        import sys
        import keras
        before = {m for m in ("tensorflow", "jax", "torch") if m in sys.modules}
        import keras_accum
        opt = keras_accum.AccumOptimizer("sgd", merge_grad=2)
        after = {m for m in ("tensorflow", "jax", "torch") if m in sys.modules}
        print("BEFORE", sorted(before), "AFTER", sorted(after))
        """
    )
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("BEFORE"))
    before, after = line[len("BEFORE ") :].split(" AFTER ")
    assert before == after, line
    assert BACKEND in after


def test_public_names():
    assert set(keras_accum.__all__) >= {"AccumOptimizer", "SwapEMAWeights", "FlushWindow"}
    assert isinstance(AccumOptimizer("adam"), keras.optimizers.Optimizer)


def test_raise_policy_with_weight_and_none_gradient():
    """A None gradient next to a weighted micro-step under "raise" is just zero."""
    params = make_params()
    v = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=2, on_nonfinite="raise")
    g = [ops.ones(x.shape) for x in v]
    opt.apply([g[0], None, g[2]], v, weight=2.0)
    opt.apply(g, v, weight=2.0)
    np.testing.assert_allclose(v[0].numpy(), params[0] - 1.0)  # mean of two 1s
    np.testing.assert_allclose(v[1].numpy(), params[1] - 0.5)  # (0*2 + 1*2) / 4
    with pytest.raises(FloatingPointError, match="micro-step 3"):
        opt.apply([g[0] * np.inf, None, g[2]], v, weight=2.0)


class _PyFuncSGD(keras.optimizers.SGD):
    """An SGD whose update runs a NumPy function, which XLA cannot compile."""

    def update_step(self, gradient, variable, learning_rate):
        step = tf.numpy_function(lambda g: g * np.float32(0.1), [gradient], tf.float32)
        variable.assign_sub(tf.reshape(step, tf.shape(variable)))


def _sgd_oracle(case_id):
    """The case named `case_id`, its parameters and stream, and RefAccum(RefSGD(0.1)) run on it."""
    case = next(c for c in CASES if c.id == case_id)
    params, stream = make_params(), make_stream(case)
    oracle = RefAccum(params, RefSGD(0.1), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    return case, params, stream, oracle


def _count_micro_steps(opt, record):
    """A list that gets `record(kwargs)` each time `opt._micro_step`'s Python body runs."""
    bodies = []
    step_body = opt._micro_step

    def counting(*args, **kwargs):
        bodies.append(record(kwargs))
        return step_body(*args, **kwargs)

    opt._micro_step = counting
    return bodies


class _PyFuncAccum(AccumOptimizer):
    """A subclass whose micro-step adds through a NumPy function (XLA cannot compile it)."""

    def update_step(self, gradient, variable, learning_rate):
        acc = self._accumulators[self._get_variable_index(variable)]
        added = tf.numpy_function(lambda g: g * np.float32(1.0), [gradient], tf.float32)
        acc.assign_add(tf.reshape(added, tf.shape(acc)))


class _HalvesAccum(AccumOptimizer):
    """A subclass that adds each gradient in two halves through the base `update_step`."""

    def update_step(self, gradient, variable, learning_rate):
        half = gradient * 0.5
        super().update_step(half, variable, learning_rate)
        super().update_step(half, variable, learning_rate)


@pytest.mark.parametrize("jit_compile", [True, False], ids=["jit", "nojit"])
def test_overridden_update_step_adds_at_every_micro_step(jit_compile):
    """The window's first micro-step writes instead of adding only with our own
    `update_step`: an override may add twice into one accumulator."""
    case, params, stream, oracle = _sgd_oracle("merge4_weighted")
    opt = _HalvesAccum(keras.optimizers.SGD(0.1), jit_compile=jit_compile, **case.kwargs)
    got = run_stream(opt, make_variables(params), stream)
    _assert_close(got, oracle.params)
    assert int(opt.iterations.numpy()) == oracle.iterations


@pytest.mark.tensorflow
def test_inner_op_xla_cannot_compile_runs_unjitted_without_warning():
    """The inner optimizer never runs under our XLA function: it runs eagerly."""
    import warnings

    case, params, stream, oracle = _sgd_oracle("merge4")
    opt = AccumOptimizer(_PyFuncSGD(0.1), **case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run_stream(opt, make_variables(params), stream)
    _assert_close(got, oracle.params)
    assert opt._plumbing._accumulate_jitted


@pytest.mark.tensorflow
def test_xla_fallback_warns_once_and_gives_the_same_numbers():
    case, params, stream, oracle = _sgd_oracle("merge4")
    opt = _PyFuncAccum(keras.optimizers.SGD(0.1), **case.kwargs)
    bodies = _count_micro_steps(opt, lambda kwargs: (kwargs.get("closes"), kwargs.get("starts", False)))
    with pytest.warns(UserWarning, match="XLA could not compile the step") as record:
        got = run_stream(opt, make_variables(params), stream)
    assert sum("XLA could not compile" in str(w.message) for w in record) == 1
    # The accumulate function traced twice (the XLA try, then the plain
    # tf.function), the update function once: none runs per micro-step.
    # `update_step` is overridden, so no micro-step writes instead of adding.
    assert bodies.count((False, False)) == 2
    assert bodies.count((False, True)) == 0
    assert bodies.count((True, False)) == 1 < oracle.iterations
    assert not opt._plumbing._accumulate_jitted
    _assert_close(got, oracle.params)
    assert int(opt.iterations.numpy()) == oracle.iterations


def test_numpy_gradients_match_oracle_and_a_bad_shape_changes_nothing():
    """NumPy arrays are gradients too (eager loop); one of the wrong shape is
    refused, naming the variable and the shape, before anything moves."""
    case, params, stream, oracle = _sgd_oracle("merge4_weighted")
    variables = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), **case.kwargs)
    for grads, weight in stream[:-1]:
        opt.apply([np.asarray(g, "float32") for g in grads], variables, weight=weight)
    before = [np.array(v.numpy()) for v in variables + list(opt.variables)]
    bad = [np.asarray(g, "float32") for g in stream[-1][0]]
    bad[0] = np.zeros(bad[0].shape[::-1] + (1,), "float32")
    with pytest.raises(ValueError, match=r"variable's shape.*Received: gradient of shape"):
        opt.apply(bad, variables, weight=stream[-1][1])
    after = [np.array(v.numpy()) for v in variables + list(opt.variables)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    grads, weight = stream[-1]
    opt.apply([np.asarray(g, "float32") for g in grads], variables, weight=weight)
    _assert_close([np.array(v.numpy()) for v in variables], oracle.params)
    assert int(opt.iterations.numpy()) == oracle.iterations


@pytest.mark.tensorflow
def test_run_functions_eagerly_runs_every_micro_step_in_python():
    """`tf.config.run_functions_eagerly(True)` (debugging) reaches every micro-step:
    the concrete functions that eager micro-steps call are bypassed then."""
    case, params, stream, oracle = _sgd_oracle("merge4_weighted")
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), **case.kwargs)
    bodies = _count_micro_steps(opt, lambda kwargs: kwargs.get("closes"))
    tf.config.run_functions_eagerly(True)
    try:
        got = run_stream(opt, make_variables(params), stream)
    finally:
        tf.config.run_functions_eagerly(False)
    assert len(bodies) == len(stream)  # once per micro-step, no trace skipped any
    _assert_close(got, oracle.params)


@pytest.mark.slow
def test_a_layer_frozen_while_a_window_is_open_moves_once_when_it_closes():
    """Freezing a layer mid-window (then recompiling, as Keras asks): its gradients
    from the window's earlier micro-steps are not lost (contract point 4), so it
    moves once more, when the window closes, by the inner step on what it
    accumulated divided by the window's weight; never after. (Keras's JAX trainer
    refuses a changed list of trainable variables for any built optimizer.)"""
    if BACKEND == "jax":
        pytest.skip("Keras's JAX trainer refuses it for every optimizer")
    x, y = _data(64)
    model = _model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=4)
    model.compile(optimizer=opt, loss="mse")
    probe = _model()  # the gradients of the first two micro-batches, by SGD(lr=1) steps
    probe.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    frozen = model.layers[0]
    sums = [np.zeros(v.shape, "float32") for v in frozen.trainable_variables]
    for i in range(2):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        model.train_on_batch(xb, yb)
        probe.set_weights(model.get_weights())
        before = [np.array(v.numpy()) for v in probe.layers[0].trainable_variables]
        probe.train_on_batch(xb, yb)
        for s, b, v in zip(sums, before, probe.layers[0].trainable_variables):
            s += b - np.array(v.numpy())
    at_freeze = [np.array(v.numpy()) for v in frozen.trainable_variables]
    frozen.trainable = False
    model.compile(optimizer=opt, loss="mse")
    for i in range(2, 4):  # the window closes here
        model.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    assert int(opt.iterations.numpy()) == 1
    moved = [np.array(v.numpy()) for v in frozen.variables]
    for m, a, s in zip(moved, at_freeze, sums):
        np.testing.assert_allclose(m, a - 0.1 * s / 4, rtol=1e-5, atol=1e-6)
    for i in range(4, 8):  # a whole window later: it stays where it is
        model.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    for m, v in zip(moved, frozen.variables):
        np.testing.assert_array_equal(m, np.array(v.numpy()))
    assert int(opt.iterations.numpy()) == 2
