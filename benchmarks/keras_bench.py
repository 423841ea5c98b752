"""Keras section: AccumOptimizer(Adam) against the built-in accumulation, plain Adam and the floor.

Run by `python -m benchmarks` in its own process; alone:
`python -m benchmarks.keras_bench [--quick] [--sizes 1M,10M] --json out.json`.

Two kinds of measurement, each in the contexts a user trains in:

* The optimizer alone on fixed gradients (no forward/backward): in an eager
  loop (AccumOptimizer with `jit_compile` on, then off; the built-in and plain
  Adam have no such switch and run eagerly), and inside a plain
  `tf.function`.
* `model.fit` on an MLP of the same size (batches of 8), with the model's
  `jit_compile` off and on; each batch is timed by a callback.

The floor is a bare `assign_add` of the same gradients into buffers of the
same shapes, compiled the way our accumulate-only step is: XLA in the eager
loop with `jit_compile=True`, a plain `tf.function` otherwise, and inside
`fit` an optimizer whose `apply` does only that.

Configurations measured together are interleaved window by window (one
window = `merge_grad` micro-steps, the last one updates), so that a loaded
machine slows them alike; each figure is the median over windows.

Runs on Keras's TensorFlow backend. `AccumOptimizer(jit_compile=True)`
compiles its eager micro-step with XLA only where a GPU or TPU is present;
this section sets `KERAS_ACCUM_FORCE_XLA=1` (the runner sets it in the
section's process), so that the eager "jit_compile=True" rows measure XLA on
the CPU too, as they did before that rule.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import zipfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Read once, when keras_accum's TensorFlow plumbing is imported (see above).
os.environ.setdefault("KERAS_ACCUM_FORCE_XLA", "1")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _keras_fit as F  # noqa: E402
from keras_accum.keras._backend import tensorflow as tf_plumbing  # noqa: E402

K = C.MERGE_GRAD
_adam, _accum = F.adam, F.accum


def _variables(width, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(C.LAYERS):
        kernel = rng.standard_normal((width, width), dtype=np.float32) * 0.05
        out.append(keras.Variable(kernel, name=f"kernel{i}"))
        out.append(keras.Variable(np.zeros(width, "float32"), name=f"bias{i}"))
    return out


def _gradients(variables, seed=1):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(rng.standard_normal(tuple(v.shape), dtype=np.float32) * 1e-3) for v in variables
    ]


def _bytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


class _Floor:
    """A bare `buffer.assign_add(gradient)` per variable, compiled like our accumulate step.

    `concrete`: called through its concrete function, as AccumOptimizer's
    eager micro-steps are (no `tf.function` lookup of the trace per call);
    else through the `tf.function`, like the other rows of a `tf.function` loop.
    """

    def __init__(self, variables, jit_compile, concrete=False):
        self.buffers = [tf.Variable(tf.zeros(v.shape, v.dtype)) for v in variables]
        self._fn = tf.function(self._add, jit_compile=jit_compile)
        self._concrete = concrete

    def _add(self, grads):
        for b, g in zip(self.buffers, grads):
            b.assign_add(g)

    def __call__(self, grads):
        if self._concrete and not isinstance(self._fn, tf.types.experimental.ConcreteFunction):
            self._fn(grads)  # traces
            self._fn = self._fn.get_concrete_function(grads)
            return
        self._fn(grads)


def _distinct(variables, leave_out=()):
    skip = {id(v) for v in leave_out}
    return {id(v): v for v in variables if id(v) not in skip}.values()


def _memory(row, opt, base, variables):
    """Bytes of the distinct variables `opt` holds beyond `base`'s and the model's.

    `base` is `opt`'s inner optimizer (whose variables `opt` lists too), or a
    plain optimizer built apart on the same model (compared by size).
    """
    mine = _distinct(opt.variables, leave_out=variables)
    if base is getattr(opt, "inner_optimizer", None):
        extra = _bytes(_distinct(mine, leave_out=base.variables))
    else:
        extra = _bytes(mine) - _bytes(_distinct(base.variables, leave_out=variables))
    return dict(row=row, extra=extra)


def _saved_optimizer_bytes(width, optimizer, folder):
    """Bytes of the optimizer's arrays in a `.keras` file (the inner optimizer's included)."""
    import h5py

    model = F.mlp(width, optimizer, jit_compile=False)
    optimizer.build(model.trainable_variables)
    path = os.path.join(folder, "model.keras")
    model.save(path)
    total = 0

    def add(name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset) and name.startswith("optimizer/"):
            total += obj.size * obj.dtype.itemsize

    with zipfile.ZipFile(path) as z, z.open("model.weights.h5") as f, h5py.File(f) as h5:
        h5.visititems(add)
    return total


def _saved_state(width):
    """Optimizer bytes in a `.keras` file beyond plain Adam's (one small size only)."""
    with tempfile.TemporaryDirectory() as folder:
        plain = _saved_optimizer_bytes(width, _adam(), folder)
        return {
            row: _saved_optimizer_bytes(width, opt, folder) - plain
            for row, opt in (
                ("accum", _accum()),
                ("builtin", _adam(gradient_accumulation_steps=K)),
                ("accum_ema", _accum(use_ema=True)),
            )
        }


