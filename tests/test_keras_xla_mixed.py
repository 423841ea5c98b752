"""XLA-jitted steps and mixed precision for the Keras AccumOptimizer.

- `jit_compile=True`: in custom loops `apply_gradients` runs as one
  XLA-compiled function, traced once for update and non-update micro-steps,
  with the numbers of the eager step (docs/semantics.md, point 13); inside
  `model.fit` the model's own `jit_compile` decides.
- Mixed precision: under `mixed_float16` the model's LossScaleOptimizer wraps
  ours and skips an overflowing micro-step without touching the window;
  accumulators and EMA stay float32 for bfloat16 variables, so many tiny
  bfloat16 gradients add up instead of stalling.
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
from keras_driver import BACKEND, to_tensors
from keras_driver import small_data as _data
from keras_driver import small_model as _make_model

if BACKEND == "tensorflow":
    import tensorflow as tf

from keras_accum import AccumOptimizer

RTOL, ATOL = 1e-5, 1e-6

# Mixed precision against a float32 run. Forward and backward passes in
# float16 carry a relative error of about 2**-11 (5e-4) per operation; over a
# few updates of a tiny model the weights (|w| < 1) drift by about 1e-4
# (measured: 5e-5). 5e-3 is ~5 float16 ulps at 1.0: loose enough for that
# drift, ten times tighter than what one dropped or misplaced micro-batch
# does to these weights (about 5e-2 here). bfloat16 keeps 8 bits (ulp 2**-8
# just below 1.0), hence 2e-2 there (measured: 7e-4).
FP16_ATOL = 5e-3
BF16_ATOL = 2e-2


# -- helpers --------------------------------------------------------------------


def _variables(params, dtype="float32"):
    return [keras.Variable(np.array(p), dtype=dtype, name=f"v{i}") for i, p in enumerate(params)]


def _tensors(grads, dtype="float32"):
    return to_tensors(grads, dtype)


def _values(variables):
    return [np.array(v.numpy(), dtype=np.float32) for v in variables]


def _close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


def _state(opt, variables):
    """Everything a run leaves behind, as NumPy."""
    return {
        "params": _values(variables),
        "ema": [np.array(e.numpy()) for e in opt.ema_variables],
        "counters": (
            int(opt.iterations.numpy()),
            int(opt.micro_steps.numpy()),
            int(opt.skipped_updates.numpy()),
            int(opt.window_steps.numpy()),
        ),
        "last_grad_norm": float(opt.last_grad_norm.numpy()),
    }


def _run_case(case, jit_compile, momentum=0.9):
    params = cases.make_params()
    variables = _variables(params)
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=momentum), jit_compile=jit_compile, **case.kwargs
    )
    for grads, weight in cases.make_stream(case):
        # Weighted rows pass every weight (1.0 too): one call signature, one trace.
        w = None if case.weights is None else weight
        opt.apply_gradients(zip(_tensors(grads), variables), weight=w)
    if case.flush_at_end:
        opt.flush()
    return opt, variables


def _oracle(case, momentum=0.9):
    oracle = ref.RefAccum(cases.make_params(), ref.RefSGD(0.1, momentum), **case.kwargs)
    for grads, weight in cases.make_stream(case):
        oracle.step(grads, weight)
    if case.flush_at_end:
        oracle.flush()
    return oracle




def _fit(x, y, optimizer, batch_size, jit_compile=False, epochs=2, initial_weights=None):
    model = _make_model()
    if initial_weights is not None:
        model.set_weights(initial_weights)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test, and always puts float32 back."""

    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)

    try:
        yield set_policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- XLA in custom loops ---------------------------------------------------------


