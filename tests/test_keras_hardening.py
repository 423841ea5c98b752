"""Keras AccumOptimizer: what expert users found running real workflows through it.

Each test failed on the version before it was written. Numbers are checked
against the NumPy oracle (`reference.py`), a plain inner optimizer fed the
oracle's merged gradients, a large-batch `fit`, or float64 NumPy arithmetic.

- weight-decay exclusions reach the inner optimizer (also before `build`);
- `variables`, `get_weights`/`set_weights` and the saved state list own and
  inner state once each; `.keras` files of state format 1 still load;
- a refused load assigns nothing, inner state included;
- float64 variables accumulate (and keep their EMA) in float64;
- an all-`None` gradient list raises as plain Keras does, changing nothing;
- `MultiOptimizer`, `Muon` and `ScheduleFreeAdamW` as inner optimizers;
- `loss_scale_factor` works on the wrapper, as the refusal advises;
- a Keras backend without optimizer steps (NumPy) is refused at construction.
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
from keras_driver import (
    BACKEND,
    FLOAT64,
    make_variables,
    run_stream,
    small_data,
    small_model,
    to_tensors,
)

if BACKEND == "tensorflow":
    import tensorflow as tf
from reference import RecordingInner, RefAccum

from keras_accum import AccumOptimizer
from keras_accum.keras import _state

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
FORMAT1_FILE = os.path.join(HERE, "data", "format1_adam_merge4_ema.keras")


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _same(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"{what}[{i}]")


def _close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


def _grads(variables, seed):
    rng = np.random.default_rng(seed)
    return [ops.convert_to_tensor(rng.standard_normal(v.shape), dtype=v.dtype) for v in variables]


def _trained(opt, model, n=3, seed=0):
    """Takes `n` micro-steps of random gradients on `model`'s variables."""
    variables = model.trainable_variables
    for k in range(n):
        opt.apply(_grads(variables, seed + k), variables)
    return opt


# ------------------------------------------------------- weight-decay exclusion
@pytest.mark.parametrize("how", ["var_names", "var_list"])
def test_exclude_from_weight_decay_reaches_the_inner_optimizer(how):
    """AdamW must not decay an excluded variable, as the plain AdamW does not."""
    params = make_params()
    case = next(c for c in CASES if c.id == "merge2")
    stream = make_stream(case)
    oracle = RefAccum(params, RecordingInner(), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)

    def exclude(opt, variables):
        if how == "var_names":
            opt.exclude_from_weight_decay(var_names=["v1"])
        else:
            opt.exclude_from_weight_decay(var_list=[variables[1]])

    wrapped_vars = make_variables(params)
    opt = AccumOptimizer(keras.optimizers.AdamW(0.1, weight_decay=0.5), jit_compile=False, **case.kwargs)
    exclude(opt, wrapped_vars)  # before build: nothing to exclude from yet
    got = run_stream(opt, wrapped_vars, stream)

    plain_vars = make_variables(params)
    plain = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    exclude(plain, plain_vars)
    for grads in oracle.handed:
        plain.apply(to_tensors(grads), plain_vars)
    _close(got, _values(plain_vars))
    # The exclusion matters here: decayed, variable 1 would end elsewhere.
    decayed_vars = make_variables(params)
    decayed = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    for grads in oracle.handed:
        decayed.apply(to_tensors(grads), decayed_vars)
    assert np.abs(got[1] - decayed_vars[1].numpy()).max() > 1e-3


# ----------------------------------------------------- variables and weights
def test_variables_list_inner_then_own_state_once_each():
    """The inner state first, so `variables[0]` is the step counter (`iterations`), as
    Keras code reads it; the base class's unused counter and learning rate are not listed."""
    model = small_model()
    opt = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=2)
    opt.build(model.trainable_variables)
    ids = [id(v) for v in opt.variables]
    assert len(ids) == len(set(ids)), [v.path for v in opt.variables]
    inner = opt.inner_optimizer.variables
    assert ids[: len(inner)] == [id(v) for v in inner]
    assert opt.variables[0] is opt.iterations
    model_ids = {id(v) for v in model.trainable_variables}
    assert not model_ids & set(ids), "model weights listed as optimizer state"
    own = ids[len(inner) :]
    assert not {id(v) for v in inner} & set(own), "inner state listed as own state"
    assert id(opt._iterations) not in ids and id(opt._learning_rate) not in ids
    assert len(own) == 4 + 6  # an accumulator per variable, the counters


