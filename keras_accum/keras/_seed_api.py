"""The tf.keras experimental Optimizer methods (TF 2.9 to 2.15) on `AccumOptimizer`.

Keras 3 dropped `minimize`, `compute_gradients` and `aggregate_gradients`,
and refuses the configs that era wrote (`is_legacy_optimizer`, `jit_compile`
on every optimizer). Custom training loops written against that API still
call them; `_SeedAPIMixin` gives them back on `AccumOptimizer`, each going
through `apply_gradients`, so accumulation, clipping and EMA hold as usual.
It also converts an optimizer that uses Keras 3's own
`gradient_accumulation_steps` / `use_ema` (`from_keras_optimizer`).

The mixin only calls the public methods of the optimizer it is mixed into
(`apply_gradients`, `build`, `save_own_variables`, `load_own_variables`) and
reads the state variables that `AccumOptimizer.build` creates.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_accum.keras._backend import host_value

#: Features the wrapper owns, with their "off" values. A tf.keras-era (or
#: Keras 3) inner optimizer config that turns one on hands it to the wrapper.
_WRAPPER_FEATURES = (
    ("clipnorm", None),
    ("clipvalue", None),
    ("global_clipnorm", None),
    ("use_ema", False),
    ("ema_momentum", 0.99),
    ("ema_overwrite_frequency", None),
)
_EMA_KEYS = ("ema_momentum", "ema_overwrite_frequency")


def _received(name: str, value: Any) -> str:
    return f"Received: {name}={value!r}"


def _is_off(value: Any) -> bool:
    return value is None or value is False or (not isinstance(value, bool) and value == 0)


def _lift(config: dict, key: str, value: Any, default: Any, where: str) -> None:
    """Moves `value` (from the inner optimizer's config) to the wrapper's `key`."""
    if value == default or value is None:
        return
    current = config.get(key, default)
    if current != default and current != value:
        raise ValueError(
            f"`{key}` is set both on the AccumOptimizer ({current!r}) and, differently, "
            f"in {where} ({value!r}): keep one. Received: {key}={current!r} and {value!r}"
        )
    config[key] = value


def _merge_steps(config: dict, steps: Any, where: str) -> None:
    """`gradient_accumulation_steps` (Keras 3) becomes `merge_grad`."""
    if _is_off(steps):
        return
    current = config.get("merge_grad", 1)
    if current not in (1, steps):
        raise ValueError(
            f"`gradient_accumulation_steps={steps!r}` in {where} disagrees with "
            f"`merge_grad={current!r}`: keep one. Received: merge_grad={current!r}"
        )
    config["merge_grad"] = steps


def _drop_legacy_decay(cfg: dict, where: str) -> None:
    decay = cfg.pop("decay", None)
    if not _is_off(decay):
        raise ValueError(
            f"{where} uses the legacy `decay` (a time-based learning-rate decay), which "
            "Keras 3 optimizers do not have: express it as a "
            "`keras.optimizers.schedules.LearningRateSchedule` instead. "
            + _received("decay", decay)
        )


def _tensorflow(what: str):
    """TensorFlow, for the methods of its era; a clear error on another backend."""
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"`{what}` takes a `tf.GradientTape` or a `tf.distribute` replica context: it "
            "exists on Keras's TensorFlow backend only. On this backend compute the "
            "gradients yourself and call `apply_gradients`. Received: backend="
            f"{keras.backend.backend()!r}"
        )
    import tensorflow as tf

    return tf


def _deserialize_optimizer(config: dict, custom_objects):
    """`keras.optimizers.deserialize`, also for the optimizers it does not list.

    Keras 3.15's `deserialize` knows its optimizers from a fixed list that
    lacks `Lamb`: given a Lamb config it returns the string `'Lamb'`. Such a
    class is then found by its module (Keras 3 configs) or its name among
    `keras.optimizers` (older ones).
    """
    from keras.src.saving import serialization_lib

    optimizer = keras.optimizers.deserialize(config, custom_objects=custom_objects)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if "module" in config:
        optimizer = serialization_lib.deserialize_keras_object(
            config, custom_objects=custom_objects
        )
    else:
        cls = getattr(keras.optimizers, str(config.get("class_name")), None)
        if isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer):
            optimizer = cls.from_config(config.get("config", {}))
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "`optimizer` must be a Keras optimizer config that Keras can deserialize. "
            f"Received: optimizer={config!r}"
        )
    return optimizer


def _inner_class_name(name: Any) -> Any:
    # TF 2.11/2.12 wrote the new optimizers as "Custom>Adam".
    if isinstance(name, str) and name.startswith("Custom>"):
        if keras.saving.get_registered_object(name) is None:
            return name[len("Custom>") :]
    return name


class _SeedAPIMixin:
    """`minimize`, `compute_gradients`, `aggregate_gradients`, era-proof configs."""

    # --------------------------------------------------------------- gradients
    def compute_gradients(self, loss, var_list, tape=None):
        """Computes `(gradient, variable)` pairs, as the tf.keras experimental optimizer did.

        Args:
            loss: a scalar tensor recorded by `tape`, or a zero-argument
                callable returning the loss (then it is evaluated under
                `tape`, or under a new tape).
            var_list: list or tuple of variables, or a zero-argument callable
                returning them (for variables created by the first call of
                `loss`).
            tape: `tf.GradientTape`; required when `loss` is a tensor.

        Returns:
            List of `(gradient, variable)` pairs; the gradient is None for a
            variable the loss does not depend on.

        Raises:
            ValueError: a tensor `loss` without `tape`.
            TypeError: a `tape` that is not a `tf.GradientTape`, or a
                `var_list` that is neither a list/tuple nor a callable.

        Example:

        ```python
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads_and_vars = opt.compute_gradients(loss, model.trainable_variables, tape=tape)
        ```
        """
        tf = _tensorflow("compute_gradients")
        if not callable(loss) and tape is None:
            raise ValueError(
                "`tape` is required when a tensor `loss` is passed (the tape that "
                "recorded it); or pass `loss` as a zero-argument callable. "
                f"Received: loss={loss!r}, tape=None"
            )
        if tape is not None and not isinstance(tape, tf.GradientTape):
            raise TypeError("`tape` must be a `tf.GradientTape`. " + _received("tape", tape))
        if not callable(var_list) and not isinstance(var_list, (list, tuple)):
            raise TypeError(
                "`var_list` must be a list or tuple of variables, or a zero-argument "
                "callable returning one. " + _received("var_list", var_list)
            )
        if tape is None:
            tape = tf.GradientTape()
        if callable(loss):
            with tape:
                if not callable(var_list):
                    # The tape knows tf.Variables; a Keras variable wraps one.
                    tape.watch([v.value if isinstance(v, keras.Variable) else v for v in var_list])
                loss = loss()
                if callable(var_list):
                    var_list = var_list()
        elif callable(var_list):
            var_list = var_list()
        var_list = list(var_list)
        grads = tape.gradient(loss, var_list)
        return list(zip(grads, var_list))

    def aggregate_gradients(self, grads_and_vars):
        """Sums the gradients across replicas; the identity on one device.

        Under a `tf.distribute` strategy of several replicas, call it in
        replica context (inside `strategy.run`): each gradient becomes the
        sum of that gradient over all replicas (one all-reduce). Then pass
        the result to `apply_gradients(..., skip_gradients_aggregation=True)`
        so it is not summed again. Without a strategy, or with one replica,
        the pairs come back unchanged. None gradients stay None.

        Args:
            grads_and_vars: iterable of `(gradient, variable)` pairs.

        Returns:
            List of `(gradient, variable)` pairs, the gradients summed over
            replicas.

        Raises:
            RuntimeError: called in cross-replica context under a strategy of
                several replicas.

        Example:

        ```python
        strategy = tf.distribute.get_strategy()  # or the MirroredStrategy you train under

        def step_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x)) / strategy.num_replicas_in_sync
            grads_and_vars = opt.compute_gradients(loss, model.trainable_variables, tape)
            grads_and_vars = opt.aggregate_gradients(grads_and_vars)
            opt.apply_gradients(grads_and_vars, skip_gradients_aggregation=True)

        strategy.run(step_fn, args=(x[:8], y[:8]))
        ```
        """
        grads_and_vars = list(grads_and_vars)
        if keras.backend.backend() != "tensorflow":
            return grads_and_vars  # no tf.distribute: one replica
        tf = _tensorflow("aggregate_gradients")
        if tf.distribute.get_strategy().num_replicas_in_sync == 1:
            return grads_and_vars
        context = tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError(
                f"`aggregate_gradients` of '{self.name}' must be called in replica context "
                "(inside `strategy.run`) under a strategy of several replicas."
            )
        present = [g for g, _ in grads_and_vars if g is not None]
        reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present) if present else [])
        return [(None if g is None else next(reduced), v) for g, v in grads_and_vars]

    def minimize(self, loss, var_list, tape=None, weight=None):
        """Computes the gradients of `loss` and takes one micro-step with them.

        `compute_gradients` followed by `apply_gradients`: with
        `merge_grad=k`, every k-th call updates the variables.

        Args:
            loss: a scalar tensor recorded by `tape`, or a zero-argument
                callable returning the loss.
            var_list: list or tuple of variables, or a zero-argument callable
                returning them.
            tape: `tf.GradientTape`; required when `loss` is a tensor.
            weight: optional micro-step weight (see `apply_gradients`).

        Returns:
            `iterations`, the number of updates applied.

        Raises:
            ValueError, TypeError: as `compute_gradients`, and as
                `apply_gradients`.

        Example:

        ```python
        for xb, yb in micro_batches[:4]:
            opt.minimize(lambda: loss_fn(yb, model(xb)), model.trainable_variables)
        ```
        """
        grads_and_vars = self.compute_gradients(loss, var_list, tape=tape)
        if weight is None:
            return self.apply_gradients(grads_and_vars)
        return self.apply_gradients(grads_and_vars, weight=weight)

    # ------------------------------------------------------------------ config
    @classmethod
    def _kwargs_from_config(cls, config, custom_objects=None) -> dict:
        """Constructor kwargs from a config of any era (see `from_config`).

        `config` is a dict the caller lets us change (`from_config` copies).
        """
        if "optimizer" not in config:
            if "class_name" in config and isinstance(config.get("config"), dict):
                config = {"optimizer": config}  # a bare serialized optimizer
            else:
                raise ValueError(
                    "`config` must be an AccumOptimizer config (with an 'optimizer' "
                    "entry) or a serialized optimizer (with 'class_name' and 'config'). "
                    f"Received: config with keys {sorted(config)}"
                )
        # Keys the tf.keras-era (or Keras 3) base class wrote for the wrapper itself.
        config.pop("is_legacy_optimizer", None)
        _drop_legacy_decay(config, "The AccumOptimizer config")
        # `loss_scale_factor` is AccumOptimizer's own argument (a fixed loss
        # scale, undone per micro-step); `weight_decay` is the inner one's.
        if _is_off(config.get("loss_scale_factor")):
            config.pop("loss_scale_factor", None)
        value = config.pop("weight_decay", None)
        if not _is_off(value):
            raise ValueError(
                "`weight_decay` belongs to the inner optimizer (AccumOptimizer has none of "
                "its own): move it into the 'optimizer' config. "
                + _received("weight_decay", value)
            )
        _merge_steps(config, config.pop("gradient_accumulation_steps", None), "the config")
        outer_lr = config.pop("learning_rate", None)

        inner = config["optimizer"]
        if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
            inner = dict(inner)
            inner["class_name"] = _inner_class_name(inner.get("class_name"))
            cfg = dict(inner["config"])
            where = f"the inner optimizer's config ({inner['class_name']})"
            cfg.pop("is_legacy_optimizer", None)
            _drop_legacy_decay(cfg, where)
            if "lr" in cfg and "learning_rate" not in cfg:  # Keras 2.0-era name
                cfg["learning_rate"] = cfg.pop("lr")
            jit_compile = cfg.pop("jit_compile", None)
            if jit_compile is not None and "jit_compile" not in config:
                config["jit_compile"] = bool(jit_compile)
            _merge_steps(config, cfg.pop("gradient_accumulation_steps", None), where)
            values = {key: cfg.pop(key, default) for key, default in _WRAPPER_FEATURES}
            for key, default in _WRAPPER_FEATURES:
                if key in _EMA_KEYS and not values["use_ema"]:
                    continue  # inert without EMA
                _lift(config, key, values[key], default, where)
            if not _is_off(outer_lr) and outer_lr != cfg.get("learning_rate", outer_lr):
                raise ValueError(
                    f"The config gives the AccumOptimizer a learning rate ({outer_lr!r}) "
                    f"other than its inner optimizer's ({cfg.get('learning_rate')!r}); "
                    "the inner optimizer's is the one used: drop the outer one. "
                    + _received("learning_rate", outer_lr)
                )
            if not _is_off(outer_lr):
                cfg.setdefault("learning_rate", outer_lr)
            schedule = cfg.get("learning_rate")
            if isinstance(schedule, dict) and "module" not in schedule:
                # tf.keras wrote schedules without a module; Keras 3 finds
                # them only among the schedules.
                cfg["learning_rate"] = keras.optimizers.schedules.deserialize(
                    schedule, custom_objects=custom_objects
                )
            inner["config"] = cfg
            config["optimizer"] = _deserialize_optimizer(inner, custom_objects)
        else:
            if not _is_off(outer_lr):
                raise ValueError(
                    "AccumOptimizer has no learning rate of its own; the inner optimizer "
                    "holds it. " + _received("learning_rate", outer_lr)
                )
            if isinstance(inner, dict):
                inner = _deserialize_optimizer(inner, custom_objects)
            config["optimizer"] = inner
        return config

    # -------------------------------------------------------------- conversion
    @classmethod
    def from_keras_optimizer(cls, optimizer, **overrides):
        """Converts a Keras optimizer using its own accumulation/EMA/clipping into an AccumOptimizer.

        The inner optimizer is a copy of `optimizer` (same class, name and
        hyperparameters, current learning rate) with those features off; the
        wrapper takes them over: `gradient_accumulation_steps` becomes
        `merge_grad`, and `use_ema`, `ema_momentum`,
        `ema_overwrite_frequency`, `clipnorm`, `clipvalue` and
        `global_clipnorm` keep their values. A `LossScaleOptimizer` is
        unwrapped (`model.compile` wraps the result again under
        `mixed_float16`, with a fresh loss scale).

        If `optimizer` is built (a loaded or trained model's), its state comes
        along and the result is built on the same variables: the inner
        optimizer's slots and learning rate, `iterations` (the number of
        updates applied), the open window (Keras's accumulated gradients and
        its position in the window) and the EMA shadows. From then on the
        contract's rules apply: a learning-rate schedule is evaluated at the
        update count (Keras's built-in accumulation fed it the micro-step
        count), and the EMA moves once per update (Keras's moved at every
        micro-step).

        Args:
            optimizer: a `keras.optimizers.Optimizer` (or a
                `LossScaleOptimizer` around one).
            **overrides: further `AccumOptimizer` arguments (`reduction`,
                `on_nonfinite`, `jit_compile`, ...); they take precedence
                over the converted values.

        Returns:
            A new `AccumOptimizer` (of the class this is called on).

        Raises:
            TypeError: `optimizer` is not a Keras optimizer.
            ValueError: `optimizer` is already an AccumOptimizer, uses
                `loss_scale_factor`, or its state does not line up with a
                fresh copy of its class.

        Example:

        ```python
        # A model trained with Keras's own accumulation and EMA (as `load_model` returns it):
        model.compile(optimizer=keras.optimizers.Adam(gradient_accumulation_steps=4, use_ema=True))
        model.optimizer.build(model.trainable_variables)

        # The one-liner:
        model.compile(optimizer=AccumOptimizer.from_keras_optimizer(model.optimizer), loss="mse")
        assert model.optimizer.merge_grad == 4 and model.optimizer.use_ema
        ```
        """
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a `keras.optimizers.Optimizer`. "
                + _received("optimizer", optimizer)
            )
        if isinstance(optimizer, _SeedAPIMixin):
            raise ValueError(
                "`optimizer` is already an AccumOptimizer: there is nothing to convert. "
                + _received("optimizer", optimizer)
            )
        cfg = optimizer.get_config()
        kwargs: dict = {}
        if cfg.get("loss_scale_factor") is not None:
            # A fixed loss scale moves to the wrapper, which undoes it per micro-step.
            kwargs["loss_scale_factor"] = cfg.pop("loss_scale_factor")
        steps = cfg.pop("gradient_accumulation_steps", None)
        kwargs["merge_grad"] = int(steps) if steps else 1
        use_ema = bool(cfg.get("use_ema", False))
        for key, default in _WRAPPER_FEATURES:
            value = cfg.pop(key, default)
            if key in _EMA_KEYS and not use_ema:
                continue
            if value != default:
                kwargs[key] = value
        inner = type(optimizer).from_config(cfg)
        kwargs.update(overrides)
        new = cls(inner, **kwargs)
        if optimizer.built:
            new._carry_state_from(optimizer)
        return new

    def _carry_state_from(self, old) -> None:
        """Builds on `old`'s variables and loads its state, converted (see above)."""
        variables = list(old._trainable_variables)
        self.build(variables)
        averages = list(getattr(old, "_model_variables_moving_average", None) or [])
        window = list(getattr(old, "_accumulated_gradients", None) or [])
        own = {id(v) for v in averages + window if v is not None}
        old_inner = [v for v in old.variables if id(v) not in own]
        new_inner = list(self.inner_optimizer.variables)
        if len(old_inner) != len(new_inner) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(old_inner, new_inner)
        ):
            raise ValueError(
                f"Cannot carry the state of '{old.name}' over: its {len(old_inner)} "
                f"variables do not line up with the {len(new_inner)} of a fresh "
                f"{type(old).__name__} built on the same model (nothing was converted; "
                "pass an unbuilt optimizer to convert the configuration only)."
            )
        store: dict = {}
        self.save_own_variables(store)
        index = {id(v): str(i) for i, v in enumerate(self.variables)}

        def put(variable, value):
            dtype = keras.backend.standardize_dtype(variable.dtype)
            value = np.asarray(host_value(value)).reshape(tuple(variable.shape))
            store[index[id(variable)]] = np.asarray(host_value(ops.cast(value, dtype)))

        for new_v, old_v in zip(new_inner, old_inner):
            put(new_v, old_v.numpy())
        micro = int(old._iterations.numpy())
        steps = old.gradient_accumulation_steps or 1
        position = micro % steps
        put(self.inner_optimizer.iterations, micro // steps)  # updates, not micro-steps
        put(self._micro_steps, micro)
        put(self._window_steps, position)
        put(self._window_weight, float(position))
        put(self._seen, np.full(len(variables), 1 if position else 0))
        if position:
            for acc, old_acc in zip(self._accumulators, window):
                if old_acc is not None:
                    put(acc, old_acc.numpy())
        if self.use_ema and averages:
            for ema, average, v in zip(self._ema, averages, variables):
                put(ema, (v if average is None else average).numpy())
        self.load_own_variables(store)