@pytest.mark.parametrize("case", cases.CASES, ids=[c.id for c in cases.CASES])
def test_jitted_step_matches_eager_step_and_oracle(case):
    """The optimizer's own compiled eager step (XLA on TensorFlow, `jax.jit` on JAX;
    torch has none) gives the numbers of the uncompiled one, and the oracle's."""
    jit_opt, jit_vars = _run_case(case, jit_compile=True)
    eager_opt, eager_vars = _run_case(case, jit_compile=False)
    # TensorFlow: one XLA function for the micro-steps that neither open nor
    # close a window (and for the first window's opening one: after the build
    # the host reads the position, it has not seen a reset), traced once per
    # structure of the gradient list (which gradients are None); the opening
    # micro-step of later windows and the closing one run plain
    # tf.functions, also traced once per structure.
    structures = {tuple(g is None for g in grads) for grads, _ in cases.make_stream(case)}
    if BACKEND != "tensorflow":
        pass
    elif case.kwargs.get("merge_grad", 1) == 1:  # every micro-step updates
        assert not eager_opt._plumbing._accumulate_jitted
        assert jit_opt._plumbing._accumulate_fn is None and jit_opt._plumbing._start_fn is None
    else:
        assert not eager_opt._plumbing._accumulate_jitted
        assert 1 <= jit_opt._plumbing._start_fn.experimental_get_tracing_count() <= len(structures)
        assert jit_opt._plumbing._accumulate_jitted
        assert 1 <= jit_opt._plumbing._accumulate_fn.experimental_get_tracing_count() <= len(structures)
    jitted, eager = _state(jit_opt, jit_vars), _state(eager_opt, eager_vars)
    assert jitted["counters"] == eager["counters"]
    _close(jitted["params"], eager["params"], rtol=1e-6, atol=1e-6, what="params")
    _close(jitted["ema"], eager["ema"], rtol=1e-6, atol=1e-6, what="ema")
    np.testing.assert_allclose(jitted["last_grad_norm"], eager["last_grad_norm"], 1e-6, 1e-6)
    # And the oracle, so that "the same" is not "the same mistake".
    oracle = _oracle(case)
    _close(jitted["params"], oracle.params, what="params vs oracle")
    if oracle.use_ema:
        _close(jitted["ema"], oracle.ema, what="ema vs oracle")
    assert jitted["counters"][:3] == (oracle.iterations, oracle.micro_steps, oracle.skipped_updates)


@pytest.mark.tensorflow
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_one_xla_trace_serves_every_non_update_micro_step(weighted):
    """Eager loop: the host knows the window position, so a micro-step that does
    not update runs one XLA function that only accumulates (no conditional, so
    XLA writes back no weight and no inner slot); the closing one runs its own function."""
    variables = _variables(cases.make_params())
    opt = AccumOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9),
        merge_grad=4,
        use_ema=True,
        global_clipnorm=1.0,
        ema_overwrite_frequency=2,
    )
    stream = cases.make_stream(cases.AccumCase("s", merge_grad=4, n_micro=12))
    for k, (grads, _) in enumerate(stream):
        opt.apply_gradients(
            zip(_tensors(grads), variables), weight=float(k + 1) if weighted else None
        )
    assert int(opt.iterations.numpy()) == 3 and int(opt.micro_steps.numpy()) == 12
    assert opt._plumbing._accumulate_fn.experimental_get_tracing_count() == 1
    assert opt._plumbing._start_fn.experimental_get_tracing_count() == 1
    (concrete,) = opt._plumbing._accumulate_fn._list_all_concrete_functions()
    (start,) = opt._plumbing._start_fn._list_all_concrete_functions()
    # The function of the micro-steps inside a window is XLA-compiled
    # (must-compile), not a plain graph; the window's first one is a plain
    # graph (it writes the gradients into the accumulators).
    assert concrete.function_def.attr["_XlaMustCompile"].b
    assert not start.function_def.attr["_XlaMustCompile"].b
    # Both write the accumulators and counters only: no model weight, no inner slot.
    forbidden = {id(v.value.handle) for v in variables} | {
        id(s.value.handle) for s in opt.inner_optimizer.variables
    }
    accumulators = {id(a.value.handle) for a in opt._accumulators}
    for fn in (concrete, start):
        written = {
            op.inputs[0].name
            for op in fn.graph.get_operations()
            if op.type.startswith("AssignVariable") or op.type.startswith("AssignAddVariable")
        }
        captured = {t.name: v for t, v in zip(fn.graph.internal_captures, fn.captured_inputs)}
        touched = {id(captured[name]) for name in written if name in captured}
        assert touched & accumulators and not touched & forbidden


@pytest.mark.tensorflow
def test_user_tf_function_decides_compilation_and_traces_once():
    case = next(c for c in cases.CASES if c.id == "ema_merge4_warmup_overwrite2")
    variables = _variables(cases.make_params())
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), **case.kwargs)  # jit_compile=True

    @tf.function
    def step(grads):  # closes over the variables: Keras variables cannot be arguments
        opt.apply_gradients(zip(grads, variables))

    stream = cases.make_stream(case)
    step(_tensors(stream[0][0]))  # builds the optimizer: tf.function traces again after
    traces = step.experimental_get_tracing_count()  # creating variables on a first call
    for grads, _ in stream[1:]:
        step(_tensors(grads))
    assert step.experimental_get_tracing_count() == traces  # no retrace, updates included
    assert opt._plumbing._accumulate_fn is None  # the caller's function ran the step, not ours
    oracle = _oracle(case)
    _close(_values(variables), oracle.params, what="params vs oracle")
    _close([np.array(e.numpy()) for e in opt.ema_variables], oracle.ema, what="ema vs oracle")
    assert int(opt.iterations.numpy()) == oracle.iterations