def test_get_weights_and_set_weights_carry_inner_state():
    """`set_weights(get_weights())` moves inner step and moments too; lockstep after."""
    source = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), n=3)
    target_model = small_model()
    target = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2)
    target.build(target_model.trainable_variables)
    weights = source.get_weights()
    assert len(weights) == len(source.variables)
    target.set_weights(weights)
    _same(_values(target.variables), _values(source.variables))
    assert int(target.inner_optimizer.iterations.numpy()) == 1
    assert int(target.micro_steps.numpy()) == 3
    # Lockstep: the same model weights and gradients give the same results.
    source_vars = source._trainable_variables
    for tv, sv in zip(target_model.trainable_variables, source_vars):
        tv.assign(sv)
    for k in range(3):
        source.apply(_grads(source_vars, 10 + k), source_vars)
        target.apply(_grads(source_vars, 10 + k), target_model.trainable_variables)
    _same(_values(target_model.trainable_variables), _values(source_vars))


@pytest.mark.parametrize("bad", ["count", "shape", "dtype"])
def test_set_weights_refuses_a_bad_list_and_assigns_nothing(bad):
    opt = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), n=3)
    before = _values(opt.variables)
    weights = opt.get_weights()
    if bad == "count":
        weights = weights[:-1]
        match = rf"`weights` must hold {len(before)} arrays.*Received: {len(before) - 1} arrays"
    elif bad == "shape":
        last_inner = len(opt.inner_optimizer.variables) - 1
        weights[last_inner] = np.zeros((7,), weights[last_inner].dtype)
        match = r"shape \(2,\).*Received: .*shape \(7,\)"
    else:
        weights[-1] = weights[-1].astype("int32")
        match = "dtype float32.*Received: .*dtype int32"
    with pytest.raises(ValueError, match=match):
        opt.set_weights(weights)
    _same(_values(opt.variables), before)


# ------------------------------------------------------------- saved state
def _save_store(opt):
    store = {}
    opt.save_own_variables(store)
    return store


def _signature(store):
    return json.loads(bytes(np.asarray(store["keras_accum_signature"], np.uint8)).decode())


def test_saved_state_is_inner_and_own_once_with_format_version_3():
    opt = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), n=1)
    store = _save_store(opt)
    assert len(store) == len(opt.variables) + 1
    assert _signature(store)["format_version"] == 3
    # Round trip into a fresh optimizer: every own and inner value arrives.
    other = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2)
    other.build(small_model().trainable_variables)
    other.load_own_variables(store)
    _same(_values(other.variables), _values(opt.variables))


def test_unknown_state_format_version_is_refused_naming_it():
    opt = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), n=1)
    store = _save_store(opt)
    signature = _signature(store)
    signature["format_version"] = 99
    store["keras_accum_signature"] = np.frombuffer(json.dumps(signature).encode(), np.uint8)
    before = _values(opt.variables)
    with pytest.raises(ValueError, match="state format version 99.*reads versions 1, 2, 3"):
        opt.load_own_variables(store)
    _same(_values(opt.variables), before)


@pytest.mark.tensorflow
def test_checkpoint_guard_reads_format_1_and_refuses_unknown_versions():
    """`tf.train.Checkpoint` names each variable: format-1 and 2 checkpoints restore as is."""
    opt = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2)
    signature = json.loads(opt._state_guard.serialize())
    assert signature["format_version"] == 3
    opt._state_guard.deserialize(json.dumps(dict(signature, format_version=1)))
    opt._state_guard.deserialize(json.dumps(dict(signature, format_version=2)))
    with pytest.raises(ValueError, match="format_version: saved 99, this optimizer 3"):
        opt._state_guard.deserialize(json.dumps(dict(signature, format_version=99)))


