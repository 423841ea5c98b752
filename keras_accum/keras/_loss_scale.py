"""Loss scaling: a `LossScaleOptimizer` around an `AccumOptimizer` scales once per window.

docs/semantics.md, point 16. `model.compile` wraps any optimizer in Keras's
`LossScaleOptimizer` under the `mixed_float16` policy. Its own step would
check each micro-batch alone (on replica 0 only, under a strategy), drop an
overflowing one before it reaches us and move the scale per micro-batch, so
the windows would shift and mix scales. When its inner optimizer is an
`AccumOptimizer` its `apply` (and, on JAX, its `stateless_apply`) hands
every micro-batch to us as it comes, at the window's scale; the update
divides the merged sum by the scale, checks it (after the cross-replica
sum), and then applies the LossScaleOptimizer's own rule once per window:
x0.5 and a skipped window on an overflow, x2 after `dynamic_growth_steps`
good updates. Every other LossScaleOptimizer runs Keras's code unchanged.
"""

from __future__ import annotations

import functools
import weakref

import keras
import numpy as np
from keras import ops
from keras.src.optimizers.base_optimizer import BaseOptimizer


def scaler(opt):
    """The LossScaleOptimizer wrapping `opt`, once it has applied through it."""
    ref = opt._loss_scaler_ref
    return ref() if ref is not None else None


def scale_of(opt):
    """The dynamic loss scale the open window was accumulated at (a copy), or None."""
    lso = scaler(opt)
    return None if lso is None else opt._plumbing.snapshot(lso.dynamic_scale)


def after_window(opt, applied, skipped) -> None:
    """The scale's rule after a window that closed: x0.5 and the growth count reset
    when it was skipped (an overflow), x2 after every `dynamic_growth_steps`
    applied ones. `applied` and `skipped` are booleans (both False when the
    window did not close); scalar selects, so no branch is needed."""
    lso = scaler(opt)
    if lso is None:
        return
    counter, scale = lso.step_counter.value, lso.dynamic_scale.value
    grow = ops.logical_and(applied, ops.equal(counter, lso.dynamic_growth_steps - 1))
    restart = ops.logical_or(skipped, grow)
    zero = ops.zeros_like(counter)
    lso.step_counter.assign(ops.where(restart, zero, ops.where(applied, counter + 1, counter)))
    lso.dynamic_scale.assign(ops.where(skipped, scale * 0.5, ops.where(grow, scale * 2.0, scale)))


def state_variables(opt) -> list:
    """The LossScaleOptimizer's own variables the update writes (or none)."""
    lso = scaler(opt)
    return [] if lso is None else [lso.step_counter, lso.dynamic_scale]


def install() -> None:
    """Routes a LossScaleOptimizer's step to the AccumOptimizer it wraps (idempotent)."""
    from keras_accum.keras.optimizer import AccumOptimizer

    cls = keras.optimizers.LossScaleOptimizer
    original = cls.apply
    if getattr(original, "_keras_accum_hook", False):
        return

    @functools.wraps(original)
    def apply(self, grads, trainable_variables=None):
        if not isinstance(self.inner_optimizer, AccumOptimizer):
            return original(self, grads, trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        accum = self.inner_optimizer
        accum._loss_scaler_ref = weakref.ref(self)
        accum.apply(grads, trainable_variables)

    original_stateless = cls.stateless_apply

    @functools.wraps(original_stateless)
    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not isinstance(self.inner_optimizer, AccumOptimizer):
            return original_stateless(self, optimizer_variables, grads, trainable_variables)
        # The base class's: our `apply` in one stateless scope over every
        # variable (the scale's included), all writes collected after it.
        return BaseOptimizer.stateless_apply(self, optimizer_variables, grads, trainable_variables)

    original_load = cls.load_own_variables

    @functools.wraps(original_load)
    def load_own_variables(self, store):
        if not isinstance(self.inner_optimizer, AccumOptimizer):
            return original_load(self, store)
        # The LossScaleOptimizer's entry holds its own variables, then ours by
        # position: it would assign ours unchecked before our own entry is
        # checked (and refused). It loads only its own; ours come from ours.
        own = self._variables
        expected = len(own) + len(self.inner_optimizer.variables)
        if len(store.keys()) != expected:
            raise ValueError(
                f"Cannot load optimizer state into LossScaleOptimizer '{self.name}': it "
                f"holds {len(store.keys())} entries, this optimizer {expected} "
                "(nothing was loaded)."
            )
        values = [np.asarray(store[str(i)]) for i in range(len(own))]
        # Assigned by our `load_own_variables` once it has checked ours.
        self.inner_optimizer._pending_loss_scale = (weakref.ref(self), values)

    apply._keras_accum_hook = True
    cls.apply = apply
    cls.stateless_apply = stateless_apply
    cls.load_own_variables = load_own_variables
