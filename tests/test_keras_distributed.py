"""AccumOptimizer under `tf.distribute.MirroredStrategy` (two logical CPU devices).

The oracle is always a run on one device without any strategy: the large-batch
run (batch `k * b`) with the plain inner optimizer, or the same loop on one
device. What Keras's built-in `gradient_accumulation_steps` does in the same
setting is said in each test's docstring; the tests do not depend on it.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum import AccumOptimizer

#: tf.distribute is TensorFlow's (JAX: `test_keras_jax.py`, `keras.distribution`).
pytestmark = pytest.mark.tensorflow

DEVICES = ["/cpu:0", "/cpu:1"]
B = 8  # global micro-batch
K = 2  # merge_grad


@pytest.fixture(scope="module", autouse=True)
def _two_devices():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("TensorFlow was initialised before conftest split the CPU")


def _strategy(**kwargs):
    """A strategy with its own cross-device ops (no collectives: see STRATEGY)."""
    return tf.distribute.MirroredStrategy(DEVICES, **kwargs)


# No collectives in-process: two collective-based strategies in one process
# (another test module's, a README example's) may reuse collective instance
# keys and abort each other's ops. The collective path (CollectiveReduceV2) is
# tested with MultiWorkerMirroredStrategy, in worker processes of their own.
STRATEGY = tf.distribute.MirroredStrategy(
    DEVICES, cross_device_ops=tf.distribute.ReductionToOneDevice()
)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 5)).astype(np.float32),
        rng.standard_normal((n, 2)).astype(np.float32),
    )


def _mlp(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )


def _sched():
    return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.8)


INNER = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_momentum_schedule": lambda: keras.optimizers.SGD(_sched(), momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_schedule": lambda: keras.optimizers.Adam(_sched()),
}
# (inner, extra AccumOptimizer arguments): EMA and an active global clip
# (the merged gradient norms here are above 0.3) on half the rows.
FIT_ROWS = [
    ("sgd_momentum", {}),
    ("sgd_momentum_schedule", {"use_ema": True, "global_clipnorm": 0.3}),
    ("adam", {"use_ema": True, "global_clipnorm": 0.3}),
    ("adam_schedule", {}),
]


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_close(actual, expected, atol=1e-5):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=atol)


def _per_replica(variable):
    """The values each device holds of a (Keras) distributed variable."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.array(v.numpy()) for v in getattr(value, "values", [value])]


