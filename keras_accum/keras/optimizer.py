"""`AccumOptimizer`: exact gradient accumulation, EMA and clipping for Keras 3.

The wrapper owns accumulation, clipping, the non-finite policy and the EMA of
weights; the inner optimizer runs with all of those off and is called exactly
once per update, so its state, step counter, weight decay and learning-rate
schedule advance once per update (docs/semantics.md, points 1 to 13).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import warnings
import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.saving import serialization_lib
from tensorflow.python.ops import control_flow_util

from keras_accum import _core
from keras_accum.keras import _distribute
from keras_accum.keras._seed_api import _SeedAPIMixin

_SIGNATURE_KEY = "keras_accum_signature"

#: Layout of the state that `save_own_variables` writes: 2 lists own variables
#: and then the inner optimizer's, each once. Version 1 (the first layout)
#: listed the inner slots and the model's weights a second time among our own
#: variables; it is still read (`_state_layout`).
_FORMAT_VERSION = 2
_READABLE_FORMAT_VERSIONS = (1, 2)


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
        if saved.get("format_version") in _READABLE_FORMAT_VERSIONS:
            current["format_version"] = saved["format_version"]
        _core.check_state_signature(saved, current)
        if self._on_restore is not None:
            self._on_restore()


class _HostSide:
    """What the host keeps between eager micro-steps.

    A plain object: Keras tracks every attribute set on an optimizer (a list
    set there becomes a tracked wrapper, about 20 µs a time), and these are
    set on every micro-step.
    """

    __slots__ = ("window_steps", "pending_checks", "alignment", "shapes", "concrete")

    def __init__(self):
        self.window_steps = None  # `window_steps` as the host last knew it; None: read it
        self.pending_checks = []  # traced weight checks the traced micro-step waits for
        self.alignment = None  # the variables of the last call, and their indices
        self.shapes = []  # the built variables' shapes, as tuples
        self.concrete = {}  # (function, argument dtypes) -> its traced concrete function


def _in_xla_context() -> bool:
    # Assert and CheckNumerics are dropped, silently, by XLA: `on_nonfinite=
    # "raise"` needs to know whether it would be.
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@keras.saving.register_keras_serializable(package="keras_accum")
class AccumOptimizer(_SeedAPIMixin, keras.optimizers.Optimizer):
    """Wraps a Keras optimizer with exact gradient accumulation, EMA and clipping.

    Each call of `apply_gradients` (a micro-step) adds the gradients into
    accumulators (float32, float64 for float64 variables); every `merge_grad`-th call (an update) hands the
    merged gradient to the inner optimizer, once:

        acc_i     += w * g_i                       (each micro-step, weight w)
        merged_i   = acc_i / sum(w)                (reduction="mean")
                   = acc_i                         (reduction="sum")
        merged     = clip(merged)                  (clipvalue, then clipnorm or
                                                    global_clipnorm)
        inner.apply(merged)                        (once per update)
        ema_i      = m * ema_i + (1 - m) * var_i   (after each update only)

    Custom loops written for the tf.keras experimental optimizer keep working:
    `minimize`, `compute_gradients` and `aggregate_gradients` are here, each
    going through `apply_gradients`; `from_config` reads that era's configs;
    `from_keras_optimizer` converts an optimizer that uses Keras's own
    `gradient_accumulation_steps`/`use_ema`. Subclass it as any Keras
    optimizer: `update_step` is the per-variable work of a micro-step
    (docs/subclassing.md).

    With equal micro-batches and `w = 1`, training with `merge_grad=k` on
    batches of `b` equals training on batches of `k * b`, for every inner
    optimizer, learning-rate schedule included.

    Under `tf.distribute` (`MirroredStrategy`, `MultiWorkerMirroredStrategy`)
    each replica adds into its own accumulators with no communication; the
    update sums them across replicas once (one batched all-reduce) and takes
    every decision (clip, non-finite skip, EMA, counters) once, on that sum.
    Create the optimizer inside `strategy.scope()`; under a strategy, `weight`
    is the micro-step's global weight, the same on every replica.

    Sparse gradients (`tf.IndexedSlices`, from `Embedding` or `tf.gather`) are
    scatter-added into the dense accumulator: no extra memory, and a
    micro-step costs a scatter of the rows present (duplicates add up), not a
    dense pass. The merged gradient handed on is dense, as in a dense
    large-batch step.

    Args:
        optimizer: A `keras.optimizers.Optimizer`, or anything
            `keras.optimizers.get` accepts (`"adam"`, a config dict). It must
            not do accumulation, EMA, clipping or loss scaling itself.
        merge_grad: int >= 1, micro-steps per update. Defaults to 1 (then the
            wrapper is bit-identical to the inner optimizer).
        reduction: `"mean"` (default): the merged gradient is the weighted
            mean `sum(w * g) / sum(w)`; `"sum"`: `sum(w * g)`.
        accumulator_dtype: dtype name of the accumulators and of the EMA
            arithmetic; defaults to `"float32"`. A variable of a wider dtype
            (float64) accumulates, and keeps its EMA, in its own dtype.
        use_ema: bool, keep an exponential moving average of the trainable
            variables (in `accumulator_dtype`, or the variable's dtype where
            wider), moved after each update only.
        ema_momentum: float in [0, 1], the EMA momentum `m`. Defaults to 0.99.
        ema_overwrite_frequency: int >= 1 or None; right after every
            `ema_overwrite_frequency`-th update the variables are replaced by
            their EMA.
        ema_warmup: bool, use `m = min(ema_momentum, (1 + n) / (10 + n))`
            with `n` the number of updates before this one. Defaults to False.
        clipnorm: float > 0 or None, clip each merged gradient to this norm.
        clipvalue: float > 0 or None, clip merged gradient values to
            `[-clipvalue, clipvalue]` (before any norm clipping).
        global_clipnorm: float > 0 or None, clip the merged gradients to
            this global norm. Exclusive with `clipnorm`.
        on_nonfinite: `"skip"` (default): a window with an inf or NaN is
            discarded at its update and counted in `skipped_updates`;
            `"raise"`: raise at the micro-step that produced it;
            `"ignore"`: pass non-finite values on.
        jit_compile: bool, compile with XLA the function that an eagerly
            called micro-step which neither opens nor closes a window runs
            (custom loops); the window's first micro-step and the closing
            one run plain `tf.function`s (eagerly with `merge_grad=1`).
            Inside `model.fit` or a user's `tf.function`, the caller's
            compilation decides. Defaults to True.
        loss_scale_factor: float > 0 or None, a fixed loss scale: `model.fit`
            multiplies the loss by it (`scale_loss`) and each micro-step
            divides its gradients by it before accumulating. Defaults to None.
        name: str, the optimizer's name.

    Raises:
        TypeError: an argument of the wrong kind (`merge_grad="4"`, an
            `optimizer` that is not an optimizer).
        ValueError: a bad value, or an inner optimizer that already does
            accumulation, EMA, clipping or loss scaling.
        RuntimeError: Keras runs a backend other than TensorFlow.

    Example:

    ```python
    opt = keras_accum.AccumOptimizer(keras.optimizers.Adam(1e-3), merge_grad=4)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8)  # the updates of batch_size=32
    ```
    """

    def __init__(
        self,
        optimizer: Any,
        merge_grad: int = 1,
        reduction: str = "mean",
        accumulator_dtype: str = "float32",
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        ema_warmup: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
        jit_compile: bool = True,
        loss_scale_factor: float | None = None,
        name: str | None = None,
    ):
        _check_backend()
        config = _core.AccumConfig.create(
            merge_grad=merge_grad,
            reduction=reduction,
            accumulator_dtype=accumulator_dtype,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            ema_warmup=ema_warmup,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
        )
        jit_compile = _core.validate_bool("jit_compile", jit_compile)
        loss_scale_factor = _core.validate_positive_float("loss_scale_factor", loss_scale_factor)
        inner = _resolve_inner(optimizer)
        super().__init__(learning_rate=0.0, name=name, loss_scale_factor=loss_scale_factor)
        self._config = config
        self.inner_optimizer = inner
        self.jit_compile = jit_compile
        # The base class keeps these names for its own EMA/clipping, which
        # never runs here (we override `apply`); Keras callbacks read them.
        self.use_ema = config.use_ema
        self.ema_momentum = config.ema_momentum
        self.ema_overwrite_frequency = config.ema_overwrite_frequency
        self.clipnorm = config.clipnorm
        self.clipvalue = config.clipvalue
        self.global_clipnorm = config.global_clipnorm
        self._signature = _core.encode_signature(
            dict(config.state_signature(type(inner).__name__), format_version=_FORMAT_VERSION)
        )
        self._state_guard = _StateGuard(self._signature, on_restore=self._forget_window_position)
        # Eager micro-steps: what the host keeps between them, and the three
        # step functions, traced on first use.
        self._host = _HostSide()
        self._accumulate_fn = None
        self._start_fn = None
        self._window_starts = False  # while tracing a window's first micro-step
        self._accumulate_jitted = False
        self._update_fn = None
        self._loss_scaler_ref = None
        self._pending_loss_scale = None

    # ------------------------------------------------------------------ config
    @property
    def merge_grad(self) -> int:
        """Micro-steps per update."""
        return self._config.merge_grad

    @property
    def reduction(self) -> str:
        """`"mean"` (divide by the window's weight sum) or `"sum"`."""
        return self._config.reduction

    @property
    def accumulator_dtype(self) -> str:
        """Dtype name of the accumulators and of the EMA arithmetic."""
        return self._config.accumulator_dtype

    @property
    def ema_warmup(self) -> bool:
        """Whether the EMA momentum warms up as `min(m, (1 + n) / (10 + n))`."""
        return self._config.ema_warmup

    @property
    def on_nonfinite(self) -> str:
        """What a window with an inf or NaN does: `"skip"`, `"raise"` or `"ignore"`."""
        return self._config.on_nonfinite

    # --------------------------------------------------------- forwarded state
    @property
    def learning_rate(self):
        """The inner optimizer's learning rate (a schedule or a variable); settable."""
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        """Updates applied (the inner optimizer's step counter)."""
        return self.inner_optimizer.iterations

    @property
    def variables(self):
        """Own state, then the inner optimizer's: each variable once."""
        return self._own_variables() + self.inner_optimizer.variables

    def _own_variables(self):
        # Keras tracks every variable assigned to an attribute, so the model's
        # weights (`_trainable_variables`) and the inner slots we index
        # (`_inner_slots`) land in `_variables` too: they are not our state.
        foreign = {id(v) for v in self._trainable_variables}
        foreign.update(id(v) for v in self.inner_optimizer.variables)
        return [v for v in self._variables if id(v) not in foreign]

    @property
    def optimizers(self):
        """The sub-optimizers of an inner `MultiOptimizer`.

        Keras's `LearningRateScheduler` and `ReduceLROnPlateau` look for this
        attribute and then drive each sub-optimizer's learning rate, as they
        do on a plain `MultiOptimizer`. Absent (AttributeError) otherwise.
        """
        inner = self.inner_optimizer
        if not isinstance(inner, keras.optimizers.MultiOptimizer):
            raise AttributeError(
                "`optimizers` exists when the inner optimizer is a MultiOptimizer. "
                f"Received: optimizer={type(inner).__name__}"
            )
        return inner.optimizers

    def __dir__(self):
        # Keras's `.keras` saving walks `dir()` and saves, then loads, every
        # optimizer it finds there on its own, after our `load_own_variables`.
        # The inner state is part of ours, checked and loaded as one; loaded
        # again on its own, it would be overwritten even when ours refused.
        return [name for name in super().__dir__() if name not in ("inner_optimizer", "optimizers")]

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay.

        Forwarded to the inner optimizer, which does the decay (once per
        update); call it before the first step, as on a plain optimizer.

        Args:
            var_list: list of variables to exclude.
            var_names: list of strings; a variable whose name contains one
                of them is excluded.
        """
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def get_weights(self):
        """The values of `variables` (own state, then the inner optimizer's), as NumPy arrays."""
        self._check_built("get_weights")
        return [np.array(v.numpy()) for v in self.variables]

    def set_weights(self, weights):
        """Sets own and inner state from a `get_weights()` list; all or nothing.

        Raises:
            ValueError: `weights` has another length, or an array of another
                shape or dtype than its variable. Nothing is assigned then.
        """
        self._check_built("set_weights")
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(
                f"`weights` must hold {len(variables)} arrays, one per entry of "
                f"`optimizer.variables` (own state, then the inner optimizer's). "
                f"Received: {len(weights)} arrays"
            )
        values = [np.asarray(w) for w in weights]
        for i, (v, value) in enumerate(zip(variables, values)):
            if tuple(v.shape) != tuple(value.shape) or not _loadable(value.dtype, v.dtype):
                raise ValueError(
                    f"`weights[{i}]` must have shape {tuple(v.shape)} and dtype "
                    f"{keras.backend.standardize_dtype(v.dtype)} (variable '{v.path}'); "
                    "nothing was set. Received: an array of shape "
                    f"{tuple(value.shape)} and dtype {keras.backend.standardize_dtype(value.dtype)}"
                )
        for v, value in zip(variables, values):
            v.assign(value)
        self._forget_window_position()

    @property
    def micro_steps(self):
        """Micro-steps taken (calls of `apply_gradients`)."""
        self._check_built("micro_steps")
        return self._micro_steps

    @property
    def skipped_updates(self):
        """Windows discarded by `on_nonfinite="skip"`."""
        self._check_built("skipped_updates")
        return self._skipped_updates

    @property
    def last_grad_norm(self):
        """Global norm of the last merged gradient, before clipping."""
        self._check_built("last_grad_norm")
        return self._last_grad_norm

    @property
    def window_steps(self):
        """Micro-steps in the open window."""
        self._check_built("window_steps")
        return self._window_steps

    @property
    def window_weight(self):
        """Sum of the micro-step weights in the open window."""
        self._check_built("window_weight")
        return self._window_weight

    @property
    def next_step_updates(self) -> bool:
        """Whether the next micro-step closes a window (read eagerly)."""
        if not self.built:
            return self.merge_grad == 1
        return int(self._window_steps.numpy()) + 1 >= self.merge_grad

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` exists once the optimizer is built: call "
                "`optimizer.build(model.trainable_variables)` or take a step first."
            )

    # ------------------------------------------------------------------- build
    def build(self, var_list):
        """Creates the accumulators, counters and EMA shadows, and builds the inner optimizer.

        Under a `tf.distribute` strategy the accumulators are replica-local
        (each replica adds into its own copy; reading one in cross-replica
        context, as saving does, gives the sum over replicas), and every other
        variable is mirrored and only written in cross-replica context.
        """
        if self.built:
            return
        var_list = list(var_list)
        strategy = self._bind_strategy()
        if _distribute.multi_replica() and any(_overwrites_with_gradient(v) for v in var_list):
            # Their window maximum is per replica, and the update sums replicas.
            raise RuntimeError(
                f"AccumOptimizer '{self.name}': float8 training (variables with "
                "`overwrite_with_gradient=True`) under a strategy of several replicas "
                "is not supported yet. Train float8 models on one device."
            )
        acc_dtype = self.accumulator_dtype
        # Variables made while a `tf.function` traces its first call must
        # be lifted out of the graph (keras-team/keras#23085); the strategy
        # is entered again because the outer graph may not have it in scope.
        with tf.init_scope(), _distribute.scope_of(strategy):
            self._build_inner(var_list)
            # The merged gradients we hand on are sums over replicas already.
            for inner in [self.inner_optimizer, *getattr(self.inner_optimizer, "optimizers", [])]:
                inner._all_reduce_sum_gradients = _distribute.already_reduced
            self._inner_slots = _slots_by_variable(self.inner_optimizer, var_list)
            self._accumulators = [
                _distribute.replica_local_variable(
                    self,
                    v.shape,
                    _accumulation_dtype(acc_dtype, v.dtype),
                    f"{_var_name(v)}_accumulator",
                )
                for v in var_list
            ]
            n = len(var_list)
            counter = functools.partial(self.add_variable, aggregation="only_first_replica")
            # 1 where the variable got a gradient in the open window.
            self._seen = counter(shape=(n,), dtype="int32", name="seen")
            self._window_weight = counter(shape=(), dtype=acc_dtype, name="window_weight")
            self._window_steps = counter(shape=(), dtype="int64", name="window_steps")
            self._micro_steps = counter(shape=(), dtype="int64", name="micro_steps")
            self._skipped_updates = counter(shape=(), dtype="int64", name="skipped_updates")
            self._last_grad_norm = counter(shape=(), dtype=acc_dtype, name="last_grad_norm")
            if self.use_ema:
                self._ema = [
                    counter(
                        shape=v.shape,
                        dtype=_accumulation_dtype(acc_dtype, v.dtype),
                        name=f"{_var_name(v)}_ema",
                    )
                    for v in var_list
                ]
                self._ema_swapped = counter(shape=(), dtype="int32", name="ema_swapped")
                # Raw weights while the EMA is swapped in. A variable of its
                # shadow's dtype trades places with it (no extra memory);
                # others need a copy in their own dtype (a cast would round).
                self._raw_backup = [
                    None
                    if v.dtype == _accumulation_dtype(acc_dtype, v.dtype)
                    else counter(shape=v.shape, dtype=v.dtype, name=f"{_var_name(v)}_raw_backup")
                    for v in var_list
                ]
            else:
                self._ema = []
        # The base class's own bookkeeping; its EMA/accumulators are not built.
        for i, variable in enumerate(var_list):
            self._trainable_variables_indices[self._var_key(variable)] = i
        self._trainable_variables = var_list[:]
        # Unknown, not 0: a checkpoint restored before the build fills the
        # variables made here (a mid-window state), after its restore hook.
        self._host.window_steps = None
        self._host.shapes = [tuple(v.shape) for v in var_list]
        self.built = True

    def _bind_strategy(self):
        """The strategy the variables are made under, checked against the caller's.

        Keras users create the optimizer inside `strategy.scope()`. One made
        outside any strategy and first built inside one is bound to it (none
        of its variables is distributed yet, except the step counters, which
        are only ever written in cross-replica context).
        """
        current = tf.distribute.get_strategy()
        made_under = self._distribution_strategy
        if current is made_under or not tf.distribute.has_strategy():
            return made_under
        if not _distribute.is_default(made_under):
            raise RuntimeError(
                f"AccumOptimizer '{self.name}' was created under another "
                "`tf.distribute` strategy than the one it is built in. Create the "
                "optimizer (and compile the model) inside the `strategy.scope()` "
                "it trains under."
            )
        self._distribution_strategy = current
        self.inner_optimizer._distribution_strategy = current
        return current

    # ------------------------------------------------------------------- apply
    def apply_gradients(self, grads_and_vars, weight=None, skip_gradients_aggregation=False):
        """Takes one micro-step: `apply_gradients(zip(grads, vars), weight=None)`.

        Args:
            grads_and_vars: iterable of `(gradient, variable)` pairs; a `None`
                gradient contributes zero for this micro-step.
            weight: optional number or scalar tensor >= 0, this micro-step's
                weight `w` (a sample or token count); defaults to 1. Under a
                `tf.distribute` strategy every replica passes the same value:
                the micro-step's global weight (for example its global sample
                count), not the replica's share.
            skip_gradients_aggregation: bool. Under a strategy of `n`
                replicas, True means the gradients were already summed across
                replicas by the caller (as with `aggregate_gradients`), so
                each replica adds `g / n` and the once-per-update sum gives
                `g` again. Ignored without a strategy. Defaults to False.

        Returns:
            `iterations`, the number of updates applied.
        """
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(
            grads,
            trainable_variables,
            weight=weight,
            skip_gradients_aggregation=skip_gradients_aggregation,
        )
        return self.iterations

    def apply(self, grads, trainable_variables=None, weight=None, skip_gradients_aggregation=False):
        """Takes one micro-step (see `apply_gradients`)."""
        grads = self._checked_gradients(grads)
        self._finish_inner_build()
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "`trainable_variables` must be given on the first call, or the "
                    "optimizer built with `optimizer.build(trainable_variables)`. "
                    "Received: trainable_variables=None"
                )
            _core.check_num_gradients(len(grads), len(self._trainable_variables))
            aligned = grads
        else:
            trainable_variables = list(trainable_variables)
            _core.check_num_gradients(len(grads), len(trainable_variables))
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
            aligned = [None] * len(self._trainable_variables)
            for g, i in zip(grads, self._indices_of(trainable_variables)):
                aligned[i] = g
        aligned = [_as_dense_or_slices(g) for g in aligned]
        _check_gradient_shapes(aligned, self._trainable_variables, self._host.shapes)
        self._host.pending_checks = []
        weight = self._checked_weight(weight)
        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise RuntimeError(
                f"AccumOptimizer '{self.name}': `apply_gradients` must be called in "
                "replica context under a `tf.distribute` strategy, i.e. inside "
                "`strategy.run(step_fn)` (`model.fit` does this)."
            )
        if skip_gradients_aggregation and _distribute.multi_replica():
            # Already summed over replicas: the update's sum must not count
            # them n times (exact for a power-of-two number of replicas).
            inv = 1.0 / _distribute.num_replicas()
            aligned = [g if g is None else _scale_gradient(g, inv) for g in aligned]

        if not tf.executing_eagerly():
            if _distribute.multi_replica() and _in_xla_context():
                raise RuntimeError(
                    f"AccumOptimizer '{self.name}': XLA cannot compile a step that spans "
                    "the several devices of a `tf.distribute` strategy (TensorFlow refuses "
                    "it for plain Keras optimizers too). Compile the model with "
                    "`jit_compile=False` under the strategy."
                )
            if self.on_nonfinite == "raise" and _in_xla_context():
                raise RuntimeError(
                    "`on_nonfinite='raise'` cannot raise inside an XLA-compiled "
                    "function (XLA drops the check). Compile the model with "
                    "`jit_compile=False`, or use `on_nonfinite='skip'`. "
                    "Received: on_nonfinite='raise'"
                )
            # The caller traces: one graph serves every micro-step, and the
            # window decision is a `cond` on the step counter.
            self._host.window_steps = None
            with tf.control_dependencies(self._host.pending_checks):  # nothing moves before them
                self._micro_step(aligned, weight, assert_finite=True, starts=None)
            return
        if _distribute.in_strategy_replica_context():
            finite = self._micro_step(aligned, weight)  # eager `strategy.run`
        else:
            finite = self._eager_micro_step(aligned, weight)
        if self._raise_checked() and not bool(finite):
            raise FloatingPointError(
                f"on_nonfinite='raise': non-finite gradient at micro-step "
                f"{int(self._micro_steps.numpy()) + 1} (window position "
                f"{int(self._window_steps.numpy()) + 1} of {self.merge_grad}); "
                "nothing was accumulated."
            )

    def _indices_of(self, variables):
        """Each variable's index among the built ones; refused if one is unknown.

        A training loop passes the same variables every time: the last
        call's indices serve again when the list holds the same objects.
        """
        last = self._host.alignment
        if (
            last is not None
            and len(last[0]) == len(variables)
            and all(a is b for a, b in zip(last[0], variables))
        ):
            return last[1]
        self._check_variables_are_known(variables)
        indices = [self._get_variable_index(v) for v in variables]
        self._host.alignment = (tuple(variables), indices)
        return indices

    def _checked_weight(self, weight):
        """`weight` as a scalar tensor of the accumulator dtype, or None; checked.

        A number or an eager tensor is checked here, before anything moves; a
        traced tensor gets a `tf.debugging` check (XLA drops it: there a
        negative weight cannot be caught).
        """
        if weight is None or isinstance(weight, (bool, int, float, np.number)):
            weight = _core.validate_weight(weight)
            return None if weight is None else tf.constant(weight, self.accumulator_dtype)
        if not isinstance(weight, (tf.Tensor, tf.Variable, np.ndarray, keras.Variable)):
            raise TypeError(
                "`weight` must be a finite number >= 0 (a sample or token count), or a "
                f"scalar numeric tensor. Received: weight={weight!r}"
            )
        dtype = tf.as_dtype(weight.dtype)
        if not (dtype.is_floating or dtype.is_integer) or len(weight.shape) != 0:
            raise TypeError(
                "`weight` must be a finite number >= 0 (a sample or token count), or a "
                f"scalar numeric tensor. Received: weight={weight!r}"
            )
        weight = tf.cast(weight, self.accumulator_dtype)
        if tf.executing_eagerly():
            _core.validate_weight(float(weight.numpy()))
        elif not _in_xla_context():
            checks = [
                tf.debugging.assert_non_negative(
                    weight,
                    message="`weight` must be a finite number >= 0 (a sample or token count)",
                ),
                tf.debugging.assert_all_finite(weight, "`weight` must be finite"),
            ]
            self._host.pending_checks = checks  # the traced micro-step runs after them
        return weight

    def _eager_micro_step(self, aligned, weight):
        """An eager micro-step: the host knows whether it closes the window.

        So a non-update micro-step runs one compiled function that only
        accumulates (XLA when `jit_compile`, traced once per gradient
        structure), with no conditional that would make XLA write back every
        variable the update could touch; the window's first one writes
        instead of adding (`_accumulate_step`); the closing one runs one
        plain `tf.function` (traced once per structure: the inner optimizer's
        kernels, as in `fit`). With `merge_grad=1` every micro-step updates
        and runs eagerly, as the inner optimizer runs alone in an eager loop,
        so the two are bit-identical.
        """
        position = self._host.window_steps
        known = position is not None
        if not known:  # after a load, a restore or a traced call
            position = int(self._window_steps.numpy())
        closes = position + 1 >= self.merge_grad
        if closes and self.merge_grad == 1:
            # Every micro-step updates: run eagerly, as the inner optimizer
            # runs alone in an eager loop, so the two are bit-identical.
            finite = self._micro_step(aligned, weight, closes=True)
        elif closes:
            if self._update_fn is None:
                self._update_fn = self._step_function(closes=True)
            finite = self._call(self._update_fn, aligned, weight)
        else:
            # The window's first micro-step writes its gradients instead of
            # adding them, when the host saw the accumulators reset (the
            # update it ran; after a build, a load or a restore it adds).
            starts = known and position == 0 and self._own_update_step()
            finite = self._accumulate_step(aligned, weight, starts=starts)
        if self._raise_checked() and not bool(finite):
            self._host.window_steps = position if known else None
        else:
            self._host.window_steps = 0 if closes else position + 1
        return finite

    def _checked_gradients(self, grads):
        """The gradient list, refused if all None, and divided by `loss_scale_factor`."""
        grads = list(grads)
        if all(g is None for g in grads):
            # Plain Keras raises this too; counting a micro-step (or an
            # update) of nothing would shift every later window.
            raise ValueError(
                "No gradients provided for any variable: `grads` must hold at least "
                "one gradient that is not None; nothing was changed. Received: "
                f"grads with {len(grads)} entries, all None"
            )
        factor = self.loss_scale_factor
        if factor is None:
            return grads
        return [_unscaled(g, factor) for g in grads]

    def _build_inner(self, var_list):
        """Builds the inner optimizer (inside `build`, under `tf.init_scope`).

        `model.fit` on a model not built before builds the model while
        tracing its first train step: TensorFlow gives the weights made there
        their values only after that trace (it then traces again and never
        runs the first graph). ScheduleFreeAdamW's build copies each weight
        into its momentum, which cannot be done yet; the copies wait for
        `_finish_inner_build`, at the start of the next trace.
        """
        inner = self.inner_optimizer
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

    def _finish_inner_build(self):
        """Makes the copies `_build_inner` had to leave, once the weights have values."""
        pending = getattr(self, "_pending_weight_copies", None)
        if not pending:
            return
        if _any_uninitialized([v for _, v in pending]):
            # Still no values: TensorFlow could not lift the initialisers out
            # of the function. Fail where the step would run, never silently.
            tf.debugging.Assert(
                False,
                [
                    f"AccumOptimizer '{self.name}': the inner ScheduleFreeAdamW could not "
                    "copy the model's weights into its momentum. Build the model "
                    "before `fit` (call it on a batch, or `model.build(input_shape)`)."
                ],
            )
            return
        with tf.init_scope():
            for momentum, variable in pending:
                momentum.assign(variable)
        self._pending_weight_copies = []

    def _forget_window_position(self):
        """The state was set from outside a step (a load, a restore): read it again."""
        self._host.window_steps = None

    def _accumulate_step(self, aligned, weight, starts):
        """A micro-step that does not update, in one compiled function.

        Those inside a window add into the accumulators in one XLA function
        (when `jit_compile`) with no conditional. The window's first one
        (`starts`: the host ran the update that reset them) writes `w * g` into
        them instead, in a plain `tf.function`: the reset left them sharing
        one buffer of zeros, which an add would first copy, and which an XLA
        call copies even to only write it. Written, each accumulator gets a
        buffer of its own at the cost of one copy of the gradients at most,
        and the later adds are in place.
        """
        if starts:
            if self._start_fn is None:
                self._start_fn = self._step_function(closes=False, starts=True)
            return self._call(self._start_fn, aligned, weight)
        if self._accumulate_fn is None:
            self._accumulate_jitted = self.jit_compile
            self._accumulate_fn = self._step_function(self.jit_compile, closes=False)
        try:
            return self._call(self._accumulate_fn, aligned, weight)
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
                f"AccumOptimizer '{self.name}': XLA could not compile the step, "
                f"so it runs as a plain tf.function from now on ({type(e).__name__}: "
                f"{message.splitlines()[0][:200]}).",
                stacklevel=4,
            )
            self._accumulate_jitted = False
            self._accumulate_fn = self._step_function(closes=False)
            return self._accumulate_fn(aligned, weight)

    def _step_function(self, jit_compile=False, **kwargs):
        """`_micro_step(grads, weight, **kwargs)` as a `tf.function` of (grads, weight)."""

        def step(grads, weight):
            return self._micro_step(grads, weight, **kwargs)

        return tf.function(step, jit_compile=jit_compile)

    def _call(self, fn, aligned, weight):
        """`fn(aligned, weight)`, through its concrete function once traced.

        `tf.function` finds its trace from the arguments' types on every call
        (about 0.2 ms for a few variables). Eager dense gradients have their
        variables' shapes, so their dtypes (and the weight's) pick the trace.
        """
        if tf.config.functions_run_eagerly() or not all(
            g is None or isinstance(g, tf.Tensor) for g in aligned
        ):
            # Debugging with `run_functions_eagerly`: through the tf.function,
            # which honours it. Slices: their number of rows varies.
            return fn(aligned, weight)
        key = (
            fn,
            tuple(None if g is None else g.dtype for g in aligned),
            None if weight is None else weight.dtype,
        )
        concrete = self._host.concrete.get(key)
        if concrete is not None:
            return concrete(aligned, weight)
        finite = fn(aligned, weight)  # the first call traces (and may make variables)
        self._host.concrete[key] = fn.get_concrete_function(aligned, weight)
        return finite

    def _own_update_step(self) -> bool:
        """Whether `update_step` is this class's: only then may a window's first
        micro-step write instead of adding (an override may add twice into one
        accumulator, through `super().update_step`)."""
        return type(self).update_step is AccumOptimizer.update_step

    def _raise_checked(self) -> bool:
        """Whether each micro-step is checked for non-finite values ("raise").

        Under a LossScaleOptimizer an overflow is the loss scale's business:
        its window is skipped and the scale lowered, as torch's GradScaler does.
        """
        return self.on_nonfinite == "raise" and self._loss_scaler() is None

    def update_step(self, gradient, variable, learning_rate):
        """Adds one (weighted) gradient into `variable`'s accumulator.

        The inner optimizer does the real update, once per window; this is
        the per-variable work of a micro-step, on this replica's accumulator.
        """
        i = self._get_variable_index(variable)
        acc = self._accumulators[i]
        if isinstance(gradient, tf.IndexedSlices):
            # Memory: none beyond the accumulator; time: one scatter of the
            # rows present (duplicates add up), not a dense pass.
            _distribute.local_component(acc).scatter_add(gradient)
        elif _overwrites_with_gradient(variable):
            # float8 scaling state: Keras (and the large batch) keep the
            # window's maximum, not a sum.
            first = self._window_steps == 0
            acc.assign(tf.where(first, gradient, tf.maximum(acc, gradient)))
        elif self._window_starts:
            # The accumulator holds zeros: the gradient is its value. A
            # snapshot takes the gradient's buffer if nothing else holds it,
            # else copies it: either way the accumulator's own, so that the
            # next add is in place.
            _distribute.local_component(acc).assign(tf.raw_ops.Snapshot(input=gradient))
        else:
            # The tf.Variable's own in-place add: `keras.Variable.assign_add`
            # is `assign(self + value)`, a new full-size tensor every time.
            _distribute.local_component(acc).assign_add(gradient)

    def _micro_step(self, grads, weight, assert_finite=False, closes=None, starts=False):
        """One micro-step, traceable: accumulate here, decide once for all replicas.

        `grads` is aligned with the built variables (None where absent).
        `closes`: None to decide at run time (a `cond` on the window counter,
        for graphs that serve every micro-step), True or False when the
        caller knows. `starts`: True when the caller knows the accumulators
        hold zeros (the window's first micro-step), None to decide at run
        time. Returns whether this micro-step's gradients were finite
        ("raise" policy), else True.
        """
        present = tuple(g is not None for g in grads)
        finite = tf.constant(True)
        if self._raise_checked():
            finite = _all_finite([g if g is None else _weighted(g, weight) for g in grads])
            if assert_finite:
                tf.debugging.Assert(
                    finite,
                    [
                        "on_nonfinite='raise': non-finite gradient at micro-step",
                        self._micro_steps + 1,
                    ],
                )
            tf.cond(
                finite,
                lambda: _no_output(self._accumulate(grads, weight, starts)),
                lambda: None,
            )
        else:
            self._accumulate(grads, weight, starts)

        def decide(weight, finite):
            if self._raise_checked():
                tf.cond(
                    finite,
                    lambda: _no_output(self._close_or_count(present, weight, closes)),
                    lambda: None,
                )
            else:
                self._close_or_count(present, weight, closes)

        _distribute.call_in_cross_replica_context(decide, weight, finite)
        return finite

    def _accumulate(self, grads, weight, starts=False):
        """This replica's share of a micro-step: `acc += w * g`, no communication.

        `starts`: the accumulators hold zeros, so `update_step` may write
        `w * g` instead of adding it (an absent gradient leaves its zeros);
        None: a graph that serves every micro-step decides at run time.
        """
        if starts is None:
            if _in_xla_context() or not self._own_update_step():
                # XLA never shares the reset's zeros.
                starts = False
            else:
                # The reset left the accumulators sharing one buffer of zeros,
                # which an add would first copy: write, at a window's start.
                tf.cond(
                    tf.equal(self._window_steps, 0),
                    lambda: _no_output(self._accumulate(grads, weight, True)),
                    lambda: _no_output(self._accumulate(grads, weight, False)),
                )
                return
        self._window_starts = starts
        try:
            self._add_each(grads, weight)
        finally:
            self._window_starts = False

    def _add_each(self, grads, weight):
        for g, v in zip(grads, self._trainable_variables):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = _scatter_ready(g, self._accumulators[self._get_variable_index(v)].dtype)
            else:
                g = tf.cast(g, self._accumulators[self._get_variable_index(v)].dtype)
            if weight is not None and not _overwrites_with_gradient(v):
                g = _scale_gradient(g, weight)
            self.update_step(g, v, None)

    def _close_or_count(self, present, weight, closes):
        """Counts the micro-step, then closes the window if it is due (cross-replica)."""
        if all(present):
            self._seen.assign(tf.ones_like(self._seen))
        elif any(present):
            self._seen.assign(tf.maximum(self._seen, tf.constant(present, dtype="int32")))
        one = tf.constant(1, "int64")
        self._window_weight.assign_add(
            tf.constant(1, self.accumulator_dtype) if weight is None else weight
        )
        self._window_steps.assign_add(one)
        self._micro_steps.assign_add(one)
        if closes is None:
            _run_if(self._window_steps >= self.merge_grad, lambda: self._update(present))
        elif closes:
            self._update(present)

    # ------------------------------------------------------------------ update
    def _update(self, present):
        """Closes the window: merge, check, clip, one inner step, EMA, reset.

        Runs once for all replicas (cross-replica context): the accumulators
        are summed over replicas here, once per update, and every decision
        below is taken on that sum, so every replica takes the same one.
        `present[i]` is True when variable i is known (at trace time) to have
        a gradient in this window; otherwise `_seen` decides at run time.
        """
        done = self._close_window(present)
        for i, acc in enumerate(self._accumulators):
            # Reset by assignment, never by subtraction or scaling: one inf
            # must not turn later windows into NaN.
            acc.assign(_zeros_after(acc, done, i))
        self._seen.assign(tf.zeros_like(self._seen))
        self._window_weight.assign(tf.zeros_like(self._window_weight))
        self._window_steps.assign(tf.zeros_like(self._window_steps))

    def _close_window(self, present):
        """Merge, check, clip, one inner step, EMA; nothing if the window weighs 0.

        The decision (samples in the window, finite or not) needs the global
        norm first. It is taken from the summed accumulators, then scaled,
        so that no full-size merged gradient exists before it: the merged
        gradients are made in the branch that applies them. That keeps the
        update's peak temporaries at about half the trainable bytes (the
        built-in's: up to all of them) and, on the CPU with the system's
        malloc, its fresh, page-faulting allocations few.

        Returns what `_run_if` returns for the step: under XLA, a scalar that
        exists only once the accumulators have been read (`_zeros_after`).
        """
        sums = _distribute.sum_over_replicas(self._accumulators)
        scaler = self._loss_scaler()
        overwrite = [_overwrites_with_gradient(v) for v in self._trainable_variables]

        def merge():
            merged = []
            for acc_sum, over in zip(sums, overwrite):
                g = acc_sum
                if not over:  # a float8 window maximum is never divided or unscaled
                    if self.reduction == "mean":
                        g = g / _loop_variant(tf.cast(self._window_weight, g.dtype))
                    elif _xla_loop_trips():
                        g = g * _loop_variant(tf.ones([], g.dtype))  # exact
                    if scaler is not None:
                        g = g / tf.cast(scaler.dynamic_scale, g.dtype)
                merged.append(g)
            return merged

        # Never-seen accumulators are exactly zero: they add nothing to the norm.
        norm = _global_norm([x for x, over in zip(sums, overwrite) if not over])
        if self.reduction == "mean":
            norm = norm / tf.cast(self._window_weight, norm.dtype)
        if scaler is not None:
            norm = norm / tf.cast(scaler.dynamic_scale, norm.dtype)
        if any(overwrite):
            maxima = _global_norm([x for x, over in zip(sums, overwrite) if over])
            norm = tf.sqrt(tf.square(norm) + tf.square(tf.cast(maxima, norm.dtype)))
        # A window whose weights sum to 0 holds no samples: nothing is
        # applied or counted (a large batch of no samples takes no step).
        # One `cond` decides, not one per question: each nested level costs.
        has_samples = self._window_weight > 0
        last = tf.convert_to_tensor(self._last_grad_norm)
        self._last_grad_norm.assign(tf.where(has_samples, tf.cast(norm, last.dtype), last))
        if self.on_nonfinite == "skip" or scaler is not None:
            # One read pass: the norm is finite iff every element is, unless
            # only the sum of squares overflowed (then look, exactly).
            finite = tf.cond(
                tf.math.is_finite(norm), lambda: tf.constant(True), lambda: _all_finite(merge())
            )
            return _run_if(
                tf.logical_and(has_samples, finite),
                lambda: self._apply_merged(merge(), present, norm),
                otherwise=lambda: _run_if(has_samples, self._skip_window),
            )
        else:
            return _run_if(has_samples, lambda: self._apply_merged(merge(), present, norm))

    def _skip_window(self):
        self._skipped_updates.assign_add(1)
        scaler = self._loss_scaler()
        if scaler is not None:  # as LossScaleOptimizer does on a non-finite step
            scaler.step_counter.assign(0)
            scaler.dynamic_scale.assign(scaler.dynamic_scale * 0.5)
        return None

    def _clip(self, merged, norm):
        cfg = self._config
        if cfg.clipvalue is not None:
            merged = [tf.clip_by_value(g, -cfg.clipvalue, cfg.clipvalue) for g in merged]
            norm = None  # clipping by value changed it
        if cfg.clipnorm is not None:
            merged = [g * cfg.clipnorm / tf.maximum(tf.norm(g), cfg.clipnorm) for g in merged]
        elif cfg.global_clipnorm is not None:
            c = cfg.global_clipnorm
            if norm is None:
                norm = _global_norm(merged)
            scale = c / tf.maximum(norm, tf.cast(c, norm.dtype))
            merged = [g * tf.cast(scale, g.dtype) for g in merged]
        return merged

    def _apply_merged(self, merged, present, norm):
        inner = self.inner_optimizer
        clipped = [
            g if _overwrites_with_gradient(v) else c
            for g, c, v in zip(merged, self._clip(merged, norm), self._trainable_variables)
        ]
        variables = self._trainable_variables
        grads = [tf.cast(g, v.dtype) for g, v in zip(clipped, variables)]
        # A variable without gradient at the closing micro-step may have one
        # from earlier in the window (then its accumulator holds it), or none
        # at all (then it must not move). One inner step over every variable
        # keeps global inner state (step counter, Nadam's u-product) moving
        # once; the never-seen ones then get their value and their slots back.
        dynamic = [i for i, p in enumerate(present) if not p]
        kept = [
            (i, group, [tf.identity(x) for x in group])
            for i in dynamic
            for group in [[variables[i]] + self._inner_slots[i]]
        ]
        _distribute.run_in_each_replica(lambda g: inner.apply(g, variables), grads)
        for i, group, values in kept:

            def _restore(group=group, values=values):
                for x, value in zip(group, values):
                    x.assign(value)
                return None

            _run_if(self._seen[i] <= 0, _restore)
        if self.use_ema:
            self._update_ema()
        scaler = self._loss_scaler()
        if scaler is not None:  # as LossScaleOptimizer does on a finite step
            tf.cond(
                tf.equal(scaler.step_counter, scaler.dynamic_growth_steps - 1),
                lambda: _no_output(
                    [scaler.step_counter.assign(0), scaler.dynamic_scale.assign(scaler.dynamic_scale * 2.0)]
                ),
                lambda: _no_output(scaler.step_counter.assign_add(1)),
            )
        return None

    def _update_ema(self):
        """`ema = m * ema + (1 - m) * var` after an update (`iterations` already stepped)."""
        cfg = self._config
        # float64 shadows (of float64 variables) get a float64 momentum.
        dtype = _widest_dtype([self.accumulator_dtype] + [e.dtype for e in self._ema])
        n = tf.cast(self.iterations, dtype) - 1.0  # updates before this one
        m = tf.constant(cfg.ema_momentum, dtype)
        if cfg.ema_warmup:
            m = tf.minimum(m, (1.0 + n) / (10.0 + n))
        m = tf.where(n > 0, m, tf.zeros_like(m))
        for ema, v in zip(self._ema, self._trainable_variables):
            m_ema = tf.cast(m, ema.dtype)
            ema.assign(m_ema * ema + (1.0 - m_ema) * _stored_value(v, ema.dtype))
        f = cfg.ema_overwrite_frequency
        if f is not None:
            _run_if(tf.equal(self.iterations % f, 0), self._overwrite_with_ema)

    def _overwrite_with_ema(self):
        for ema, v in zip(self._ema, self._trainable_variables):
            v.assign(tf.cast(ema, v.dtype))
        return None

    # ------------------------------------------------------------ loss scaling
    def _loss_scaler(self):
        """The LossScaleOptimizer wrapping this one, once it has applied through us."""
        ref = self._loss_scaler_ref
        return ref() if ref is not None else None

    def _apply_loss_scaled(self, loss_scale_optimizer, grads, trainable_variables):
        """`LossScaleOptimizer.apply` when it wraps us (`compile` under mixed_float16).

        Keras's LossScaleOptimizer checks each micro-batch (on replica 0
        alone under a strategy), drops an overflowing one before it reaches
        us, and moves the scale per micro-batch: the windows would shift and
        mix scales. Instead every micro-batch is accumulated as it comes, at
        the window's scale; the update unscales the merged sum and checks it
        after the cross-replica sum; an overflow anywhere skips the whole
        window on every replica; the scale moves only there, by the
        LossScaleOptimizer's own rule (x0.5 on an overflow, x2 after
        `dynamic_growth_steps` good updates), so a window never mixes scales.
        """
        self._loss_scaler_ref = weakref.ref(loss_scale_optimizer)
        self.apply(grads, trainable_variables)

    # ------------------------------------------------------------------- flush
    def flush(self):
        """Applies the open window now, with its true divisor (`window_weight`).

        An empty window does nothing. Call it at the end of training (or of an
        epoch) when the number of micro-batches is not a multiple of
        `merge_grad`; until then the open window stays in the saved state.
        Under a strategy, call it in cross-replica context (outside
        `strategy.run`), as `model.fit`'s callbacks are.

        Returns:
            True if an update was made (or skipped by the non-finite policy),
            else False. Inside a `tf.function`, the flush is traced and this
            returns None.
        """
        if not self.built:
            return False
        self._host.window_steps = None
        if not tf.executing_eagerly():
            n = len(self._trainable_variables)

            def traced():
                _run_if(self._window_steps > 0, lambda: self._update((False,) * n))

            _distribute.call_in_cross_replica_context(traced)
            return None
        if int(self._window_steps.numpy()) == 0:
            return False
        present = tuple(bool(s) for s in self._seen.numpy())
        with _distribute.scope_of(self._distribution_strategy):
            self._update(present)
        return True

    # --------------------------------------------------------------------- EMA
    def finalize_variable_values(self, var_list):
        """Writes the EMA into the model's variables (`model.fit` calls this at the end)."""
        if not self.use_ema or not self.built:
            return
        self._restore_raw_weights()
        for v in var_list:
            i = self._get_variable_index(v)
            v.assign(tf.cast(self._ema[i], v.dtype))

    @property
    def ema_variables(self):
        """The EMA shadows, one per trainable variable (empty without EMA).

        float32 (`accumulator_dtype`), or the variable's dtype where wider.
        """
        if self.use_ema and self.built and int(self._ema_swapped.numpy()):
            raise RuntimeError(
                "The EMA is swapped into the model: read the model's variables."
            )
        return list(self._ema) if self.built else []

    def swap_in_ema(self):
        """Puts the EMA into the model's variables, keeping the raw weights bit-exactly.

        Idempotent. The swap is recorded in the optimizer's state, so a model
        saved to a `.keras` file while swapped resumes training from its raw
        weights (loading puts them back). After restoring a
        `tf.train.Checkpoint` written while swapped, call `swap_out_ema()`.
        """
        self._require_ema("swap_in_ema")
        if int(self._ema_swapped.numpy()):
            return
        for i, v in enumerate(self._trainable_variables):
            ema = self._ema[i]
            if self._raw_backup[i] is None:
                raw = tf.identity(v)
                v.assign(ema)
                ema.assign(raw)  # the shadow holds the raw weights meanwhile
            else:
                self._raw_backup[i].assign(v)
                v.assign(tf.cast(ema, v.dtype))
        self._ema_swapped.assign(1)

    def swap_out_ema(self):
        """Puts the raw weights back after `swap_in_ema`; a no-op if not swapped."""
        self._require_ema("swap_out_ema")
        self._restore_raw_weights()

    def _restore_raw_weights(self):
        if not int(self._ema_swapped.numpy()):
            return
        for i, v in enumerate(self._trainable_variables):
            ema = self._ema[i]
            if self._raw_backup[i] is None:
                shown = tf.identity(v)
                v.assign(ema)
                ema.assign(shown)
            else:
                v.assign(self._raw_backup[i])
        self._ema_swapped.assign(0)

    @contextlib.contextmanager
    def swap_ema_weights(self):
        """Context manager: the model holds its EMA inside, its raw weights after.

        Example:

        ```python
        with opt.swap_ema_weights():
            model.evaluate(x_val, y_val)
        ```
        """
        self.swap_in_ema()
        try:
            yield self
        finally:
            self.swap_out_ema()

    def _require_ema(self, what):
        if not self.use_ema:
            raise ValueError(f"`{what}` needs `use_ema=True`. Received: use_ema=False")
        self._check_built(what)

    # ------------------------------------------------------------ saving, config
    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[_SIGNATURE_KEY] = np.frombuffer(self._signature.encode("utf-8"), dtype=np.uint8)

    def load_own_variables(self, store):
        """Loads state saved by `save_own_variables`; raises instead of skipping.

        Raises:
            ValueError: the state was saved by a differently configured
                optimizer, or holds another number or shape of variables.
                Nothing is assigned in that case.
        """
        keys = list(store.keys())
        if _SIGNATURE_KEY not in keys:
            raise ValueError(
                f"Cannot load optimizer state into AccumOptimizer '{self.name}': "
                "it was not saved by an AccumOptimizer (no signature; nothing was loaded)."
            )
        saved = json.loads(bytes(np.asarray(store[_SIGNATURE_KEY], dtype=np.uint8)).decode("utf-8"))
        version = saved.get("format_version")
        if version not in _READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"Cannot load optimizer state into AccumOptimizer '{self.name}': it was "
                f"saved in state format version {version!r}, and this keras_accum reads "
                f"versions {' and '.join(map(str, _READABLE_FORMAT_VERSIONS))} (saved by "
                "a newer keras_accum? nothing was loaded)."
            )
        # Every check comes before the first assignment, the inner state's
        # included: a refused load leaves all of it as it was.
        current = dict(json.loads(self._signature), format_version=version)
        _core.check_state_signature(saved, current)
        layout = self._state_layout(version)
        n_saved = len(keys) - 1
        if n_saved != len(layout):
            raise ValueError(
                f"Cannot load optimizer state into AccumOptimizer '{self.name}': "
                f"it has {len(layout)} variables, the saved state {n_saved} "
                "(build the optimizer on the same model first; nothing was loaded)."
            )
        values = [np.asarray(store[str(i)]) for i in range(n_saved)]
        for (v, _), value in zip(layout, values):
            if tuple(v.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load optimizer state: variable '{v.path}' has shape "
                    f"{tuple(v.shape)}, the saved value {tuple(value.shape)} "
                    "(nothing was loaded)."
                )
            if not _loadable(value.dtype, v.dtype):
                raise ValueError(
                    f"Cannot load optimizer state: variable '{v.path}' has dtype "
                    f"{keras.backend.standardize_dtype(v.dtype)}, the saved value "
                    f"{keras.backend.standardize_dtype(value.dtype)} (nothing was loaded)."
                )
        for (v, assign), value in zip(layout, values):
            if assign:
                v.assign(value)
        self._forget_window_position()
        pending, self._pending_loss_scale = self._pending_loss_scale, None
        if pending is not None and pending[0]() is not None:
            for v, value in zip(pending[0]()._variables, pending[1]):
                v.assign(value)  # the wrapping LossScaleOptimizer's own state
        # Saved while the EMA was swapped in: the model's weights just loaded
        # are the EMA, the raw ones sit in our state. Keras loads the model's
        # weights before its optimizer's, so put the raw ones back now and
        # training resumes from them.
        if self.use_ema:
            self._restore_raw_weights()

    def _state_layout(self, version):
        """The saved entries of a state format, in order: `(variable, assign)` pairs.

        Format 2 is `variables`. Format 1 also held, among our own
        variables, the inner slots (after the learning rate) and the model's
        weights (after the EMA state): those entries are checked but not
        assigned (the inner slots come again with the inner state, the
        weights are the model's to load).
        """
        if version == _FORMAT_VERSION:
            return [(v, True) for v in self.variables]
        inner_slots = []
        for group in self._inner_slots:
            inner_slots.extend(x for x in group if all(x is not y for y in inner_slots))
        own = [self._iterations, self._learning_rate]
        own += self._accumulators
        own += [
            self._seen,
            self._window_weight,
            self._window_steps,
            self._micro_steps,
            self._skipped_updates,
            self._last_grad_norm,
        ]
        if self.use_ema:
            own += self._ema + [self._ema_swapped]
            own += [b for b in self._raw_backup if b is not None]
        return (
            [(v, True) for v in own[:2]]
            + [(v, False) for v in inner_slots]
            + [(v, True) for v in own[2:]]
            + [(v, False) for v in self._trainable_variables]
            + [(v, True) for v in self.inner_optimizer.variables]
        )

    def get_config(self):
        config = {
            "name": self.name,
            "optimizer": serialization_lib.serialize_keras_object(self.inner_optimizer),
            "jit_compile": self.jit_compile,
            "loss_scale_factor": self.loss_scale_factor,
        }
        config.update(self._config.to_dict())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates an AccumOptimizer from `get_config()` output, or from an older config.

        Besides this class's own configs it accepts those written in the
        tf.keras experimental optimizer era (TF 2.9 to 2.15) and by Keras 3's
        base class: `is_legacy_optimizer` is ignored; `jit_compile` (on the
        inner optimizer's config) becomes this wrapper's `jit_compile`;
        `gradient_accumulation_steps` becomes `merge_grad`; an inner config
        with `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
        `clipnorm`, `clipvalue` or `global_clipnorm` hands them to the
        wrapper; the TF 2.11 class names `"Custom>Adam"` and the old `lr`
        name are read; a legacy `decay` of 0 is dropped. A bare serialized
        optimizer (`{"class_name": "Adam", "config": {...}}`) is wrapped with
        the default settings plus whatever it turns on. A subclass's own
        config keys pass through untouched to its constructor.

        Args:
            config: dict, a config as described above (not modified).
            custom_objects: optional dict of custom classes for the inner
                optimizer or its learning-rate schedule.

        Returns:
            An instance of this class.

        Raises:
            TypeError: `config` is not a dict.
            ValueError: a setting that cannot be carried over (a non-zero
                legacy `decay`, a `weight_decay` or `loss_scale_factor` on the
                wrapper, a feature set differently on the wrapper and the
                inner config), or a config of neither form.

        Example:

        ```python
        old = {"class_name": "Custom>Adam", "config": {"learning_rate": 0.01,
               "jit_compile": False, "is_legacy_optimizer": False}}  # TF 2.11
        restored = AccumOptimizer.from_config(old)
        assert restored.jit_compile is False
        ```
        """
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict. Received: config={config!r}")
        # Deep copy: the inner optimizer's `from_config` swaps objects into
        # its dict, and the caller's config must stay serialisable.
        config = copy.deepcopy(config)
        return cls(**cls._kwargs_from_config(config, custom_objects=custom_objects))


def _check_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            "keras_accum.AccumOptimizer supports the TensorFlow backend of Keras only; "
            f"Keras is running the {backend!r} backend. Set KERAS_BACKEND=tensorflow "
            "before Keras is imported, or, for a PyTorch model, use "
            "keras_accum.torch.AccumOptimizer. Received: backend="
            f"{backend!r}"
        )


def _unscaled(gradient, factor):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values / factor, gradient.indices, gradient.dense_shape)
    return gradient / factor


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


def _resolve_inner(optimizer):
    """Resolves and checks the inner optimizer (before anything is created)."""
    if isinstance(optimizer, (str, dict)):
        try:
            optimizer = keras.optimizers.get(optimizer)
        except ValueError as e:
            raise ValueError(
                "`optimizer` must be a Keras optimizer, or a name or config that "
                f"`keras.optimizers.get` accepts. Received: optimizer={optimizer!r} ({e})"
            ) from None
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` must be a `keras.optimizers.Optimizer` instance, or a name "
            f"or config that `keras.optimizers.get` accepts. Received: optimizer={optimizer!r}"
        )
    if isinstance(optimizer, AccumOptimizer):
        raise ValueError(
            "`optimizer` is already an AccumOptimizer; wrap the plain optimizer "
            f"once. Received: optimizer={optimizer!r}"
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`optimizer` must not be a LossScaleOptimizer: wrap the other way round, "
            "`LossScaleOptimizer(AccumOptimizer(...))` (`model.compile` does this "
            f"itself under `mixed_float16`). Received: optimizer={optimizer!r}"
        )
    checks = (
        ("gradient_accumulation_steps", None),
        ("use_ema", False),
        ("clipnorm", None),
        ("clipvalue", None),
        ("global_clipnorm", None),
        ("loss_scale_factor", None),
    )
    # A MultiOptimizer's sub-optimizers do the work: check them too.
    subs = optimizer.optimizers if isinstance(optimizer, keras.optimizers.MultiOptimizer) else []
    for candidate in [optimizer] + list(subs):
        for feature, off in checks:
            value = getattr(candidate, feature, off)
            if value != off and value is not None:
                if feature == "loss_scale_factor":
                    raise _loss_scale_factor_error(value)
                raise _core.inner_feature_error(feature, value)
        if candidate.built:
            raise ValueError(
                "`optimizer` must not be built yet: AccumOptimizer builds it on the "
                f"variables it trains. Received: optimizer={candidate!r} (built)"
            )
    return optimizer


def _loss_scale_factor_error(value):
    return ValueError(
        f"The inner optimizer already has `loss_scale_factor={value!r}`; AccumOptimizer "
        "scales the loss and unscales each micro-step's gradients itself. Pass "
        f"`loss_scale_factor={value!r}` to AccumOptimizer and leave it off the inner "
        f"optimizer. Received: optimizer with loss_scale_factor={value!r}"
    )


def _slots_by_variable(inner, var_list):
    """The inner optimizer's per-variable slots, as lists indexed like `var_list`.

    Keras optimizers keep each kind of slot in a list indexed by
    `_get_variable_index(variable)` (`_momentums[i]`, Adafactor's `_r[i]`):
    every attribute that is such a list of variables is taken. Global state
    (the step counter, Nadam's `_u_product`) is not per-variable and is left
    out on purpose. A `MultiOptimizer` keeps no slots: its sub-optimizers
    do, each indexed like the variables it was built on.
    """
    index = {id(v): i for i, v in enumerate(var_list)}
    slots = [[] for _ in var_list]
    holders = [(inner, list(var_list))]
    if isinstance(inner, keras.optimizers.MultiOptimizer):
        holders += [(sub, list(sub._trainable_variables)) for sub in inner.optimizers]
    for holder, holder_vars in holders:
        n = len(holder_vars)
        for name, value in sorted(vars(holder).items()):
            if name in ("_variables", "_trainable_variables") or not isinstance(
                value, (list, tuple)
            ):
                continue
            if len(value) != n or not any(isinstance(x, keras.Variable) for x in value):
                continue
            if not all(x is None or isinstance(x, keras.Variable) for x in value):
                continue
            for j, x in enumerate(value):
                if x is not None and id(x) not in index:
                    slots[index[id(holder_vars[j])]].append(x)
    return slots


def _var_name(variable) -> str:
    return getattr(variable, "path", variable.name).replace("/", "_").replace(":", "_")


def _stored_value(variable, dtype):
    """`variable`'s value as stored, cast to `dtype`.

    XLA may forward the unrounded float32 result of an update to a later read
    of a bfloat16/float16 variable (`xla_allow_excess_precision`). A bitcast
    round trip through an unsigned int of the same width pins the stored bits.
    """
    value = tf.convert_to_tensor(variable)
    if value.dtype == dtype or not value.dtype.is_floating:
        return tf.cast(value, dtype)
    bits = {2: tf.uint16, 4: tf.uint32, 8: tf.uint64}[value.dtype.size]
    return tf.cast(tf.bitcast(tf.bitcast(value, bits), value.dtype), dtype)


def _check_gradient_shapes(grads, variables, shapes):
    """A gradient must have its variable's shape (known at trace time, or eagerly).

    `shapes`: the variables' shapes as tuples, for the quick test of an
    eager micro-step (a traced shape may be only compatible).
    """
    for g, v, shape in zip(grads, variables, shapes):
        if g is None or isinstance(g, tf.IndexedSlices):
            continue
        g_shape = g.shape if isinstance(g.shape, tf.TensorShape) else tf.TensorShape(g.shape)
        if g_shape.rank == len(shape) and tuple(g_shape) == shape:
            continue
        if not g_shape.is_compatible_with(shape):
            raise ValueError(
                f"Each gradient must have its variable's shape: variable '{v.path}' has "
                f"shape {tuple(v.shape)}. Received: gradient of shape {tuple(g.shape)}"
            )


def _overwrites_with_gradient(variable) -> bool:
    # Keras float8 training: the "gradient" is the new amax history or scale.
    return bool(getattr(variable, "overwrite_with_gradient", False))


def _as_dense_or_slices(gradient):
    """A gradient as a tensor or as `tf.IndexedSlices` of tensors (or None).

    Keras accepts slices whose indices are a Python tuple; a `tf.function`
    signature does not, so they are made tensors here, once.
    """
    if gradient is None or not isinstance(gradient, tf.IndexedSlices):
        return gradient
    return tf.IndexedSlices(
        tf.convert_to_tensor(gradient.values),
        tf.convert_to_tensor(gradient.indices),
        None if gradient.dense_shape is None else tf.convert_to_tensor(gradient.dense_shape),
    )


def _scatter_ready(gradient, dtype):
    return tf.IndexedSlices(
        tf.cast(gradient.values, dtype), gradient.indices, gradient.dense_shape
    )


def _scale_gradient(gradient, factor):
    """`factor * gradient`, for a tensor or `tf.IndexedSlices` (only its values)."""
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * tf.cast(factor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def _weighted(gradient, weight):
    """The values a micro-step adds, for the "raise" check."""
    values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
    if weight is None:
        return values
    return tf.cast(values, weight.dtype) * weight


def _no_output(_):
    # `tf.cond` branches must return the same structure: ours return nothing.
    return None


def _run_if(pred, fn, otherwise=None):
    """Runs `fn()` where the scalar `pred` holds, else `otherwise()` if given.

    Both are traced once and their outputs dropped. A `tf.cond`, except
    under XLA, where each is a loop of 0 or 1 iterations. An XLA conditional
    returns every variable either branch may write, so the branch that does
    not write one copies it, at every call: on the micro-steps that do not
    update, a write-back of every weight, inner slot and accumulator. A
    while loop's state is updated in place, and a loop that runs zero times
    touches nothing.

    Returns None, or under XLA the loops' trip count: a scalar that exists
    only after `fn` (or `otherwise`) ran, for `_zeros_after`.
    """
    if not _in_xla_context():
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


def _loop_variant(scalar):
    """`scalar`, unchanged, made to depend on the innermost `_run_if` loop's counter.

    XLA moves what a loop body computes from values the loop does not change
    (the accumulators, the window weight) out of the loop, as full-size
    temporaries: the merged gradient, then the inner step's `g * g`. A
    conditional's branch fused them into the inner step's passes. Made from
    the counter (`+ 0.0 * i`, which XLA does not fold for floats), the merge
    stays in the loop and fuses there. Outside such a loop: `scalar` itself.
    """
    trips = _xla_loop_trips()
    if not trips:
        return scalar
    return scalar + tf.cast(trips[-1], scalar.dtype) * 0


def _zeros_after(variable, done, index):
    """Zeros to assign to `variable` (the `index`-th), computed from `done` when given.

    Under XLA, a variable written inside a loop is updated in place. The
    update reads the accumulators inside such loops; zeros written into them
    with no data dependency on those reads may come first as far as XLA
    knows, so it copies every accumulator before the reset. Zeros made from
    the loops' trip count (`0.0 * (trips + index)`, which XLA does not fold
    for floats) come after them, and the copies go. `index` keeps the fills
    of same-shape accumulators apart: XLA would merge equal ones into one
    buffer and copy it into each.
    """
    if done is None:
        return tf.zeros_like(variable)
    return tf.fill(tf.shape(variable), tf.cast(done + index, variable.dtype) * 0)


def _all_finite(tensors):
    checks = [
        tf.reduce_all(tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t))
        for t in tensors
        if t is not None
    ]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def _global_norm(tensors):
    # `2 * l2_loss` reads each tensor once; `reduce_sum(square)` writes the
    # squares out and reads them back.
    if not tensors:
        return tf.constant(0.0)
    squares = [2.0 * tf.nn.l2_loss(t) for t in tensors]
    dtype = _widest_dtype([s.dtype for s in squares])  # float64 accumulators beside float32
    return tf.sqrt(tf.add_n([tf.cast(s, dtype) for s in squares]))


def _dtype_size(dtype) -> int:
    return tf.as_dtype(keras.backend.standardize_dtype(dtype)).size


def _widest_dtype(dtypes) -> str:
    """The largest of several float dtypes (the first one among equal sizes)."""
    # A plain loop: AutoGraph, tracing the step, rewrites `max(..., key=...)`.
    widest = None
    for dtype in dtypes:
        name = keras.backend.standardize_dtype(dtype)
        if widest is None or _dtype_size(name) > _dtype_size(widest):
            widest = name
    return widest


def _accumulation_dtype(accumulator_dtype, variable_dtype) -> str:
    """`accumulator_dtype`, or the variable's float dtype where that is wider.

    Accumulators and EMA shadows are never less precise than their variable
    (the contract, docs/semantics.md point 2): float64 variables accumulate
    in float64 whatever `accumulator_dtype` says.
    """
    variable_dtype = keras.backend.standardize_dtype(variable_dtype)
    if tf.as_dtype(variable_dtype).is_floating:
        return _widest_dtype([accumulator_dtype, variable_dtype])
    return keras.backend.standardize_dtype(accumulator_dtype)


#: Saved dtypes that load into a variable of a wider dtype without loss.
_WIDENINGS = {
    ("float16", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float64"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
}


def _loadable(saved_dtype, variable_dtype) -> bool:
    """Whether a saved value of `saved_dtype` loads into the variable exactly.

    The same dtype, or a float widening: state saved when float64 variables
    still accumulated in float32 loads into their float64 accumulators.
    """
    saved = keras.backend.standardize_dtype(saved_dtype)
    target = keras.backend.standardize_dtype(variable_dtype)
    return saved == target or (saved, target) in _WIDENINGS


def _install_loss_scale_hook():
    """Lets a `LossScaleOptimizer` that wraps an AccumOptimizer hand it the scaling.

    `model.compile` wraps any optimizer in a LossScaleOptimizer under the
    `mixed_float16` policy. Its own `apply` would check and drop each
    micro-batch alone (see `AccumOptimizer._apply_loss_scaled`); when its inner
    optimizer is an AccumOptimizer, the call goes to us instead. Every other
    LossScaleOptimizer runs Keras's code unchanged.
    """
    cls = keras.optimizers.LossScaleOptimizer
    original = cls.apply
    if getattr(original, "_keras_accum_hook", False):
        return

    @functools.wraps(original)
    def apply(self, grads, trainable_variables=None):
        if not isinstance(self.inner_optimizer, AccumOptimizer):
            return original(self, grads, trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        self.inner_optimizer._apply_loss_scaled(self, grads, trainable_variables)

    original_load = cls.load_own_variables

    @functools.wraps(original_load)
    def load_own_variables(self, store):
        if not isinstance(self.inner_optimizer, AccumOptimizer):
            return original_load(self, store)
        # The LossScaleOptimizer's entry holds its own variables, then ours by
        # position: it would assign ours unchecked before our own entry is
        # checked (and refused). It loads only its own; ours come from ours.
        own = self._variables
        if len(store.keys()) != len(own) + len(self.inner_optimizer.variables):
            raise ValueError(
                f"Cannot load optimizer state into LossScaleOptimizer '{self.name}': it "
                f"holds {len(store.keys())} entries, this optimizer "
                f"{len(own) + len(self.inner_optimizer.variables)} (nothing was loaded)."
            )
        values = [np.asarray(store[str(i)]) for i in range(len(own))]
        # Assigned by our `load_own_variables` once it has checked ours.
        self.inner_optimizer._pending_loss_scale = (weakref.ref(self), values)

    apply._keras_accum_hook = True
    cls.apply = apply
    cls.load_own_variables = load_own_variables


_install_loss_scale_hook()
