"""`update_model` for Keras models: FastEstimator's entry point, on Keras 3.

`keras_accum.update_model(model, gradients=..., ...)` is one micro-step of the
model's own optimizer (`model.optimizer`, set by `compile`). With an
`AccumOptimizer` its `merge_grad` behaves as FastEstimator's `UpdateOp`: for
every `merge_grad` calls, only the last one updates the model; the others
only accumulate. The torch mirror is `keras_accum.torch.update_model`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_accum import _update
from keras_accum._update import Deferred, apply_deferred

__all__ = ["apply_deferred", "update_model"]


def update_model(
    model: keras.Model,
    gradients: list | None = None,
    loss: Any = None,
    tape: Any = None,
    defer: bool = False,
    deferred: Deferred | None = None,
) -> None:
    """Applies one micro-step of `model.optimizer`, from gradients or from a loss.

    The two forms of FastEstimator's `fe.backend.update_model`:

    * r1.2, `gradients`: a list with one gradient per entry of
      `model.trainable_variables`, in that order (None for a variable without
      gradient), applied as `model.optimizer.apply_gradients(zip(gradients,
      model.trainable_variables))`.
    * r1.1, `loss` and the `tape` that recorded it: the gradients are
      `tape.gradient(mean(loss), model.trainable_variables)`, with the loss
      scaled first when the optimizer scales losses (see below). A loss with
      more than one element is averaged first, as FastEstimator did. Add
      `sum(model.losses)` to it yourself if the model has regularization
      losses.

    Each call is one micro-step (`apply_gradients` call) of the model's
    optimizer. With a plain Keras optimizer every call updates the weights;
    with an `AccumOptimizer(merge_grad=k)` every k-th call does, on the
    merged gradient of the k calls.

    Deferring (`defer=True`) stores the micro-step in `deferred` instead of
    running it; `apply_deferred(deferred)` runs everything stored. The
    gradients are taken at call time, so deferred updates use the weights
    the losses were computed with. On the TensorFlow side the order of
    updates cannot corrupt a gradient anyway: the tape keeps the values read
    in the forward pass (a variable update copies the buffer while a
    recorded read still holds it), so a generator's gradient taken through a
    discriminator is the same before and after the discriminator's update.
    `defer=True` is there for code that moves between backends (in torch the
    order does matter). What TensorFlow does refuse is a second gradient
    from a non-persistent tape, as when one tape recorded both losses of a
    GAN: this raises a `RuntimeError` that says to record with
    `tf.GradientTape(persistent=True)`.

    Loss scaling (a `LossScaleOptimizer`, which `model.compile` puts around
    the optimizer under the `mixed_float16` policy): with `loss`, the
    gradient is taken of `model.optimizer.scale_loss(loss)` and the optimizer
    unscales it, as Keras's own `train_step` does. Precomputed `gradients`
    are taken to be in the same, scaled form: compute them from
    `model.optimizer.scale_loss(loss)` (which is the loss itself when no loss
    scaling is active, so the same code serves both). The optimizer divides
    them by the current scale, and an overflow skips the update (with an
    `AccumOptimizer`: its whole window).

    Under a `tf.distribute` strategy, call it in replica context (inside
    `strategy.run`): the optimizer sums the gradients over replicas, so the
    loss must be scaled for that sum, as `keras.losses.Loss` objects do.

    Every error below is raised before anything is updated or stored.

    Args:
        model: a compiled `keras.Model`; its `optimizer` takes the step.
        gradients: list of gradients (tensors, `tf.IndexedSlices`, arrays or
            None), one per trainable variable. Exclusive with `loss`.
        loss: a scalar or per-sample loss tensor computed under `tape`.
            Exclusive with `gradients`.
        tape: the `tf.GradientTape` that recorded `loss` (required with
            `loss`). If it is still recording, the optimizer step runs with
            its recording stopped. Use `persistent=True` to take several
            losses' gradients from one tape.
        defer: bool, store the update in `deferred` instead of applying it.
            Defaults to False.
        deferred: dict, where deferred updates are stored (`model` -> list of
            callables, FastEstimator's layout); required with `defer=True`.
            Inside a `tf.function`, apply it in the same function.

    Raises:
        TypeError: `model` is not a Keras model (a torch module: use
            `keras_accum.torch.update_model`), `tape` is not a
            `tf.GradientTape`, `loss` is not a tensor, `defer` is not a bool
            or `deferred` not a dict.
        ValueError: the model has no optimizer (not compiled), both or
            neither of `gradients` and `loss`, `loss` without `tape`,
            `gradients` of the wrong length or shape, or a `loss` that no
            trainable variable's gradient depends on.
        RuntimeError: the tape was already used up (non-persistent).

    Example:

    ```python
    model.compile(optimizer=keras_accum.AccumOptimizer("adam", merge_grad=4))
    for xb, yb in micro_batches[:4]:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb))
        keras_accum.update_model(model, loss=loss, tape=tape)  # the 4th call updates
    assert int(model.optimizer.iterations) == 1
    ```
    """
    _update.check_common_args(gradients, loss, defer, deferred)
    optimizer = _model_optimizer(model)
    variables = list(model.trainable_variables)
    if gradients is not None and tape is None:
        grads = _checked_gradients(gradients, variables)
        pairs = list(zip(grads, variables))
        _update.store_or_run(model, lambda: optimizer.apply_gradients(pairs), defer, deferred)
        return
    tf = _tensorflow()
    if tape is not None and not isinstance(tape, tf.GradientTape):
        raise TypeError(
            "`tape` must be the `tf.GradientTape` that recorded `loss`. "
            f"Received: tape={tape!r}"
        )
    if gradients is not None:
        grads = _checked_gradients(gradients, variables)
    else:
        if tape is None:
            raise ValueError(
                "`tape` is required with `loss`: pass the `tf.GradientTape` that "
                "recorded the loss. Received: tape=None"
            )
        if not tf.is_tensor(loss) and not isinstance(loss, keras.Variable):
            raise TypeError(
                "`loss` must be a tensor computed under `tape`. "
                f"Received: loss of type {type(loss).__name__}"
            )
        with _paused(tape):
            grads = _gradients_of(loss, variables, tape, optimizer)

    pairs = list(zip(grads, variables))

    def run():
        return optimizer.apply_gradients(pairs)

    if defer:
        _update.store_or_run(model, run, True, deferred)
        return
    with _paused(tape):  # the optimizer's own work is not for the tape to record
        run()


def _tensorflow():
    """TensorFlow, for the `loss`/`tape` form; a clear error on another backend."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "`loss` and `tape` take a `tf.GradientTape`: that form of `update_model` exists "
            "on Keras's TensorFlow backend only. On this backend pass the gradients, "
            "`update_model(model, gradients=grads)`. Received: backend="
            f"{keras.backend.backend()!r}"
        )
    import tensorflow as tf

    return tf