def _large_batch_fit(inner, x, y, epochs=2, ema=False, global_clipnorm=None):
    """The oracle: one device, batches of K*B, the plain inner optimizer (+ our EMA/clip)."""
    model = _mlp()
    opt = (
        AccumOptimizer(inner, use_ema=ema, global_clipnorm=global_clipnorm)
        if (ema or global_clipnorm)
        else inner
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=K * B, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("inner_id,extra", FIT_ROWS, ids=[r[0] for r in FIT_ROWS])
def test_fit_under_mirrored_strategy_equals_the_large_batch(inner_id, extra):
    """merge_grad=2 on global batches of 8 over two replicas = batches of 16 on one device.

    Keras's built-in `gradient_accumulation_steps` cannot run here at all: its
    `cond` in replica context calls `merge_call` and `fit` raises.
    """
    x, y = _data()
    strategy = STRATEGY
    with strategy.scope():
        model = _mlp()
        opt = AccumOptimizer(INNER[inner_id](), merge_grad=K, **extra)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    reference = _large_batch_fit(
        INNER[inner_id](), x, y, ema=extra.get("use_ema", False),
        global_clipnorm=extra.get("global_clipnorm"),
    )
    _assert_close(_weights(model), _weights(reference))
    assert int(opt.iterations.numpy()) == 8 and int(opt.micro_steps.numpy()) == 16
    if extra.get("global_clipnorm"):
        assert float(opt.last_grad_norm.numpy()) > extra["global_clipnorm"]  # the clip acted
    # Every replica holds the same weights, counters and EMA.
    mirrored = list(model.trainable_variables) + [opt._micro_steps, opt._skipped_updates]
    mirrored += list(opt._ema)
    for variable in mirrored:
        first, *others = _per_replica(variable)
        for other in others:
            np.testing.assert_array_equal(first, other)


@pytest.mark.slow
@pytest.mark.parametrize("inner_id", ["sgd_momentum", "adam"])
def test_merge_grad_1_equals_the_plain_inner_optimizer_under_the_strategy(inner_id):
    x, y = _data(32)
    runs = []
    for wrap in (True, False):
        with STRATEGY.scope():
            model = _mlp()
            inner = INNER[inner_id]()
            model.compile(
                optimizer=AccumOptimizer(inner) if wrap else inner, loss="mse", jit_compile=False
            )
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        runs.append(_weights(model))
    _assert_close(runs[0], runs[1], atol=1e-7)


def _custom_loop(strategy, make_opt, x, y, weights=None, bad=None, steps=None, model=None,
                 opt=None):
    """A user's loop: `strategy.run(step_fn)` in a `tf.function`, average loss scaled
    as TensorFlow recommends. Returns (model, opt). `weights[t]` is micro-step t's
    global weight; `bad=(t, row)` puts a NaN into row `row` of micro-batch t."""
    x = x.copy()
    if bad is not None:
        x[bad[0] * B + bad[1]] = np.nan
    with strategy.scope():
        if model is None:
            model = _mlp()
            opt = make_opt()
    ds = tf.data.Dataset.from_tensor_slices((x, y, np.asarray(weights or [1.0] * (len(x) // B),
                                                              np.float32).repeat(B)))
    ds = ds.batch(B)
    if steps is not None:
        ds = ds.skip(steps[0]).take(steps[1] - steps[0])

    @tf.function
    def train_step(batch):
        def step_fn(inputs):
            xb, yb, wb = inputs
            with tf.GradientTape() as tape:
                per_example = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=B)
            grads = tape.gradient(loss, model.trainable_variables)
            pairs = zip(grads, model.trainable_variables)
            if weights is None:
                opt.apply_gradients(pairs)
            else:
                opt.apply_gradients(pairs, weight=wb[0])

        strategy.run(step_fn, args=(batch,))

    for batch in strategy.experimental_distribute_dataset(ds):
        train_step(batch)
    return model, opt


def test_custom_loop_under_strategy_equals_the_large_batch():
    """`strategy.run` in a user's `tf.function`, variables built lazily while tracing.

    The optimizer is not built before the loop: its variables are created on
    the first traced call (keras-team/keras#23085 broke this for Keras's own
    optimizers). Keras's built-in accumulation fails here with `merge_call`.
    """
    x, y = _data()
    model, opt = _custom_loop(
        STRATEGY, lambda: AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K), x, y
    )
    reference = _large_batch_fit(keras.optimizers.Adam(0.01), x, y, epochs=1)
    _assert_close(_weights(model), _weights(reference))
    assert int(opt.iterations.numpy()) == 4


def test_weight_is_the_global_weight_and_equals_the_single_device_weighted_run():
    """Each replica passes the micro-step's global weight; one device sees the same."""
    x, y = _data(32)
    weights = [1.0, 3.0, 2.0, 0.5]

    def make():
        return AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=K)

    model, _ = _custom_loop(STRATEGY, make, x, y, weights=weights)
    single, _ = _custom_loop(tf.distribute.get_strategy(), make, x, y, weights=weights)
    _assert_close(_weights(model), _weights(single), atol=1e-6)
    # And the weighting is real: unweighted training ends elsewhere.
    unweighted, _ = _custom_loop(tf.distribute.get_strategy(), make, x, y)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(single), _weights(unweighted))) > 1e-4


def test_a_nonfinite_value_on_one_replica_skips_the_window_on_all():
    """A NaN in replica 1's half of micro-batch 1 skips window 0 everywhere.

    Keras's built-in accumulation cannot run under the strategy; its
    LossScaleOptimizer lets replica 0 alone decide finiteness.
    """
    x, y = _data()
    make = lambda: AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K, use_ema=True)  # noqa: E731
    model, opt = _custom_loop(STRATEGY, make, x, y, bad=(1, B - 1))  # row 15: replica 1
    assert int(opt.skipped_updates.numpy()) == 1
    assert int(opt.iterations.numpy()) == 3
    # One device, the same loop, never shown window 0 (rows 0..15).
    reference, ref_opt = _custom_loop(tf.distribute.get_strategy(), make, x[2 * B:], y[2 * B:])
    _assert_close(_weights(model), _weights(reference))
    _assert_close([e.numpy() for e in opt._ema], [e.numpy() for e in ref_opt._ema])
    for variable in [*model.trainable_variables, *opt._ema, opt._skipped_updates,
                     opt.inner_optimizer.iterations]:
        first, *others = _per_replica(variable)
        for other in others:
            np.testing.assert_array_equal(first, other)


