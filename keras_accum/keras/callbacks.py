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

    Args:
        on: `"epoch_end"` (default) or `"train_end"`.
    """

    def __init__(self, on: str = "epoch_end"):
        super().__init__()
        self.on = validate_choice("on", on, ("epoch_end", "train_end"))

    def on_epoch_end(self, epoch, logs=None):
        if self.on == "epoch_end":
            _accum_optimizer(self.model).flush()

    def on_train_end(self, logs=None):
        if self.on == "train_end":
            _accum_optimizer(self.model).flush()


class SwapEMAWeights(keras.callbacks.Callback):
    """Evaluates and predicts on the EMA weights, then puts the raw weights back.

    The swap copies (it never adds and subtracts), so the raw weights come
    back bit-exactly. On the TensorFlow and torch backends the EMA is held
    only while the compiled test (or predict) function runs, one batch at a
    time: Keras fetches predict batches, and runs callbacks, outside that
    function, so an error there (a failing data source, a callback raising,
    an interrupt) finds the raw weights in place. On JAX the trainer reads
    the weights once, before the first batch, so the EMA is swapped in from
    the start of the evaluation (or prediction) to its end.
    """

    _ATTRS = ("test_function", "predict_function")

    def _wrap(self, opt):
        if keras.backend.backend() == "jax":
            opt.swap_in_ema()  # the trainer reads the weights once, after this
            return
        for attr in self._ATTRS:
            fn = getattr(self.model, attr, None)
            if fn is None or getattr(fn, "_keras_accum_guarded", False):
                continue

            def on_ema(*args, _fn=fn, **kwargs):
                opt.swap_in_ema()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    opt.swap_out_ema()

            on_ema._keras_accum_guarded = True
            on_ema._keras_accum_original = fn
            setattr(self.model, attr, on_ema)

    def _unwrap(self):
        _accum_optimizer(self.model).swap_out_ema()
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