def _format1_batches():
    x, y = small_data(n=48)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)] * 2


def _format1_arrays():
    """The arrays stored in the format-1 file, read with h5py (no Keras loading)."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(FORMAT1_FILE) as archive:
        raw = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(raw), "r") as f:

        def group(name):
            g = f[name]
            return [np.array(g[str(i)]) for i in range(len([k for k in g if k.isdigit()]))]

        model = group("layers/dense/vars") + group("layers/dense_1/vars")
        own = group("optimizer/vars")
        inner = group("optimizer/inner_optimizer/vars")
        signature = json.loads(bytes(np.array(f["optimizer/vars/keras_accum_signature"])).decode())
    return model, own, inner, signature


def _assign_format1_state(model, opt, arrays):
    """Writes the file's arrays into `model` and a built `opt`, entry by entry."""
    model_arrays, own, inner, _ = arrays
    model.set_weights(model_arrays)
    for (variable, assign), value in zip(_state.layout(opt, 1), own):
        if assign:
            variable.assign(value)
    for variable, value in zip(opt.inner_optimizer.variables, inner):
        variable.assign(value)


def _format1_optimizer():
    return AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4, use_ema=True, ema_momentum=0.5)


@pytest.mark.slow
def test_keras_file_of_state_format_1_loads_and_resumes_bit_identically():
    """A `.keras` file written by the format-1 layout (model weights and inner
    slots listed twice in the optimizer's state) loads and resumes exactly.

    The file was made by the previous release's code: `small_model(seed=1)`,
    `AccumOptimizer(Adam(0.01), merge_grad=4, use_ema=True, ema_momentum=0.5)`,
    `train_on_batch` on the first 6 batches of `_format1_batches()`, then saved
    (tests/data/README.md).

    Bit-for-bit comparisons are made only between numbers computed on this
    machine, or against the numbers stored in the file: the file's weights
    were computed on another CPU, and recomputing them here may differ in the
    last bit (seen on an AVX-512 CPU: one ulp, 7.45e-09).

    1. What is loaded equals what the file stores, entry by entry (every entry
       of the format-1 layout, the ones listed twice included), and every
       optimizer variable is one of them.
    2. Resume: the loaded model, trained on the 6 remaining batches, equals
       bit for bit a model built in code whose every variable was assigned
       the file's arrays directly (not through `load_model`) and trained on
       the same batches here: the load restored the whole state.
    3. The file is what its recipe makes: recomputed here from scratch, the
       run agrees with it to float32 round-off (not bit for bit).
    """
    arrays = _format1_arrays()
    model_arrays, own, inner, signature = arrays
    assert signature["format_version"] == 1
    batches = _format1_batches()

    loaded = keras.models.load_model(FORMAT1_FILE)
    opt = loaded.optimizer
    # 1. The loaded state is the stored state.
    _same(loaded.get_weights(), model_arrays, "model weights vs file")
    layout = _state.layout(opt, 1)
    assert len(layout) == len(own)
    _same(_values([v for v, _ in layout]), own, "format-1 entries vs file")
    _same(_inner_state(opt), inner, "inner state vs file")
    listed = [v for v, assign in layout if assign] + list(opt.inner_optimizer.variables)
    assert all(any(v is w for w in listed) for v in opt.variables), "a variable not in the file"
    assert int(opt.window_steps.numpy()) == 2 and int(opt.iterations.numpy()) == 1

    # 2. Resume, against a run from the file's arrays, on this machine: the same
    #    program (the file's model, loss and optimizer configs), its state
    #    scrambled, then every entry assigned from the file by hand.
    straight = keras.models.load_model(FORMAT1_FILE)
    straight_opt = straight.optimizer
    straight.set_weights([np.zeros_like(w) for w in model_arrays])
    straight_opt.set_weights([np.zeros_like(v) for v in _values(straight_opt.variables)])
    _assign_format1_state(straight, straight_opt, arrays)
    _same(_values(straight_opt.variables), _values(opt.variables), "assigned vs loaded state")
    for xb, yb in batches[6:]:
        straight.train_on_batch(xb, yb)
        loaded.train_on_batch(xb, yb)
    _same(loaded.get_weights(), straight.get_weights(), "model after resume")
    _same(_values(opt.ema_variables), _values(straight_opt.ema_variables), "EMA")
    _same(_values(opt.variables), _values(straight_opt.variables), "optimizer state after resume")
    assert int(opt.iterations.numpy()) == 3 and int(opt.window_steps.numpy()) == 0

    # 3. The recipe's own run, recomputed here (TensorFlow: the backend that drew
    #    the initial weights): equal to round-off.
    if BACKEND == "tensorflow":
        recipe = small_model(seed=1)
        recipe.compile(optimizer=_format1_optimizer(), loss="mse")
        for xb, yb in batches[:6]:
            recipe.train_on_batch(xb, yb)
        _close(recipe.get_weights(), model_arrays, rtol=1e-6, atol=1e-7, what="recomputed vs file")

    # Saved again, it is written in the current format (each value once).
    store = _save_store(opt)
    assert _signature(store)["format_version"] == 3
    assert len(store) == len(opt.variables) + 1