class _CountingReduction(tf.distribute.ReductionToOneDevice):
    """Counts, at run time, every cross-device reduction the strategy makes."""

    def __init__(self):
        super().__init__()
        with tf.init_scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False)

        self._depth = 0  # a batched reduction calls the single one inside: count it once

    def _counted(self, implementation, *args, **kwargs):
        if self._depth == 0:
            self.count.assign_add(1)
        self._depth += 1
        try:
            return implementation(*args, **kwargs)
        finally:
            self._depth -= 1

    def reduce_implementation(self, *args, **kwargs):
        return self._counted(super().reduce_implementation, *args, **kwargs)

    def batch_reduce_implementation(self, *args, **kwargs):
        return self._counted(super().batch_reduce_implementation, *args, **kwargs)


@pytest.mark.parametrize("merge_grad", [1, 4])
def test_one_batched_reduction_per_update_and_none_on_other_micro_steps(merge_grad):
    """The plain Adam all-reduces on every step; we reduce once per update.

    (Keras's built-in accumulation would all-reduce in every micro-step's
    `merge_call`, had its `fit` not failed first.)
    """
    x, y = _data(64)
    reduction = _CountingReduction()
    _custom_loop(
        _strategy(cross_device_ops=reduction),
        lambda: AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=merge_grad), x, y,
    )
    assert int(reduction.count.numpy()) == 8 // merge_grad
    plain = _CountingReduction()
    _custom_loop(_strategy(cross_device_ops=plain), lambda: keras.optimizers.Adam(0.01), x, y)
    assert int(plain.count.numpy()) == 8


def test_skip_gradients_aggregation_takes_gradients_already_summed():
    """Gradients all-reduced by the user (`skip_gradients_aggregation=True`) are not summed twice."""
    x, y = _data(32)
    strategy = STRATEGY
    with strategy.scope():
        model = _mlp()
        opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=K)
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(B))

    @tf.function
    def train_step(batch):
        def step_fn(inputs):
            xb, yb = inputs
            with tf.GradientTape() as tape:
                per_example = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=B)
            grads = tape.gradient(loss, model.trainable_variables)
            summed = tf.distribute.get_replica_context().all_reduce("sum", grads)
            opt.apply_gradients(
                zip(summed, model.trainable_variables), skip_gradients_aggregation=True
            )

        strategy.run(step_fn, args=(batch,))

    for batch in ds:
        train_step(batch)
    reference = _large_batch_fit(keras.optimizers.SGD(0.1, momentum=0.9), x, y, epochs=1)
    _assert_close(_weights(model), _weights(reference))


def test_checkpoint_mid_window_holds_every_replica_and_resumes_into_1_or_2_replicas(tmp_path):
    """The saved accumulator is the sum over replicas; a restore re-spreads it.

    Restoring spreads `sum / n` to each of `n` replicas, so the resumed run
    sums the same numbers in another order: equal to the uninterrupted run up
    to float32 re-association (well inside 1e-6 here), not bit for bit.
    Keras's own accumulators are mirrored variables: a checkpoint keeps only
    replica 0's partial sum.
    """
    x, y = _data(48)
    make = lambda: AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=4)  # noqa: E731
    strategy = STRATEGY
    full, _ = _custom_loop(strategy, make, x, y)
    part, opt = _custom_loop(strategy, make, x, y, steps=(0, 3))  # window open: 3 of 4
    assert int(opt.window_steps.numpy()) == 3
    accs = [_per_replica(a) for a in opt._accumulators]
    assert all(not np.array_equal(r0, r1) for r0, r1 in accs)  # each replica its own sum
    path = tf.train.Checkpoint(model=part, optimizer=opt).write(str(tmp_path / "ckpt"))
    for resume_strategy in (strategy, tf.distribute.get_strategy()):
        with resume_strategy.scope():
            model, fresh = _mlp(seed=7), make()
            fresh.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=fresh).read(path).assert_consumed()
        for acc, (r0, r1) in zip(fresh._accumulators, accs):
            np.testing.assert_allclose(np.sum(_per_replica(acc), axis=0), r0 + r1, rtol=1e-6)
        resumed, _ = _custom_loop(resume_strategy, None, x, y, steps=(3, 6), model=model,
                                  opt=fresh)
        _assert_close(_weights(resumed), _weights(full), atol=1e-6)
        assert int(fresh.iterations.numpy()) == 1 and int(fresh.window_steps.numpy()) == 2


