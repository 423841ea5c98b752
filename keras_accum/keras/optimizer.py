"""`AccumOptimizer`: exact gradient accumulation, EMA and clipping for Keras 3.

The wrapper owns accumulation, clipping, the non-finite policy and the EMA of
weights; the inner optimizer runs with all of those off and is called exactly
once per update, so its state, step counter, weight decay and learning-rate
schedule advance once per update (docs/semantics.md, points 1 to 13).

This module is the public class: construction, configuration, building, the
micro-step's entry points and the EMA and saving API. Each rule of the
contract lives in one module beside it, written once in `keras.ops`:

- `_window`: the accumulators and counters, what a micro-step adds;
- `_close`: closing a window (merge, check, clip, one inner step, or a skip);
- `_functional`: the norms, the finite check and clipping;
- `_ema`: the EMA of the weights and swapping it in;
- `_state`: the saved state's layout and its all-or-nothing load;
- `_loss_scale`: cooperation with a wrapping `LossScaleOptimizer`.

How a backend runs those steps (tracing, compiling an eager micro-step,
tf.distribute, JAX's stateless scopes) is `_backend`'s, one file per backend.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import keras
import numpy as np
from keras import ops
from keras.src.saving import serialization_lib

from keras_accum import _core
from keras_accum.keras import _close, _ema, _loss_scale, _state, _window
from keras_accum.keras._backend import host_value, plumbing_for
from keras_accum.keras._seed_api import _SeedAPIMixin


class _HostSide:
    """What the host keeps between eager micro-steps.

    A plain object: Keras tracks every attribute set on an optimizer (a list
    set there becomes a tracked wrapper, about 20 µs a time), and these are
    set on every micro-step.
    """

    __slots__ = ("window_steps", "followed", "alignment", "shapes")

    def __init__(self):
        self.window_steps = None  # `window_steps` as the host last knew it; None: read it
        # False once a step ran that the host cannot follow (a traced one,
        # which a cached function reruns unseen, or one on values): from
        # then on every eager micro-step reads the position from the state.
        self.followed = True
        self.alignment = None  # the variables of the last call, and their indices
        self.shapes = []  # the built variables' shapes, as tuples


@keras.saving.register_keras_serializable(package="keras_accum")
class AccumOptimizer(_SeedAPIMixin, keras.optimizers.Optimizer):
    """Wraps a Keras optimizer with exact gradient accumulation, EMA and clipping.

    Each call of `apply_gradients` (a micro-step) adds the gradients into
    accumulators (float32, float64 for float64 variables); every
    `merge_grad`-th call (an update) hands the merged gradient to the inner
    optimizer, once:

        acc_i     += w * g_i                       (each micro-step, weight w)
        merged_i   = acc_i / sum(w)                (reduction="mean")
                   = acc_i                         (reduction="sum")
        merged     = clip(merged)                  (clipvalue, then clipnorm or
                                                    global_clipnorm)
        inner.apply(merged)                        (once per update)
        ema_i      = m * ema_i + (1 - m) * var_i   (after each update only)

    It runs on every Keras 3 backend (TensorFlow, JAX, torch): in
    `model.fit`, in custom loops calling `apply_gradients`, and on JAX in a
    jitted step calling `stateless_apply`; all of its state is in
    `variables`. With equal micro-batches and `w = 1`, training with
    `merge_grad=k` on batches of `b` equals training on batches of `k * b`,
    for every inner optimizer, learning-rate schedule included.

    Custom loops written for the tf.keras experimental optimizer keep working
    (TensorFlow backend): `minimize`, `compute_gradients` and
    `aggregate_gradients` are here, each going through `apply_gradients`;
    `from_config` reads that era's configs; `from_keras_optimizer` converts
    an optimizer that uses Keras's own `gradient_accumulation_steps`/
    `use_ema`. Subclass it as any Keras optimizer: `update_step` is the
    per-variable work of a micro-step (docs/subclassing.md).

    TensorFlow backend only: under `tf.distribute` (`MirroredStrategy`,
    `MultiWorkerMirroredStrategy`) each replica adds into its own
    accumulators with no communication, and the update sums them across
    replicas once and takes every decision once, on that sum (create the
    optimizer inside `strategy.scope()`; `weight` is the micro-step's global
    weight). Sparse gradients (`tf.IndexedSlices`) are scatter-added into the
    dense accumulator. On JAX, `keras.distribution` places the accumulators
    and the EMA with their variables' layouts.

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
        jit_compile: bool, compile the eager micro-step of custom loops.
            TensorFlow: with XLA, and only where a GPU or TPU is present
            (as the tf.keras optimizers did: on a CPU, XLA is slower than
            TensorFlow's own kernels); JAX: with `jax.jit`, on every device;
            torch: no effect. Inside `model.fit` or a user's `tf.function` /
            `jax.jit`, the caller's compilation decides. Defaults to True.
        loss_scale_factor: float > 0 or None, a fixed loss scale: `model.fit`
            multiplies the loss by it (`scale_loss`) and each micro-step
            divides its gradients by it before accumulating. Defaults to None.
        name: str, the optimizer's name.

    Raises:
        TypeError: an argument of the wrong kind (`merge_grad="4"`, an
            `optimizer` that is not an optimizer).
        ValueError: a bad value, or an inner optimizer that already does
            accumulation, EMA, clipping or loss scaling.
        RuntimeError: Keras runs a backend other than TensorFlow, JAX or torch.

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
        plumbing = plumbing_for(self)
        super().__init__(learning_rate=0.0, name=name, loss_scale_factor=loss_scale_factor)
        self._config = config
        self.inner_optimizer = inner
        self._jit_compile_requested = jit_compile
        # The base class keeps these names for its own EMA/clipping, which
        # never runs here (we override `apply`); Keras callbacks read them.
        self.use_ema = config.use_ema
        self.ema_momentum = config.ema_momentum
        self.ema_overwrite_frequency = config.ema_overwrite_frequency
        self.clipnorm = config.clipnorm
        self.clipvalue = config.clipvalue
        self.global_clipnorm = config.global_clipnorm
        self._signature = _state.signature(config, inner)
        self._host = _HostSide()
        self._window_starts = False  # True: the adds of a window's first micro-step write
        self._loss_scaler_ref = None
        self._pending_loss_scale = None
        self._flush_before_finalize = False  # set by `FlushWindow(on="train_end")`
        self._plumbing = plumbing
        self.jit_compile = plumbing.resolve_jit_compile(jit_compile)
        plumbing.attach()

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

    def __repr__(self) -> str:
        defaults = _core.AccumConfig().to_dict()
        parts = [f"name={self.name}", f"optimizer={type(self.inner_optimizer).__name__}"]
        parts += [f"{k}={v!r}" for k, v in self._config.to_dict().items() if v != defaults[k]]
        return f"<{type(self).__name__} {', '.join(parts)}>"

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
        """The inner optimizer's state, then ours: each variable once.

        `variables[0]` is the inner step counter (`iterations`), as Keras
        code expects of an optimizer.
        """
        if not self.built:
            return list(self.inner_optimizer.variables)
        return list(self.inner_optimizer.variables) + _state.own_variables(self)

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
        """The values of `variables` (the inner optimizer's state, then ours), as NumPy arrays."""
        self._check_built("get_weights")
        return [np.array(v.numpy()) for v in self.variables]

    def set_weights(self, weights):
        """Sets inner and own state from a `get_weights()` list; all or nothing.

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
                f"`optimizer.variables` (the inner optimizer's state, then ours). "
                f"Received: {len(weights)} arrays"
            )
        values = [np.asarray(w) for w in weights]
        for i, (v, value) in enumerate(zip(variables, values)):
            if tuple(v.shape) != tuple(value.shape) or not _state.loadable(value, v.dtype):
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
        return _to_int(self._window_steps) + 1 >= self.merge_grad

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
        variable is mirrored and only written in cross-replica context. Under
        a `keras.distribution` layout (JAX), accumulators and EMA shadows take
        their variable's layout.
        """
        if self.built:
            return
        var_list = list(var_list)
        plumbing = self._plumbing
        with plumbing.building(var_list):
            plumbing.build_inner(var_list)
            _window.build(self, var_list)
            _close.build(self, var_list)
            _ema.build(self, var_list)
        # The base class's own bookkeeping; its EMA/accumulators are not built.
        for i, variable in enumerate(var_list):
            self._trainable_variables_indices[self._var_key(variable)] = i
        self._trainable_variables = var_list[:]
        # Unknown, not 0: a checkpoint restored before the build fills the
        # variables made here (a mid-window state), after its restore hook.
        self._host.window_steps = None
        self._host.shapes = [tuple(v.shape) for v in var_list]
        self.built = True

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
            skip_gradients_aggregation: bool (TensorFlow). Under a strategy of
                `n` replicas, True means the gradients were already summed
                across replicas by the caller (as with `aggregate_gradients`),
                so each replica adds `g / n` and the once-per-update sum gives
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
        plumbing = self._plumbing
        grads = self._checked_gradients(grads)
        plumbing.before_step()
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
                # In the building context (TensorFlow: lifted out of a traced
                # function), a subclass's own `build` variables too.
                with (
                    keras.name_scope(self.name, caller=self),
                    plumbing.building(trainable_variables),
                ):
                    self.build(trainable_variables)
            aligned = [None] * len(self._trainable_variables)
            for g, i in zip(grads, self._indices_of(trainable_variables)):
                aligned[i] = g
        aligned = plumbing.gradients(aligned)
        self._check_gradient_shapes(aligned)
        weight = self._checked_weight(weight)
        plumbing.check_replica_context()
        aligned = plumbing.share_of_replica(aligned, skip_gradients_aggregation)

        if plumbing.traced():
            # The caller traces: one graph serves every micro-step, and the
            # window decision is taken at run time on the step counter.
            plumbing.check_traced_call()
            if self._raise_checked():
                plumbing.check_traced_raise()
            self._stop_following()
            plumbing.traced_step(
                lambda: self._micro_step(aligned, weight, assert_finite=True, closes=None)
            )
            return
        if plumbing.in_replica_context_of_strategy():
            finite = self._micro_step(aligned, weight)  # eager `strategy.run`
        else:
            finite = self._eager_micro_step(aligned, weight)
        if self._raise_checked() and not _to_bool(finite):
            raise FloatingPointError(
                f"on_nonfinite='raise': non-finite gradient at micro-step "
                f"{_to_int(self._micro_steps) + 1} (window position "
                f"{_to_int(self._window_steps) + 1} of {self.merge_grad}); "
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

    def _check_gradient_shapes(self, grads):
        """A gradient must have its variable's shape (or one compatible, while tracing)."""
        for g, v, shape in zip(grads, self._trainable_variables, self._host.shapes):
            if g is None:
                continue
            g_shape = self._plumbing.gradient_shape(g)
            if g_shape is None or g_shape == shape:
                continue
            if len(g_shape) != len(shape) or any(
                a is not None and a != b for a, b in zip(g_shape, shape)
            ):
                raise ValueError(
                    f"Each gradient must have its variable's shape: variable '{v.path}' has "
                    f"shape {tuple(v.shape)}. Received: gradient of shape "
                    f"{tuple(None if a is None else int(a) for a in g_shape)}"
                )

    def _checked_weight(self, weight):
        """`weight` as a scalar tensor of the accumulator dtype, or None; checked.

        A number or an eager tensor is checked here, before anything moves; a
        traced tensor gets a traced check where the backend has one (XLA and
        `jax.jit` drop it: there a negative weight cannot be caught).
        """
        if weight is None or isinstance(weight, (bool, int, float, np.number)):
            weight = _core.validate_weight(weight)
            if weight is None:
                return None
            return ops.convert_to_tensor(weight, self.accumulator_dtype)
        return self._plumbing.weight(weight, self.accumulator_dtype)

    def _eager_micro_step(self, aligned, weight):
        """An eager micro-step: the host knows whether it opens or closes the window.

        So the backend runs exactly the step that is due: a micro-step inside
        a window only accumulates (no conditional that a compiler would make
        write back every variable the update could touch); the window's first
        one writes instead of adding (the update the host ran left the
        accumulators at zero); the closing one updates. With `merge_grad=1`
        every micro-step updates, as the inner optimizer alone does.
        """
        position = self._host.window_steps
        known = position is not None
        if not known:  # after a load, a restore, a traced call
            position = _to_int(self._window_steps)
        closes = position + 1 >= self.merge_grad
        starts = (not closes) and known and position == 0 and self._own_update_step()
        try:
            finite = self._plumbing.eager_step(self._micro_step, closes, starts, aligned, weight)
        except BaseException:
            self._host.window_steps = None
            raise
        if self._raise_checked() and not _to_bool(finite):
            self._host.window_steps = position if known else None
        elif self._host.followed:
            self._host.window_steps = 0 if closes else position + 1
        return finite

    def _stop_following(self):
        """A step the host cannot follow ran: it reads the position from now on."""
        self._host.window_steps = None
        self._host.followed = False

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
        return [None if g is None else self._plumbing.scale(g, 1.0 / factor) for g in grads]

    def _forget_window_position(self):
        """The state was set from outside a step (a load, a restore): read it again."""
        self._host.window_steps = None

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
        return self.on_nonfinite == "raise" and _loss_scale.scaler(self) is None

    def update_step(self, gradient, variable, learning_rate):
        """Adds one (weighted) gradient into `variable`'s accumulator.

        The inner optimizer does the real update, once per window; this is
        the per-variable work of a micro-step, on this replica's accumulator.
        `gradient` is this micro-step's `w * g`, already cast to the
        accumulator dtype; `learning_rate` is None.
        """
        _window.add(self, gradient, variable)

    def _micro_step(self, grads, weight, assert_finite=False, closes=None, starts=False):
        """One micro-step: accumulate here, decide once for all replicas.

        `grads` is aligned with the built variables (None where absent).
        `closes`: None to decide at run time (a graph that serves every
        micro-step), True or False when the caller knows. `starts`: True when
        the caller knows the accumulators hold zeros (the window's first
        micro-step), None to decide at run time. Returns whether this
        micro-step's gradients were finite ("raise" policy), else True.
        """
        plumbing = self._plumbing
        present = tuple(g is not None for g in grads)
        # An update run op by op (eagerly) is all or nothing: its sums are
        # formed, not written, and the scalars it writes before the inner
        # step are put back if anything raises (`_close.all_or_nothing`).
        op_by_op = closes is True and not plumbing.traced() and self._own_update_step()
        pending = _window.pending_sums(self, grads, weight) if op_by_op else None
        if self._raise_checked():
            from keras_accum.keras import _functional as F

            finite = F.all_finite(
                [None if g is None else _weighted(plumbing, g, weight) for g in grads]
            )
            if assert_finite:
                plumbing.assert_finite(finite, self._micro_steps.value + 1)
            if not op_by_op:
                plumbing.run_if(finite, lambda: _window.accumulate(self, grads, weight, starts))
        else:
            finite = ops.convert_to_tensor(True)
            if not op_by_op:
                _window.accumulate(self, grads, weight, starts)

        def decide(weight, finite):
            if self._raise_checked():
                plumbing.run_if(
                    finite, lambda: self._count_or_close(present, weight, closes, pending)
                )
            else:
                self._count_or_close(present, weight, closes, pending)

        with _close.all_or_nothing(self) if op_by_op else contextlib.nullcontext():
            plumbing.in_cross_replica_context(decide, weight, finite)
        return finite

    def _count_or_close(self, present, weight, closes, pending=None):
        """Counts the micro-step, then closes the window if it is due (cross-replica)."""
        _window.count(self, present, weight)
        if closes is None:  # decided at run time
            closes = self._window_steps.value >= self.merge_grad
        if closes is not False:
            _close.close(self, present, closes, pending)

    # --------------------------------------------------------------- stateless
    def stateless_apply(
        self, optimizer_variables, grads, trainable_variables, weight=None, axis_name=None
    ):
        """One micro-step on values, for a jitted JAX step: returns the new values.

        As Keras's `stateless_apply` (what `model.fit` calls on JAX), with the
        micro-step's `weight`: `optimizer_variables` pairs with `variables` and
        `trainable_variables` with the variables the optimizer was built on,
        by position; nothing is assigned.

        Args:
            optimizer_variables: list of tensors, the values of `variables`.
            grads: list of gradients, one per built variable (None allowed).
            trainable_variables: list of tensors, the model's trainable values.
            weight: optional micro-step weight (see `apply_gradients`).
            axis_name: JAX only: the data axis of a `jax.shard_map` this step
                runs in. `grads` are then this device's own (its gradient of
                its own mean loss, not reduced), each accumulator in
                `optimizer_variables` is this device's row (see
                `split_window`), and the window is averaged over the axis
                once, at the update: a micro-step that does not update
                communicates nothing. `weight` is the micro-step's global
                weight, the same on every device.

        Returns:
            `(trainable_variables, optimizer_variables)`, the new values.

        Example:

        ```python
        # backend: jax (a whole program, run with KERAS_BACKEND=jax)
        import jax
        import keras
        import numpy as np

        from keras_accum import AccumOptimizer

        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
        opt = AccumOptimizer(keras.optimizers.Adam(1e-3), merge_grad=4)
        opt.build(model.trainable_variables)

        def loss_of(train_values, x, y):
            y_pred, _ = model.stateless_call(train_values, [], x)
            return keras.ops.mean((y_pred - y) ** 2)

        def train_step(opt_values, train_values, x, y):
            grads = jax.grad(loss_of)(train_values, x, y)
            train_values, opt_values = opt.stateless_apply(opt_values, grads, train_values)
            return opt_values, train_values

        step = jax.jit(train_step, donate_argnums=(0, 1))  # updated in place
        state = ([v.value for v in opt.variables], [v.value for v in model.trainable_variables])
        x = np.random.default_rng(0).normal(size=(32, 10)).astype("float32")
        for i in range(0, 32, 8):  # 4 micro-batches of 8: one update
            state = step(*state, x[i : i + 8], x[i : i + 8, :1])
        print(int(state[0][0]), "update")  # variables[0] is `iterations`
        ```
        """
        return self._stateless(
            lambda: self.apply(grads, weight=weight),
            optimizer_variables,
            trainable_variables,
            axis_name,
        )

    def split_window(self, optimizer_variables, num_devices):
        """The values of `variables` for steps taking `stateless_apply(..., axis_name=...)`.

        Each accumulator gets a leading axis of `num_devices` rows, one per
        device of the data axis, each holding the open window's sums (the
        update averages the rows); the other values are returned as given.
        `window_specs` gives `shard_map` their partition specs;
        `join_window` goes back.

        Args:
            optimizer_variables: list of tensors, the values of `variables`.
            num_devices: int, the size of the data axis.

        Returns:
            The list of values, accumulators split.

        Example (a `jax.shard_map` step over two devices; the micro-steps
        that do not update communicate nothing, the update all-reduces once):

        ```python
        # backend: jax (a whole program, run with KERAS_BACKEND=jax)
        import os

        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # 2 CPU devices
        import jax
        import jax.numpy as jnp
        import keras
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from keras_accum import AccumOptimizer

        mesh = jax.make_mesh((2,), ("batch",))
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
        opt = AccumOptimizer(keras.optimizers.Adam(1e-3), merge_grad=4)
        opt.build(model.trainable_variables)
        specs = opt.window_specs("batch")

        def loss_of(train_values, x, y):
            y_pred, _ = model.stateless_call(train_values, [], x)
            return jnp.mean((y_pred - y) ** 2)  # this device's own mean loss

        def train_step(opt_values, train_values, x, y):
            grads = jax.grad(loss_of)(train_values, x, y)  # not reduced
            train_values, opt_values = opt.stateless_apply(
                opt_values, grads, train_values, axis_name="batch"
            )
            return opt_values, train_values

        step = jax.jit(
            jax.shard_map(
                train_step,
                mesh=mesh,
                in_specs=(specs, P(), P("batch"), P("batch")),
                out_specs=(specs, P()),
                check_vma=False,  # the gradients stay this device's own
            ),
            donate_argnums=(0, 1),
        )

        def put(value, spec):  # a host copy: the donated step owns its buffers
            return jax.device_put(np.asarray(value), NamedSharding(mesh, spec))

        split = opt.split_window([v.value for v in opt.variables], num_devices=2)
        opt_values = [put(v, s) for v, s in zip(split, specs)]
        train_values = [put(v.value, P()) for v in model.trainable_variables]
        x = np.random.default_rng(0).normal(size=(32, 10)).astype("float32")
        for i in range(0, 32, 8):  # 4 micro-batches of 8, 4 rows per device: one update
            batch = put(x[i : i + 8], P("batch")), put(x[i : i + 8, :1], P("batch"))
            opt_values, train_values = step(opt_values, train_values, *batch)
        # Back to the layout of `variables` (to assign, save or flush):
        for v, value in zip(opt.variables, opt.join_window(opt_values)):
            v.assign(value)
        print(int(opt.iterations), "update")
        ```
        """
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(
                f"`num_devices` must be an int >= 1. Received: num_devices={num_devices!r}"
            )
        return _window.split(self, optimizer_variables, num_devices)

    def join_window(self, optimizer_variables):
        """The values of `variables` from those `split_window` made: each accumulator's rows
        averaged, as the update averages them (the values to assign, save or flush).

        Args:
            optimizer_variables: list of tensors, split values of `variables`.

        Returns:
            The list of values, accumulators joined.
        """
        return _window.join(self, optimizer_variables)

    def window_specs(self, axis_name):
        """`jax.sharding.PartitionSpec`s of split `variables`, for `shard_map`'s specs.

        The accumulators split over `axis_name` by their leading axis; every
        other value replicated.

        Args:
            axis_name: the data axis's name in the mesh.

        Returns:
            A list of `PartitionSpec`, one per entry of `variables`.
        """
        self._check_built("window_specs")
        return self._plumbing.window_specs(_window.split_entries(self), axis_name)

    def stateless_flush(self, optimizer_variables, trainable_variables):
        """`flush()` on values, for a jitted JAX step: returns the new values.

        Args:
            optimizer_variables: list of tensors, the values of `variables`.
            trainable_variables: list of tensors, the model's trainable values.

        Returns:
            `(trainable_variables, optimizer_variables)`, the new values (the
            same values when the window is empty).
        """
        return self._stateless(self.flush, optimizer_variables, trainable_variables)

    def _stateless(self, run, optimizer_variables, trainable_variables, axis_name=None):
        self._plumbing.check_stateless(self)
        if not self.built:
            raise ValueError(
                f"`stateless_apply` needs a built optimizer: call "
                f"`optimizer.build(trainable_variables)` first ('{self.name}' is not built)."
            )
        variables = self.variables
        _window.check_length(self, optimizer_variables)
        if len(trainable_variables) != len(self._trainable_variables):
            raise ValueError(
                "`trainable_variables` must hold one value per variable the optimizer was "
                f"built on ({len(self._trainable_variables)}). Received: "
                f"{len(trainable_variables)} values"
            )
        with self._plumbing.data_axis(axis_name, optimizer_variables):
            if axis_name is not None:
                optimizer_variables = _window.device_row(self, optimizer_variables)
            mapping = list(zip(self._trainable_variables, trainable_variables))
            mapping += list(zip(variables, optimizer_variables))
            # On values the host cannot follow the position (outside `jax.jit`
            # too, the variables are not written).
            self._stop_following()
            with keras.StatelessScope(state_mapping=mapping) as scope:
                run()
        new_values = [scope.get_current_value(v) for v in variables]
        if axis_name is not None:
            new_values = _window.as_device_row(self, new_values)
        return [scope.get_current_value(v) for v in self._trainable_variables], new_values

    # ------------------------------------------------------------------- flush
    def flush(self):
        """Applies the open window now, with its true divisor (`window_weight`).

        An empty window does nothing. Call it at the end of training (or of an
        epoch) when the number of micro-batches is not a multiple of
        `merge_grad`; until then the open window stays in the saved state.
        Under a strategy, call it in cross-replica context (outside
        `strategy.run`), as `model.fit`'s callbacks are.

        Returns:
            True if the window held micro-steps (it was applied, skipped by
            the non-finite policy, or, its weights summing to 0, emptied),
            False for an empty window. Inside a traced function this returns
            None.
        """
        if not self.built:
            return False
        self._host.window_steps = None
        plumbing = self._plumbing
        if plumbing.traced():
            self._stop_following()
            n = len(self._trainable_variables)

            def traced():
                _close.close(self, (False,) * n, self._window_steps.value > 0)

            plumbing.in_cross_replica_context(traced)
            return None
        if _to_int(self._window_steps) == 0:
            return False
        present = tuple(bool(s) for s in host_value(self._seen))
        with plumbing.strategy_scope(), _close.all_or_nothing(self):
            plumbing.eager_close(lambda: _close.close(self, present))
        return True

    # --------------------------------------------------------------------- EMA
    def finalize_variable_values(self, var_list):
        """Writes the EMA into the model's variables (`model.fit` calls this at the end).

        Nothing is written before the first update (there is no average yet).
        A `FlushWindow(on="train_end")` in `fit` has the open window applied
        first. Nothing is done when the state is out of the variables (JAX's
        `fit` calls this even when its first train step raised, which leaves
        it out): the error that stopped training is the one raised.
        """
        if not self.built or self._plumbing.held_elsewhere(self.variables):
            return
        if self._flush_before_finalize:
            self._flush_before_finalize = False
            self.flush()
        if self.use_ema:
            _ema.finalize(self, var_list)

    @property
    def ema_variables(self):
        """The EMA shadows, one per trainable variable (empty without EMA).

        float32 (`accumulator_dtype`), or the variable's dtype where wider.
        Before the first update they hold zeros: there is no average yet
        (`swap_in_ema()` then shows the raw weights).
        """
        if self.use_ema and self.built and _ema.swapped(self):
            raise RuntimeError("The EMA is swapped into the model: read the model's variables.")
        return list(self._ema) if self.built else []

    def swap_in_ema(self):
        """Puts the EMA into the model's variables, keeping the raw weights bit-exactly.

        Idempotent. Before the first update there is no average yet, and the
        model keeps its weights. The swap is recorded in the optimizer's
        state, so a model saved to a `.keras` file while swapped resumes
        training from its raw weights (loading puts them back). After
        restoring a `tf.train.Checkpoint` written while swapped, call
        `swap_out_ema()`.
        """
        self._require_ema("swap_in_ema")
        _ema.swap_in(self)

    def swap_out_ema(self):
        """Puts the raw weights back after `swap_in_ema`; a no-op if not swapped."""
        self._require_ema("swap_out_ema")
        _ema.swap_out(self)

    def swap_ema_weights(self):
        """Context manager: the model holds its EMA inside, its raw weights after.

        Example:

        ```python
        with opt.swap_ema_weights():
            model.evaluate(x_val, y_val)
        ```
        """
        self._require_ema("swap_ema_weights")
        return _ema.swapped_in(self)

    def _require_ema(self, what):
        if not self.use_ema:
            raise ValueError(f"`{what}` needs `use_ema=True`. Received: use_ema=False")
        self._check_built(what)

    # ------------------------------------------------------------ saving, config
    def save_own_variables(self, store):
        """Saves `variables` and the state signature (a `.keras` file's optimizer entry)."""
        _state.save(self, store)

    def load_own_variables(self, store):
        """Loads state saved by `save_own_variables`; raises instead of skipping.

        Raises:
            ValueError: the state was saved by a differently configured
                optimizer, or holds another number or shape of variables.
                Nothing is assigned in that case.
        """
        _state.load(self, store)
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
            _ema.swap_out(self)

    def get_config(self):
        config = {
            "name": self.name,
            "optimizer": serialization_lib.serialize_keras_object(self.inner_optimizer),
            "jit_compile": self._jit_compile_requested,
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


def _to_int(variable) -> int:
    return int(host_value(variable))


def _to_bool(value) -> bool:
    return bool(host_value(value))


def _weighted(plumbing, gradient, weight):
    """The values a micro-step adds, for the "raise" check."""
    values = plumbing.values(gradient)
    if weight is None:
        return values
    return ops.cast(values, weight.dtype) * weight


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


_loss_scale.install()