def _peak_temporaries(call):
    """Peak bytes allocated beyond those held, in one window's micro-steps.

    Read from TensorFlow's BFC allocator (the runner's default on the CPU;
    the system's malloc keeps no such count): the largest over the
    micro-steps that do not update, and the update's. The call must start a
    window.
    """
    if os.environ.get(C.TF_BFC, "").lower() not in ("1", "true"):
        return {}
    peaks = []
    for _ in range(K):
        tf.config.experimental.reset_memory_stats("CPU:0")
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        call()
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - held)
    return {"peak_non_update": max(peaks[:-1]), "peak_update": peaks[-1]}


# --------------------------------------------------------------- optimizer alone
def _interleaved_windows(steps, repeats, warmup=1):
    """Times `steps` (name -> (call, kind)) window by window, interleaved.

    kind: "accum" (the window's last micro-step updates), "update" (every
    micro-step updates: plain Adam) or "non_update" (none does: the floor).
    Returns name -> median stats.
    """
    for call, _ in steps.values():
        for _ in range(warmup * K):
            call()
    per_repeat = {name: [] for name in steps}
    for name in C.interleaved(steps, repeats):
        call, kind = steps[name]
        times = [C.timed(call) for _ in range(K)]
        if kind == "accum":
            per_repeat[name].append(C.window_stats(times))
        else:
            per_repeat[name].append(C.uniform_stats(times, kind))
    return {name: C.median_stats(r) for name, r in per_repeat.items()}