@pytest.mark.slow
def test_keras_file_mid_window_resumes_under_the_strategy(tmp_path):
    """A `.keras` file saved with a window open resumes under the strategy."""
    x, y = _data(40)  # 5 micro-batches of 8: epoch 1 ends with 1 micro-step open
    strategy = STRATEGY

    def compiled():
        with strategy.scope():
            model = _mlp()
            model.compile(
                optimizer=AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K),
                loss="mse", jit_compile=False,
            )
        return model

    full = compiled()
    full.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    part = compiled()
    part.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    assert int(part.optimizer.window_steps.numpy()) == 1
    part.save(tmp_path / "m.keras")
    with strategy.scope():
        loaded = keras.models.load_model(tmp_path / "m.keras")
    assert int(loaded.optimizer.window_steps.numpy()) == 1
    loaded.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    _assert_close(_weights(loaded), _weights(full), atol=1e-6)
    assert int(loaded.optimizer.micro_steps.numpy()) == 10


def test_optimizer_made_outside_the_scope_is_bound_to_it():
    """Created outside `strategy.scope()`, built inside: it trains as if made inside."""
    x, y = _data(32)
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=K)
    strategy = STRATEGY
    with strategy.scope():
        model = _mlp()
    model, opt = _custom_loop(strategy, None, x, y, model=model, opt=opt)
    reference = _large_batch_fit(keras.optimizers.SGD(0.1, momentum=0.9), x, y, epochs=1)
    _assert_close(_weights(model), _weights(reference))


def test_optimizer_of_one_strategy_refused_under_another():
    opt_strategy, other = STRATEGY, _strategy(cross_device_ops=tf.distribute.ReductionToOneDevice())
    with opt_strategy.scope():
        opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=K)
    with other.scope():
        model = _mlp()
        with pytest.raises(RuntimeError, match="created under another `tf.distribute` strategy"):
            opt.build(model.trainable_variables)
    assert not opt.built


def test_apply_in_cross_replica_context_is_refused_clearly():
    strategy = STRATEGY
    with strategy.scope():
        model = _mlp()
        opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=K)
        opt.build(model.trainable_variables)
        grads = [tf.ones_like(v) for v in model.trainable_variables]
        before = _weights(model)
        with pytest.raises(RuntimeError, match=r"inside\s+`strategy.run\(step_fn\)`"):
            opt.apply_gradients(zip(grads, model.trainable_variables))
    assert int(opt.micro_steps.numpy()) == 0
    _assert_close(_weights(model), before, atol=0)


@pytest.mark.slow
def test_xla_fit_under_the_strategy_is_refused_clearly():
    """TensorFlow cannot XLA-compile a step spanning devices (plain Adam fails too)."""
    x, y = _data(16)
    with STRATEGY.scope():
        model = _mlp()
        model.compile(optimizer=AccumOptimizer("adam", merge_grad=K), loss="mse", jit_compile=True)
    with pytest.raises(RuntimeError, match="jit_compile=False"):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)


def _embedding_data():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(32, 3)).astype(np.int32)  # duplicates in every batch
    return ids, rng.standard_normal((32, 2)).astype(np.float32)


def _embedding_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(6, 4),
         keras.layers.Flatten(), keras.layers.Dense(2)]
    )


def _dense_large_batch(ids, y, inner, batch, epochs):
    """The oracle for sparse gradients: one device, batches of `batch`, every
    gradient densified before the plain inner optimizer (Keras's Adam updates
    only the rows present when handed `tf.IndexedSlices`; the merged window is
    dense, so the dense computation is the one to match)."""
    model = _embedding_model()
    for _ in range(epochs):
        for start in range(0, len(ids), batch):
            xb, yb = ids[start:start + batch], y[start:start + batch]
            with tf.GradientTape() as tape:
                loss = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.reduce_mean(loss)
            grads = tape.gradient(loss, model.trainable_variables)
            assert isinstance(grads[0], tf.IndexedSlices)
            inner.apply([tf.convert_to_tensor(g) for g in grads], model.trainable_variables)
    return model


