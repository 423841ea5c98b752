"""Runs the framework-free streams of `cases.py` through the Keras optimizer.

Backend-free (`keras.ops` and NumPy), so that the same tests run on Keras's
TensorFlow, JAX and torch backends; only `compiled="function"` (a user's
`tf.function`) needs TensorFlow.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def _has_float64() -> bool:
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


#: Whether float64 variables hold float64 (JAX keeps float32 without `jax_enable_x64`).
FLOAT64 = _has_float64()


def small_model(seed=1):
    """A 5 -> 4 (tanh) -> 2 MLP with fixed initial weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )


def small_data(n=64, seed=0):
    """Inputs (n, 5) and targets (n, 2), standard normal float32."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 5)).astype(np.float32),
        rng.standard_normal((n, 2)).astype(np.float32),
    )


def make_variables(params, dtype="float32"):
    return [keras.Variable(np.array(p), dtype=dtype, name=f"v{i}") for i, p in enumerate(params)]


def to_tensors(grads, dtype="float32"):
    return [None if g is None else ops.convert_to_tensor(np.asarray(g), dtype=dtype) for g in grads]


def values(variables):
    """The variables' values as NumPy arrays (copies)."""
    return [np.array(v.numpy()) for v in variables]


def run_stream(opt, variables, stream, flush=False, use_weights=True, compiled=None):
    """Feeds `stream` (list of (grads, weight)) through `opt`, one micro-step each.

    compiled: None to call `apply` as is (eager, jitted by the optimizer), or
        "function" to call it inside a user's `tf.function`.
    """
    def step(grads, weight):
        opt.apply(grads, variables, weight=weight)

    if compiled == "function":
        import tensorflow as tf

        # As in a user's loop: the variables are captured, not passed in.
        step = tf.function(step)
    for grads, weight in stream:
        w = weight if use_weights and weight != 1.0 else None
        step(to_tensors(grads, variables[0].dtype), w)
    if flush:
        opt.flush()
    return [np.array(v.numpy()) for v in variables]


def replay_inner(inner, variables, handed):
    """Applies each handed-on merged gradient list through a plain Keras optimizer.

    A MultiOptimizer takes every variable, with None for one without gradient
    (its sub-optimizers drop those); the others take the pairs with gradients.
    """
    keep_none = isinstance(inner, keras.optimizers.MultiOptimizer)
    for grads in handed:
        pairs = [
            (None if g is None else ops.convert_to_tensor(np.asarray(g)), v)
            for g, v in zip(grads, variables)
            if g is not None or keep_none
        ]
        with warnings.catch_warnings():
            # Keras warns about each None it drops; here they are on purpose.
            warnings.filterwarnings("ignore", "Gradients do not exist", UserWarning)
            inner.apply_gradients(pairs)
    return [np.array(v.numpy()) for v in variables]


#: How a test takes a micro-step, per Keras backend:
#: "eager": `apply` called eagerly, the optimizer built with `jit_compile=False`;
#: "jit": `apply` called eagerly, the optimizer's own compiled step (XLA on
#: TensorFlow, `jax.jit` on JAX); "function": inside a user's `tf.function`;
#: "xla_function": inside a user's `tf.function(jit_compile=True)` (as `fit`
#: with XLA); "jax_jit": a user's `jax.jit` of `stateless_apply` (as `fit` on
#: JAX). In the last two the window position is decided at run time.
MODES = {
    "tensorflow": ("eager", "jit", "function", "xla_function"),
    "jax": ("eager", "jit", "jax_jit"),
    "torch": ("eager",),
}[BACKEND]

#: The modes in which a step is traced by the caller, as in `fit`.
TRACED_MODES = ("xla_function", "jax_jit")


def stepper(opt, variables, mode):
    """`step(grads, weight=None)`: one micro-step of `opt` on `variables`, called as `mode` says.

    `opt` must be built on `variables` for the traced modes.
    """
    if mode in ("function", "xla_function"):
        import tensorflow as tf

        # Keras variables cannot be tf.function arguments: close over them.
        @tf.function(jit_compile=mode == "xla_function")
        def step(grads, weight=None):
            opt.apply(grads, variables, weight=weight)

        return step
    if mode == "jax_jit":
        import jax

        @jax.jit
        def pure(opt_values, train_values, grads, weight):
            return opt.stateless_apply(opt_values, grads, train_values, weight=weight)

        def step(grads, weight=None):
            if weight is not None:
                weight = np.float32(weight)
            trained, state = pure(
                [v.value for v in opt.variables], [v.value for v in variables], grads, weight
            )
            _write(variables, trained)
            _write(opt.variables, state)

        return step
    return lambda grads, weight=None: opt.apply(grads, variables, weight=weight)


def flusher(opt, variables, mode):
    """`flush()` of `opt`, called as `mode` says (see `stepper`)."""
    if mode == "xla_function":
        import tensorflow as tf

        return tf.function(lambda: opt.flush(), jit_compile=True)
    if mode == "jax_jit":
        import jax

        pure = jax.jit(opt.stateless_flush)

        def flush():
            trained, state = pure([v.value for v in opt.variables], [v.value for v in variables])
            _write(variables, trained)
            _write(opt.variables, state)
            return None

        return flush
    return opt.flush


def _write(variables, new_values):
    for v, value in zip(variables, new_values):
        v.assign(value)
