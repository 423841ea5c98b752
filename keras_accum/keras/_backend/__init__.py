"""Each Keras backend's plumbing for `AccumOptimizer`, behind one small interface.

The contract (docs/semantics.md) is written once, in `keras.ops`, in the
modules beside this package (`_window`, `_close`, `_ema`, ...). What differs
between TensorFlow, JAX and torch is how its steps are run, never what they
compute: how a one-sided branch that writes state is expressed under tracing,
how an eager micro-step is compiled, where a distributed accumulator lives,
which kernel reads a tensor once for its norm. `Plumbing` names those
questions; `tensorflow.py`, `jax.py` and `torch.py` answer them, and none of
them knows a rule of the contract (as Keras keeps `BaseOptimizer` apart from
`TFOptimizer`, `JaxOptimizer` and `TorchOptimizer`).

`plumbing_for(optimizer)` imports only the running backend's module, so a
JAX or torch user never imports TensorFlow through keras_accum.
"""

from __future__ import annotations

import contextlib
import importlib

import keras
from keras import ops


class Plumbing:
    """The defaults, right for a backend that runs eagerly with no distribution.

    Args:
        optimizer: the `AccumOptimizer` this plumbing serves.
    """

    #: The dtype of the step counters (`micro_steps`, `window_steps`, ...).
    count_dtype = "int64"

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def attach(self) -> None:
        """Called at the end of the optimizer's construction."""

    # ---------------------------------------------------------------- building
    def resolve_jit_compile(self, requested: bool) -> bool:
        """Whether an eager micro-step is compiled, given the user's `jit_compile`."""
        return False

    def building(self, var_list) -> contextlib.AbstractContextManager:
        """The context the optimizer's variables are made in."""
        return contextlib.nullcontext()

    def build_inner(self, var_list) -> None:
        """Builds the inner optimizer on `var_list`."""
        self.optimizer.inner_optimizer.build(var_list)

    def before_step(self) -> None:
        """Called at the start of every micro-step, before anything is read."""

    def accumulator(self, variable, dtype: str, name: str):
        """A zero-initialised per-variable buffer with `variable`'s layout."""
        return self.optimizer.add_variable(
            shape=variable.shape,
            dtype=dtype,
            layout=getattr(variable, "_layout", None),
            name=name,
        )

    def counter(self, shape, dtype: str, name: str):
        """A variable written once per micro-step for all replicas."""
        return self.optimizer.add_variable(
            shape=shape, dtype=dtype, aggregation="only_first_replica", name=name
        )

    def shadow(self, variable, dtype: str, name: str):
        """A per-variable copy (EMA, raw-weight backup) with `variable`'s layout."""
        return self.optimizer.add_variable(
            shape=variable.shape,
            dtype=dtype,
            aggregation="only_first_replica",
            layout=getattr(variable, "_layout", None),
            name=name,
        )

    # ------------------------------------------------------------------ inputs
    def gradients(self, grads) -> list:
        """The aligned gradients as backend tensors (None kept)."""
        return [None if g is None else ops.convert_to_tensor(g) for g in grads]

    def gradient_shape(self, gradient):
        """`gradient`'s shape as a tuple (None for a dimension unknown while tracing),
        or None for a gradient whose shape is not its variable's (sparse rows)."""
        return tuple(gradient.shape)

    def weight(self, weight, dtype: str):
        """A checked tensor `weight` as a scalar of `dtype` (numbers are checked before)."""
        from keras_accum import _core

        if not hasattr(weight, "shape") or not hasattr(weight, "dtype"):
            raise _core.bad_weight_tensor(weight)
        value = weight.value if isinstance(weight, keras.Variable) else weight
        if len(value.shape) != 0 or not _is_real_dtype(value.dtype):
            raise _core.bad_weight_tensor(weight)
        value = ops.cast(value, dtype)
        if not self.traced():
            _core.validate_weight(float(host_value(value)))
        return value

    def scale(self, gradient, factor):
        """`gradient * factor`, with `factor` cast to the gradient's dtype."""
        return gradient * ops.cast(factor, gradient.dtype)

    def cast(self, gradient, dtype):
        return ops.cast(gradient, dtype)

    def values(self, gradient):
        """The numbers a gradient holds (its values, for a sparse one)."""
        return gradient

    # ------------------------------------------------------------------ steps
    def traced(self) -> bool:
        """Whether the running micro-step is being traced (one graph for every step)."""
        return False

    def check_traced_call(self) -> None:
        """Refuses, at trace time, what the caller's compilation cannot do."""

    def check_traced_raise(self) -> None:
        """Refuses `on_nonfinite="raise"` where a traced step cannot raise."""

    def check_stateless(self, optimizer) -> None:
        """Refuses `stateless_apply` where the backend's variables cannot take it."""

    def window_specs(self, split, axis_name) -> list:
        """`shard_map` partition specs: `split[i]` over `axis_name` by the leading axis."""
        raise _no_data_axis(axis_name)

    def data_axis(self, axis_name, values) -> contextlib.AbstractContextManager:
        """The step runs inside `shard_map` over `axis_name` (JAX): its accumulators
        hold this device's partial sums, reduced once, at the update. Refused where
        a step cannot run there (`values`: the step's state)."""
        if axis_name is None:
            return contextlib.nullcontext()
        raise _no_data_axis(axis_name)

    def traced_step(self, run) -> None:
        """Runs `run()`, the traced micro-step (with any pending input checks first)."""
        run()

    def eager_step(self, run, closes: bool, starts: bool, grads, weight):
        """Runs one eager micro-step whose position the host knows.

        `run(grads, weight, closes=..., starts=...)` is the micro-step;
        returns what it returns (whether the gradients were finite).
        """
        return run(grads, weight, closes=closes, starts=starts)

    def eager_close(self, run) -> None:
        """Runs `run()`, a window's update started by the host (`flush`)."""
        run()

    # ----------------------------------------------------------- control flow
    def run_if(self, pred, fn, otherwise=None):
        """Runs `fn()` where the scalar `pred` holds, else `otherwise()` (if given).

        Both may write state (assign to variables); their outputs are
        dropped. Returns None, or a scalar that exists only after the
        branch ran (see `zeros_after`).
        """
        if _as_bool(pred):
            fn()
        elif otherwise is not None:
            otherwise()
        return None

    def close_window(self, closes, phases) -> None:
        """Runs a window's update (`_close._Phases`) where `closes` holds.

        The default, for a `closes` the host knows (a Python bool) or a
        backend that branches in Python: sum, decide, record, apply if the
        window passes, reset.
        """
        if not _as_bool(closes):
            return
        sums = phases.sums()
        norm, finite = phases.decide(sums)
        phases.record(True, norm, finite)
        after = self.run_if(phases.ok(finite), lambda: phases.apply(sums, norm))
        phases.reset(after)

    def written(self, variables):
        """What the reset after an update must follow (see `zeros_after`); None: program order."""
        return None

    def loop_variant(self, scalar):
        """`scalar`, possibly made to depend on the innermost `run_if` (see tensorflow.py)."""
        return scalar

    def loop_variant_identity(self, tensor):
        """`tensor`, possibly made to depend on the innermost `run_if` (see tensorflow.py)."""
        return tensor

    def writes_at_window_start(self) -> bool:
        """Whether a traced micro-step should write, not add, at a window's start."""
        return False

    def clear(self, accumulator, done, index) -> None:
        """Writes zeros into `accumulator` (never `acc * 0`), ordered after `done`."""
        accumulator.assign(self.zeros_after(accumulator, done, index))

    def zeros_after(self, variable, done, index):
        """Zeros to reset `variable` with, ordered after `done` where the backend needs it."""
        return ops.zeros(variable.shape, variable.dtype)

    def assert_finite(self, finite, micro_step) -> None:
        """A traced check that fails the step when `finite` is False ("raise")."""

    # ----------------------------------------------------------------- kernels
    def add_into(self, accumulator, gradient) -> None:
        """`accumulator += gradient`, in place where the backend can."""
        accumulator.assign(accumulator.value + gradient)

    def added(self, accumulator, gradient):
        """`accumulator + gradient` as a new tensor; the accumulator is not written."""
        return accumulator.value + gradient

    def write_into(self, accumulator, gradient) -> None:
        """`accumulator = gradient`, for an accumulator that holds zeros."""
        accumulator.assign(gradient)

    def keep_maximum(self, accumulator, gradient, first) -> None:
        """float8 scaling state: the window's maximum (`first`: the window's first step)."""
        accumulator.assign(self.maximum_of(accumulator, gradient, first))

    def maximum_of(self, accumulator, gradient, first):
        """The window's maximum with `gradient` in it, as a new tensor (see `added`)."""
        return ops.where(first, gradient, ops.maximum(accumulator.value, gradient))

    def sum_of_squares(self, tensor):
        """`sum(tensor ** 2)`, reading `tensor` once where the backend can."""
        return ops.sum(ops.square(tensor))

    def stored_value(self, variable, dtype):
        """`variable`'s value as stored, cast to `dtype`."""
        return ops.cast(variable.value, dtype)

    def snapshot(self, variable):
        """A copy of `variable`'s current value that later writes do not change."""
        return ops.copy(variable.value)

    def held_elsewhere(self, variables) -> bool:
        """Whether a trainer holds these variables' values outside them (JAX's `fit`)."""
        return False

    # ------------------------------------------------------------ distribution
    def in_replica_context_of_strategy(self) -> bool:
        """Inside a distribution strategy's per-replica call (TensorFlow)."""
        return False

    def check_replica_context(self) -> None:
        """Refuses a micro-step taken where the strategy cannot take one."""

    def share_of_replica(self, grads, skip_gradients_aggregation: bool) -> list:
        """Each replica's share of already-summed gradients (tf.distribute)."""
        return grads

    def in_cross_replica_context(self, fn, *args):
        """Runs `fn(*args)` once for all replicas."""
        return fn(*args)

    def sum_over_replicas(self, accumulators) -> list:
        """The accumulators summed over replicas, as tensors."""
        return [a.value for a in accumulators]

    def in_each_replica(self, fn, grads) -> None:
        """Runs `fn(grads)` on every replica (from cross-replica context)."""
        fn(grads)

    def strategy_scope(self) -> contextlib.AbstractContextManager:
        """The scope a host-started update (`flush`) runs in."""
        return contextlib.nullcontext()