def _copies_of(hlo, shape):
    """How many `copy` instructions of an f32 buffer of `shape` the HLO text holds."""
    dims = ",".join(str(d) for d in shape)
    return len(re.findall(rf"= f32\[{dims}\]\{{[0-9,]*\}} copy\(", hlo))


@pytest.mark.tensorflow
@pytest.mark.parametrize("on_nonfinite", ["skip", "ignore"])
def test_xla_function_copies_no_state_and_matches_oracle(on_nonfinite):
    """Inside a user's `tf.function(jit_compile=True)` (as in `fit` with XLA) one
    compiled step serves every micro-step and decides at run time.

    An XLA conditional would return every variable its update branch writes,
    so its other branch would copy each weight, inner slot, EMA shadow and
    accumulator at every micro-step. The compiled step holds no copy of any
    of them (recognised by their shapes: two variables share a shape, whose
    reset must not be one shared buffer of zeros copied into each), and every
    micro-step matches the oracle.
    """
    shapes = [*cases.SHAPES, cases.SHAPES[0]]
    case = cases.AccumCase(
        "xla", merge_grad=3, n_micro=9, config=(("use_ema", True), ("global_clipnorm", 1.0))
    )
    kwargs = dict(case.kwargs, on_nonfinite=on_nonfinite)
    params = cases.make_params(shapes=shapes)
    variables = _variables(params)
    opt = AccumOptimizer(keras.optimizers.Adam(0.1), **kwargs)
    opt.build(variables)

    @tf.function(jit_compile=True)
    def step(grads):
        opt.apply(grads, variables)

    oracle = ref.RefAccum(params, ref.RefAdam(0.1), **kwargs)
    stream = cases.make_stream(case, shapes=shapes)
    for k, (grads, _) in enumerate(stream):
        oracle.step(grads)
        step(_tensors(grads))
        # Adam's step is lr * m / (sqrt(v) + eps), of size ~lr = 0.1 per
        # update, whatever the gradient's scale: float32 rounding in XLA's
        # fusions (against the NumPy oracle's order) shows at ~1e-5 of it.
        _close(_values(variables), oracle.params, atol=1e-5, what=f"params, micro-step {k + 1}")
        assert int(opt.iterations.numpy()) == oracle.iterations
    _close([np.array(e.numpy()) for e in opt.ema_variables], oracle.ema, what="ema")
    assert step.experimental_get_tracing_count() == 1
    hlo = step.experimental_get_compiler_ir(_tensors(stream[0][0]))(stage="optimized_hlo")
    assert " while(" in hlo  # the update: a loop of 0 or 1 iterations
    for shape in shapes:
        assert _copies_of(hlo, shape) == 0, (shape, on_nonfinite)


# -- XLA inside model.fit --------------------------------------------------------


@pytest.mark.slow
def test_fit_with_model_jit_compile_matches_large_batch():
    x, y = _data(64)
    config = {"use_ema": True, "ema_momentum": 0.5, "global_clipnorm": 0.1}
    small = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=4, **config)
    large = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=1, **config)
    small_model = _fit(x, y, small, batch_size=8, jit_compile=True)
    # The large-batch run without XLA: one compile less, and XLA vs graph on the way.
    large_model = _fit(x, y, large, batch_size=32, jit_compile=False)
    if BACKEND == "tensorflow":
        # The model's XLA-compiled train step ran ours; the optimizer made no function of its own.
        assert small._plumbing._accumulate_fn is None and large._plumbing._accumulate_fn is None
    assert int(small.iterations.numpy()) == int(large.iterations.numpy()) == 4
    assert int(small.micro_steps.numpy()) == 16
    _close(_values(small_model.trainable_weights), _values(large_model.trainable_weights))
    _close(
        [np.array(e.numpy()) for e in small.ema_variables],
        [np.array(e.numpy()) for e in large.ema_variables],
    )
    np.testing.assert_allclose(
        float(small.last_grad_norm.numpy()), float(large.last_grad_norm.numpy()), RTOL, ATOL
    )


# -- mixed precision -------------------------------------------------------------