def _inner_state(opt):
    return _values(opt.inner_optimizer.variables)


def _saved_merge4_and_trained_merge2(tmp_path):
    """A `.keras` file of a merge_grad=4 model, and a merge_grad=2 model that
    took one update (moments non-zero): loading the first into the second must
    be refused."""
    x, y = small_data(n=32)
    saved = small_model()
    saved.compile(optimizer=AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=4), loss="mse")
    saved.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "m.keras")
    saved.save(path)
    model = small_model(seed=5)
    opt = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x[:16], y[:16], batch_size=8, verbose=0)
    return saved, path, model, opt


@pytest.mark.slow
def test_refused_keras_load_leaves_inner_and_own_state_unchanged(tmp_path):
    """Loading a differently configured `.keras` state raises and assigns nothing."""
    _, path, model, opt = _saved_merge4_and_trained_merge2(tmp_path)
    own_before = _values(opt.variables[len(opt.inner_optimizer.variables) :])
    inner_before = _inner_state(opt)
    with pytest.raises(ValueError, match="merge_grad: saved 4, this optimizer 2"):
        model.load_weights(path)
    _same(_inner_state(opt), inner_before, "inner state")
    _same(_values(opt.variables[len(opt.inner_optimizer.variables) :]), own_before, "own")


@pytest.mark.parametrize("bad", ["inner_shape", "inner_dtype", "own_dtype"])
def test_load_validates_inner_state_before_assigning_anything(bad):
    """A store whose inner (or own) entries do not fit raises before any assignment."""
    source = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), n=3)
    store = _save_store(source)
    n = len(source.inner_optimizer.variables)
    if bad == "inner_shape":
        store[str(n - 1)] = np.zeros((9,), "float32")
        match = r"shape \(2,\), the saved value \(9,\)"
    elif bad == "inner_dtype":
        store[str(n - 1)] = store[str(n - 1)].astype("float64")
        match = "dtype float32, the saved value float64"
    else:
        store["0"] = np.asarray(store["0"]).astype("float32")
        match = "dtype int(32|64), the saved value float32"
    target = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), small_model(), 1, 7)
    before = _values(target.variables)
    with pytest.raises(ValueError, match=match):
        target.load_own_variables(store)
    _same(_values(target.variables), before)


@pytest.mark.tensorflow
def test_refused_checkpoint_restore_leaves_inner_state_unchanged(tmp_path):
    model = small_model()
    source = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=4), model, n=4)
    path = tf.train.Checkpoint(optimizer=source).write(str(tmp_path / "ckpt"))
    other_model = small_model(seed=3)
    other = _trained(AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2), other_model, 2, 9)
    before = _values(other.variables)
    with pytest.raises(ValueError, match="merge_grad: saved 4, this optimizer 2"):
        tf.train.Checkpoint(optimizer=other).restore(path)
    _same(_values(other.variables), before)


