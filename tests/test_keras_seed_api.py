"""The tf.keras experimental Optimizer methods on AccumOptimizer, and subclassing it.

`minimize`, `compute_gradients`, `aggregate_gradients`,
`apply_gradients(skip_gradients_aggregation=...)`; `from_config` with configs
of the tf.keras era; `from_keras_optimizer` converting Keras's own
`gradient_accumulation_steps`/`use_ema` (state included); and the subclass of
docs/subclassing.md against the Keras 3 base-class contract. Numbers are
checked against the NumPy oracle (`reference.py`).
"""

from __future__ import annotations

import functools
import inspect
import os
import re

import keras
import numpy as np
import pytest
from keras import ops
from keras_driver import BACKEND, to_tensors

from keras_accum import AccumOptimizer

if BACKEND == "tensorflow":
    import tensorflow as tf

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = {"jit_compile": False}  # XLA is not the point here; it only costs compile time

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 3)).astype("float32")
Y = RNG.standard_normal((4, 2)).astype("float32")
W0 = RNG.standard_normal((3, 2)).astype("float32")
B0 = RNG.standard_normal((2,)).astype("float32")


def _linear_grads(params, x=X, y=Y):
    """d/d(W, b) of mean_i 0.5 * ||x_i W + b - y_i||^2, in NumPy (the oracle's gradient)."""
    w, b = params
    r = x @ w + b - y
    return [x.T @ r / len(x), r.mean(axis=0)]


def _linear_loss(w, b, x=X, y=Y):
    return tf.reduce_mean(0.5 * tf.reduce_sum((tf.matmul(tf.convert_to_tensor(x), w) + b - y) ** 2, axis=1))


def _variables():
    return [keras.Variable(W0, name="w"), keras.Variable(B0, name="b")]


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


# -- minimize / compute_gradients -------------------------------------------------------


@pytest.mark.tensorflow
def test_minimize_callable_loss_and_lazy_var_list_matches_oracle():
    """`var_list` as a callable: the layer's variables exist only after `loss()` runs."""
    layer = keras.layers.Dense(
        2,
        kernel_initializer=keras.initializers.Constant(W0),
        bias_initializer=keras.initializers.Constant(B0),
    )
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, **QUICK)
    oracle = ref.RefAccum([W0, B0], ref.RefSGD(0.1), merge_grad=2)
    for _ in range(4):
        opt.minimize(
            lambda: tf.reduce_mean(0.5 * tf.reduce_sum((layer(X) - Y) ** 2, axis=1)),
            lambda: layer.trainable_variables,
        )
        oracle.step(_linear_grads(oracle.params))
    assert int(opt.iterations) == 2 and int(opt.micro_steps) == 4
    for got, want in zip(_values(layer.trainable_variables), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.tensorflow
def test_minimize_tensor_loss_with_tape_and_weights_matches_oracle():
    variables = _variables()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=2, **QUICK)
    oracle = ref.RefAccum([W0, B0], ref.RefSGD(0.1, momentum=0.9), merge_grad=2)
    weights = [1.0, 3.0, 2.0, 0.5]
    for i, w in enumerate(weights):
        x, y = X * (i + 1), Y - i
        with tf.GradientTape() as tape:
            loss = _linear_loss(*variables, x=x, y=y)
        assert int(opt.minimize(loss, variables, tape=tape, weight=w)) == (i + 1) // 2
        oracle.step(_linear_grads(oracle.params, x=x, y=y), weight=w)
    for got, want in zip(_values(variables), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow
def test_compute_gradients_pairs_and_none_for_unused_variable():
    variables = _variables() + [keras.Variable(np.ones(3, "float32"), name="unused")]
    opt = AccumOptimizer("sgd", **QUICK)
    pairs = opt.compute_gradients(lambda: _linear_loss(*variables[:2]), variables)
    assert [v for _, v in pairs] == variables
    assert pairs[2][0] is None
    for (g, _), want in zip(pairs[:2], _linear_grads([W0, B0])):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-6, atol=1e-6)
    with tf.GradientTape() as tape:
        loss = _linear_loss(*variables[:2])
    pairs = opt.compute_gradients(loss, variables[:2], tape=tape)
    np.testing.assert_allclose(pairs[1][0].numpy(), _linear_grads([W0, B0])[1], rtol=1e-6)
    assert not opt.built  # computing gradients takes no step