def _is_real_dtype(dtype) -> bool:
    name = keras.backend.standardize_dtype(dtype)
    return name.startswith(("float", "int", "uint", "bfloat"))


def host_value(x):
    """A variable's or a tensor's value on the host, as NumPy (a copy for TensorFlow)."""
    if isinstance(x, keras.Variable):
        x = x.value
    numpy = getattr(x, "numpy", None)
    if callable(numpy) and type(x).__module__.startswith("tensorflow"):
        return numpy()  # NumPy's `__array__` on a tf.Variable warns
    return ops.convert_to_numpy(x)


def _as_bool(pred) -> bool:
    if isinstance(pred, bool):
        return pred
    return bool(host_value(pred))


_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def plumbing_for(optimizer) -> Plumbing:
    """The plumbing of the running Keras backend, for `optimizer`.

    Raises:
        RuntimeError: Keras runs a backend keras_accum does not support.
    """
    backend = keras.backend.backend()
    module = _MODULES.get(backend)
    if module is None:
        raise RuntimeError(
            "keras_accum.AccumOptimizer supports the TensorFlow, JAX and torch backends "
            f"of Keras; Keras is running the {backend!r} backend. Set KERAS_BACKEND to "
            f"one of them before Keras is imported. Received: backend={backend!r}"
        )
    return importlib.import_module(f"{__name__}.{module}").Plumbing(optimizer)


def _no_data_axis(axis_name) -> ValueError:
    return ValueError(
        "`axis_name` (one reduction per update inside `jax.shard_map`) needs Keras's "
        f"JAX backend. Received: axis_name={axis_name!r} on the "
        f"{keras.backend.backend()} backend"
    )