@pytest.mark.slow
def test_embedding_gradients_under_the_strategy_equal_the_dense_large_batch():
    """`tf.IndexedSlices` from an Embedding are scatter-added into replica-local sums."""
    ids, y = _embedding_data()
    with STRATEGY.scope():
        model = _embedding_model()
        model.compile(optimizer=AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K),
                      loss="mse", jit_compile=False)
    model.fit(ids, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    reference = _dense_large_batch(ids, y, keras.optimizers.Adam(0.01), K * B, epochs=2)
    _assert_close(_weights(model), _weights(reference))


@pytest.mark.parametrize("mode", ["eager_xla", "eager", "function"])
def test_embedding_gradients_on_one_device_equal_the_dense_large_batch(mode):
    ids, y = _embedding_data()
    model = _embedding_model()
    opt = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K, jit_compile=mode == "eager_xla")

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.mean_squared_error(yb, model(xb, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    if mode == "function":
        step = tf.function(step)
    for start in range(0, len(ids), B):
        step(ids[start:start + B], y[start:start + B])
    reference = _dense_large_batch(ids, y, keras.optimizers.Adam(0.01), K * B, epochs=1)
    _assert_close(_weights(model), _weights(reference))


def test_indexed_slices_with_tuple_indices_and_duplicates_are_summed():
    """Python-tuple indices (accepted by plain Keras) and repeated rows, under XLA."""
    v = keras.Variable(np.zeros((4, 2), np.float32))
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=2, reduction="sum")
    values = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    slices = tf.IndexedSlices(values, (1, 3, 1), dense_shape=(4, 2))
    opt.apply_gradients([(slices, v)])
    np.testing.assert_array_equal(opt._accumulators[0].numpy(), [[0, 0], [6, 8], [0, 0], [3, 4]])
    opt.apply_gradients([(slices, v)])
    np.testing.assert_array_equal(v.numpy(), -2 * np.array([[0, 0], [6, 8], [0, 0], [3, 4]]))


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "plain"])
def test_indexed_slices_of_a_new_number_of_rows_each_step_trace_at_most_twice(jit_compile):
    """An eager loop over micro-batches of different lengths (a new number of rows
    each time) must not trace a function per length: after a second length the
    functions take any number of rows (`reduce_retracing`). Numbers: a NumPy sum."""
    rng = np.random.default_rng(8)
    v = keras.Variable(np.zeros((10, 3), np.float32))
    opt = AccumOptimizer(keras.optimizers.SGD(1.0), merge_grad=4, reduction="sum",
                         jit_compile=jit_compile)
    expected = np.zeros((10, 3))
    for rows in range(2, 14):  # 12 micro-steps, 12 lengths, 3 updates
        ids = rng.integers(0, 10, rows)
        values = rng.standard_normal((rows, 3)).astype(np.float32)
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(ids), (10, 3)), v)])
        np.add.at(expected, ids, values)
    plumbing = opt._plumbing
    for fn in (plumbing._accumulate_fn, plumbing._start_fn, plumbing._update_fn):
        assert fn is not None and fn.experimental_get_tracing_count() <= 2, fn
    assert int(opt.iterations.numpy()) == 3
    np.testing.assert_allclose(v.numpy(), -expected, rtol=1e-5, atol=1e-5)


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_multi_worker_mirrored_strategy_equals_the_large_batch(tmp_path):
    """Two worker processes on 127.0.0.1 (`TF_CONFIG`), a custom `strategy.run` loop.

    Keras's built-in accumulation fails under this strategy as under
    MirroredStrategy (`merge_call` inside its `cond`). Keras 3.15's `fit`
    itself fails under this strategy for every optimizer (see mwms_worker.py).
    """
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        )
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(here, "mwms_worker.py"), str(tmp_path / f"w{i}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    results = [np.load(tmp_path / f"w{i}.npz") for i in range(2)]
    for key in results[0].files:  # both workers hold the same state
        np.testing.assert_array_equal(results[0][key], results[1][key])
    x, y = _data()
    reference = _mlp()
    ref_opt = AccumOptimizer(keras.optimizers.Adam(0.01), global_clipnorm=0.3, use_ema=True)
    ref_opt.build(reference.trainable_variables)
    for start in range(0, 64, K * B):  # one device, batches of 16, the plain rule
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y[start:start + K * B],
                                                   reference(x[start:start + K * B]))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, reference.trainable_variables)
        ref_opt.apply_gradients(zip(grads, reference.trainable_variables))
    for name in ("loop",):
        got = results[0]
        _assert_close([got[f"{name}_w{i}"] for i in range(4)], _weights(reference))
        _assert_close([got[f"{name}_ema{i}"] for i in range(4)], [e.numpy() for e in ref_opt._ema])
        assert list(got[f"{name}_counters"]) == [4, 8, 0]


