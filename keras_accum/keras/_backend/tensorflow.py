"""TensorFlow plumbing: tf.function and XLA dispatch, tf.distribute, `tf.IndexedSlices`.

Knows how TensorFlow runs the contract's steps, never what they compute:

- Eager micro-steps (custom loops): the host knows the window position, so a
  micro-step inside a window runs one compiled function that only
  accumulates (XLA where `jit_compile` resolves to it; traced once per
  gradient structure); the window's first runs one plain `tf.function` that
  writes `w * g` (the reset left the accumulators sharing one buffer of
  zeros, which an add would first copy); the closing one runs one plain
  `tf.function` (the inner optimizer's kernels, as in `fit`). With
  `merge_grad=1` every micro-step runs eagerly, as the inner optimizer does
  alone (bit-identical).
- Traced micro-steps (`fit`, a user's `tf.function`): a one-sided branch is a
  `tf.cond`, except under XLA, where it is a loop of 0 or 1 iterations (an
  XLA conditional would copy every variable the branch may write, on every
  micro-step that does not update).
- tf.distribute (`_distribute.py`): replica-local accumulators, decisions in
  cross-replica context, one all-reduce per update.
- `jit_compile`, as the tf.keras optimizers had it: XLA only where a GPU or
  TPU is present (on a CPU XLA's kernels are slower than TensorFlow's own).
  `FORCE_XLA` (tests) compiles on the CPU too.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_accum import _core
from keras_accum.keras import _backend as base
from keras_accum.keras import _distribute, _state

#: Compile the eager micro-step with XLA on a CPU-only machine too (the
#: test suite sets `KERAS_ACCUM_FORCE_XLA=1`, so that XLA runs in CI).
FORCE_XLA = os.environ.get("KERAS_ACCUM_FORCE_XLA") == "1"


def _xla_device_present() -> bool:
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def in_xla_context() -> bool:
    # Assert and CheckNumerics are dropped, silently, by XLA: `on_nonfinite=
    # "raise"` needs to know whether it would be.
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


class _StateGuard(tf.train.experimental.PythonState):
    """Carries the state signature through `tf.train.Checkpoint`.

    `deserialize` runs when a checkpoint is restored into this optimizer, and
    raises if the checkpoint was written by a differently configured one
    (docs/semantics.md, point 12: never a silent partial restore).
    """

    def __init__(self, signature: str, on_restore=None):
        self._signature = signature
        self._on_restore = on_restore

    def serialize(self):
        return self._signature

    def deserialize(self, string_value):
        saved = json.loads(string_value)
        current = json.loads(self._signature)
        # Checkpoints name each variable, so every readable format restores.
        if saved.get("format_version") in _state.READABLE_FORMAT_VERSIONS:
            current["format_version"] = saved["format_version"]
        _core.check_state_signature(saved, current)
        if self._on_restore is not None:
            self._on_restore()


class Plumbing(base.Plumbing):
    def __init__(self, optimizer):
        super().__init__(optimizer)
        self._accumulate_fn = None  # inside a window (XLA when jitted)
        self._start_fn = None  # a window's first micro-step
        self._update_fn = None  # the closing micro-step
        self._accumulate_jitted = False
        self._pending_checks = []  # traced weight checks the traced micro-step waits for
        self._concrete = {}  # (function, argument dtypes) -> its traced concrete function
        self._pending_weight_copies = []

    def attach(self):
        opt = self.optimizer
        opt._state_guard = _StateGuard(opt._signature, on_restore=opt._forget_window_position)

    def resolve_jit_compile(self, requested):
        return bool(requested) and (FORCE_XLA or _xla_device_present())

    # ---------------------------------------------------------------- building
    @contextlib.contextmanager
    def building(self, var_list):
        opt = self.optimizer
        strategy = self._bind_strategy()
        if _distribute.multi_replica() and any(
            getattr(v, "overwrite_with_gradient", False) for v in var_list
        ):
            # Their window maximum is per replica, and the update sums replicas.
            raise RuntimeError(
                f"AccumOptimizer '{opt.name}': float8 training (variables with "
                "`overwrite_with_gradient=True`) under a strategy of several replicas "
                "is not supported yet. Train float8 models on one device."
            )
        # Variables made while a `tf.function` traces its first call must
        # be lifted out of the graph (keras-team/keras#23085); the strategy
        # is entered again because the outer graph may not have it in scope.
        with tf.init_scope(), _distribute.scope_of(strategy):
            yield
            # The merged gradients we hand on are sums over replicas already.
            inner = opt.inner_optimizer
            for sub in [inner, *getattr(inner, "optimizers", [])]:
                sub._all_reduce_sum_gradients = _distribute.already_reduced

    def _bind_strategy(self):
        """The strategy the variables are made under, checked against the caller's.

        Keras users create the optimizer inside `strategy.scope()`. One made
        outside any strategy and first built inside one is bound to it (none
        of its variables is distributed yet, except the step counters, which
        are only ever written in cross-replica context).
        """
        opt = self.optimizer
        current = tf.distribute.get_strategy()
        made_under = opt._distribution_strategy
        if current is made_under or not tf.distribute.has_strategy():
            return made_under
        if not _distribute.is_default(made_under):
            raise RuntimeError(
                f"AccumOptimizer '{opt.name}' was created under another "
                "`tf.distribute` strategy than the one it is built in. Create the "
                "optimizer (and compile the model) inside the `strategy.scope()` "
                "it trains under."
            )
        opt._distribution_strategy = current
        opt.inner_optimizer._distribution_strategy = current
        return current

    def build_inner(self, var_list):
        """Builds the inner optimizer (inside `build`, under `tf.init_scope`).

        `model.fit` on a model not built before builds the model while
        tracing its first train step: TensorFlow gives the weights made there
        their values only after that trace (it then traces again and never
        runs the first graph). ScheduleFreeAdamW's build copies each weight
        into its momentum, which cannot be done yet; the copies wait for
        `before_step`, at the start of the next trace.
        """
        inner = self.optimizer.inner_optimizer
        if not (
            isinstance(inner, keras.optimizers.ScheduleFreeAdamW) and _any_uninitialized(var_list)
        ):
            inner.build(var_list)
            return
        inner.assign = lambda variable, value: None  # its build's only `assign`s: the copies
        try:
            inner.build(var_list)
        finally:
            del inner.assign
        self._pending_weight_copies = [
            (m, v) for m, v in zip(inner._momentums, var_list) if m is not None
        ]

    def before_step(self):
        """Makes the copies `build_inner` had to leave, once the weights have values."""
        pending = self._pending_weight_copies
        if not pending:
            return
        if _any_uninitialized([v for _, v in pending]):
            # Still no values: TensorFlow could not lift the initialisers out
            # of the function. Fail where the step would run, never silently.
            tf.debugging.Assert(
                False,
                [
                    f"AccumOptimizer '{self.optimizer.name}': the inner ScheduleFreeAdamW "
                    "could not copy the model's weights into its momentum. Build the model "
                    "before `fit` (call it on a batch, or `model.build(input_shape)`)."
                ],
            )
            return
        with tf.init_scope():
            for momentum, variable in pending:
                momentum.assign(variable)
        self._pending_weight_copies = []

    def accumulator(self, variable, dtype, name):
        return _distribute.replica_local_variable(self.optimizer, variable.shape, dtype, name)

    def shadow(self, variable, dtype, name):
        return self.counter(variable.shape, dtype, name)

    # ------------------------------------------------------------------ inputs
    def gradients(self, grads):
        return [_as_dense_or_slices(g) for g in grads]

    def gradient_shape(self, gradient):
        if isinstance(gradient, tf.IndexedSlices):
            return None  # rows of the variable; checked as they scatter
        shape = tf.TensorShape(gradient.shape)
        if shape.rank is None:
            return None
        return tuple(shape.as_list())

    def weight(self, weight, dtype):
        if not isinstance(weight, (tf.Tensor, tf.Variable, keras.Variable)) and not hasattr(
            weight, "__array__"
        ):
            raise _core.bad_weight_tensor(weight)
        kind = tf.as_dtype(keras.backend.standardize_dtype(weight.dtype))
        if not (kind.is_floating or kind.is_integer) or len(weight.shape) != 0:
            raise _core.bad_weight_tensor(weight)
        weight = tf.cast(weight, dtype)
        if tf.executing_eagerly():
            _core.validate_weight(float(weight.numpy()))
        elif not in_xla_context():
            self._pending_checks = [
                tf.debugging.assert_non_negative(
                    weight,
                    message="`weight` must be a finite number >= 0 (a sample or token count)",
                ),
                tf.debugging.assert_all_finite(weight, "`weight` must be finite"),
            ]
        return weight

    def scale(self, gradient, factor):
        if isinstance(gradient, tf.IndexedSlices):
            values = gradient.values * tf.cast(factor, gradient.values.dtype)
            return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
        return gradient * tf.cast(factor, gradient.dtype)

    def cast(self, gradient, dtype):
        if isinstance(gradient, tf.IndexedSlices):
            return tf.IndexedSlices(
                tf.cast(gradient.values, dtype), gradient.indices, gradient.dense_shape
            )
        return tf.cast(gradient, dtype)

    def values(self, gradient):
        return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient

    # ------------------------------------------------------------------ steps
    def traced(self):
        return not tf.executing_eagerly()

    def check_traced_call(self):
        if _distribute.multi_replica() and in_xla_context():
            raise RuntimeError(
                f"AccumOptimizer '{self.optimizer.name}': XLA cannot compile a step that "
                "spans the several devices of a `tf.distribute` strategy (TensorFlow "
                "refuses it for plain Keras optimizers too). Compile the model with "
                "`jit_compile=False` under the strategy."
            )

    def check_traced_raise(self):
        if in_xla_context():
            raise RuntimeError(
                "`on_nonfinite='raise'` cannot raise inside an XLA-compiled "
                "function (XLA drops the check). Compile the model with "
                "`jit_compile=False`, or use `on_nonfinite='skip'`. "
                "Received: on_nonfinite='raise'"
            )

    def check_stateless(self, optimizer):
        raise ValueError(
            "`stateless_apply` is not supported with the TensorFlow backend (as for Keras's "
            "own optimizers: it is incompatible with tf.distribute); call `apply_gradients`."
        )

    def traced_step(self, run):
        checks, self._pending_checks = self._pending_checks, []
        with tf.control_dependencies(checks):  # nothing moves before them
            run()

    def eager_step(self, run, closes, starts, grads, weight):
        self._pending_checks = []
        opt = self.optimizer
        if closes and opt.merge_grad == 1:
            # Every micro-step updates: run eagerly, as the inner optimizer
            # runs alone in an eager loop, so the two are bit-identical.
            return run(grads, weight, closes=True)
        if closes:
            if self._update_fn is None:
                self._update_fn = _step_function(run, closes=True)
            return self._call(self._update_fn, grads, weight)
        if starts:
            if self._start_fn is None:
                self._start_fn = _step_function(run, closes=False, starts=True)
            return self._call(self._start_fn, grads, weight)
        return self._accumulate(run, grads, weight)

    def _accumulate(self, run, grads, weight):
        """A micro-step inside a window: one compiled function of adds, no conditional."""
        opt = self.optimizer
        if self._accumulate_fn is None:
            self._accumulate_jitted = opt.jit_compile
            self._accumulate_fn = _step_function(run, opt.jit_compile, closes=False)
        try:
            return self._call(self._accumulate_fn, grads, weight)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            # XLA refuses some ops (custom kernels in an overridden
            # `update_step`); it refuses before running anything, so no state
            # has moved.
            message = str(e)
            if not self._accumulate_jitted or not any(
                word in message for word in ("XLA", "xla", "compil")
            ):
                raise
            warnings.warn(
                f"AccumOptimizer '{opt.name}': XLA could not compile the step, "
                f"so it runs as a plain tf.function from now on ({type(e).__name__}: "
                f"{message.splitlines()[0][:200]}).",
                stacklevel=5,
            )
            self._accumulate_jitted = False
            self._accumulate_fn = _step_function(run, closes=False)
            return self._accumulate_fn(grads, weight)

    def _call(self, fn, grads, weight):
        """`fn(grads, weight)`, through its concrete function once traced.

        `tf.function` finds its trace from the arguments' types on every call
        (about 0.2 ms for a few variables). Eager dense gradients have their
        variables' shapes, so their dtypes (and the weight's) pick the trace.
        Sparse gradients go through the function, whose trace relaxes the
        number of rows after its second shape (`reduce_retracing`).
        """
        if tf.config.functions_run_eagerly() or not all(
            g is None or isinstance(g, tf.Tensor) for g in grads
        ):
            return fn(grads, weight)
        key = (
            fn,
            tuple(None if g is None else g.dtype for g in grads),
            None if weight is None else weight.dtype,
        )
        concrete = self._concrete.get(key)
        if concrete is not None:
            return concrete(grads, weight)
        finite = fn(grads, weight)  # the first call traces (and may make variables)
        self._concrete[key] = fn.get_concrete_function(grads, weight)
        return finite

    def strategy_scope(self):
        return _distribute.scope_of(self.optimizer._distribution_strategy)

    # ----------------------------------------------------------- control flow
    def run_if(self, pred, fn, otherwise=None):
        """A `tf.cond`, except under XLA, where each branch is a loop of 0 or 1 iterations.

        An XLA conditional returns every variable either branch may write, so
        the branch that does not write one copies it, at every call: on the
        micro-steps that do not update, a write-back of every weight, inner
        slot and accumulator. A while loop's state is updated in place, and a
        loop that runs zero times touches nothing.

        Returns None, or under XLA the loops' trip count: a scalar that exists
        only after `fn` (or `otherwise`) ran, for `zeros_after`.
        """
        if tf.executing_eagerly() and not isinstance(pred, tf.Tensor):
            return super().run_if(pred, fn, otherwise)
        if not in_xla_context():
            tf.cond(
                pred,
                lambda: _no_output(fn()),
                lambda: _no_output(otherwise()) if otherwise is not None else None,
            )
            return None
        pred = tf.convert_to_tensor(pred)
        trips = _xla_loop_if(pred, fn)
        if otherwise is not None:
            trips = trips + _xla_loop_if(tf.logical_not(pred), otherwise)
        return trips

    def close_window(self, closes, phases):
        """The update in one conditional on the window counter (when traced).

        Nested inside it, the phases run in the default order: under a
        strategy the accumulators are all-reduced once, at the update; under
        XLA the branches are loops and the reset's zeros follow their trip
        counts (`zeros_after`).
        """
        if isinstance(closes, bool) or (tf.executing_eagerly() and not tf.is_tensor(closes)):
            return super().close_window(closes, phases)
        self.run_if(closes, lambda: super(Plumbing, self).close_window(True, phases))

    def loop_variant(self, scalar):
        """`scalar`, unchanged, made to depend on the innermost `run_if` loop's counter.

        XLA moves what a loop body computes from values the loop does not
        change (the accumulators, the window weight) out of the loop, as
        full-size temporaries: the merged gradient, then the inner step's
        `g * g`. A conditional's branch fused them into the inner step's
        passes. Made from the counter (`+ 0.0 * i`, which XLA does not fold
        for floats), the merge stays in the loop and fuses there. Outside
        such a loop: `scalar` itself.
        """
        trips = _xla_loop_trips()
        if not trips:
            return scalar
        return scalar + tf.cast(trips[-1], scalar.dtype) * 0

    def loop_variant_identity(self, tensor):
        if not _xla_loop_trips():
            return tensor
        return tensor * self.loop_variant(tf.ones([], tensor.dtype))  # exact

    def writes_at_window_start(self):
        # XLA never shares the reset's zeros; a plain graph does.
        return not in_xla_context()

    def zeros_after(self, variable, done, index):
        """Zeros to assign to `variable` (the `index`-th), computed from `done` when given.

        Under XLA, a variable written inside a loop is updated in place. The
        update reads the accumulators inside such loops; zeros written into
        them with no data dependency on those reads may come first as far as
        XLA knows, so it copies every accumulator before the reset. Zeros
        made from the loops' trip count (`0.0 * (trips + index)`, which XLA
        does not fold for floats) come after them, and the copies go. `index`
        keeps the fills of same-shape accumulators apart: XLA would merge
        equal ones into one buffer and copy it into each.
        """
        if done is None:
            return tf.zeros(variable.shape, variable.dtype)
        return tf.fill(tf.shape(variable.value), tf.cast(done + index, variable.dtype) * 0)

    def assert_finite(self, finite, micro_step):
        tf.debugging.Assert(
            finite, ["on_nonfinite='raise': non-finite gradient at micro-step", micro_step]
        )

    # ----------------------------------------------------------------- kernels
    def add_into(self, accumulator, gradient):
        # The tf.Variable's own in-place add (a scatter of the rows present
        # for `tf.IndexedSlices`: duplicates add up, no dense pass);
        # `keras.Variable.assign_add` is `assign(self + value)`, a new
        # full-size tensor every time.
        local = _distribute.local_component(accumulator)
        if isinstance(gradient, tf.IndexedSlices):
            local.scatter_add(gradient)
        else:
            local.assign_add(gradient)

    def added(self, accumulator, gradient):
        value = tf.convert_to_tensor(_distribute.local_component(accumulator))
        if isinstance(gradient, tf.IndexedSlices):
            # The rows present, added as `scatter_add` adds them.
            indices = tf.expand_dims(gradient.indices, -1)
            return tf.tensor_scatter_nd_add(value, indices, gradient.values)
        return value + gradient

    def write_into(self, accumulator, gradient):
        if isinstance(gradient, tf.IndexedSlices):
            self.add_into(accumulator, gradient)  # onto zeros: the rows present
            return
        # A snapshot takes the gradient's buffer if nothing else holds it,
        # else copies it: either way the accumulator's own, so that the next
        # add is in place.
        _distribute.local_component(accumulator).assign(tf.raw_ops.Snapshot(input=gradient))

    def sum_of_squares(self, tensor):
        # `2 * l2_loss` reads the tensor once; `reduce_sum(square)` writes
        # the squares out and reads them back.
        return 2.0 * tf.nn.l2_loss(tensor)

    def stored_value(self, variable, dtype):
        """`variable`'s value as stored, cast to `dtype`.

        XLA may forward the unrounded float32 result of an update to a later
        read of a bfloat16/float16 variable (`xla_allow_excess_precision`). A
        bitcast round trip through an unsigned int of the same width pins the
        stored bits.
        """
        value = tf.convert_to_tensor(variable)
        if value.dtype == dtype or not value.dtype.is_floating:
            return tf.cast(value, dtype)
        bits = {2: tf.uint16, 4: tf.uint32, 8: tf.uint64}[value.dtype.size]
        return tf.cast(tf.bitcast(tf.bitcast(value, bits), value.dtype), dtype)

    def snapshot(self, variable):
        return tf.identity(variable.value)

    # ------------------------------------------------------------ distribution
    def in_replica_context_of_strategy(self):
        return _distribute.in_strategy_replica_context()

    def check_replica_context(self):
        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise RuntimeError(
                f"AccumOptimizer '{self.optimizer.name}': `apply_gradients` must be called "
                "in replica context under a `tf.distribute` strategy, i.e. inside "
                "`strategy.run(step_fn)` (`model.fit` does this)."
            )

    def share_of_replica(self, grads, skip_gradients_aggregation):
        if not (skip_gradients_aggregation and _distribute.multi_replica()):
            return grads
        # Already summed over replicas: the update's sum must not count them
        # n times (exact for a power-of-two number of replicas).
        inv = 1.0 / _distribute.num_replicas()
        return [g if g is None else self.scale(g, inv) for g in grads]

    def in_cross_replica_context(self, fn, *args):
        return _distribute.call_in_cross_replica_context(fn, *args)

    def sum_over_replicas(self, accumulators):
        return _distribute.sum_over_replicas(accumulators)

    def in_each_replica(self, fn, grads):
        _distribute.run_in_each_replica(fn, grads)


def _step_function(run, jit_compile=False, **kwargs):
    """`run(grads, weight, **kwargs)` as a `tf.function` of (grads, weight)."""

    def step(grads, weight):
        return run(grads, weight, **kwargs)

    return tf.function(step, jit_compile=jit_compile, reduce_retracing=True)


def _as_dense_or_slices(gradient):
    """A gradient as a tensor or as `tf.IndexedSlices` of tensors (or None).

    Keras accepts slices whose indices are a Python tuple; a `tf.function`
    signature does not, so they are made tensors here, once.
    """
    if gradient is None:
        return None
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient if isinstance(gradient, tf.Tensor) else tf.convert_to_tensor(gradient)
    return tf.IndexedSlices(
        tf.convert_to_tensor(gradient.values),
        tf.convert_to_tensor(gradient.indices),
        None if gradient.dense_shape is None else tf.convert_to_tensor(gradient.dense_shape),
    )


def _any_uninitialized(variables) -> bool:
    """Whether a variable has no value yet outside the function being traced."""
    with tf.init_scope():
        for variable in variables:
            # A Keras variable keeps its `tf.Variable` in `value` (outside autocast).
            value = getattr(variable, "value", variable)
            is_initialized = getattr(value, "is_initialized", None)
            if isinstance(value, tf.Variable) and is_initialized is not None:
                if not bool(is_initialized()):
                    return True
    return False


def _no_output(_):
    # `tf.cond` branches must return the same structure: ours return nothing.
    return None


_XLA_LOOPS = threading.local()  # `.trips`: the loop counters of the bodies being traced


def _xla_loop_trips() -> list:
    if not hasattr(_XLA_LOOPS, "trips"):
        _XLA_LOOPS.trips = []
    return _XLA_LOOPS.trips


def _xla_loop_if(pred, fn):
    def body(i):
        trips = _xla_loop_trips()
        trips.append(i)
        try:
            fn()
        finally:
            trips.pop()
        return i + 1

    return tf.while_loop(
        lambda i: i < tf.cast(pred, tf.int32), body, [tf.constant(0)], maximum_iterations=1
    )[0]
