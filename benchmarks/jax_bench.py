"""JAX section: AccumOptimizer(Adam) in Keras's JAX `fit`, against plain Adam, the built-in, optax and the floor.

Run by `python -m benchmarks` in its own process (`KERAS_BACKEND=jax`);
alone: `KERAS_BACKEND=jax python -m benchmarks.jax_bench [--quick]
[--sizes 1M,10M] --json out.json`.

Measured as the TensorFlow section measures `fit` (`_keras_fit`): an MLP of
4 square Dense layers of each size, batches of 8, merge_grad=4, Adam,
float32; configurations interleaved window by window, each figure the
median over windows. Three groups:

* `model.fit` with the model's `jit_compile=True` (JAX's default: the
  trainer jits its train step and donates the state): AccumOptimizer(Adam),
  plain Adam on the same micro-batches, Keras's `Adam(gradient_accumulation_
  steps=4)`, the floor (an optimizer whose `apply` only adds the gradients
  into buffers), and `optax.MultiSteps(optax.adam(lr), every_k_schedule=4)`
  driven the way a JAX user drives it: a `jax.jit` train step (state
  donated, as Keras's trainer donates it) taking `jax.value_and_grad` of the
  same model through `model.stateless_call`, then the optax update and
  `optax.apply_updates`. optax is a reference row, timed per step.
* `model.fit` with `jit_compile=False` (the trainer runs its step op by op;
  AccumOptimizer's own `jit_compile=True` still jits its micro-step): the
  same rows but optax, which has no such mode.
* The custom loop Keras documents for JAX ("Writing a training loop from
  scratch in JAX"): a `jax.jit` train step (no donation, as written there)
  calling `optimizer.stateless_apply(optimizer_variables, grads,
  trainable_variables)`, for AccumOptimizer(Adam) and plain Adam; and the
  same step with its state donated (`donate_argnums=0`, as `fit` does).

JAX dispatches asynchronously: every timed micro-step waits for its state
(`jax.block_until_ready`) before the clock is read.
"""

from __future__ import annotations

import gc
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import optax  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _keras_fit as F  # noqa: E402

K = C.MERGE_GRAD
# Keras's Adam adds epsilon to sqrt(v) as optax does, with 1e-7 by default.
EPSILON = 1e-7

# Keras's built-in accumulation, stepped op by op (`jit_compile=False`),
# traces and compiles its `lax.cond`s at every micro-step (about 0.5 s a
# micro-step here, whatever the size): fewer windows for that group.
JIT_OFF_REPEATS = {"1M": 9, "10M": 5, "50M": 5}
# `--quick`: one round (its timings mean nothing).
QUICK_REPEATS = 1


def _sync(model):
    """Waits for the state of the batch `fit` just ran (the trainer keeps it there)."""
    jax.block_until_ready(getattr(model, "_jax_state", None))


def _batches(x, y):
    """The `2 * K` micro-batches a `fit` call of `x`, `y` takes, in its order."""
    b = C.BATCH
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]


def _step_runner(step, state, batches):
    """A callable that runs `step(state, batch)` over `batches` and returns each step's time.

    `state` is a one-element list holding the loop's state between calls.
    """

    def run():
        times = []
        for batch in batches:
            start = time.perf_counter()
            loss, state[0] = step(state[0], batch)
            jax.block_until_ready((loss, state[0]))
            times.append(time.perf_counter() - start)
        return times

    return run


def _loss_of(model):
    """`(trainable, non_trainable, x, y) -> (loss, non_trainable)` through `stateless_call`."""
    loss_fn = keras.losses.MeanSquaredError()

    def compute_loss_and_updates(trainable, non_trainable, x, y):
        y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x)
        return loss_fn(y, y_pred), non_trainable

    return jax.value_and_grad(compute_loss_and_updates, has_aux=True)


def _optax_multisteps(width, x, y):
    """optax MultiSteps(adam) in a jitted, donating train step; returns (run, check)."""
    model = F.mlp(width)
    grad_fn = _loss_of(model)
    tx = optax.MultiSteps(optax.adam(F.LR, eps=EPSILON), every_k_schedule=K)

    def train_step(state, batch):
        trainable, non_trainable, opt_state = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, *batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return loss, (optax.apply_updates(trainable, updates), non_trainable, opt_state)

    # Copies: the donated state must not be the model's own buffers.
    trainable = [jax.numpy.copy(v.value) for v in model.trainable_variables]
    non_trainable = [jax.numpy.copy(v.value) for v in model.non_trainable_variables]
    state = [(trainable, non_trainable, tx.init(trainable))]
    run = _step_runner(jax.jit(train_step, donate_argnums=0), state, _batches(x, y))

    def window_position():
        return int(state[0][2].mini_step)

    return run, window_position


