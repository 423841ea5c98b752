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
    back bit-exactly; if evaluation or prediction raises, they come back
    before the error leaves the test (or predict) function.
    """

    def _swap_in(self):
        opt = _accum_optimizer(self.model)
        opt.swap_in_ema()
        self._guard(opt)

    def _guard(self, opt):
        # Callbacks hear nothing when evaluation raises: wrap the compiled
        # step so an error puts the raw weights back first.
        for attr in ("test_function", "predict_function"):
            fn = getattr(self.model, attr, None)
            if fn is None or getattr(fn, "_keras_accum_guarded", False):
                continue

            def guarded(*args, _fn=fn, **kwargs):
                try:
                    return _fn(*args, **kwargs)
                except BaseException:
                    opt.swap_out_ema()
                    raise

            guarded._keras_accum_guarded = True
            guarded._keras_accum_original = fn
            setattr(self.model, attr, guarded)

    def _swap_out(self):
        opt = _accum_optimizer(self.model)
        opt.swap_out_ema()
        for attr in ("test_function", "predict_function"):
            fn = getattr(self.model, attr, None)
            if fn is not None and getattr(fn, "_keras_accum_guarded", False):
                setattr(self.model, attr, fn._keras_accum_original)

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_test_end(self, logs=None):
        self._swap_out()

    def on_predict_begin(self, logs=None):
        self._swap_in()

    def on_predict_end(self, logs=None):
        self._swap_out()
