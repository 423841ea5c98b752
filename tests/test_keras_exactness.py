"""Exactness and input checks of the Keras micro-step: merge_grad=1 bit for bit in an
eager loop (XLA on), float8 scaling state merged by maximum, weights and gradient
shapes checked before anything moves."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from cases import CASES, make_params, make_stream
from keras import ops
from keras_driver import BACKEND, make_variables, to_tensors

if BACKEND == "tensorflow":
    import tensorflow as tf

from keras_accum import AccumOptimizer

INNER = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "adafactor": lambda: keras.optimizers.Adafactor(0.1),
    "ftrl": lambda: keras.optimizers.Ftrl(0.1),
}


@pytest.mark.parametrize("inner_id", sorted(INNER))
def test_merge_grad_1_is_bit_identical_in_an_eager_loop_with_the_default_jit(inner_id):
    """The closing micro-step runs eagerly, as the inner optimizer runs alone."""
    params = make_params()
    stream = make_stream(CASES[2])
    wrapped = AccumOptimizer(INNER[inner_id]())  # merge_grad=1, jit_compile=True
    got = make_variables(params)
    plain, ref = INNER[inner_id](), make_variables(params)
    for grads, _ in stream:
        tensors = to_tensors(grads)
        wrapped.apply_gradients(zip(tensors, got))
        plain.apply_gradients(zip(tensors, ref))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _float8_model():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )
    model.quantize("float8")
    return model


@pytest.mark.slow
def test_float8_scaling_state_is_merged_by_maximum_like_the_large_batch():
    """amax histories and scales (`overwrite_with_gradient`) take the window's maximum."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 8)).astype(np.float32) * np.linspace(0.5, 4, 32)[:, None]
    y = rng.standard_normal((32, 2)).astype(np.float32)
    small, large = _float8_model(), _float8_model()
    small.compile(optimizer=AccumOptimizer(keras.optimizers.SGD(0.01), merge_grad=4),
                  loss="mse", jit_compile=False)
    large.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    small.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    large.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    overwritten = [v for v in small.trainable_variables if v.overwrite_with_gradient]
    assert overwritten
    for a, b in zip(small.trainable_variables, large.trainable_variables):
        if a.overwrite_with_gradient and "grad" in a.path:
            # The loss is a mean over 4 rows, not 16: each micro-batch's output
            # gradient, its amax and its scale are 4 times the large batch's,
            # and the window's maximum keeps exactly that (the scale that fits
            # the micro-batches). A window mean would blur it.
            np.testing.assert_allclose(a.numpy(), 4 * b.numpy(), rtol=1e-3, err_msg=a.path)
        elif a.overwrite_with_gradient:
            # Forward amax: a window mean would put a quarter of the amax in the new slot.
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, err_msg=a.path)
        else:
            # float8 rounds each micro-batch's gradient on its own (e5m2): close, not equal.
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-2, atol=1e-4, err_msg=a.path)


def _built(merge_grad=2):
    variables = make_variables(make_params())
    opt = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=merge_grad)
    opt.build(variables)
    return opt, variables


def _snapshot(opt, variables):
    return [v.numpy().copy() for v in variables] + [v.numpy().copy() for v in opt.variables]