@pytest.mark.skipif(not FLOAT64, reason="JAX runs without float64 (jax_enable_x64)")
# ----------------------------------------------------------------- float64
@pytest.mark.parametrize("jit_compile", [False, True])
def test_float64_variables_accumulate_in_float64(jit_compile):
    """Differences of 1e-10 survive the window, as in float64 large-batch arithmetic."""
    w0 = np.array([1.0, -2.0, 3.0])
    grads = [np.array([1.0, 1.0, 1.0]) + k * 1e-10 * np.array([1.0, 2.0, 3.0]) for k in range(4)]
    v = keras.Variable(w0, dtype="float64")
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=4, jit_compile=jit_compile)
    for g in grads:
        opt.apply([ops.convert_to_tensor(g, "float64")], [v])
    expected = w0 - np.mean(grads, axis=0)
    np.testing.assert_allclose(v.numpy(), expected, rtol=0, atol=1e-15)
    # The norm of the merged gradient is a float64 computation too.
    np.testing.assert_allclose(
        float(opt.last_grad_norm.numpy()), np.linalg.norm(np.mean(grads, axis=0)), rtol=1e-6
    )


@pytest.mark.skipif(not FLOAT64, reason="JAX runs without float64 (jax_enable_x64)")
@pytest.mark.parametrize("make", [lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                                  lambda: keras.optimizers.Adam(0.01)])
def test_float64_merge_grad_1_is_bit_identical_to_the_inner_optimizer(make):
    params = [p.astype("float64") for p in make_params()]
    # Gradients with bits below float32 precision.
    stream = [
        ([g.astype("float64") * (1 + 1e-9) for g in grads], w)
        for grads, w in make_stream(CASES[2])
    ]
    wrapped = AccumOptimizer(make(), merge_grad=1, jit_compile=False)
    got = run_stream(wrapped, make_variables(params, "float64"), stream)
    plain = make()
    ref_vars = make_variables(params, "float64")
    for grads, _ in stream:
        plain.apply(to_tensors(grads, "float64"), ref_vars)
    _same(got, _values(ref_vars))


@pytest.mark.skipif(not FLOAT64, reason="JAX runs without float64 (jax_enable_x64)")
def test_float64_ema_is_kept_in_float64():
    v = keras.Variable(np.array([1.0, 2.0]), dtype="float64")
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), use_ema=True, ema_momentum=0.5, jit_compile=False)
    history = []
    for k in range(3):
        opt.apply([ops.convert_to_tensor([1e-9 * (k + 1), -3e-9], "float64")], [v])
        history.append(v.numpy().copy())
    ema = history[0]
    for w in history[1:]:
        ema = 0.5 * ema + 0.5 * w
    (shadow,) = opt.ema_variables
    assert shadow.dtype == "float64"
    np.testing.assert_allclose(shadow.numpy(), ema, rtol=0, atol=1e-15)
    with opt.swap_ema_weights():
        np.testing.assert_allclose(v.numpy(), ema, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(v.numpy(), history[-1])


# -------------------------------------------------------- all-None gradients
@pytest.mark.parametrize(
    "where", ["unbuilt", "eager", "jit", pytest.param("tf_function", marks=pytest.mark.tensorflow)]
)
def test_all_none_gradients_raise_like_keras_and_change_nothing(where):
    variables = make_variables(make_params())
    opt = AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=2, jit_compile=where == "jit")
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        keras.optimizers.Adam().apply([None] * 3, variables)  # what plain Keras says
    if where != "unbuilt":
        opt.apply([ops.ones(v.shape) for v in variables], variables)
    before = _values(opt.variables) + _values(variables)
    call = opt.apply
    if where == "tf_function":
        call = tf.function(lambda grads, variables: opt.apply(grads, variables))
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        call([None] * 3, variables)
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        opt.apply_gradients(zip([None] * 3, variables))
    if where == "unbuilt":
        assert not opt.built
        return
    _same(_values(opt.variables) + _values(variables), before)
    assert int(opt.micro_steps.numpy()) == 1 and int(opt.iterations.numpy()) == 0


