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
