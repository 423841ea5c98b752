"""Where the window lives: the accumulators and counters, and what a micro-step adds.

docs/semantics.md, points 2 to 4: each micro-step adds `w * g` into a
per-variable accumulator (float32 by default, never narrower than its
variable), counts itself (`micro_steps`, `window_steps`, `window_weight`,
and `seen`, which variables got a gradient in the open window); the update
that closes the window resets every accumulator by assignment. Between
windows every accumulator is zero, so a window's first micro-step may write
`w * g` instead of adding it.

Functions of the optimizer; its variables keep the attribute names that
`tf.train.Checkpoint` files key them by.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_accum.keras import _functional as F


def accumulation_dtype(accumulator_dtype: str, variable_dtype) -> str:
    """`accumulator_dtype`, or the variable's float dtype where that is wider (point 2)."""
    variable_dtype = keras.backend.standardize_dtype(variable_dtype)
    if "float" in variable_dtype:
        return F.widest_dtype([accumulator_dtype, variable_dtype])
    return keras.backend.standardize_dtype(accumulator_dtype)


def var_name(variable) -> str:
    return getattr(variable, "path", variable.name).replace("/", "_").replace(":", "_")


def overwrites_with_gradient(variable) -> bool:
    """Keras float8 training: the "gradient" is the new amax history or scale."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


def build(opt, var_list) -> None:
    """Creates the accumulators and the window's counters."""
    plumbing, acc_dtype = opt._plumbing, opt.accumulator_dtype
    opt._accumulators = [
        plumbing.accumulator(
            v, accumulation_dtype(acc_dtype, v.dtype), f"{var_name(v)}_accumulator"
        )
        for v in var_list
    ]
    counter = plumbing.counter
    # 1 where the variable got a gradient in the open window.
    opt._seen = counter((len(var_list),), "int32", "seen")
    opt._window_weight = counter((), acc_dtype, "window_weight")
    opt._window_steps = counter((), plumbing.count_dtype, "window_steps")
    opt._micro_steps = counter((), plumbing.count_dtype, "micro_steps")


def accumulate(opt, grads, weight, starts) -> None:
    """This replica's share of a micro-step: `acc += w * g`, no communication.

    `grads` is aligned with the built variables (None where absent).
    `starts`: True when the accumulators are known to hold zeros (the
    window's first micro-step): each gradient is then written, not added
    (an absent one leaves its zeros); None: decided at run time where the
    backend profits from it (`Plumbing.writes_at_window_start`).
    """
    if starts is None:
        if opt._plumbing.writes_at_window_start() and opt._own_update_step():
            opt._plumbing.run_if(
                ops.equal(opt._window_steps, 0),
                lambda: _add_each(opt, grads, weight, True),
                otherwise=lambda: _add_each(opt, grads, weight, False),
            )
            return
        starts = False
    _add_each(opt, grads, weight, starts)


def _add_each(opt, grads, weight, starts) -> None:
    # One gradient at a time: each `w * g` is freed once added (forming them
    # all first would hold a model-sized copy on every micro-step). What
    # could refuse a gradient, its shape and the weight, is checked before
    # the step starts (`AccumOptimizer.apply`).
    opt._window_starts = starts
    try:
        for g, v, acc in zip(grads, opt._trainable_variables, opt._accumulators):
            if g is not None:
                opt.update_step(_weighted(opt, g, v, acc, weight), v, None)
    finally:
        opt._window_starts = False


def _weighted(opt, gradient, variable, accumulator, weight):
    """`w * g` in the accumulator's dtype (float8 scaling state is never weighted)."""
    plumbing = opt._plumbing
    g = plumbing.cast(gradient, accumulator.dtype)
    if weight is not None and not overwrites_with_gradient(variable):
        g = plumbing.scale(g, weight)
    return g


def pending_sums(opt, grads, weight) -> list:
    """The window's sums with this micro-step in them, written nowhere.

    An update run op by op takes its sums from here (`_close._Phases`), so
    that whatever raises before the reset leaves every accumulator as it was.
    The same arithmetic as `add` (one rounding of `acc + w * g`); None where
    the micro-step has no gradient (the accumulator holds the sum).
    """
    plumbing = opt._plumbing
    sums = []
    for g, v, acc in zip(grads, opt._trainable_variables, opt._accumulators):
        if g is None:
            sums.append(None)
            continue
        g = _weighted(opt, g, v, acc, weight)
        if overwrites_with_gradient(v):
            sums.append(plumbing.maximum_of(acc, g, ops.equal(opt._window_steps.value, 0)))
        else:
            sums.append(plumbing.added(acc, g))
    return sums