# ----------------------------------------------------------- MultiOptimizer
def _multi():
    # v0 with Adam; v1 and v2 share an SGD with momentum.
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.1, momentum=0.9), {"v0": keras.optimizers.Adam(0.05)}
        )
    )


def test_multi_optimizer_variable_unseen_for_a_window_keeps_its_sub_optimizer_slots():
    variables = make_variables(make_params())
    opt = AccumOptimizer(_multi(), merge_grad=2)
    g = [ops.ones(v.shape) for v in variables]
    opt.apply(g, variables)
    opt.apply(g, variables)  # window 1: every variable moves, every slot filled
    (sgd,) = [o for o in opt.inner_optimizer.optimizers if isinstance(o, keras.optimizers.SGD)]
    slots_before = _values(sgd.variables)
    weight_before = variables[2].numpy().copy()
    opt.apply([g[0], g[1], None], variables)
    opt.apply([g[0], None, None], variables)  # v2 unseen in window 2
    np.testing.assert_array_equal(variables[2].numpy(), weight_before)
    changed = {
        s.path: not np.array_equal(b, s.numpy()) for b, s in zip(slots_before, sgd.variables)
    }
    assert not any(c for path, c in changed.items() if "v2" in path), changed
    assert any(c for path, c in changed.items() if "v1" in path), changed


@pytest.mark.slow
def test_learning_rate_callbacks_on_wrapper_with_inner_multi_optimizer_act_as_on_plain_one():
    x, y = small_data(n=32)

    def multi():
        model_map = keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.1, name="sgd_sub"),
            {".*kernel": keras.optimizers.Adam(0.02, name="adam_sub")},
        )
        return keras.optimizers.MultiOptimizer(model_map)

    def run(optimizer):
        model = small_model()
        model.compile(optimizer=optimizer, loss="mse")
        callbacks = [
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
        ]
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
        subs = optimizer.optimizers
        lrs = [float(s.learning_rate.numpy()) for s in subs]
        return lrs, history.history, model.get_weights()

    wrapped = AccumOptimizer(multi(), merge_grad=1)
    got_lrs, got_logs, got_weights = run(wrapped)
    want_lrs, want_logs, want_weights = run(multi())
    assert got_lrs == want_lrs
    _close(got_weights, want_weights)
    # halved by the scheduler at each epoch, by the plateau after epoch 2
    np.testing.assert_allclose(sorted(got_lrs), [0.02 * 0.5**3, 0.1 * 0.5**3], rtol=1e-6)
    lr_keys = sorted(k for k in want_logs if k.startswith("learning_rate"))
    assert lr_keys == ["learning_rate_adam_sub", "learning_rate_sgd_sub"]
    assert lr_keys == sorted(k for k in got_logs if k.startswith("learning_rate"))
    for k in lr_keys:
        np.testing.assert_allclose(got_logs[k], want_logs[k])


# ------------------------------------------------------- ScheduleFreeAdamW
@pytest.mark.slow
def test_schedule_free_adamw_in_fit_on_a_model_not_built_before_fit():
    """merge_grad=4 at batch 8 equals batch 32 with the optimizer built eagerly.

    The large-batch run builds its optimizer before `fit`: a plain
    ScheduleFreeAdamW built lazily inside the traced train step loses the
    copy of the weights into its momentum (its build assigns inside a trace
    that TensorFlow never runs), which the wrapper must not imitate.
    """
    x, y = small_data(n=64)
    keras.utils.set_random_seed(0)
    small = keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    small.compile(
        optimizer=AccumOptimizer(keras.optimizers.ScheduleFreeAdamW(0.01), merge_grad=4),
        loss="mse",
    )
    small.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    keras.utils.set_random_seed(0)
    large = keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    large.build((None, 5))
    plain = keras.optimizers.ScheduleFreeAdamW(0.01)
    plain.build(large.trainable_variables)
    large.compile(optimizer=plain, loss="mse")
    large.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    _close(small.get_weights(), large.get_weights())
    assert int(small.optimizer.iterations.numpy()) == 4
    assert int(small.optimizer.micro_steps.numpy()) == 16


