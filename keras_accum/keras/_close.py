"""Closing a window: the decision, the merge, the inner step once, or the skip.

docs/semantics.md, points 3 to 8 and 16. At the update the accumulators are
summed over replicas once; the decision (does the window hold samples, is it
finite) is taken on that sum; a window that passes is merged
(`sum(w * g) / sum(w)` or the sum), clipped, and handed to the inner
optimizer in one call over every variable, after which the variables that
got no gradient in the whole window get their value and their slots back;
the EMA moves; the accumulators are reset. A non-finite window is skipped:
nothing moves but `skipped_updates` (and a loss scale).

Functions of the optimizer, written in `keras.ops`; every branch that writes
state goes through `Plumbing.run_if`, every cross-replica step through the
plumbing's distribution hooks.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_accum.keras import _ema, _loss_scale, _window
from keras_accum.keras import _functional as F


def build(opt, var_list) -> None:
    """The update's own state: `skipped_updates`, `last_grad_norm`; the inner slots' index."""
    opt._skipped_updates = opt._plumbing.counter((), "int64", "skipped_updates")
    opt._last_grad_norm = opt._plumbing.counter((), opt.accumulator_dtype, "last_grad_norm")
    opt._inner_slots = slots_by_variable(opt.inner_optimizer, var_list)


def close(opt, present) -> None:
    """The update: merge, check, clip, one inner step, EMA (or a skip), then reset.

    Runs once for all replicas (cross-replica context under tf.distribute):
    every decision is taken on the accumulators' sum over replicas, so every
    replica takes the same one. `present[i]` is True when variable i is known
    (at trace time) to have a gradient in this window; otherwise `seen`
    decides at run time.
    """
    done = _close_window(opt, present)
    _window.reset(opt, done)


def _close_window(opt, present):
    """Merge, check, clip, one inner step, EMA; nothing if the window weighs 0.

    The decision needs the global norm first. It is taken from the summed
    accumulators, then scaled, so that no full-size merged gradient exists
    before it: the merged gradients are made in the branch that applies
    them (peak temporaries about half the trainable bytes).

    Returns what `run_if` returns for the step (see `Plumbing.zeros_after`).
    """
    plumbing = opt._plumbing
    sums = plumbing.sum_over_replicas(opt._accumulators)
    scale = _loss_scale.scale_of(opt)
    overwrite = [_window.overwrites_with_gradient(v) for v in opt._trainable_variables]

    def merge():
        merged = []
        for acc_sum, over in zip(sums, overwrite):
            g = acc_sum
            if not over:  # a float8 window maximum is never divided or unscaled
                if opt.reduction == "mean":
                    g = g / plumbing.loop_variant(ops.cast(opt._window_weight.value, g.dtype))
                else:
                    g = plumbing.loop_variant_identity(g)
                if scale is not None:
                    g = g / ops.cast(scale, g.dtype)
            merged.append(g)
        return merged

    # The global norm of the merged gradient, from the sums (never-seen
    # accumulators are exactly zero: they add nothing). float8 scaling state
    # is not a gradient: it is checked for finiteness, never counted in the
    # norm that clips and is reported (as Keras leaves it out of clipping).
    norm, finite = F.norm_and_finite(
        [x for x, over in zip(sums, overwrite) if not over], plumbing.sum_of_squares
    )
    if opt.reduction == "mean":
        norm = norm / ops.cast(opt._window_weight.value, norm.dtype)
    if scale is not None:
        norm = norm / ops.cast(scale, norm.dtype)
    if any(overwrite):
        finite = ops.logical_and(
            finite, F.all_finite([x for x, over in zip(sums, overwrite) if over])
        )
    # A window whose weights sum to 0 holds no samples: nothing is applied
    # or counted (a large batch of no samples takes no step).
    has_samples = opt._window_weight.value > 0
    last = opt._last_grad_norm.value
    opt._last_grad_norm.assign(ops.where(has_samples, ops.cast(norm, last.dtype), last))
    if opt.on_nonfinite == "skip" or scale is not None:
        return plumbing.run_if(
            ops.logical_and(has_samples, finite),
            lambda: _apply_merged(opt, merge(), present, norm),
            otherwise=lambda: plumbing.run_if(has_samples, lambda: _skip_window(opt)),
        )
    return plumbing.run_if(has_samples, lambda: _apply_merged(opt, merge(), present, norm))


def _skip_window(opt) -> None:
    opt._skipped_updates.assign(opt._skipped_updates.value + 1)
    _loss_scale.after_overflow(opt)


def _apply_merged(opt, merged, present, norm) -> None:
    plumbing = opt._plumbing
    variables = opt._trainable_variables
    clipped = F.clip(merged, norm, opt._config, plumbing.sum_of_squares)
    grads = [
        plumbing.cast(g if _window.overwrites_with_gradient(v) else c, v.dtype)
        for g, c, v in zip(merged, clipped, variables)
    ]
    # A variable without gradient at the closing micro-step may have one
    # from earlier in the window (then its accumulator holds it), or none
    # at all (then it must not move). One inner step over every variable
    # keeps global inner state (step counter, Nadam's u-product) moving
    # once; the never-seen ones then get their value and their slots back.
    kept = [
        (i, group, [plumbing.snapshot(x) for x in group])
        for i, p in enumerate(present)
        if not p
        for group in [[variables[i]] + opt._inner_slots[i]]
    ]
    inner = opt.inner_optimizer
    plumbing.in_each_replica(lambda g: inner.apply(g, variables), grads)
    for i, group, values in kept:

        def restore(group=group, values=values):
            for x, value in zip(group, values):
                x.assign(value)

        plumbing.run_if(opt._seen.value[i] <= 0, restore)
    if opt.use_ema:
        _ema.update(opt)
    _loss_scale.after_finite(opt)


def slots_by_variable(inner, var_list) -> list:
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
