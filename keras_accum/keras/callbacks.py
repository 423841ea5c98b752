"""Keras callbacks for AccumOptimizer: flushing open windows, evaluating on the EMA."""

from __future__ import annotations

import keras

from keras_accum._core import validate_choice


def _accum_optimizer(model):
    from keras_accum.keras.optimizer import AccumOptimizer

    opt = model.optimizer
    # `model.compile` wraps us in a LossScaleOptimizer under mixed_float16.
    while opt is not None and not isinstance(opt, AccumOptimizer):
        opt = getattr(opt, "inner_optimizer", None)
    if opt is None:
        raise ValueError(
            "This callback needs a model compiled with a keras_accum.AccumOptimizer. "
            f"Received: model.optimizer={model.optimizer!r}"
        )
    return opt


class FlushWindow(keras.callbacks.Callback):
    """Applies the open accumulation window at the end of each epoch or of training.

    With `on="train_end"` the window is applied before `fit` writes the EMA
    into the model (`finalize_variable_values`, which Keras calls before the
    callbacks' `on_train_end`), so that the last update moves the EMA as any
    other, and the model ends on the EMA of every update.

    Args:
        on: `"epoch_end"` (default) or `"train_end"`.
    """

    def __init__(self, on: str = "epoch_end"):
        super().__init__()
        self.on = validate_choice("on", on, ("epoch_end", "train_end"))

    # With on="train_end", the optimizer is asked to flush before its
    # `finalize_variable_values` from the end of each epoch to the start of
    # the next: a `fit` that raises mid-epoch (where Keras calls no
    # `on_train_end`) leaves no request behind for a later `fit`.
    def on_epoch_begin(self, epoch, logs=None):
        if self.on == "train_end":
            _accum_optimizer(self.model)._flush_before_finalize = False

    def on_epoch_end(self, epoch, logs=None):
        if self.on == "epoch_end":
            _accum_optimizer(self.model).flush()
        else:
            _accum_optimizer(self.model)._flush_before_finalize = True

    def on_train_end(self, logs=None):
        if self.on == "train_end":
            opt = _accum_optimizer(self.model)
            opt._flush_before_finalize = False
            opt.flush()  # a no-op when `finalize_variable_values` flushed


class SwapEMAWeights(keras.callbacks.Callback):
    """Evaluates and predicts on the EMA weights, then puts the raw weights back.

    The swap copies (it never adds and subtracts), so the raw weights come
    back bit-exactly. The EMA is used only while the compiled test (or
    predict) function runs, one call at a time: Keras fetches batches, and
    runs callbacks, outside that function, so an error there (a failing data
    source, a callback raising, an interrupt) finds the raw weights in place.
    On the TensorFlow and torch backends the EMA is swapped into the
    variables around each call; on JAX, where the function takes the
    weights as values, each call is handed the EMA instead of the weights
    and the variables are never written. Before the first update there is
    no average yet, and the raw weights are used.
    """

    _ATTRS = ("test_function", "predict_function")

    def _wrap(self, opt):
        for attr in self._ATTRS:
            fn = getattr(self.model, attr, None)
            if fn is None or getattr(fn, "_keras_accum_guarded", False):
                continue
            if keras.backend.backend() == "jax":
                on_ema = _handing_the_ema(opt, self.model, fn)
            else:
                on_ema = _swapping_the_ema_in(opt, fn)
            on_ema._keras_accum_guarded = True
            on_ema._keras_accum_original = fn
            setattr(self.model, attr, on_ema)

    def _unwrap(self):
        opt = _accum_optimizer(self.model)
        if keras.backend.backend() != "jax":
            opt.swap_out_ema()
        for attr in self._ATTRS:
            fn = getattr(self.model, attr, None)
            if fn is not None and getattr(fn, "_keras_accum_guarded", False):
                setattr(self.model, attr, fn._keras_accum_original)

    def on_test_begin(self, logs=None):
        self._wrap(_accum_optimizer(self.model))

    def on_test_end(self, logs=None):
        self._unwrap()

    def on_predict_begin(self, logs=None):
        self._wrap(_accum_optimizer(self.model))

    def on_predict_end(self, logs=None):
        self._unwrap()


def _swapping_the_ema_in(opt, fn):
    """`fn`, run with the EMA swapped into the variables (TensorFlow, torch)."""

    def on_ema(*args, **kwargs):
        opt.swap_in_ema()
        try:
            return fn(*args, **kwargs)
        finally:
            opt.swap_out_ema()

    return on_ema


def _handing_the_ema(opt, model, fn):
    """`fn(state, ...)` (JAX's trainer), handed the EMA in place of the weights.

    The trainer's state starts with the trainable values, which the function
    donates: it gets fresh copies of the EMA (in the variables' dtypes), and
    the raw values go back into the state it returns.
    """
    import jax.numpy as jnp

    from keras_accum.keras import _ema

    def on_ema(state, *args, **kwargs):
        if not _ema.ready(opt):
            return fn(state, *args, **kwargs)
        trainable = state[0]
        shown = [
            jnp.array(opt._ema[opt._get_variable_index(v)].value, dtype=v.dtype, copy=True)
            for v in model.trainable_variables
        ]
        out, new_state = fn((shown, *state[1:]), *args, **kwargs)
        return out, (trainable, *new_state[1:])

    return on_ema