@pytest.mark.tensorflow
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"loss": 1.0, "var_list": []}, ValueError, "`tape` is required"),
        ({"loss": lambda: 1.0, "var_list": "w"}, TypeError, "`var_list` must be a list"),
        ({"loss": lambda: 1.0, "var_list": [], "tape": "t"}, TypeError, "`tape` must be"),
    ],
    ids=["tensor-loss-without-tape", "bad-var-list", "bad-tape"],
)
def test_compute_gradients_and_minimize_bad_input(kwargs, error, message):
    opt = AccumOptimizer("sgd", **QUICK)
    for method in (opt.compute_gradients, opt.minimize):
        with pytest.raises(error, match=message):
            method(**kwargs)
    assert not opt.built


# -- aggregate_gradients / skip_gradients_aggregation -------------------------------------


def test_aggregate_gradients_is_the_identity_on_one_device():
    variables = _variables()
    g = ops.convert_to_tensor(np.ones((3, 2), "float32"))
    out = AccumOptimizer("sgd").aggregate_gradients(zip([g, None], variables))
    assert out[0][0] is g and out[1][0] is None
    assert [v for _, v in out] == variables


_SKIP_SUPPORTED = "skip_gradients_aggregation" in inspect.signature(
    AccumOptimizer.apply_gradients
).parameters
needs_skip = pytest.mark.skipif(
    not _SKIP_SUPPORTED, reason="apply_gradients(skip_gradients_aggregation=...) not available"
)
needs_two_devices = pytest.mark.skipif(
    BACKEND != "tensorflow" or len(tf.config.list_logical_devices("CPU")) < 2,
    reason="needs tf.distribute and the CPU split into two logical devices (conftest.py)",
)


@needs_skip
def test_skip_gradients_aggregation_changes_nothing_on_one_device():
    runs = []
    for skip in (False, True):
        variables = _variables()
        opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, **QUICK)
        for _ in range(4):
            grads = _linear_grads(_values(variables))
            opt.apply_gradients(
                zip(to_tensors(grads), variables), skip_gradients_aggregation=skip
            )
        runs.append(_values(variables))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@functools.cache