# ------------------------------------------------------- loss_scale_factor
def test_loss_scale_factor_refusal_advice_works_when_followed():
    with pytest.raises(ValueError, match=r"Pass `loss_scale_factor=1024.0` to AccumOptimizer"):
        AccumOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=1024.0), merge_grad=2)
    # Following the advice: the wrapper scales the loss and unscales the
    # gradients, and matches the run without any scaling.
    params = make_params()
    case = next(c for c in CASES if c.id == "merge2")
    stream = make_stream(case)
    scaled = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, loss_scale_factor=1024.0)
    assert float(ops.convert_to_numpy(scaled.scale_loss(ops.convert_to_tensor(2.0)))) == 2048.0
    got_vars = make_variables(params)
    for grads, _ in stream:
        scaled.apply(to_tensors([g * 1024.0 for g in grads]), got_vars)
    plain = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    want = run_stream(plain, make_variables(params), stream)
    _same(_values(got_vars), want)  # a power of two: exact
    config = scaled.get_config()
    assert config["loss_scale_factor"] == 1024.0
    assert AccumOptimizer.from_config(config).loss_scale_factor == 1024.0


@pytest.mark.parametrize("value,error", [(0.0, ValueError), ("8", TypeError)])
def test_bad_loss_scale_factor(value, error):
    with pytest.raises(error, match=f"Received: loss_scale_factor={value!r}"):
        AccumOptimizer("sgd", loss_scale_factor=value)


@pytest.mark.slow
def test_loss_scale_factor_in_fit_equals_the_unscaled_run():
    x, y = small_data(n=32)
    weights = []
    for factor in (None, 256.0):
        model = small_model()
        opt = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=2, loss_scale_factor=factor)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, verbose=0, shuffle=False)
        weights.append(model.get_weights())
    _close(weights[1], weights[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------- backends
@pytest.mark.slow
def test_unsupported_keras_backend_is_refused_at_construction():
    """Keras's NumPy backend (inference only) has no optimizer step: a clear error."""
    code = textwrap.dedent(
        """
        import keras_accum
        try:
            keras_accum.AccumOptimizer("sgd", merge_grad=2)
        except RuntimeError as e:
            print("REFUSED:", e)
        """
    )
    env = dict(os.environ, KERAS_BACKEND="numpy", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert "REFUSED:" in out.stdout, out.stdout + out.stderr
    message = out.stdout.split("REFUSED:", 1)[1]
    assert "TensorFlow, JAX and torch backends" in message
    assert "Received: backend='numpy'" in message


@pytest.mark.slow
def test_refused_keras_load_under_mixed_float16_leaves_every_state_unchanged(tmp_path):
    """`compile` wraps us in a LossScaleOptimizer, whose own load would assign
    our variables by position before ours are checked: it must not."""
    x, y = small_data(n=32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        saved, path, model, opt = _saved_merge4_and_trained_merge2(tmp_path)
        scaler = model.optimizer
        before = _values(scaler.variables)
        with pytest.raises(ValueError, match="merge_grad: saved 4, this optimizer 2"):
            model.load_weights(path)
        _same(_values(scaler.variables), before, "loss scale, own and inner state")
        # The same configuration loads, loss scale included.
        same = small_model(seed=5)
        same.compile(optimizer=AccumOptimizer(keras.optimizers.Adam(0.1), merge_grad=4),
                     loss="mse")
        same.fit(x[:8], y[:8], batch_size=8, verbose=0)
        same.load_weights(path)
        _same(_values(same.optimizer.variables), _values(saved.optimizer.variables), "loaded")
    finally:
        keras.mixed_precision.set_global_policy("float32")
