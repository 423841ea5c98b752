"""Closing a window: the decision, the merge, the inner step once, or the skip.

docs/semantics.md, points 3 to 8 and 16. At the update the accumulators are
summed over replicas once; the decision (does the window hold samples, is it
finite) is taken on that sum; a window that passes is merged
(`sum(w * g) / sum(w)` or the sum), clipped, and handed to the inner
optimizer in one call over every variable, after which the variables that
got no gradient in the whole window get their value and their slots back;
the EMA moves. A non-finite window is skipped: nothing moves but
`skipped_updates` (and a loss scale). Either way the accumulators are reset.

The update is written here as phases (`_Phases`: sums, decide, record,
apply, reset), each in `keras.ops`; the backend's plumbing sequences them
(`Plumbing.close_window`), because what keeps a traced update cheap differs:
TensorFlow nests the phases in one conditional that all-reduces once, JAX
runs them as flat 0-or-1-trip loops (a loop nested in another makes XLA copy
the state it carries). The phases are the same rules either way.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from keras_accum.keras import _ema, _loss_scale, _window
from keras_accum.keras import _functional as F


def build(opt, var_list) -> None:
    """The update's own state: `skipped_updates`, `last_grad_norm`; the inner slots' index."""
    opt._skipped_updates = opt._plumbing.counter((), opt._plumbing.count_dtype, "skipped_updates")
    opt._last_grad_norm = opt._plumbing.counter((), opt.accumulator_dtype, "last_grad_norm")
    opt._inner_slots = slots_by_variable(opt.inner_optimizer, var_list)


def close(opt, present, closes=True, pending=None) -> None:
    """The update: merge, check, clip, one inner step, EMA (or a skip), then reset.

    `closes`: True when the caller knows the window closes, else a traced
    boolean (the step serves every micro-step). Runs once for all replicas
    (cross-replica context under tf.distribute): every decision is taken on
    the accumulators' sum over replicas. `present[i]` is True when variable
    i is known (at trace time) to have a gradient in this window; otherwise
    `seen` decides at run time. `pending`: the sums with the closing
    micro-step in them, written nowhere (`_window.pending_sums`), for an
    update run op by op; None: the accumulators hold the whole window.
    """
    opt._plumbing.close_window(closes, _Phases(opt, present, pending))


@contextlib.contextmanager
def all_or_nothing(opt):
    """Puts the window's counters and the update's own state back if the body raises.

    For a micro-step or a flush run op by op (eagerly): the accumulators
    are not written before the reset (`pending`), so with these scalars
    restored the window is as it was before the call, whatever raised (the
    inner optimizer included). What the inner optimizer wrote before it
    raised is its own, as it would be without this wrapper.
    """
    plumbing = opt._plumbing
    state = _window.counters(opt) + [opt._last_grad_norm, opt._skipped_updates]
    saved = [(v, plumbing.snapshot(v)) for v in state + _loss_scale.state_variables(opt)]
    try:
        yield
    except BaseException:
        for v, value in saved:
            v.assign(value)
        raise


class _Phases:
    """The phases of an update, for `Plumbing.close_window` to sequence.

    `sums()` the accumulators summed over replicas; `decide(sums)` the
    merged gradient's global norm and whether it is finite (pure: no
    writes); `record(closes, norm, finite)` the counters, `last_grad_norm`
    and the loss scale (scalar writes, no branch); `ok(finite)` whether the
    window is applied; `apply(sums, norm)` merge, clip, one inner step, EMA,
    returning what the reset must follow (`Plumbing.written`); `reset(after)`
    empties the window.
    """

    def __init__(self, opt, present, pending=None):
        self.opt = opt
        self.present = present
        self.pending = pending
        self.overwrite = [_window.overwrites_with_gradient(v) for v in opt._trainable_variables]
        # The scale the window was accumulated at, read before `record` may
        # grow it: the merge and the norm divide by this one (point 16).
        self.scale = _loss_scale.scale_of(opt)

    def sums(self):
        """The window's sums: the accumulators summed over replicas, or the pending sums.

        Pending sums (an update run op by op) are handed over, not kept: the
        list given to `_Phases` is emptied and `merge` drops each sum once
        merged, so that the pending sums do not live beside the merged
        gradient through the inner step. The base `close_window`, the one
        that runs an update op by op, asks for them once.
        """
        opt = self.opt
        if self.pending is None:
            return opt._plumbing.sum_over_replicas(opt._accumulators)
        pending, self.pending = self.pending, None
        held = iter(
            opt._plumbing.sum_over_replicas(
                [a for a, p in zip(opt._accumulators, pending) if p is None]
            )
        )
        sums = [next(held) if p is None else p for p in pending]
        pending.clear()
        return sums

    def decide(self, sums):
        """`(norm, finite)` of the merged gradient, from the sums.

        The norm is taken from the sums and then scaled, so that no full-size
        merged gradient exists before the decision (never-seen accumulators
        are exactly zero: they add nothing). float8 scaling state is not a
        gradient: it is checked for finiteness, never counted in the norm
        that clips and is reported (as Keras leaves it out of clipping).
        """
        opt = self.opt
        norm, finite = F.norm_and_finite(
            [x for x, over in zip(sums, self.overwrite) if not over],
            opt._plumbing.sum_of_squares,
        )
        if opt.reduction == "mean":
            norm = norm / ops.cast(opt._window_weight.value, norm.dtype)
        if self.scale is not None:
            norm = norm / ops.cast(self.scale, norm.dtype)
        if any(self.overwrite):
            finite = ops.logical_and(
                finite, F.all_finite([x for x, over in zip(sums, self.overwrite) if over])
            )
        return norm, finite

    def norm_dtype(self) -> str:
        return F.widest_dtype(
            [a.dtype for a, over in zip(self.opt._accumulators, self.overwrite) if not over]
            or ["float32"]
        )

    def _has_samples(self):
        # A window whose weights sum to 0 holds no samples: nothing is
        # applied or counted (a large batch of no samples takes no step).
        return self.opt._window_weight.value > 0

    def _checks(self) -> bool:
        opt = self.opt
        return opt.on_nonfinite == "skip" or _loss_scale.scaler(opt) is not None

    def ok(self, finite):
        """Whether the window is applied: it holds samples and (when checked) is finite."""
        if self._checks():
            return ops.logical_and(self._has_samples(), finite)
        return self._has_samples()

    def record(self, closes, norm, finite) -> None:
        """`last_grad_norm`, `skipped_updates` and the loss scale, for a window that closes."""
        opt = self.opt
        closing = ops.logical_and(closes, self._has_samples())
        last = opt._last_grad_norm.value
        opt._last_grad_norm.assign(ops.where(closing, ops.cast(norm, last.dtype), last))
        applied = ops.logical_and(closes, self.ok(finite))
        if self._checks():
            skipped = ops.logical_and(closing, ops.logical_not(finite))
        else:
            skipped = ops.convert_to_tensor(False)
        opt._skipped_updates.assign(
            opt._skipped_updates.value + ops.cast(skipped, opt._skipped_updates.dtype)
        )
        _loss_scale.after_window(opt, applied, skipped)

    def merge(self, sums):
        """The merged gradients; each entry of `sums` is dropped (set to None) once merged."""
        opt = self.opt
        plumbing = opt._plumbing
        scale = self.scale
        merged = []
        for i, over in enumerate(self.overwrite):
            g, sums[i] = sums[i], None
            if not over:  # a float8 window maximum is never divided or unscaled
                if opt.reduction == "mean":
                    g = g / plumbing.loop_variant(ops.cast(opt._window_weight.value, g.dtype))
                else:
                    g = plumbing.loop_variant_identity(g)
                if scale is not None:
                    g = g / ops.cast(scale, g.dtype)
            merged.append(g)
        return merged

    def apply(self, sums, norm):
        """Merge, clip, one inner step over every variable, the never-seen restored, EMA."""
        opt = self.opt
        plumbing = opt._plumbing
        variables = opt._trainable_variables
        merged = self.merge(sums)
        # float8 scaling state is not a gradient: never clipped (point 7).
        clipped = iter(
            F.clip(
                [g for g, over in zip(merged, self.overwrite) if not over],
                norm,
                opt._config,
                plumbing.sum_of_squares,
            )
        )
        grads = [
            plumbing.cast(g if over else next(clipped), v.dtype)
            for g, v, over in zip(merged, variables, self.overwrite)
        ]
        # A variable without gradient at the closing micro-step may have one
        # from earlier in the window (then its accumulator holds it), or none
        # at all (then it must not move). One inner step over every variable
        # keeps global inner state (step counter, Nadam's u-product) moving
        # once; the never-seen ones then get their value and their slots back.
        kept = [
            (i, group, [plumbing.snapshot(x) for x in group])
            for i, p in enumerate(self.present)
            if not p
            for group in [[variables[i]] + opt._inner_slots[i]]
        ]
        inner = opt.inner_optimizer
        plumbing.in_each_replica(lambda g: inner.apply(g, variables), grads)
        for i, group, values in kept:
            seen = opt._seen.value[i] > 0
            for x, value in zip(group, values):
                x.assign(ops.where(seen, x.value, value))
        if opt.use_ema:
            _ema.update(opt)
        return plumbing.written(variables)

    def reset(self, after) -> None:
        _window.reset(self.opt, after)


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