def _strategy():
    # No collectives: two collective-based strategies in one process (another
    # test module has one) may reuse instance keys and abort each other's ops.
    cpus = tf.config.list_logical_devices("CPU")[:2]
    return tf.distribute.MirroredStrategy(
        [d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.mark.tensorflow
@needs_two_devices
def test_aggregate_gradients_sums_over_two_replicas():
    strategy = _strategy()
    with strategy.scope():
        opt = AccumOptimizer("sgd", **QUICK)
        v = keras.Variable(np.zeros(2, "float32"))

    def step():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        g = tf.ones(2) * tf.cast(rid + 1, "float32")  # 1 on replica 0, 2 on replica 1
        (pair,) = opt.aggregate_gradients([(g, v)])
        return pair[0]

    out = strategy.run(step)
    for value in strategy.experimental_local_results(out):
        np.testing.assert_array_equal(value.numpy(), [3.0, 3.0])
    with strategy.scope(), pytest.raises(RuntimeError, match="replica context"):
        opt.aggregate_gradients([(tf.ones(2), v)])


@pytest.mark.tensorflow
@needs_skip
@needs_two_devices
def test_skip_gradients_aggregation_under_two_replicas_equals_large_batch():
    """Each replica averages its half; aggregate (sum) then apply with skip=True."""
    strategy = _strategy()
    with strategy.scope():
        variables = _variables()
        opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2, **QUICK)
    xs = [RNG.standard_normal((4, 3)).astype("float32") for _ in range(2)]

    @tf.function
    def train(x):
        def step_fn(x_local):
            with tf.GradientTape() as tape:
                loss = _linear_loss(*variables, x=x_local, y=Y[:2]) / 2.0  # 2 replicas
            pairs = opt.aggregate_gradients(opt.compute_gradients(loss, variables, tape))
            opt.apply_gradients(pairs, skip_gradients_aggregation=True)

        halves = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[2 * ctx.replica_id_in_sync_group : 2 * ctx.replica_id_in_sync_group + 2]
        )
        strategy.run(step_fn, args=(halves,))

    oracle = ref.RefAccum([W0, B0], ref.RefSGD(0.1), merge_grad=2)
    for x in xs:
        train(tf.constant(x))
        # The large batch of both halves: y repeats per half.
        oracle.step(_linear_grads(oracle.params, x=x, y=np.concatenate([Y[:2], Y[:2]])))
    assert int(opt.iterations.numpy()) == 1
    for got, want in zip(_values(variables), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- from_config: configs of the tf.keras era -------------------------------------------

_TF211_ADAM = {  # an .h5 training_config of TF 2.11/2.12
    "class_name": "Custom>Adam",
    "config": {
        "name": "Adam",
        "weight_decay": None,
        "clipnorm": None,
        "global_clipnorm": 1.5,
        "clipvalue": None,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 10,
        "jit_compile": False,
        "is_legacy_optimizer": False,
        "learning_rate": 0.0010000000474974513,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": False,
    },
}
_TF215_SGD = {  # TF 2.15, module written
    "module": "keras.optimizers",
    "class_name": "SGD",
    "config": {
        "name": "SGD",
        "weight_decay": None,
        "clipnorm": 0.5,
        "global_clipnorm": None,
        "clipvalue": None,
        "use_ema": False,
        "ema_momentum": 0.99,
        "ema_overwrite_frequency": None,
        "jit_compile": True,
        "is_legacy_optimizer": False,
        "learning_rate": 0.01,
        "momentum": 0.9,
        "nesterov": False,
    },
    "registered_name": None,
}
_LEGACY_RMSPROP = {  # tf.keras.optimizers.legacy, with an old-format schedule
    "class_name": "RMSprop",
    "config": {
        "name": "RMSprop",
        "learning_rate": {
            "class_name": "ExponentialDecay",
            "config": {
                "initial_learning_rate": 0.1,
                "decay_steps": 10,
                "decay_rate": 0.5,
                "staircase": False,
                "name": None,
            },
        },
        "decay": 0.0,
        "rho": 0.9,
        "momentum": 0.0,
        "epsilon": 1e-07,
        "centered": False,
        "is_legacy_optimizer": True,
    },
}
_KERAS3_ACCUM = {  # Keras 3's own accumulation in the inner config
    "class_name": "SGD",
    "config": {"learning_rate": 0.1, "gradient_accumulation_steps": 4},
}


@pytest.mark.parametrize(
    "config, inner_class, expected",
    [
        (
            _TF211_ADAM,
            keras.optimizers.Adam,
            dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=10,
                 global_clipnorm=1.5, jit_compile=False, merge_grad=1),
        ),
        (
            {"optimizer": _TF215_SGD, "merge_grad": 2, "name": "acc"},
            keras.optimizers.SGD,
            dict(clipnorm=0.5, merge_grad=2, jit_compile=True, use_ema=False, name="acc"),
        ),
        (
            # A seed-era AccumOptimizer config: base-class keys on the wrapper too.
            {"optimizer": _LEGACY_RMSPROP, "merge_grad": 3, "learning_rate": 0.0,
             "weight_decay": None, "is_legacy_optimizer": False, "jit_compile": False,
             "decay": 0.0, "loss_scale_factor": None, "gradient_accumulation_steps": None},
            keras.optimizers.RMSprop,
            dict(merge_grad=3, jit_compile=False),
        ),
        (_KERAS3_ACCUM, keras.optimizers.SGD, dict(merge_grad=4)),
    ],
    ids=["tf2.11-custom-adam", "tf2.15-sgd", "legacy-rmsprop-seed-wrapper", "keras3-steps"],
)
def test_from_config_reads_older_configs(config, inner_class, expected):
    snapshot = repr(config)
    opt = AccumOptimizer.from_config(config)
    assert repr(config) == snapshot  # the caller's config is left alone
    assert isinstance(opt.inner_optimizer, inner_class)  # torch's backend subclasses
    cfg = opt.get_config()
    for key, value in expected.items():
        assert cfg[key] == value, key
    inner = opt.inner_optimizer
    # The inner optimizer runs with the wrapper's features off (else it refuses).
    assert not inner.use_ema and inner.global_clipnorm is None and inner.clipnorm is None
    assert inner.gradient_accumulation_steps is None
    # And the result round-trips through the current format.
    assert AccumOptimizer.from_config(cfg).get_config() == cfg