def _paused(tape):
    """`tape.stop_recording()` while `tape` records, else a null context."""
    if tape is not None and getattr(tape, "_recording", False):
        return tape.stop_recording()
    return contextlib.nullcontext()


def _model_optimizer(model):
    if not isinstance(model, keras.Model):
        hint = ""
        if type(model).__module__.split(".")[0] == "torch":
            hint = " For a torch module use `keras_accum.torch.update_model`."
        raise TypeError(
            f"`model` must be a `keras.Model`.{hint} Received: model of type "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "`model` has no optimizer: compile it first, "
            f"`model.compile(optimizer=...)`. Received: model={model.name!r} with "
            "model.optimizer=None"
        )
    return optimizer


def _checked_gradients(gradients, variables):
    grads = _update.check_gradient_list(gradients, len(variables), "trainable variable")
    out = []
    for i, (g, v) in enumerate(zip(grads, variables)):
        if g is None:
            out.append(None)
            continue
        if _is_indexed_slices(g):
            # Rows of the variable: the trailing dimensions must agree.
            shape = tuple(g.values.shape)[1:]
            if not _compatible(shape, tuple(v.shape)[1:]):
                raise _update.shape_error(i, tuple(v.shape), ("?",) + shape, "variable")
            out.append(g)
            continue
        if not hasattr(g, "shape"):
            raise TypeError(
                f"`gradients[{i}]` must be a tensor, an array or None. "
                f"Received: gradients[{i}] of type {type(g).__name__}"
            )
        if isinstance(g, np.ndarray):
            g = np.array(g)  # a snapshot: a deferred update sees today's value
        g = ops.convert_to_tensor(g)
        if not _compatible(tuple(g.shape), tuple(v.shape)):
            raise _update.shape_error(i, tuple(v.shape), tuple(g.shape), "variable")
        out.append(g)
    return out


def _is_indexed_slices(gradient) -> bool:
    return type(gradient).__name__ == "IndexedSlices" and keras.backend.backend() == "tensorflow"


def _compatible(shape, expected) -> bool:
    """Equal shapes, or equal but for dimensions unknown while tracing (None)."""
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )


def _loss_scale(optimizer, dtype):
    """The factor `optimizer.scale_loss` multiplies a loss by, or None."""
    import tensorflow as tf

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or (
        getattr(optimizer, "loss_scale_factor", None) is not None
    ):
        return tf.cast(optimizer.scale_loss(tf.ones((), dtype)), dtype)
    return None


def _gradients_of(loss, variables, tape, optimizer):
    """`tape.gradient(scale_loss(mean(loss)), variables)`, without re-recording.

    The mean and the scale enter as the upstream gradient of `loss`
    (`output_gradients`), which is what their own gradients would feed back:
    the loss need not have been scaled or averaged under the tape.
    """
    import tensorflow as tf

    loss = tf.convert_to_tensor(loss)
    scale = _loss_scale(optimizer, loss.dtype)
    upstream = None
    if loss.shape.rank != 0:
        # d mean(loss) / d loss_i = upstream / n, as TensorFlow's own mean gradient.
        top = tf.ones((), loss.dtype) if scale is None else scale
        n = tf.cast(tf.size(loss), loss.dtype)
        upstream = tf.fill(tf.shape(loss), top) / n
    elif scale is not None:
        upstream = scale
    try:
        grads = tape.gradient(loss, variables, output_gradients=upstream)
    except RuntimeError as e:
        if "non-persistent" not in str(e):
            raise
        raise RuntimeError(
            "update_model: the `tape` was already used to compute gradients, and a "
            "non-persistent `tf.GradientTape` can only compute one set (as when one "
            "tape recorded the losses of two models, e.g. a GAN's generator and "
            "discriminator). Record the step with `tf.GradientTape(persistent=True)`. "
            f"Nothing was updated. ({e})"
        ) from e
    if variables and all(g is None for g in grads):
        raise ValueError(
            "`loss` has no gradient with respect to any trainable variable of `model` "
            "through `tape`: compute the loss from the model's output inside "
            "`with tape:`. Nothing was updated."
        )
    return list(grads)