def _stateless_loop(width, optimizer, x, y, donate=False):
    """Keras's documented JAX loop: `jax.jit(train_step)` calling `stateless_apply`.

    `donate`: the step donates its state (`donate_argnums=0`, as `fit` does),
    so XLA may update it in place. Returns (run, sync): `sync()` writes the
    loop's optimizer state back into `optimizer.variables`.
    """
    model = F.mlp(width)
    optimizer.build(model.trainable_variables)
    grad_fn = _loss_of(model)

    def train_step(state, batch):
        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, *batch)
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )
        return loss, (trainable, non_trainable, optimizer_variables)

    # Copies when donated: the donated state must not be the variables' own buffers.
    own = jax.numpy.copy if donate else (lambda value: value)
    state = [
        (
            [own(v.value) for v in model.trainable_variables],
            [own(v.value) for v in model.non_trainable_variables],
            [own(v.value) for v in optimizer.variables],
        )
    ]
    step = jax.jit(train_step, donate_argnums=0 if donate else ())
    run = _step_runner(step, state, _batches(x, y))

    def sync():
        for v, value in zip(optimizer.variables, state[0][2]):
            v.assign(value)

    return run, sync


def _fit(width, jit_compile, repeats, warmup):
    x, y = F.fit_data(width)
    extra, position = {}, None
    if jit_compile:
        run, position = _optax_multisteps(width, x, y)
        extra["optax"] = (run, "accum")
    rows = F.fit_rows(
        width,
        x,
        y,
        jit_compile=jit_compile,
        repeats=repeats,
        warmup=warmup,
        sync=_sync,
        extra=extra,
    )
    assert position is None or position() == 0
    return rows


def _custom_loop(width, repeats, warmup, donate):
    x, y = F.fit_data(width)
    accum = F.accum()
    run_accum, sync_accum = _stateless_loop(width, accum, x, y, donate)
    run_plain, _ = _stateless_loop(width, F.adam(), x, y, donate)
    runners = {"accum": (run_accum, "accum"), "plain": (run_plain, "update")}
    stats = F.interleaved_runs(runners, repeats, warmup)
    sync_accum()
    assert F.window_steps(accum) == 0
    context = "jax.jit train step, stateless_apply" + (", state donated" if donate else "")
    out = [dict(context=context, row=n, **s) for n, s in stats.items()]
    del runners
    keras.backend.clear_session()
    gc.collect()
    return out


def main(argv=None):
    parser = C.section_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    F.require_backend(parser, "jax", "JAX")
    widths = C.QUICK_WIDTHS if args.quick else C.FULL_WIDTHS
    sizes = args.sizes.split(",") if args.sizes else list(widths)
    if args.quick:
        # A smoke test of every row: compiling each train step, and the
        # built-in's per-micro-step compiles with `jit_compile=False`, cost
        # the same at every size; one size, one round, no warm-up call.
        sizes = sizes[:1]
    warmup = 0 if args.quick else 1
    rows, repeats = [], {}
    for size in sizes:
        width = widths[size]
        on = QUICK_REPEATS if args.quick else C.FULL_REPEATS[size]
        off = QUICK_REPEATS if args.quick else JIT_OFF_REPEATS[size]
        repeats[size] = {"jit_compile=True": on, "jit_compile=False": off}
        start = time.perf_counter()
        size_rows = (
            _fit(width, True, on, warmup)
            + _fit(width, False, off, warmup)
            + _custom_loop(width, on, warmup, donate=False)
            + _custom_loop(width, on, warmup, donate=True)
        )
        for r in size_rows:
            r.update(size=size, params=C.n_params(width))
        rows += size_rows
        gc.collect()
        print(f"jax {size}: {time.perf_counter() - start:.1f} s", flush=True)
    C.write_json(
        args.json,
        {
            "rows": rows,
            "memory": [],
            "merge_grad": K,
            "threads": "XLA default",
            "sizes": sizes,
            "repeats": repeats,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
