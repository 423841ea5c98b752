"""What the Keras sections share on every backend: the optimizers, the model, the `fit` protocol.

Imports Keras (whose backend the process's `KERAS_BACKEND` picked), never a
backend itself: the TensorFlow, JAX and torch-backend sections each run in
their own process and time `model.fit` the same way.

The protocol: each configuration is a callable that trains two windows
(`2 * merge_grad` micro-batches of `BATCH`) and returns each micro-step's
time. The first window is dropped (a `fit` call's iterator start-up slows
its first batch); the second is kept whole, its first micro-step included.
Configurations are interleaved window by window (`_common.interleaved`),
and each figure is the median over the rounds.
"""

from __future__ import annotations

import gc
import time

import keras
import numpy as np

from benchmarks import _common as C
from keras_accum import AccumOptimizer

K = C.MERGE_GRAD
LR = 1e-4


def adam(**kwargs):
    return keras.optimizers.Adam(LR, **kwargs)


def accum(**kwargs):
    return AccumOptimizer(adam(), merge_grad=K, **kwargs)


def mlp(width, optimizer=None, jit_compile=False):
    """`LAYERS` square Dense layers, compiled with `optimizer` and an MSE loss (if given)."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(C.LAYERS - 1)]
    model = keras.Sequential([keras.Input((width,)), *layers, keras.layers.Dense(width)])
    if optimizer is not None:
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model


def fit_data(width):
    """Two windows of micro-batches: `x`, `y` of `2 * K * BATCH` rows."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2 * K * C.BATCH, width), dtype=np.float32)
    y = rng.standard_normal((2 * K * C.BATCH, width), dtype=np.float32)
    return x, y


class BatchTimer(keras.callbacks.Callback):
    """Times each `fit` batch, from `on_train_batch_begin` to `on_train_batch_end`.

    `sync`: called at each batch's end before the clock is read, for a
    backend that dispatches asynchronously (JAX: the batch ends when its
    state is ready, not when its last op was dispatched).
    """

    def __init__(self, sync=None):
        super().__init__()
        self.times = []
        self._start = None
        self._sync = sync

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._sync is not None:
            self._sync()
        self.times.append(time.perf_counter() - self._start)


def fit_runner(model, x, y, sync=None):
    """A callable that runs one `fit` call of two windows and returns each batch's time."""

    def run():
        timer = BatchTimer(None if sync is None else lambda: sync(model))
        model.fit(x, y, batch_size=C.BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        return timer.times

    return run


def fit_stats(times, kind):
    """Stats of one call of two windows: the first (iterator start-up) is dropped.

    The second window is kept whole: its first micro-step is where a
    window's accumulators start, and costs what it costs. `kind`: "accum"
    (the window's last micro-step updates), "update" (every one does: plain
    Adam) or "non_update" (none does: the floor).
    """
    assert len(times) == 2 * K, times
    kept = times[K:]
    if kind != "accum":
        return C.uniform_stats(kept, kind)
    return C.window_stats(kept)


def interleaved_runs(runners, repeats, warmup=1):
    """Runs `runners` (name -> (run, kind)) interleaved; name -> median stats.

    `warmup` untimed calls of each first (trace, compile, slot creation).
    """
    for run, _ in runners.values():
        for _ in range(warmup):
            run()
    per_repeat = {name: [] for name in runners}
    for name in C.interleaved(runners, repeats):
        run, kind = runners[name]
        per_repeat[name].append(fit_stats(run(), kind))
    return {name: C.median_stats(r) for name, r in per_repeat.items()}


class FloorOptimizer(keras.optimizers.Optimizer):
    """The floor inside `model.fit`: `apply` adds the gradients into buffers, nothing else.

    On torch the add is in place (`add_`, as AccumOptimizer's torch plumbing
    adds; Keras's `assign_add` there makes a new tensor); elsewhere it is
    `assign_add` (on JAX `assign(b + g)`, which a jitted, donating train
    step, `fit`'s, runs in place). `fit` builds the optimizer before it
    traces its train step.
    """

    def __init__(self):
        super().__init__(learning_rate=0.0, name="floor")

    def build(self, var_list):
        super().build(var_list)
        self._buffers = [self.add_variable_from_reference(v, "buffer") for v in var_list]

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        in_place = keras.backend.backend() == "torch"
        for b, g in zip(self._buffers, grads):
            if in_place:
                b.value.add_(g)
            else:
                b.assign_add(g)


def fit_rows(width, x, y, *, jit_compile, repeats, warmup=1, sync=None, extra=None):
    """`model.fit` rows: AccumOptimizer(Adam), plain Adam, Keras's built-in and the floor.

    Each trains an MLP of `width` on `x`, `y`, interleaved with the runners
    in `extra` (name -> (run, kind)); one row per name (the median stats),
    with the context `model.fit, jit_compile=...`. Checks that the
    window closed, then frees the models.
    """
    optimizers = {
        "accum": (accum(), "accum"),
        "plain": (adam(), "update"),
        "builtin": (adam(gradient_accumulation_steps=K), "accum"),
        "floor": (FloorOptimizer(), "non_update"),
    }
    runners = {
        name: (fit_runner(mlp(width, opt, jit_compile), x, y, sync=sync), kind)
        for name, (opt, kind) in optimizers.items()
    }
    runners.update(extra or {})
    stats = interleaved_runs(runners, repeats, warmup)
    assert window_steps(optimizers["accum"][0]) == 0
    context = f"model.fit, jit_compile={jit_compile}"
    out = [dict(context=context, row=n, **s) for n, s in stats.items()]
    del runners, optimizers
    keras.backend.clear_session()
    gc.collect()
    return out


def require_backend(parser, backend, section):
    """Stops with `parser.error` unless Keras runs `backend` (picked before Keras's import)."""
    if keras.backend.backend() != backend:
        parser.error(
            f"the {section} section needs Keras's {backend} backend: set "
            f"KERAS_BACKEND={backend} before Keras is imported. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )


def window_steps(optimizer) -> int:
    """AccumOptimizer's open window's length, read on the host (0 after whole windows)."""
    return int(keras.ops.convert_to_numpy(optimizer.window_steps))
