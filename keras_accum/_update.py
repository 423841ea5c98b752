"""Framework-free pieces of `update_model`, shared by the Keras and torch sides.

This module imports neither TensorFlow nor torch. It holds what both
`keras_accum.update_model` and `keras_accum.torch.update_model` agree on: the
checks of their common arguments (with the same error texts on both sides),
and `apply_deferred`, which runs the updates that `defer=True` stored.

The `deferred` container is FastEstimator's: a dict mapping a key (here the
model object) to a list of zero-argument callables, one per deferred update,
so code written for `fe.backend.update_model(..., defer=True, deferred=d)`
keeps working with the same dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Type of the container that `defer=True` fills: model -> pending updates.
Deferred = dict[Any, list[Callable[[], Any]]]

#: The advice given wherever an update came too early (both sides).
DEFER_ADVICE = (
    "Pass `defer=True, deferred=deferred` to the earlier `update_model` call(s) and "
    "call `apply_deferred(deferred)` once every gradient of the step is computed."
)


def _received(name: str, value: Any) -> str:
    return f"Received: {name}={value!r}"


def check_common_args(gradients: Any, loss: Any, defer: Any, deferred: Any) -> None:
    """Checks the arguments both sides share, before anything is computed.

    Raises:
        ValueError: both or neither of `gradients` and `loss`.
        TypeError: `defer` not a bool, or `deferred` not a dict (or None when
            `defer=False`).
    """
    if (gradients is None) == (loss is None):
        raise ValueError(
            "Exactly one of `gradients` and `loss` must be given: `gradients` to apply "
            "precomputed gradients, `loss` to have them computed. Received: "
            f"gradients={'None' if gradients is None else type(gradients).__name__}, "
            f"loss={'None' if loss is None else type(loss).__name__}"
        )
    if not isinstance(defer, bool):
        raise TypeError("`defer` must be a bool. " + _received("defer", defer))
    if defer and not isinstance(deferred, dict):
        raise TypeError(
            "`deferred` must be a dict when `defer=True` (the updates are stored in it "
            "until `apply_deferred(deferred)`). " + _received("deferred", deferred)
        )
    if deferred is not None and not isinstance(deferred, dict):
        raise TypeError("`deferred` must be a dict or None. " + _received("deferred", deferred))


def check_gradient_list(gradients: Any, num_variables: int, what: str) -> list:
    """`gradients` as a list, checked to hold one entry per trainable variable.

    Args:
        gradients: a list or tuple of gradients (None entries allowed).
        num_variables: the number of trainable variables / parameters.
        what: how the variables are named in the message.

    Raises:
        TypeError: `gradients` is not a list or tuple.
        ValueError: it does not hold one entry per variable.
    """
    if not isinstance(gradients, (list, tuple)):
        raise TypeError(
            f"`gradients` must be a list with one gradient per {what} (None for one "
            f"without gradient). Received: gradients of type {type(gradients).__name__}"
        )
    if len(gradients) != num_variables:
        raise ValueError(
            f"`gradients` must hold one gradient per {what} ({num_variables}, in order). "
            f"Received: {len(gradients)} gradients"
        )
    return list(gradients)


def shape_error(index: int, expected: tuple, received: tuple, what: str) -> ValueError:
    return ValueError(
        f"`gradients[{index}]` must have the shape of {what} {index}, {expected}. "
        f"Received: shape {received}"
    )


def store_or_run(
    model: Any, run: Callable[[], Any], defer: bool, deferred: Deferred | None
) -> None:
    """Runs `run()` now, or appends it to `deferred[model]` when `defer`."""
    if defer:
        deferred.setdefault(model, []).append(run)
    else:
        run()


def apply_deferred(deferred: Deferred) -> int:
    """Applies every update that `update_model(..., defer=True)` stored, then empties `deferred`.

    Call it once per training step, after every gradient of the step has been
    computed. The updates run model by model, in the order the models were
    first deferred, and for each model in the order its updates were
    deferred; each is one micro-step of that model's optimizer, exactly as if
    `update_model` had run it without `defer`. An update is removed from
    `deferred` just before it runs, so if one raises, the ones not yet run
    are still in `deferred`.

    Args:
        deferred: the dict passed as `deferred=` to `update_model` (a model ->
            list of zero-argument callables, FastEstimator's layout).

    Returns:
        int, the number of updates applied.

    Raises:
        TypeError: `deferred` is not a dict of lists of callables (nothing
            is applied).

    Example:

    ```python
    deferred = {}
    for xb, yb in micro_batches[:2]:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb))
        keras_accum.update_model(model, loss=loss, tape=tape, defer=True, deferred=deferred)
    keras_accum.apply_deferred(deferred)  # both gradients were taken before either update
    ```
    """
    if not isinstance(deferred, dict):
        raise TypeError(
            "`deferred` must be the dict passed to `update_model(..., deferred=...)`. "
            + _received("deferred", deferred)
        )
    for key, updates in deferred.items():
        if not isinstance(updates, list) or not all(callable(u) for u in updates):
            raise TypeError(
                "`deferred` must map each model to a list of zero-argument callables. "
                f"Received: deferred[{key!r}]={updates!r}"
            )
    applied = 0
    while deferred:
        key = next(iter(deferred))
        updates = deferred[key]
        while updates:
            update = updates.pop(0)
            update()
            applied += 1
        del deferred[key]
    return applied