@pytest.mark.parametrize(
    "weight,error,match",
    [
        (lambda: ops.convert_to_tensor(-1.0), ValueError, "Received: weight=-1.0"),
        (lambda: ops.convert_to_tensor(float("nan")), ValueError, "Received: weight=nan"),
        (lambda: "2", TypeError, "Received: weight='2'"),
        (lambda: [1.0], TypeError, r"Received: weight=\[1.0\]"),
        (lambda: ops.convert_to_tensor([1.0, 2.0]), TypeError, "scalar numeric tensor"),
        pytest.param(
            lambda: tf.constant("2"), TypeError, "scalar numeric tensor",
            marks=pytest.mark.tensorflow, id="string-tensor",
        ),
    ],
)
def test_bad_weight_is_refused_eagerly_with_nothing_changed(weight, error, match):
    weight = weight()
    opt, variables = _built()
    before = _snapshot(opt, variables)
    grads = [ops.ones(v.shape) for v in variables]
    with pytest.raises(error, match=match):
        opt.apply_gradients(zip(grads, variables), weight=weight)
    for a, b in zip(before, _snapshot(opt, variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tensorflow
def test_negative_tensor_weight_in_a_tf_function_is_caught():
    opt, variables = _built()

    @tf.function
    def step(w):
        opt.apply_gradients(zip([tf.ones_like(v) for v in variables], variables), weight=w)

    with pytest.raises(tf.errors.InvalidArgumentError, match="`weight` must be a finite number"):
        step(tf.constant(-2.0))
    assert int(opt.micro_steps.numpy()) == 0


def test_gradient_of_the_wrong_shape_names_the_variable():
    opt, variables = _built()
    before = _snapshot(opt, variables)
    grads = [ops.ones(v.shape) for v in variables]
    grads[1] = ops.ones((7,))
    with pytest.raises(ValueError, match=r"variable 'v1' has shape .* gradient of shape \(7,\)"):
        opt.apply_gradients(zip(grads, variables))
    for a, b in zip(before, _snapshot(opt, variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("checkpoint", marks=pytest.mark.tensorflow),
        pytest.param("checkpoint_before_build", marks=pytest.mark.tensorflow),
        "set_weights",
    ],
)
def test_eager_window_position_is_read_again_after_a_restore(tmp_path, how):
    """The eager loop keeps the window position on the host; a restore must not
    leave it stale (the restored window would close at the wrong micro-step)."""
    params, stream = make_params(), make_stream(CASES[2])
    full = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4)
    full_vars = make_variables(params)
    for grads, _ in stream[:6]:
        full.apply(to_tensors(grads), full_vars)
    part = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4)
    part_vars = make_variables(params)
    for grads, _ in stream[:3]:
        part.apply(to_tensors(grads), part_vars)
    fresh = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4)
    fresh_vars = make_variables(params)
    if how == "checkpoint_before_build":
        # The usual resume of a custom loop: restore into the new optimizer,
        # whose variables (made by the first apply) take the values then.
        path = tf.train.Checkpoint(v=part_vars, o=part).write(str(tmp_path / "c"))
        tf.train.Checkpoint(v=fresh_vars, o=fresh).read(path)
    else:
        fresh.build(fresh_vars)
    if how == "checkpoint":
        path = tf.train.Checkpoint(v=part_vars, o=part).write(str(tmp_path / "c"))
        tf.train.Checkpoint(v=fresh_vars, o=fresh).read(path).assert_consumed()
    elif how == "set_weights":
        for a, b in zip(fresh_vars, part_vars):
            a.assign(b)
        fresh.set_weights(part.get_weights())
    for grads, _ in stream[3:6]:
        fresh.apply(to_tensors(grads), fresh_vars)
    assert int(fresh.iterations.numpy()) == int(full.iterations.numpy()) == 1
    for a, b in zip(fresh_vars, full_vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_window_of_zero_weights_applies_nothing_and_counts_nothing(reduction):
    """sum(w) = 0: no samples, no step (mean would hand on 0/0 = NaN)."""
    from reference import RefAccum, RefSGD

    params, stream = make_params(), make_stream(CASES[2])
    weights = [0.0, 0.0, 1.0, 3.0, 0.0, 0.0]
    oracle = RefAccum(params, RefSGD(0.1, momentum=0.9), merge_grad=2, reduction=reduction)
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2,
                         reduction=reduction, on_nonfinite="ignore")
    variables = make_variables(params)
    for (grads, _), w in zip(stream, weights):
        oracle.step(grads, w)
        opt.apply(to_tensors(grads), variables, weight=w)
    assert int(opt.iterations.numpy()) == oracle.iterations == 1
    assert int(opt.skipped_updates.numpy()) == 0
    for v, p in zip(variables, oracle.params):
        assert np.isfinite(v.numpy()).all()
        np.testing.assert_allclose(v.numpy(), p, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("clipvalue", [None, 1e9])
def test_float8_global_clipnorm_clips_by_the_gradients_norm_like_keras(clipvalue):
    """float8 scaling state (scales, amax histories) is not a gradient: Keras leaves it
    out of clipping, so must the norm that clips and is reported. With merge_grad=1
    the step equals plain `SGD(global_clipnorm=1)`'s. A `clipvalue` that clips
    nothing changes nothing (the norm is then taken again, after it: of the
    gradients only, too)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 8)).astype(np.float32) * 3
    y = rng.standard_normal((16, 2)).astype(np.float32) * 3
    ours, plain, probe = _float8_model(), _float8_model(), _float8_model()
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1), global_clipnorm=1.0, clipvalue=clipvalue, jit_compile=False
    )
    ours.compile(optimizer=opt, loss="mse", jit_compile=False)
    plain.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=1.0), loss="mse",
                  jit_compile=False)
    # The gradients themselves: one unclipped step of SGD(lr=1) moves each weight by them.
    probe.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", jit_compile=False)
    is_grad = [not v.overwrite_with_gradient for v in probe.trainable_variables]
    before = [np.array(v.numpy()) for v in probe.trainable_variables]
    probe.train_on_batch(x, y)
    steps = [b - np.array(v.numpy()) for b, v, g in zip(before, probe.trainable_variables, is_grad) if g]
    grad_norm = float(np.sqrt(sum(np.sum(s.astype(np.float64) ** 2) for s in steps)))
    assert grad_norm > 1.0  # the clip is active
    ours.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    np.testing.assert_allclose(float(opt.last_grad_norm.numpy()), grad_norm, rtol=1e-4)
    for a, b in zip(ours.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