def test_from_config_legacy_schedule_and_lr():
    opt = AccumOptimizer.from_config({"optimizer": _LEGACY_RMSPROP})
    schedule = opt.inner_optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.ExponentialDecay)
    assert schedule.initial_learning_rate == 0.1
    old = {"class_name": "SGD", "config": {"lr": 0.25, "decay": 0.0}}
    assert float(AccumOptimizer.from_config(old).learning_rate.numpy()) == 0.25


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"class_name": "SGD", "config": {"decay": 0.01}}, ValueError, "legacy `decay`"),
        ({"optimizer": "sgd", "weight_decay": 0.1}, ValueError, "`weight_decay` belongs"),
        ({"optimizer": _TF215_SGD, "clipnorm": 2.0}, ValueError, "`clipnorm` is set both"),
        ({"optimizer": _KERAS3_ACCUM, "merge_grad": 2}, ValueError, "gradient_accumulation_steps"),
        ({"optimizer": {"class_name": "SGD", "config": {"learning_rate": 0.1}},
          "learning_rate": 0.5}, ValueError, "learning rate"),
        ({"learning_rate": 0.1}, ValueError, "'optimizer' entry"),
        ("adam", TypeError, "`config` must be a dict"),
    ],
    ids=["decay", "outer-weight-decay", "clipnorm-twice", "steps-vs-merge-grad",
         "outer-learning-rate", "neither-form", "not-a-dict"],
)
def test_from_config_refuses_what_it_cannot_carry(config, error, message):
    with pytest.raises(error, match=message):
        AccumOptimizer.from_config(config)


# -- from_keras_optimizer ------------------------------------------------------------------


def test_from_keras_optimizer_moves_the_features_to_the_wrapper():
    old = keras.optimizers.Adam(
        2e-3, gradient_accumulation_steps=3, use_ema=True, ema_momentum=0.9, clipnorm=1.0
    )
    new = AccumOptimizer.from_keras_optimizer(old, reduction="sum")
    assert (new.merge_grad, new.use_ema, new.ema_momentum, new.clipnorm) == (3, True, 0.9, 1.0)
    assert new.reduction == "sum"
    inner = new.inner_optimizer
    assert isinstance(inner, keras.optimizers.Adam) and inner.name == old.name
    assert inner.gradient_accumulation_steps is None and not inner.use_ema
    assert inner.clipnorm is None
    np.testing.assert_allclose(float(inner.learning_rate.numpy()), 2e-3)
    assert not new.built
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2))
    assert AccumOptimizer.from_keras_optimizer(wrapped).merge_grad == 2