def _optimizer_alone(width, repeats):
    variables = _variables(width)
    grads = _gradients(variables)

    def eager_step(opt):
        opt.build(variables)
        return lambda: opt.apply(grads, variables)

    def graph_step(opt):
        opt.build(variables)
        # Variables are captured, not passed: tf.function would make them tensors.
        fn = tf.function(lambda g: opt.apply(g, variables))
        return lambda: fn(grads)

    def floor_step(jit_compile, concrete=False):
        floor = _Floor(variables, jit_compile, concrete)
        return lambda: floor(grads)

    # Both eager settings in one interleaved group: the built-in and plain
    # Adam (eager, no jit switch) are measured once and serve both. The
    # built-in inside a tf.function runs here too, as the eager target's
    # reference: this machine's speed drifts by tens of percent over minutes,
    # so a ratio between two groups measured apart carries that drift.
    accum_jit, accum_graph = _accum(jit_compile=True), _accum(jit_compile=False)
    steps = {
        "accum_jit": (eager_step(accum_jit), "accum"),
        "accum_graph": (eager_step(accum_graph), "accum"),
        "builtin": (eager_step(_adam(gradient_accumulation_steps=K)), "accum"),
        "plain": (eager_step(_adam()), "update"),
        "floor_jit": (floor_step(True, concrete=True), "non_update"),
        "floor_graph": (floor_step(False, concrete=True), "non_update"),
        "builtin_tf": (graph_step(_adam(gradient_accumulation_steps=K)), "accum"),
    }
    stats = _interleaved_windows(steps, repeats)
    assert int(accum_jit.window_steps.numpy()) == int(accum_graph.window_steps.numpy()) == 0
    rows, memory = [], []
    for jit, suffix in ((True, "_jit"), (False, "_graph")):
        context = f"eager loop, jit_compile={jit}"
        for name in ("accum", "builtin", "plain", "floor", "builtin_tf"):
            row_stats = stats.get(name + suffix, stats.get(name))
            rows.append(dict(context=context, row=name, **row_stats))
    del steps, accum_jit, accum_graph
    gc.collect()

    accum, builtin, plain = _accum(), _adam(gradient_accumulation_steps=K), _adam()
    steps = {
        "accum": (graph_step(accum), "accum"),
        "builtin": (graph_step(builtin), "accum"),
        "plain": (graph_step(plain), "update"),
        "floor": (floor_step(False), "non_update"),
    }
    stats = _interleaved_windows(steps, repeats)
    assert int(accum.window_steps.numpy()) == 0
    rows += [dict(context="tf.function", row=name, **s) for name, s in stats.items()]

    # Memory: the variables' sizes (what a `.keras` file holds is measured
    # apart, by `_saved_state`), and the temporaries of one window.
    memory += [
        dict(_memory("accum", accum, accum.inner_optimizer, variables),
             **_peak_temporaries(steps["accum"][0])),
        dict(_memory("builtin", builtin, plain, variables),
             **_peak_temporaries(steps["builtin"][0])),
    ]  # fmt: skip
    del steps, accum, builtin, plain
    gc.collect()
    ema = _accum(use_ema=True)
    ema.build(variables)
    memory.append(_memory("accum_ema", ema, ema.inner_optimizer, variables))
    trainable = _bytes(variables)
    for m in memory:
        m["trainable"] = trainable
    return rows, memory


# ------------------------------------------------------------------------- fit
def _fit(width, jit_compile, repeats):
    """`model.fit`, each batch timed by a callback (`_keras_fit`'s protocol)."""
    x, y = F.fit_data(width)
    return F.fit_rows(width, x, y, jit_compile=jit_compile, repeats=repeats)


def main(argv=None):
    parser = C.section_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--saved-state", action="store_true", help="also measure a .keras file (first size)"
    )
    args = parser.parse_args(argv)
    F.require_backend(parser, "tensorflow", "Keras")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    widths = C.QUICK_WIDTHS if args.quick else C.FULL_WIDTHS
    sizes = args.sizes.split(",") if args.sizes else list(widths)
    rows, memory = [], []
    saved = _saved_state(widths[sizes[0]]) if args.saved_state else {}
    for size in sizes:
        width = widths[size]
        repeats = C.QUICK_REPEATS if args.quick else C.FULL_REPEATS[size]
        start = time.perf_counter()
        alone, mem = _optimizer_alone(width, repeats)
        fit_rows = _fit(width, False, repeats) + _fit(width, True, repeats)
        for r in alone + fit_rows + mem:
            r.update(size=size, params=C.n_params(width))
        for m in mem:
            m["saved_extra"] = saved.get(m["row"]) if size == sizes[0] else None
        rows += alone + fit_rows
        memory += mem
        gc.collect()
        print(f"keras {size}: {time.perf_counter() - start:.1f} s", flush=True)
    threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    C.write_json(
        args.json,
        {
            "rows": rows,
            "memory": memory,
            "merge_grad": K,
            "threads": threads,
            "xla_forced": tf_plumbing.FORCE_XLA,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
