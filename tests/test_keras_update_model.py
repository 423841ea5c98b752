"""keras_accum.update_model and apply_deferred on the Keras side.

The FastEstimator docs' LeNet examples (r1.1 loss form with a persistent tape,
r1.2 gradients form) against the NumPy oracle and a plain large-batch run; the
GAN with `defer=True` (and what TensorFlow does without it); mixed precision
under a LossScaleOptimizer; every bad input with nothing changed.
"""

from __future__ import annotations

import os
import re

import keras
import numpy as np
import pytest
from keras_driver import BACKEND

if BACKEND == "tensorflow":
    import tensorflow as tf

import keras_accum
from keras_accum import AccumOptimizer, apply_deferred, update_model

#: Their loss form records with `tf.GradientTape` (the gradients form runs on every
#: backend: `test_keras_backends.py`).
pytestmark = pytest.mark.tensorflow
if BACKEND != "tensorflow":
    pytest.skip("needs Keras's TensorFlow backend", allow_module_level=True)

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref


#: Where XLA is not the point, it only costs compile time.
QUICK = {"jit_compile": False}


def lenet(seed=0):
    """FastEstimator's TF LeNet, with fewer channels (28x28x1 in, softmax out)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def batches(n, size, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((size, 28, 28, 1)).astype("float32"),
            rng.integers(0, 10, size).astype("int32"),
        )
        for _ in range(n)
    ]


def weights(model):
    return [np.array(v.numpy()) for v in model.trainable_variables]


def sparse_ce(y, pred):
    """Per-sample loss, as `fe.backend.sparse_categorical_crossentropy`."""
    return keras.losses.sparse_categorical_crossentropy(y, pred)


# -- the FastEstimator docs' examples ------------------------------------------------


def test_fe_docs_example_loss_form_with_adam():
    """r1.1, verbatim in shape: update_model(m, loss=loss, tape=tape) inside a persistent tape."""
    m = lenet()
    m.compile(optimizer="adam")
    x = tf.ones((3, 28, 28, 1))  # (batch, height, width, channels)
    y = tf.constant((1, 0, 1))
    oracle = ref.RefAdam(0.001)
    params = weights(m)
    with tf.GradientTape(persistent=True) as tape:
        pred = m(x)  # [[~0.1, ...], ...]
        loss = sparse_ce(y, pred)  # ~2.3
        expected_grads = tape.gradient(tf.reduce_mean(loss), m.trainable_variables)
        update_model(m, loss=loss, tape=tape)
    assert 2.0 < float(tf.reduce_mean(loss)) < 2.6
    oracle.step(params, [g.numpy() for g in expected_grads])
    assert int(m.optimizer.iterations) == 1
    for got, want in zip(weights(m), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lenet_gradients_form_merge_grad_matches_oracle():
    """r1.2 with AccumOptimizer(Adam, merge_grad=2): RefAccum(RefAdam) on the same gradients."""
    m = lenet()
    m.compile(optimizer=AccumOptimizer(keras.optimizers.Adam(1e-2), merge_grad=2, **QUICK))
    oracle = ref.RefAccum(weights(m), ref.RefAdam(1e-2), merge_grad=2)
    for x, y in batches(4, 3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(sparse_ce(y, m(x)))
        gradients = tape.gradient(loss, m.trainable_variables)
        update_model(m, gradients=gradients)
        oracle.step([g.numpy() for g in gradients])
    assert int(m.optimizer.iterations) == oracle.iterations == 2
    for got, want in zip(weights(m), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_lenet_loss_form_merge_grad_equals_large_batch():
    """r1.1 on micro-batches of 3 with merge_grad=2 = plain Adam on batches of 6."""
    m, big = lenet(), lenet()
    m.compile(optimizer=AccumOptimizer(keras.optimizers.Adam(1e-2), merge_grad=2, **QUICK))
    plain = keras.optimizers.Adam(1e-2)
    data = batches(4, 3)
    for x, y in data:
        with tf.GradientTape() as tape:
            loss = sparse_ce(y, m(x))  # per sample: update_model takes the mean
        update_model(m, loss=loss, tape=tape)
    for i in range(0, 4, 2):
        x = np.concatenate([data[i][0], data[i + 1][0]])
        y = np.concatenate([data[i][1], data[i + 1][1]])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(sparse_ce(y, big(x)))
        plain.apply_gradients(zip(tape.gradient(loss, big.trainable_variables),
                                  big.trainable_variables))
    # Adam divides by sqrt(v): near-zero gradients magnify float32 round-off.
    for got, want in zip(weights(m), weights(big)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def _mlp(seed=0, out=2):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(out)]
    )


def test_merge_grad_only_every_kth_call_updates():
    """UpdateOp: for every merge_grad calls, only the last one updates the model."""
    m = _mlp()
    m.compile(optimizer=AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=3))
    x = tf.random.stateless_normal((4, 3), seed=(1, 2))
    before = weights(m)
    for call in range(1, 4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(m(x) ** 2)
        update_model(m, loss=loss, tape=tape)
        unchanged = all(np.array_equal(a, b) for a, b in zip(weights(m), before))
        assert unchanged == (call < 3), call
    assert (int(m.optimizer.micro_steps), int(m.optimizer.iterations)) == (3, 1)


def test_deferred_inside_tf_function_equals_eager():
    def step(m, x):
        deferred = {}
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(m(x) ** 2)
        update_model(m, loss=loss, tape=tape, defer=True, deferred=deferred)
        apply_deferred(deferred)

    x = tf.random.stateless_normal((4, 3), seed=(3, 4))
    eager, traced = _mlp(), _mlp()
    for m in (eager, traced):
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        m.optimizer.build(m.trainable_variables)
    traced_step = tf.function(step)
    for _ in range(2):
        step(eager, x)
        traced_step(traced, x)
    for a, b in zip(weights(eager), weights(traced)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(traced.optimizer.iterations) == 2


@pytest.mark.skipif(
    len(tf.config.list_logical_devices("CPU")) < 2,
    reason="needs the CPU split into two logical devices (tests/conftest.py)",
)
def test_update_model_under_two_replicas_equals_large_batch():
    """merge_grad=2 under MirroredStrategy, called in `strategy.run`: the large batch."""
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    # No collectives: two collective-based strategies in one process (another
    # test module has one) may reuse instance keys and abort each other's ops.
    strategy = tf.distribute.MirroredStrategy(
        cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        m = _mlp()
        m.compile(optimizer=AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2))
    big = _mlp()
    plain = keras.optimizers.SGD(0.1, momentum=0.9)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = rng.standard_normal((32, 2)).astype("float32")
    mse = keras.losses.MeanSquaredError()  # scales its loss for the replicas' sum

    @tf.function
    def train(batch):
        def step_fn(xb, yb):
            with tf.GradientTape() as tape:
                loss = mse(yb, m(xb))
            update_model(m, loss=loss, tape=tape)

        strategy.run(step_fn, args=batch)

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # global micro-batch 8
    for batch in strategy.experimental_distribute_dataset(data):
        train(batch)
    for i in range(0, 32, 16):
        with tf.GradientTape() as tape:
            loss = mse(y[i : i + 16], big(x[i : i + 16]))
        plain.apply_gradients(zip(tape.gradient(loss, big.trainable_variables),
                                  big.trainable_variables))
    assert int(m.optimizer.iterations.numpy()) == 2
    for got, want in zip(weights(m), weights(big)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- defer: the GAN -------------------------------------------------------------------

LR = 0.1


def _gan():
    keras.utils.set_random_seed(0)
    gen = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)]
    )
    disc = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    gen.compile(optimizer=keras.optimizers.SGD(LR))
    disc.compile(optimizer=keras.optimizers.SGD(LR))
    z = tf.random.stateless_normal((5, 2), seed=(5, 6))
    real = tf.random.stateless_normal((5, 3), seed=(7, 8))
    return gen, disc, z, real


def _gan_losses(gen, disc, z, real):
    """Least-squares GAN: the generator's loss runs through the discriminator."""
    fake = gen(z)
    g_loss = tf.reduce_mean((disc(fake) - 1.0) ** 2)
    d_loss = tf.reduce_mean((disc(real) - 1.0) ** 2) + tf.reduce_mean(
        disc(tf.stop_gradient(fake)) ** 2
    )
    return g_loss, d_loss