def test_from_keras_optimizer_carries_the_state_mid_window():
    """Keras's Adam(gradient_accumulation_steps=2, use_ema) for 5 micro-steps, then ours for 3:
    the weights are those of the oracle over all 8, and the EMA continues from Keras's."""
    stream = [
        [RNG.standard_normal(W0.shape).astype("float32"), RNG.standard_normal(2).astype("float32")]
        for _ in range(8)
    ]
    variables = _variables()
    old = keras.optimizers.Adam(0.05, gradient_accumulation_steps=2, use_ema=True, ema_momentum=0.8)
    for grads in stream[:5]:
        old.apply_gradients(zip(to_tensors(grads), variables))
    keras_ema = [np.array(a.numpy()) for a in old._model_variables_moving_average]

    new = AccumOptimizer.from_keras_optimizer(old, **QUICK)
    assert new.built
    assert (int(new.iterations), int(new.micro_steps), int(new.window_steps)) == (2, 5, 1)
    for ema, want in zip(new.ema_variables, keras_ema):
        np.testing.assert_array_equal(ema.numpy(), want)

    oracle = ref.RefAccum([W0, B0], ref.RefAdam(0.05), merge_grad=2)
    snapshots = []
    for i, grads in enumerate(stream):
        if oracle.step(grads) and i >= 5:
            snapshots.append([p.copy() for p in oracle.params])
        if i >= 5:
            new.apply_gradients(zip(to_tensors(grads), variables))
    assert int(new.iterations) == 4
    for got, want in zip(_values(variables), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Our EMA, once per update (2 updates after the conversion), from Keras's shadows.
    ema = keras_ema
    for params in snapshots:
        ema = [0.8 * e + 0.2 * p for e, p in zip(ema, params)]
    for got, want in zip(new.ema_variables, ema):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer, error, message",
    [
        ("adam", TypeError, "must be a `keras.optimizers.Optimizer`"),
        (AccumOptimizer("sgd"), ValueError, "already an AccumOptimizer"),
    ],
    ids=["not-an-optimizer", "already-accum"],
)
def test_from_keras_optimizer_bad_input(optimizer, error, message):
    with pytest.raises(error, match=message):
        AccumOptimizer.from_keras_optimizer(optimizer)


def test_from_keras_optimizer_moves_a_fixed_loss_scale_to_the_wrapper():
    converted = AccumOptimizer.from_keras_optimizer(keras.optimizers.SGD(loss_scale_factor=128.0))
    assert converted.loss_scale_factor == 128.0
    assert converted.inner_optimizer.loss_scale_factor is None