def split_entries(opt) -> list:
    """For each entry of `opt.variables`: whether it is an accumulator (split per device)."""
    accumulators = {id(a) for a in opt._accumulators}
    return [id(v) in accumulators for v in opt.variables]


def rows_by_maximum(opt) -> list:
    """For each accumulator: whether the devices' rows combine by their maximum
    (float8 scaling state, as its window does) instead of their mean."""
    return [overwrites_with_gradient(v) for v in opt._trainable_variables]


def split(opt, values, num_devices) -> list:
    """Each accumulator's value repeated on a new leading axis of `num_devices` rows."""
    check_length(opt, values)
    return [
        ops.repeat(ops.expand_dims(x, 0), num_devices, axis=0) if rows else x
        for x, rows in zip(values, split_entries(opt))
    ]


def join(opt, values) -> list:
    """Each accumulator's rows combined as the update combines them (`split`'s inverse)."""
    check_length(opt, values)
    maximum = {id(a): m for a, m in zip(opt._accumulators, rows_by_maximum(opt))}
    out = []
    for x, v in zip(values, opt.variables):
        if id(v) in maximum:
            _check_rows(v, x, None)
            x = ops.max(x, axis=0) if maximum[id(v)] else ops.mean(x, axis=0)
        out.append(x)
    return out


def device_row(opt, values) -> list:
    """Inside `shard_map`: this device's row (a leading axis of 1) of each accumulator."""
    return [
        _check_rows(v, x, 1)[0] if rows else x
        for x, v, rows in zip(values, opt.variables, split_entries(opt))
    ]


def as_device_row(opt, values) -> list:
    return [ops.expand_dims(x, 0) if rows else x for x, rows in zip(values, split_entries(opt))]


def check_length(opt, values) -> None:
    if len(values) != len(opt.variables):
        raise ValueError(
            f"`optimizer_variables` must hold one value per entry of `variables` "
            f"({len(opt.variables)}). Received: {len(values)} values"
        )


def _check_rows(variable, value, rows):
    shape = tuple(value.shape)
    if len(shape) != len(variable.shape) + 1 or shape[1:] != tuple(variable.shape) or (
        rows is not None and shape[0] != rows
    ):
        expected = f"({rows if rows is not None else 'num_devices'}, " + ", ".join(
            str(d) for d in variable.shape
        ) + ")"
        raise ValueError(
            f"The accumulator '{variable.path}' must have a leading device axis, shape "
            f"{expected} (use `optimizer.split_window` and `window_specs`). "
            f"Received: shape {shape}"
        )
    return value


def counters(opt) -> list:
    """The window's counters (`count` writes them)."""
    return [opt._seen, opt._window_weight, opt._window_steps, opt._micro_steps]


def add(opt, gradient, variable) -> None:
    """Adds one (weighted) gradient into `variable`'s accumulator (`update_step`)."""
    plumbing = opt._plumbing
    acc = opt._accumulators[opt._get_variable_index(variable)]
    if overwrites_with_gradient(variable):
        # float8 scaling state: Keras (and the large batch) keep the
        # window's maximum, not a sum.
        plumbing.keep_maximum(acc, gradient, ops.equal(opt._window_steps, 0))
    elif opt._window_starts:
        plumbing.write_into(acc, gradient)
    else:
        plumbing.add_into(acc, gradient)


def count(opt, present, weight) -> None:
    """Counts the micro-step: `seen`, `window_weight`, `window_steps`, `micro_steps`.

    `present[i]`: variable i has a gradient in this micro-step (known when
    the step is traced).
    """
    if all(present):
        opt._seen.assign(ops.ones_like(opt._seen.value))
    elif any(present):
        opt._seen.assign(
            ops.maximum(opt._seen.value, ops.convert_to_tensor(present, dtype="int32"))
        )
    one = ops.convert_to_tensor(1, opt._window_steps.dtype)
    if weight is None:
        weight = ops.convert_to_tensor(1, opt.accumulator_dtype)
    opt._window_weight.assign(opt._window_weight.value + weight)
    opt._window_steps.assign(opt._window_steps.value + one)
    opt._micro_steps.assign(opt._micro_steps.value + one)


def reset(opt, done) -> None:
    """Empties the window: accumulators by assignment (never by arithmetic), counters.

    Assigned zeros, never `acc * 0` or `acc - acc`: one inf must not turn
    later windows into NaN (point 2). `done` orders the zeros after the
    update's reads where the backend needs it (`Plumbing.clear`).
    """
    plumbing = opt._plumbing
    for i, acc in enumerate(opt._accumulators):
        plumbing.clear(acc, done, i)
    opt._seen.assign(ops.zeros_like(opt._seen.value))
    opt._window_weight.assign(ops.zeros_like(opt._window_weight.value))
    opt._window_steps.assign(ops.zeros_like(opt._window_steps.value))