@pytest.mark.slow
def test_mixed_float16_fit_matches_float32_large_batch(policy):
    x, y = _data(64)
    config = {"use_ema": True, "ema_momentum": 0.5}
    large = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=1, **config)
    reference = _fit(x, y, large, batch_size=32)
    policy("mixed_float16")
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=4, **config)
    model = _fit(x, y, opt, batch_size=8)
    # model.compile wrapped ours in a LossScaleOptimizer, which ran it as its inner optimizer.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is opt
    assert model.layers[0].compute_dtype == "float16"
    assert all(a.dtype == "float32" for a in opt._accumulators)
    assert all(e.dtype == "float32" for e in opt.ema_variables)
    assert int(opt.iterations.numpy()) == 4 and int(opt.micro_steps.numpy()) == 16
    assert int(opt.skipped_updates.numpy()) == 0
    # Final weights are the EMA (fit finalizes) in both runs.
    _close(
        _values(model.trainable_weights),
        _values(reference.trainable_weights),
        rtol=0,
        atol=FP16_ATOL,
        what="mixed_float16 merge_grad=4 vs float32 batch 32",
    )
    _close(
        [np.array(e.numpy()) for e in opt.ema_variables],
        [np.array(e.numpy()) for e in large.ema_variables],
        rtol=0,
        atol=FP16_ATOL,
        what="EMA",
    )


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_mixed_float16_overflow_skips_its_whole_window_like_the_large_batch(policy, jit_compile):
    """An overflowing micro-batch skips its window; the windows stay aligned.

    Keras's LossScaleOptimizer alone would drop the bad micro-batch before it
    reached us and shift every later window, moving the scale mid-window. The
    large batch that contains the bad rows is skipped by the LossScaleOptimizer:
    accumulation must end where that run ends, with the same loss scale. With
    the model's `jit_compile=True` the skip and the scale's move run inside XLA.
    """
    x, y = _data(64)
    y = y.copy()
    y[16:24] = 1e4  # micro-batch 2 (in window 0): its float16 gradient overflows
    policy("mixed_float16")
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=4)
    model = _fit(x, y, opt, batch_size=8, epochs=1, jit_compile=jit_compile)
    large = _fit(x, y, keras.optimizers.SGD(0.1, momentum=0.9), batch_size=32, epochs=1)
    scaler = model.optimizer
    assert isinstance(scaler, keras.optimizers.LossScaleOptimizer)
    assert int(opt.micro_steps.numpy()) == 8  # every micro-batch reached us
    assert int(opt.skipped_updates.numpy()) == 1
    assert int(opt.iterations.numpy()) == int(large.optimizer.iterations.numpy()) == 1
    # The scale halved once, at the window's end, as the large batch's did.
    assert float(scaler.dynamic_scale.numpy()) == scaler.initial_scale / 2
    assert float(large.optimizer.dynamic_scale.numpy()) == scaler.initial_scale / 2
    for acc in opt._accumulators:  # the last window closed: nothing left over
        np.testing.assert_array_equal(acc.numpy(), np.zeros(acc.shape, np.float32))
    _close(
        _values(model.trainable_weights),
        _values(large.trainable_weights),
        rtol=0,
        atol=FP16_ATOL,
        what="mixed_float16 merge_grad=4 vs mixed_float16 batch 32, bad batch skipped",
    )
    assert max(np.abs(a - b).max() for a, b in zip(_values(model.trainable_weights),
                                                    _values(large.trainable_weights))) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed_bfloat16", "bfloat16"])
def test_bfloat16_policies_keep_float32_state_and_match_float32(policy, name):
    x, y = _data(64)
    config = {"use_ema": True, "ema_momentum": 0.5}
    policy(name)
    # bfloat16 variables draw their initial values in bfloat16: start the
    # float32 run from the same (exactly representable) values.
    initial = [np.array(w, np.float32) for w in _make_model().get_weights()]
    opt = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=4, **config)
    model = _fit(x, y, opt, batch_size=8, initial_weights=initial)
    policy("float32")
    large = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), merge_grad=1, **config)
    reference = _fit(x, y, large, batch_size=32, initial_weights=initial)
    assert model.optimizer is opt  # no loss scaling for bfloat16
    variable_dtype = "float32" if name == "mixed_bfloat16" else "bfloat16"
    assert all(w.dtype == variable_dtype for w in model.trainable_weights)
    assert all(a.dtype == "float32" for a in opt._accumulators)
    assert all(e.dtype == "float32" for e in opt.ema_variables)
    assert int(opt.iterations.numpy()) == 4 and int(opt.micro_steps.numpy()) == 16
    _close(
        _values(model.trainable_weights),
        _values(reference.trainable_weights),
        rtol=0,
        atol=BF16_ATOL,
        what=f"{name} merge_grad=4 vs float32 batch 32",
    )