@pytest.mark.slow
def test_one_liner_converts_a_saved_model(tmp_path):
    """The documented one-liner, on a `.keras` file saved with Keras's own accumulation."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras.optimizers.Adam(gradient_accumulation_steps=2, use_ema=True), loss="mse"
    )
    model.optimizer.build(model.trainable_variables)
    for i in range(3):  # 1 update and an open window
        model.optimizer.apply_gradients(
            zip([ops.ones(v.shape) * (i + 1) for v in model.trainable_variables],
                model.trainable_variables)
        )
    path = str(tmp_path / "builtin.keras")
    model.save(path)

    model = keras.models.load_model(path)
    model.compile(optimizer=AccumOptimizer.from_keras_optimizer(model.optimizer), loss="mse")

    opt = model.optimizer
    assert type(opt) is AccumOptimizer and opt.merge_grad == 2 and opt.use_ema
    assert (int(opt.iterations), int(opt.micro_steps), int(opt.window_steps)) == (1, 3, 1)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)  # closes the window
    assert (int(opt.iterations), int(opt.micro_steps)) == (2, 4)
    # fit ends with finalize_variable_values: the model holds the EMA.
    for v, ema in zip(model.trainable_variables, opt.ema_variables):
        np.testing.assert_array_equal(v.numpy(), ema.numpy())


# -- subclassing: the class of docs/subclassing.md ----------------------------------------


def _doc_subclass():
    with open(os.path.join(ROOT, "docs", "subclassing.md"), encoding="utf-8") as f:
        first_block = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    namespace: dict = {}
    exec(compile(first_block, "docs/subclassing.md", "exec"), namespace)
    return namespace["MicroClipAccum"]


def test_subclass_update_step_changes_what_a_micro_step_adds():
    MicroClipAccum = _doc_subclass()
    variables = _variables()
    opt = MicroClipAccum(keras.optimizers.SGD(0.1), micro_clipnorm=1.0, merge_grad=2, **QUICK)
    oracle = ref.RefAccum([W0, B0], ref.RefSGD(0.1), merge_grad=2)
    clipped = 0
    for i in range(4):
        grads = [g * (i + 0.5) for g in _linear_grads(oracle.params)]
        norms = [np.sqrt(np.sum(g**2)) for g in grads]
        clipped += sum(n > 1.0 for n in norms)
        oracle.step([g * (1.0 / max(n, 1.0)) for g, n in zip(grads, norms)])
        opt.apply_gradients(zip(to_tensors(grads), variables))
    assert 0 < clipped < 8 and int(opt.clipped) == clipped
    for got, want in zip(_values(variables), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_subclass_base_class_contract(tmp_path):
    MicroClipAccum = _doc_subclass()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = MicroClipAccum(
        keras.optimizers.SGD(schedule), micro_clipnorm=0.5, merge_grad=2, use_ema=True, **QUICK
    )
    model.compile(optimizer=opt, loss="mse")
    variables = model.trainable_variables

    # build + add_variable: own variables are tracked and saved with the optimizer.
    opt.build(variables)
    assert any(v is opt.clipped for v in opt.variables)
    # add_variable_from_reference: the reference's shape and dtype, Keras's name pattern.
    kernel = variables[0]
    extra = opt.add_variable_from_reference(kernel, name="extra")
    assert tuple(extra.shape) == tuple(kernel.shape) and extra.dtype == kernel.dtype
    assert extra.name == f"{kernel.path.replace('/', '_')}_extra"
    assert any(v is extra for v in opt.variables)
    opt._untrack_variable(extra)  # keep the saved layout that of the class

    # iterations counts updates; learning_rate is the schedule at `iterations`.
    for i in range(5):
        opt.apply_gradients(zip([ops.ones(v.shape) * (i + 1) for v in variables], variables))
    assert (int(opt.iterations), int(opt.micro_steps)) == (2, 5)
    np.testing.assert_allclose(float(opt.learning_rate), 0.1 * 0.5**2, rtol=1e-6)

    # get_config / from_config: the subclass's own key passes through.
    clone = MicroClipAccum.from_config(opt.get_config())
    assert type(clone) is MicroClipAccum and clone.micro_clipnorm == 0.5
    assert clone.get_config() == opt.get_config()

    # .keras round trip mid-window: the subclass, its variable and the window come back.
    path = str(tmp_path / "sub.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    ropt = restored.optimizer
    assert type(ropt) is MicroClipAccum
    assert int(ropt.clipped) == int(opt.clipped) > 0
    assert (int(ropt.iterations), int(ropt.window_steps)) == (2, 1)
    g = [ops.ones(v.shape) for v in variables]
    opt.apply_gradients(zip(g, variables))
    ropt.apply_gradients(zip(g, restored.trainable_variables))
    for a, b in zip(variables, restored.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # finalize_variable_values writes the EMA into the model (fit calls it).
    opt.finalize_variable_values(variables)
    for v, ema in zip(variables, opt.ema_variables):
        np.testing.assert_array_equal(v.numpy(), ema.numpy())


#: Every optimizer class Keras exports that wraps nothing (the wrappers need arguments).
_KERAS_OPTIMIZERS = sorted(
    name
    for name in dir(keras.optimizers)
    if isinstance(getattr(keras.optimizers, name), type)
    and issubclass(getattr(keras.optimizers, name), keras.optimizers.Optimizer)
    and name not in ("Optimizer", "LossScaleOptimizer", "MultiOptimizer")
)


@pytest.mark.parametrize("name", _KERAS_OPTIMIZERS)
def test_every_keras_optimizer_round_trips_through_its_config(name):
    """`from_config` and `keras.optimizers.deserialize` give the inner class back
    (Keras 3.15's own `deserialize` returns the string 'Lamb' for a Lamb config)."""
    assert len(_KERAS_OPTIMIZERS) >= 14
    opt = AccumOptimizer(getattr(keras.optimizers, name)(), merge_grad=2, **QUICK)
    for restored in (
        AccumOptimizer.from_config(opt.get_config()),
        keras.optimizers.deserialize(keras.optimizers.serialize(opt)),
    ):
        assert isinstance(restored, AccumOptimizer)
        assert type(restored.inner_optimizer) is type(opt.inner_optimizer)
        assert restored.get_config() == opt.get_config()


@pytest.mark.slow
def test_a_model_trained_with_lamb_inside_loads_and_resumes(tmp_path):
    x, y = X, np.random.default_rng(1).standard_normal((4, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=AccumOptimizer(keras.optimizers.Lamb(0.01), merge_grad=2), loss="mse")
    model.train_on_batch(x, y)  # an open window
    path = str(tmp_path / "lamb.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Lamb)
    assert int(loaded.optimizer.window_steps.numpy()) == 1
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