def _gan_oracle(gen, disc, z, real):
    """Both gradients before any update, then SGD in NumPy."""
    with tf.GradientTape(persistent=True) as tape:
        g_loss, d_loss = _gan_losses(gen, disc, z, real)
    g_grads = tape.gradient(g_loss, gen.trainable_variables)
    d_grads = tape.gradient(d_loss, disc.trainable_variables)
    return [
        w - LR * g.numpy()
        for w, g in zip(weights(gen) + weights(disc), list(g_grads) + list(d_grads))
    ]


@pytest.mark.parametrize("order", ["deferred", "discriminator-first-not-deferred"])
def test_gan_both_orders_equal_both_gradients_before_any_update(order):
    """Deferring equals taking both gradients first. TensorFlow's tape keeps the
    forward values, so updating the discriminator before the generator's
    gradient gives the same numbers (the documented Keras-side behaviour)."""
    gen, disc, z, real = _gan()
    expected = _gan_oracle(gen, disc, z, real)
    deferred = {}
    defer = order == "deferred"
    with tf.GradientTape(persistent=True) as tape:
        g_loss, d_loss = _gan_losses(gen, disc, z, real)
    if defer:
        update_model(gen, loss=g_loss, tape=tape, defer=True, deferred=deferred)
        update_model(disc, loss=d_loss, tape=tape, defer=True, deferred=deferred)
        assert int(gen.optimizer.iterations) == int(disc.optimizer.iterations) == 0
        assert list(deferred) == [gen, disc]
        assert apply_deferred(deferred) == 2
    else:
        update_model(disc, loss=d_loss, tape=tape)
        update_model(gen, loss=g_loss, tape=tape)
    assert deferred == {}
    for got, want in zip(weights(gen) + weights(disc), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gan_one_non_persistent_tape_raises_and_suggests_persistent():
    gen, disc, z, real = _gan()
    with tf.GradientTape() as tape:
        g_loss, d_loss = _gan_losses(gen, disc, z, real)
    update_model(disc, loss=d_loss, tape=tape)
    before = weights(gen)
    deferred = {}
    with pytest.raises(RuntimeError, match=r"persistent=True\).*Nothing was updated"):
        update_model(gen, loss=g_loss, tape=tape, defer=True, deferred=deferred)
    assert all(np.array_equal(a, b) for a, b in zip(weights(gen), before))
    assert deferred == {} and int(gen.optimizer.iterations) == 0


# -- mixed precision ------------------------------------------------------------------


def _mixed_run(form, policy="mixed_float16"):
    keras.mixed_precision.set_global_policy(policy)
    try:
        m = _mlp()
        m.compile(optimizer=AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2))
        rng = np.random.default_rng(4)
        for _ in range(4):
            x = rng.standard_normal((5, 3)).astype("float32")
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.cast(m(x), "float32") ** 2, axis=-1)
                if form == "scaled":
                    target = m.optimizer.scale_loss(tf.reduce_mean(loss))
                else:
                    target = tf.reduce_mean(loss)
            if form == "loss":
                update_model(m, loss=loss, tape=tape)
            else:
                update_model(m, gradients=tape.gradient(target, m.trainable_variables))
        return m
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_gradients_are_taken_in_the_loss_scale():
    """Under a LossScaleOptimizer, precomputed gradients are those of `scale_loss(loss)`."""
    full = _mixed_run("loss", policy="float32")
    from_loss = _mixed_run("loss")
    assert isinstance(from_loss.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(from_loss.optimizer.iterations) == 2
    scaled = _mixed_run("scaled")
    for a, b, c in zip(weights(from_loss), weights(scaled), weights(full)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=5e-3)
    # Unscaled gradients would be divided by the scale (2**15): almost no step.
    unscaled = _mixed_run("unscaled")
    start = weights(_mlp())
    moved = max(np.abs(a - s).max() for a, s in zip(weights(unscaled), start))
    intended = max(np.abs(a - s).max() for a, s in zip(weights(from_loss), start))
    assert moved < intended / 1000


# -- bad input: a clear error, nothing changed ----------------------------------------


class _TorchLike:
    __module__ = "torch.nn.modules.linear"


def _bad_setup():
    m = _mlp()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2, **QUICK)
    m.compile(optimizer=opt)
    x = tf.random.stateless_normal((4, 3), seed=(9, 9))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(m(x) ** 2)
    update_model(m, loss=loss, tape=tape)  # an open window
    return m, x