# 64 micro-steps of the same tiny gradient into one bfloat16 variable at 1.0.
# Applied one by one, each would round away (1 - 1e-3 is 1.0 in bfloat16);
# accumulated in float32, the update is lr * sum or lr * mean.
_TINY = np.array([1e-3, 3e-4, 2e-3], np.float32)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("reduction", "lr"), [("sum", 1.0), ("mean", 64.0)])
def test_many_tiny_bfloat16_gradients_do_not_stall(jit_compile, reduction, lr):
    variable = keras.Variable(np.ones(3, np.float32), dtype="bfloat16")
    opt = AccumOptimizer(
        keras.optimizers.SGD(lr), merge_grad=64, reduction=reduction, jit_compile=jit_compile
    )
    grad = ops.convert_to_tensor(_TINY, dtype="bfloat16")
    for _ in range(64):
        opt.apply_gradients([(grad, variable)])
    assert opt._accumulators[0].dtype == "float32"
    assert int(opt.iterations.numpy()) == 1
    oracle = ref.RefAccum(
        [np.ones(3, np.float32)], ref.RefSGD(lr), merge_grad=64, reduction=reduction
    )
    for _ in range(64):
        oracle.step([np.asarray(ops.convert_to_numpy(ops.cast(grad, "float32")))])
    got = variable.numpy().astype(np.float32)
    # Within bfloat16 rounding of the final weight: one ulp in [0.5, 1) is 2**-8.
    np.testing.assert_allclose(got, oracle.params[0], rtol=0, atol=2**-8)
    assert np.all(got < 1.0)  # it moved: nothing stalled


@pytest.mark.parametrize(
    "jit_compile",
    [
        False,
        True,
    ],
    ids=["eager", "jit"],
)
def test_bfloat16_variable_ema_follows_the_stored_weights(jit_compile):
    variable = keras.Variable(np.ones(3, np.float32), dtype="bfloat16")
    opt = AccumOptimizer(
        keras.optimizers.SGD(1.0),
        merge_grad=64,
        reduction="sum",
        use_ema=True,
        jit_compile=jit_compile,
    )
    grad = ops.convert_to_tensor(_TINY, dtype="bfloat16")
    for _ in range(64):
        opt.apply_gradients([(grad, variable)])
    (ema,) = opt.ema_variables
    assert ema.dtype == "float32"
    # The first update copies the weights: exactly the bfloat16 values, widened.
    np.testing.assert_array_equal(ema.numpy(), variable.numpy().astype(np.float32))


def _largest_finite_scale(policy, make_optimizer, batch_size, x, y, exponents):
    """The largest loss scale 2**e (of `exponents`) at which the first window applies."""
    finite = []
    for e in exponents:
        model = _make_mixed_model()
        model.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(make_optimizer(), initial_scale=2.0**e),
            loss="mse", jit_compile=False,
        )
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        if int(model.optimizer.iterations.numpy()) == 1:
            finite.append(e)
    return max(finite)


def _make_mixed_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )


@pytest.mark.slow
def test_mixed_float16_micro_batches_overflow_at_a_lower_scale_by_at_most_k(policy):
    """Each micro-batch's loss is a mean over `b`, not `k * b`: its per-example
    gradients are k times the large batch's, so a window can overflow at a
    lower scale than the large batch, never more than k times lower, and the
    loss scale needs up to log2(k) more halvings (skipped windows) at the start.
    Measured here (docs/semantics.md, point 16): targets of alternating sign,
    whose per-example gradients cancel in the batch's weight gradients, so the
    per-example ones overflow first: the largest finite scale is 2**10 for
    merge_grad=4 on micro-batches of 8, and 2**12 for the batch of 32 on
    TensorFlow and torch (log2(4) = 2 more halvings), 2**11 on JAX (XLA's
    float16 fusions round the batch's sums otherwise)."""
    policy("mixed_float16")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype("float32")
    y = (np.where(np.arange(32)[:, None] % 2 == 0, 1.0, -1.0) * 30).astype("float32")
    exponents = range(8, 14)
    ours = _largest_finite_scale(
        policy, lambda: AccumOptimizer(keras.optimizers.SGD(1e-9), merge_grad=4), 8, x, y, exponents
    )
    large = _largest_finite_scale(policy, lambda: keras.optimizers.SGD(1e-9), 32, x, y, exponents)
    assert large - 2 <= ours <= large  # log2(4) = 2
    measured = {"tensorflow": (10, 12), "jax": (10, 11), "torch": (10, 12)}
    assert (ours, large) == measured[BACKEND], (ours, large)
