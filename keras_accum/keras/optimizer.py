"""`AccumOptimizer`: exact gradient accumulation, EMA and clipping for Keras 3.

The wrapper owns accumulation, clipping, the non-finite policy and the EMA of
weights; the inner optimizer runs with all of those off and is called exactly
once per update, so its state, step counter, weight decay and learning-rate
schedule advance once per update (semantics.md, points 1 to 13).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.saving import serialization_lib
from tensorflow.python.ops import control_flow_util

from keras_accum import _core
from keras_accum.keras._seed_api import _SeedAPIMixin

_SIGNATURE_KEY = "keras_accum_signature"


class _StateGuard(tf.train.experimental.PythonState):
    """Carries the state signature through `tf.train.Checkpoint`.

    `deserialize` runs when a checkpoint is restored into this optimizer, and
    raises if the checkpoint was written by a differently configured one
    (semantics.md point 12: never a silent partial restore).
    """

    def __init__(self, signature: str):
        self._signature = signature

    def serialize(self):
        return self._signature

    def deserialize(self, string_value):
        _core.check_state_signature(string_value, self._signature)


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
    float32 accumulators; every `merge_grad`-th call (an update) hands the
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

    Args:
        optimizer: A `keras.optimizers.Optimizer`, or anything
            `keras.optimizers.get` accepts (`"adam"`, a config dict). It must
            not do accumulation, EMA, clipping or loss scaling itself.
        merge_grad: int >= 1, micro-steps per update. Defaults to 1 (then the
            wrapper is bit-identical to the inner optimizer).
        reduction: `"mean"` (default): the merged gradient is the weighted
            mean `sum(w * g) / sum(w)`; `"sum"`: `sum(w * g)`.
        accumulator_dtype: dtype name of the accumulators and of the EMA
            arithmetic; defaults to `"float32"` whatever the variable dtype.
        use_ema: bool, keep a float32 exponential moving average of the
            trainable variables, moved after each update only.
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
        jit_compile: bool, run `apply_gradients` called eagerly (custom loops)
            as one XLA-compiled function. Inside `model.fit` or a user's
            `tf.function`, the caller's compilation decides. Defaults to True.
        name: str, the optimizer's name.

    Raises:
        TypeError: an argument of the wrong kind (`merge_grad="4"`, an
            `optimizer` that is not an optimizer).
        ValueError: a bad value, or an inner optimizer that already does
            accumulation, EMA, clipping or loss scaling.

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
        name: str | None = None,
    ):
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
        inner = _resolve_inner(optimizer)
        super().__init__(learning_rate=0.0, name=name)
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
            config.state_signature(type(inner).__name__)
        )
        self._state_guard = _StateGuard(self._signature)
        self._jit_step = None

    # ------------------------------------------------------------------ config
    @property
    def merge_grad(self) -> int:
        return self._config.merge_grad

    @property
    def reduction(self) -> str:
        return self._config.reduction

    @property
    def accumulator_dtype(self) -> str:
        return self._config.accumulator_dtype

    @property
    def ema_warmup(self) -> bool:
        return self._config.ema_warmup

    @property
    def on_nonfinite(self) -> str:
        return self._config.on_nonfinite

    # --------------------------------------------------------- forwarded state
    @property
    def learning_rate(self):
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
        return self._variables[:] + self.inner_optimizer.variables

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
        """Creates the accumulators, counters and EMA shadows, and builds the inner optimizer."""
        if self.built:
            return
        var_list = list(var_list)
        acc_dtype = self.accumulator_dtype
        # Variables made while a `tf.function` traces its first call must
        # be lifted out of the graph (keras-team/keras#23085).
        with tf.init_scope():
            self.inner_optimizer.build(var_list)
            self._inner_slots = _slots_by_variable(self.inner_optimizer, var_list)
            self._accumulators = [
                self.add_variable(
                    shape=v.shape,
                    dtype=acc_dtype,
                    name=f"{_var_name(v)}_accumulator",
                )
                for v in var_list
            ]
            n = len(var_list)
            # 1 where the variable got a gradient in the open window.
            self._seen = self.add_variable(shape=(n,), dtype="int32", name="seen")
            self._window_weight = self.add_variable(shape=(), dtype=acc_dtype, name="window_weight")
            self._window_steps = self.add_variable(shape=(), dtype="int64", name="window_steps")
            self._micro_steps = self.add_variable(shape=(), dtype="int64", name="micro_steps")
            self._skipped_updates = self.add_variable(
                shape=(), dtype="int64", name="skipped_updates"
            )
            self._last_grad_norm = self.add_variable(
                shape=(), dtype=acc_dtype, name="last_grad_norm"
            )
            if self.use_ema:
                self._ema = [
                    self.add_variable(shape=v.shape, dtype=acc_dtype, name=f"{_var_name(v)}_ema")
                    for v in var_list
                ]
                self._ema_swapped = self.add_variable(shape=(), dtype="int32", name="ema_swapped")
                # Raw weights while the EMA is swapped in. float32 variables
                # trade places with their float32 shadow (no extra memory);
                # others need a copy in their own dtype (a cast would round).
                self._raw_backup = [
                    None
                    if v.dtype == acc_dtype
                    else self.add_variable(
                        shape=v.shape, dtype=v.dtype, name=f"{_var_name(v)}_raw_backup"
                    )
                    for v in var_list
                ]
            else:
                self._ema = []
        # The base class's own bookkeeping; its EMA/accumulators are not built.
        for i, variable in enumerate(var_list):
            self._trainable_variables_indices[self._var_key(variable)] = i
        self._trainable_variables = var_list[:]
        self.built = True

    # ------------------------------------------------------------------- apply
    def apply_gradients(self, grads_and_vars, weight=None):
        """Takes one micro-step: `apply_gradients(zip(grads, vars), weight=None)`.

        Args:
            grads_and_vars: iterable of `(gradient, variable)` pairs; a `None`
                gradient contributes zero for this micro-step.
            weight: optional number or scalar tensor >= 0, this micro-step's
                weight `w` (a sample or token count); defaults to 1.

        Returns:
            `iterations`, the number of updates applied.
        """
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables, weight=weight)
        return self.iterations

    def apply(self, grads, trainable_variables=None, weight=None):
        """Takes one micro-step (see `apply_gradients`)."""
        grads = list(grads)
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
            self._check_variables_are_known(trainable_variables)
            aligned = [None] * len(self._trainable_variables)
            for g, v in zip(grads, trainable_variables):
                aligned[self._get_variable_index(v)] = g
        if isinstance(weight, (int, float, np.number)) or weight is None:
            weight = _core.validate_weight(weight)
        if weight is not None:
            weight = tf.cast(weight, self.accumulator_dtype)

        if tf.executing_eagerly() and self.jit_compile:
            finite = self._call_jitted(aligned, weight)
        elif tf.executing_eagerly():
            finite = self._micro_step(aligned, weight)
        else:
            if self.on_nonfinite == "raise" and _in_xla_context():
                raise RuntimeError(
                    "`on_nonfinite='raise'` cannot raise inside an XLA-compiled "
                    "function (XLA drops the check). Compile the model with "
                    "`jit_compile=False`, or use `on_nonfinite='skip'`. "
                    "Received: on_nonfinite='raise'"
                )
            self._micro_step(aligned, weight, assert_finite=True)
            return
        if self.on_nonfinite == "raise" and not bool(finite):
            raise FloatingPointError(
                f"on_nonfinite='raise': non-finite gradient at micro-step "
                f"{int(self._micro_steps.numpy()) + 1} (window position "
                f"{int(self._window_steps.numpy()) + 1} of {self.merge_grad}); "
                "nothing was accumulated."
            )

    def _call_jitted(self, aligned, weight):
        if self._jit_step is None:
            self._jit_step = tf.function(self._micro_step, jit_compile=True)
        try:
            return self._jit_step(aligned, weight)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            # XLA refuses some ops (sparse gradients, some custom kernels); it
            # refuses before running anything, so no state has moved.
            if "XLA" not in str(e) and "xla" not in str(e) and "compil" not in str(e):
                raise
            warnings.warn(
                f"AccumOptimizer '{self.name}': XLA could not compile the step, "
                f"so it runs as a plain tf.function from now on ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}).",
                stacklevel=3,
            )
            self._jit_step = tf.function(self._micro_step)
            return self._jit_step(aligned, weight)

    def update_step(self, gradient, variable, learning_rate):
        """Adds one (weighted) gradient into `variable`'s accumulator.

        The inner optimizer does the real update, once per window; this is
        the per-variable work of a micro-step.
        """
        acc = self._accumulators[self._get_variable_index(variable)]
        acc.assign_add(tf.cast(gradient, acc.dtype))

    def _micro_step(self, grads, weight, assert_finite=False):
        """One micro-step, traceable: accumulate, then `cond` on the window.

        `grads` is aligned with the built variables (None where absent).
        Returns whether this micro-step's gradients were finite ("raise"
        policy), else True.
        """
        finite = tf.constant(True)
        if self.on_nonfinite == "raise":
            finite = _all_finite(
                [
                    g if g is None or weight is None else tf.cast(g, weight.dtype) * weight
                    for g in grads
                ]
            )
            if assert_finite:
                tf.debugging.Assert(
                    finite,
                    [
                        "on_nonfinite='raise': non-finite gradient at micro-step",
                        self._micro_steps + 1,
                    ],
                )
            tf.cond(finite, lambda: _no_output(self._accumulate(grads, weight)), lambda: None)
        else:
            self._accumulate(grads, weight)
        return finite

    def _accumulate(self, grads, weight):
        present = tuple(g is not None for g in grads)
        for g, v in zip(grads, self._trainable_variables):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            g = tf.cast(g, self.accumulator_dtype)
            self.update_step(g if weight is None else g * weight, v, None)
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
        tf.cond(
            self._window_steps >= self.merge_grad,
            lambda: _no_output(self._update(present)),
            lambda: None,
        )

    # ------------------------------------------------------------------ update
    def _update(self, present):
        """Closes the window: merge, check, clip, one inner step, EMA, reset.

        `present[i]` is True when variable i is known (at trace time) to have
        a gradient in this window; otherwise `_seen` decides at run time.
        """
        if self.reduction == "mean":
            merged = [acc / self._window_weight for acc in self._accumulators]
        else:
            merged = [tf.identity(acc) for acc in self._accumulators]
        # Never-seen accumulators are exactly zero: they add nothing to the norm.
        norm = _global_norm(merged)
        self._last_grad_norm.assign(norm)
        if self.on_nonfinite == "skip":
            tf.cond(
                _all_finite(merged),
                lambda: self._apply_merged(merged, present),
                lambda: _no_output(self._skipped_updates.assign_add(1)),
            )
        else:
            self._apply_merged(merged, present)
        for acc in self._accumulators:
            # Reset by assignment, never by subtraction or scaling: one inf
            # must not turn later windows into NaN.
            acc.assign(tf.zeros_like(acc))
        self._seen.assign(tf.zeros_like(self._seen))
        self._window_weight.assign(tf.zeros_like(self._window_weight))
        self._window_steps.assign(tf.zeros_like(self._window_steps))

    def _clip(self, merged):
        cfg = self._config
        if cfg.clipvalue is not None:
            merged = [tf.clip_by_value(g, -cfg.clipvalue, cfg.clipvalue) for g in merged]
        if cfg.clipnorm is not None:
            merged = [g * cfg.clipnorm / tf.maximum(tf.norm(g), cfg.clipnorm) for g in merged]
        elif cfg.global_clipnorm is not None:
            c = cfg.global_clipnorm
            scale = c / tf.maximum(_global_norm(merged), c)
            merged = [g * scale for g in merged]
        return merged

    def _apply_merged(self, merged, present):
        inner = self.inner_optimizer
        merged = self._clip(merged)
        variables = self._trainable_variables
        grads = [tf.cast(g, v.dtype) for g, v in zip(merged, variables)]
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
        inner.apply(grads, variables)
        for i, group, values in kept:

            def _restore(group=group, values=values):
                for x, value in zip(group, values):
                    x.assign(value)
                return None

            tf.cond(self._seen[i] > 0, lambda: None, _restore)
        if self.use_ema:
            self._update_ema()
        return None

    def _update_ema(self):
        """`ema = m * ema + (1 - m) * var` after an update (`iterations` already stepped)."""
        cfg = self._config
        dtype = self.accumulator_dtype
        n = tf.cast(self.iterations, dtype) - 1.0  # updates before this one
        m = tf.constant(cfg.ema_momentum, dtype)
        if cfg.ema_warmup:
            m = tf.minimum(m, (1.0 + n) / (10.0 + n))
        m = tf.where(n > 0, m, tf.zeros_like(m))
        for ema, v in zip(self._ema, self._trainable_variables):
            ema.assign(m * ema + (1.0 - m) * _stored_value(v, dtype))
        f = cfg.ema_overwrite_frequency
        if f is not None:
            tf.cond(
                tf.equal(self.iterations % f, 0),
                self._overwrite_with_ema,
                lambda: None,
            )

    def _overwrite_with_ema(self):
        for ema, v in zip(self._ema, self._trainable_variables):
            v.assign(tf.cast(ema, v.dtype))
        return None

    # ------------------------------------------------------------------- flush
    def flush(self):
        """Applies the open window now, with its true divisor (`window_weight`).

        An empty window does nothing. Call it at the end of training (or of an
        epoch) when the number of micro-batches is not a multiple of
        `merge_grad`; until then the open window stays in the saved state.

        Returns:
            True if an update was made (or skipped by the non-finite policy),
            else False. Inside a `tf.function`, the flush is traced and this
            returns None.
        """
        if not self.built:
            return False
        if not tf.executing_eagerly():
            n = len(self._trainable_variables)
            tf.cond(self._window_steps > 0, lambda: self._update((False,) * n), lambda: None)
            return None
        if int(self._window_steps.numpy()) == 0:
            return False
        present = tuple(bool(s) for s in self._seen.numpy())
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
        """The float32 EMA shadows, one per trainable variable (empty without EMA)."""
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
        saved = bytes(np.asarray(store[_SIGNATURE_KEY], dtype=np.uint8)).decode("utf-8")
        _core.check_state_signature(saved, self._signature)
        n_saved = len(keys) - 1
        variables = self.variables
        if n_saved != len(variables):
            raise ValueError(
                f"Cannot load optimizer state into AccumOptimizer '{self.name}': "
                f"it has {len(variables)} variables, the saved state {n_saved} "
                "(build the optimizer on the same model first; nothing was loaded)."
            )
        values = [np.asarray(store[str(i)]) for i in range(n_saved)]
        for v, value in zip(variables, values):
            if tuple(v.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load optimizer state: variable '{v.path}' has shape "
                    f"{tuple(v.shape)}, the saved value {tuple(value.shape)} "
                    "(nothing was loaded)."
                )
        for v, value in zip(variables, values):
            v.assign(value)
        # Saved while the EMA was swapped in: the model's weights just loaded
        # are the EMA, the raw ones sit in our state. Keras loads the model's
        # weights before its optimizer's, so put the raw ones back now and
        # training resumes from them.
        if self.use_ema:
            self._restore_raw_weights()

    def get_config(self):
        config = {
            "name": self.name,
            "optimizer": serialization_lib.serialize_keras_object(self.inner_optimizer),
            "jit_compile": self.jit_compile,
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
    for feature, off in checks:
        value = getattr(optimizer, feature, off)
        if value != off and value is not None:
            raise _core.inner_feature_error(feature, value)
    if optimizer.built:
        raise ValueError(
            "`optimizer` must not be built yet: AccumOptimizer builds it on the "
            f"variables it trains. Received: optimizer={optimizer!r} (built)"
        )
    return optimizer


def _slots_by_variable(inner, var_list):
    """The inner optimizer's per-variable slots, as lists indexed like `var_list`.

    Keras optimizers keep each kind of slot in a list indexed by
    `_get_variable_index(variable)` (`_momentums[i]`, Adafactor's `_r[i]`):
    every attribute that is such a list of variables is taken. Global state
    (the step counter, Nadam's `_u_product`) is not per-variable and is left
    out on purpose.
    """
    n = len(var_list)
    own = {id(v) for v in var_list}
    slots = [[] for _ in range(n)]
    for name, value in sorted(vars(inner).items()):
        if name in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != n or not any(isinstance(x, keras.Variable) for x in value):
            continue
        if not all(x is None or isinstance(x, keras.Variable) for x in value):
            continue
        for i, x in enumerate(value):
            if x is not None and id(x) not in own:
                slots[i].append(x)
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


def _no_output(_):
    # `tf.cond` branches must return the same structure: ours return nothing.
    return None


def _all_finite(tensors):
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def _global_norm(tensors):
    squares = [tf.reduce_sum(tf.square(t)) for t in tensors]
    return tf.sqrt(tf.add_n(squares))