@pytest.mark.slow
def test_mixed_float16_overflow_on_one_replica_skips_the_window_on_all():
    """`compile` wraps us in a LossScaleOptimizer; an overflow in replica 1's half
    of a micro-batch skips the whole window everywhere and halves the scale once.

    Keras's LossScaleOptimizer alone checks replica 0's gradients only, and would
    drop the micro-batch (shifting the windows) rather than the window.
    """
    x, y = _data(64)
    y = y.copy()
    y[12:16] = 1e4  # micro-batch 1, rows of replica 1 only: its float16 gradient overflows
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with STRATEGY.scope():
            model = _mlp()
            opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=K)
            model.compile(optimizer=opt, loss="mse", jit_compile=False)
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        large = _mlp()
        large.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        large.fit(x, y, batch_size=K * B, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    scaler = model.optimizer
    assert isinstance(scaler, keras.optimizers.LossScaleOptimizer)
    assert int(opt.skipped_updates.numpy()) == 1 and int(opt.iterations.numpy()) == 3
    assert int(large.optimizer.iterations.numpy()) == 3  # the large batch skipped it too
    assert float(scaler.dynamic_scale.numpy()) == scaler.initial_scale / 2
    for variable in [*model.trainable_variables, scaler.dynamic_scale, opt._skipped_updates]:
        first, *others = _per_replica(variable)
        for other in others:
            np.testing.assert_array_equal(first, other)
    _assert_close(_weights(model), _weights(large), atol=2e-3)


@pytest.mark.slow
def test_fit_under_a_one_replica_strategy_equals_the_large_batch():
    """One device under MirroredStrategy (say one GPU): Keras's own optimizers
    `merge_call` there too, so the update still runs in cross-replica context."""
    x, y = _data(32)
    with tf.distribute.MirroredStrategy(
        ["/cpu:0"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    ).scope():
        model = _mlp()
        opt = AccumOptimizer(keras.optimizers.Adam(0.01), merge_grad=K, global_clipnorm=0.3)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    reference = _large_batch_fit(keras.optimizers.Adam(0.01), x, y, epochs=1,
                                 global_clipnorm=0.3)
    _assert_close(_weights(model), _weights(reference))
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.slow
def test_flush_window_callback_under_the_strategy_applies_the_open_window():
    """`FlushWindow` flushes from the callback (cross-replica, eager): 5 micro-batches
    of 8 with merge_grad=2 give the large batches 16, 16 and a last one of 8."""
    from keras_accum import FlushWindow

    x, y = _data(40)
    with STRATEGY.scope():
        model = _mlp()
        opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=K)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[FlushWindow()])
    assert int(opt.iterations.numpy()) == 3 and int(opt.window_steps.numpy()) == 0
    reference, plain = _mlp(), keras.optimizers.SGD(0.1, momentum=0.9)
    for start, stop in ((0, 16), (16, 32), (32, 40)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                keras.losses.mean_squared_error(y[start:stop], reference(x[start:stop]))
            )
        grads = tape.gradient(loss, reference.trainable_variables)
        plain.apply_gradients(zip(grads, reference.trainable_variables))
    _assert_close(_weights(model), _weights(reference))


# ---------------------------------- Keras's built-in under tf.distribute, measured
# The README and docs/semantics.md state these facts about Keras's own
# optimizers under a strategy (TensorFlow backend only; the backend-generic
# claims are in test_keras_builtin_claims.py). They fail if Keras changes.
@pytest.mark.slow
def test_keras_builtin_accumulation_cannot_fit_under_mirrored_strategy():
    """`gradient_accumulation_steps` puts the cross-replica update inside a `cond`
    in replica context: `fit` raises the `merge_call` RuntimeError."""
    x, y = _data(32)
    with STRATEGY.scope():
        model = _mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
                      loss="mse", jit_compile=False)
    with pytest.raises(RuntimeError, match="merge_call"):
        model.fit(x, y, batch_size=B, verbose=0)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_keras_plain_optimizer_clips_each_replica_before_the_sum(clip):
    """Replica gradients 3 and -1 (their sum, 2, is the global gradient) with a
    clip of 1: each replica's is clipped first (1 + -1), so the step is 0, not 1."""
    with STRATEGY.scope():
        v = keras.Variable(np.zeros((1,), "float32"))
        opt = keras.optimizers.SGD(1.0, **{clip: 1.0})
        opt.build([v])

    @tf.function
    def step():
        def fn():
            first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
            opt.apply_gradients([(tf.where(first, 3.0, -1.0) * tf.ones((1,)), v)])

        STRATEGY.run(fn)

    step()
    np.testing.assert_array_equal(v.numpy(), [0.0])