def _recorded(m, x):
    tape = tf.GradientTape()
    with tape:
        loss = tf.reduce_mean(m(x) ** 2)
    return loss, tape


def _grads(m, drop=0, bad_shape=False):
    grads = [tf.ones_like(v) for v in m.trainable_variables]
    if bad_shape:
        grads[1] = tf.ones((7,))
    return grads[: len(grads) - drop]


BAD = {
    "model-not-keras": (lambda m, x: dict(model=object(), gradients=_grads(m)), TypeError,
                        "`model` must be a `keras.Model`"),
    "torch-module": (lambda m, x: dict(model=_TorchLike(), gradients=_grads(m)), TypeError,
                     "keras_accum.torch.update_model"),
    "no-optimizer": (lambda m, x: dict(model=_mlp(), gradients=_grads(m)), ValueError,
                     "has no optimizer"),
    "gradients-too-few": (lambda m, x: dict(model=m, gradients=_grads(m, drop=1)), ValueError,
                          "Received: 3 gradients"),
    "gradients-wrong-shape": (lambda m, x: dict(model=m, gradients=_grads(m, bad_shape=True)),
                              ValueError, r"`gradients\[1\]` must have the shape of variable 1"),
    "gradient-wrong-kind": (lambda m, x: dict(model=m, gradients=["a"] + _grads(m)[1:]),
                            TypeError, r"`gradients\[0\]` must be a tensor"),
    "both": (lambda m, x: dict(model=m, gradients=_grads(m), loss=_recorded(m, x)[0],
                               tape=_recorded(m, x)[1]), ValueError, "Exactly one of"),
    "neither": (lambda m, x: dict(model=m), ValueError, "Exactly one of"),
    "loss-without-tape": (lambda m, x: dict(model=m, loss=_recorded(m, x)[0]), ValueError,
                          "`tape` is required with `loss`"),
    "tape-wrong-kind": (lambda m, x: dict(model=m, loss=_recorded(m, x)[0], tape="tape"),
                        TypeError, "`tape` must be the `tf.GradientTape`"),
    "loss-not-a-tensor": (lambda m, x: dict(model=m, loss=1.0, tape=tf.GradientTape()),
                          TypeError, "`loss` must be a tensor"),
    "loss-not-recorded": (lambda m, x: dict(model=m, loss=tf.reduce_mean(m(x)),
                                            tape=_recorded(m, x)[1]), ValueError,
                          "no gradient with respect to any trainable variable"),
    "defer-without-deferred": (lambda m, x: dict(model=m, gradients=_grads(m), defer=True),
                               TypeError, "`deferred` must be a dict when `defer=True`"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_and_changes_nothing(case):
    make, error, message = BAD[case]
    m, x = _bad_setup()
    kwargs = make(m, x)
    deferred = kwargs.setdefault("deferred", {} if "defer" not in kwargs else None)
    before = weights(m)
    state = [np.array(v.numpy()) for v in m.optimizer.variables]
    with pytest.raises(error, match=message):
        update_model(**kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(weights(m), before))
    assert all(
        np.array_equal(np.array(v.numpy()), s) for v, s in zip(m.optimizer.variables, state)
    )
    assert deferred in (None, {})


def test_exported_from_both_package_levels():
    assert keras_accum.update_model is keras_accum.keras.update_model
    assert keras_accum.apply_deferred is keras_accum.keras.apply_deferred
    assert {"update_model", "apply_deferred"} <= set(keras_accum.__all__)


def fe_migration_blocks(torch_side):
    """The runnable ("after") blocks of docs/migration.md's "From FastEstimator" section."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "migration.md")
    with open(path, encoding="utf-8") as f:
        section = f.read().split("## From FastEstimator", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"(<!--[^\n]*-->\n)?```python\n(.*?)```", section, re.S)
    return [
        code
        for directive, code in blocks
        # "# needs: fastestimator": the "before" code, not runnable beside Keras 3.
        if not code.startswith("# needs:") and ("import torch" in code) == torch_side
    ]


def test_fe_migration_doc_keras_after_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = fe_migration_blocks(torch_side=False)
    exec(compile(block, "docs/migration.md", "exec"), {"__name__": "__doc__"})
