"""Once-per-update gates for torch's LR schedulers and `GradScaler.update`.

The canonical torch loop calls `scheduler.step()` and `scaler.update()` once
per micro-batch, and torch gives an optimizer no say over either. Semantics
point 5 wants schedules to advance once per update, and point 15 wants a
`GradScaler` whose scale does not move inside a window (`.grad` would then
hold gradients at two scales). So both are gated at the callee, narrowly:

* `LRScheduler.step` (and every subclass's own `step`, present and future):
  when the scheduler's optimizer is an `AccumOptimizer` (or the inner
  optimizer of one), a call is a no-op unless at least one update has been
  applied since this scheduler last stepped. Counting applied updates (not
  "did the last micro-step update") keeps epoch-level schedulers right when
  an epoch does not end on a window boundary, and holds schedulers on a
  skipped window (skipped windows are not applied updates). A scheduler's own
  initial step in its constructor always runs.
* `GradScaler.update`: a no-op when every optimizer stepped through the
  scaler since the last update is an `AccumOptimizer` whose window is still
  open (it marks its per-optimizer record in the scaler). When the scale does
  move while one of our windows is open (a plain optimizer sharing the
  scaler, torch's recipe for several optimizers, or `update(new_scale)`),
  that window's partial sum is rescaled to the new scale (GradScaler's
  factors are powers of two, so exactly), never discarded.
* `GradScaler.step(opt)` for an `AccumOptimizer` hides, for that call only,
  torch's FutureWarning about the `grad_scaler` keyword protocol we rely on.

Anything not driven by an `AccumOptimizer` runs the original code unchanged.

Also here, the wrapper's own hook plumbing: `observe_step` runs torch's
step-hook and profiler wrapper around `AccumOptimizer.step` only when
something observes the step, `global_step_hooks_off` keeps torch's global
step hooks from firing a second time for the inner optimizer's step inside
an update (one `step()` call is one optimizer step to them), and `on_owner`
runs a method on the AccumOptimizer behind a proxy (Lightning's
`LightningOptimizer`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from inspect import signature
from typing import Any

import torch
from torch.optim import optimizer as _optimizer_module
from torch.optim.lr_scheduler import LRScheduler

from keras_accum.torch import _window

#: Attribute set on an AccumOptimizer (and on its inner optimizer): a weak
#: reference to the AccumOptimizer that owns the update count.
OWNER_ATTR = "_keras_accum_owner"
#: Attribute on a scheduler: the owner's update count at its last step. It is a
#: plain int in the scheduler's `__dict__`, so `scheduler.state_dict()` keeps it.
_SEEN_ATTR = "_keras_accum_updates_seen"
#: Key in `GradScaler._per_optimizer_states[id(opt)]`: this micro-step did not
#: close a window, so `update()` must not move the scale. Its value is the
#: AccumOptimizer (the records are dropped by every `update()`).
SCALER_HOLD_KEY = "keras_accum_hold"
#: The start of torch's FutureWarning in `GradScaler.step` for optimizers with
#: `_step_supports_amp_scaling` and a `grad_scaler` keyword (ours).
_SCALER_WARNING = "GradScaler is going to stop passing itself as a keyword argument"
#: Transient attribute on a scheduler while its gated step runs.
_IN_STEP_ATTR = "_keras_accum_in_step"

_installed = False


def set_owner(optimizer: torch.optim.Optimizer, owner: torch.optim.Optimizer) -> None:
    setattr(optimizer, OWNER_ATTR, weakref.ref(owner))


def _owner(optimizer: Any):
    ref = getattr(optimizer, OWNER_ATTR, None)
    return ref() if ref is not None else None


def owner(optimizer: Any):
    """The live AccumOptimizer that owns `optimizer` (itself or its inner one), or None."""
    return _owner(optimizer)


def _gate_scheduler_step(step):
    if getattr(step, "_keras_accum_gated", False):
        return step

    @functools.wraps(step)
    def gated_step(self, *args, **kwargs):
        owner = _owner(getattr(self, "optimizer", None))
        if owner is None or self.__dict__.get(_IN_STEP_ATTR, False):
            # Not ours, or a nested call (a subclass's step calling
            # super().step()): the outermost call has already decided.
            return step(self, *args, **kwargs)
        updates = owner.iterations
        # The constructor's own step (LRScheduler._initial_step) sets the
        # starting LR and always runs; it counts as "seen".
        if not getattr(self, "_is_initial", False) and getattr(self, _SEEN_ATTR, 0) == updates:
            return None  # No update applied since this scheduler last stepped.
        setattr(self, _SEEN_ATTR, updates)
        self.__dict__[_IN_STEP_ATTR] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            self.__dict__.pop(_IN_STEP_ATTR, None)

    # Never traced: reading the owner's update count would put a guard on it,
    # and torch.compile would recompile the caller at every update.
    gated_step = torch.compiler.disable(gated_step)
    gated_step._keras_accum_gated = True
    return gated_step


def _gate_class(cls: type) -> None:
    if "step" in cls.__dict__:
        cls.step = _gate_scheduler_step(cls.__dict__["step"])


def _all_subclasses(cls: type) -> list:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def _gate_grad_scaler_update(update):
    if getattr(update, "_keras_accum_gated", False):
        return update

    @functools.wraps(update)
    def gated_update(self, new_scale=None):
        states = getattr(self, "_per_optimizer_states", None)
        if not getattr(self, "_enabled", False) or not states:
            return update(self, new_scale)
        held = [s[SCALER_HOLD_KEY] for s in states.values() if s.get(SCALER_HOLD_KEY)]
        if new_scale is None and len(held) == len(states):
            # Every optimizer stepped since the last update holds an open
            # window: keep the scale (and growth tracker), forget the records,
            # exactly as update() does at its end.
            states.clear()
            return None
        # Another optimizer stepped (or a new scale was given): the scale may
        # move now, while our held windows are open. Bring their partial sums
        # to the new scale rather than let them mix scales.
        old = None if not held or self._scale is None else self._scale.clone()
        result = update(self, new_scale)
        for owner in held:
            _window.rescale(owner, old, self._scale)
        return result

    # Never traced (GradScaler.update is a graph break anyway): reading our key
    # in the records would put a guard on it, and torch.compile would
    # recompile the caller once the key appears.
    gated_update = torch.compiler.disable(gated_update)
    gated_update._keras_accum_gated = True
    return gated_update


def _gate_grad_scaler_step(step):
    if getattr(step, "_keras_accum_gated", False):
        return step

    # Never traced (GradScaler.step is a graph break anyway, and our step() is).
    @torch.compiler.disable
    def step_ours(self, optimizer, *args, **kwargs):
        patched = optimizer.__dict__.get("step")
        exposed = patched is not None and "grad_scaler" not in signature(patched).parameters
        if exposed:
            # A wrapper set on the instance without functools.wraps (accelerate's
            # AcceleratedOptimizer does this under fp16) hides our `grad_scaler`
            # keyword: GradScaler would then hand us still-scaled gradients
            # through its newer attribute protocol. Expose it for this call.
            def step_with_scaler(*a, grad_scaler=None, **kw):
                return patched(*a, grad_scaler=grad_scaler, **kw)

            optimizer.step = step_with_scaler
        try:
            # GradScaler hands itself to our `step(grad_scaler=...)` and warns
            # each time that this protocol will change. AccumOptimizer needs the
            # scaler (to hold its scale inside a window) and its tests pin the
            # protocol; the warning would only confuse users, who did nothing
            # to cause it. Hidden for this call only: other optimizers'
            # warnings, and a `-W error::FutureWarning`, are left alone.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SCALER_WARNING, category=FutureWarning)
                return step(self, optimizer, *args, **kwargs)
        finally:
            if exposed:
                optimizer.step = patched

    @functools.wraps(step)
    def gated_step(self, optimizer, *args, **kwargs):
        if _owner(optimizer) is optimizer:  # an AccumOptimizer
            return step_ours(self, optimizer, *args, **kwargs)
        return step(self, optimizer, *args, **kwargs)  # unchanged for anything else

    gated_step._keras_accum_gated = True
    return gated_step


def install() -> None:
    """Installs the gates once (idempotent). Called by `import keras_accum.torch`."""
    global _installed
    if _installed:
        return
    for cls in set(_all_subclasses(LRScheduler)):
        _gate_class(cls)

    # Scheduler classes defined later (a user's or another library's) are
    # gated as they are created.
    previous = LRScheduler.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(LRScheduler, cls).__init_subclass__(**kwargs)
        _gate_class(cls)

    LRScheduler.__init_subclass__ = classmethod(__init_subclass__)

    scaler_cls = torch.amp.GradScaler
    scaler_cls.update = _gate_grad_scaler_update(scaler_cls.update)
    scaler_cls.step = _gate_grad_scaler_step(scaler_cls.step)
    _installed = True


def on_owner(method):
    """Runs `method` on the AccumOptimizer itself when called through a proxy.

    Lightning's `LightningOptimizer` (what `self.optimizers()` returns) takes
    our class as a base and forwards missing attributes to us, so a method
    called on it would read our state but write its counters onto the proxy.
    The owner reference (forwarded too) finds the real optimizer.
    """

    @functools.wraps(method)
    def on_owner(self, *args, **kwargs):
        owner = _owner(self)
        if owner is not None and owner is not self:
            return getattr(owner, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return on_owner


def observe_step(cls: type) -> None:
    """Gives `cls.step` torch's step hooks and profiler label, only when observed.

    torch wraps every optimizer's `step` in its hook runner (step pre/post
    hooks, a profiler label): about 16 us per call with none registered,
    most of a micro-step that does not update, and several times that right
    after a backward has emptied the caches. The AccumOptimizer calls that
    same runner only when something observes the step: a hook (its own or
    global) or a running profiler. A subclass that overrides `step` is
    wrapped by torch as usual, and its `super().step()` then runs the body
    alone (hooks run once).
    """
    unobserved_step = cls.step
    hooked_step = torch.optim.Optimizer.profile_hook_step(unobserved_step)

    @functools.wraps(unobserved_step)
    @torch.compiler.disable
    def observed_step(self, *args, **kwargs):
        if type(self).step is observed_step and (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _optimizer_module._global_optimizer_pre_hooks
            or _optimizer_module._global_optimizer_post_hooks
            or torch._C._autograd._profiler_enabled()
        ):
            return hooked_step(self, *args, **kwargs)
        return unobserved_step(self, *args, **kwargs)

    observed_step.hooked = True  # torch's `_patch_step_function`: already wrapped
    cls.step = observed_step


@contextlib.contextmanager
def global_step_hooks_off() -> Iterator[None]:
    """Runs the inner optimizer's step without torch's global step hooks.

    `register_optimizer_step_pre_hook`/`..._post_hook` hooks fire around every
    optimizer step; they have fired around the wrapper's `step()` (the one
    the caller made), and would fire again around the inner optimizer's
    inside it: torch's `test_step_all_hooks` expects `[0, 1, 2, 5]` for one
    step, not `[0, 1, 0, 5, 2, 5]`. The inner optimizer's own hooks still
    fire. torch looks the global dicts up by name at each step, so they are
    swapped for empty ones (and the same dicts put back, so their handles
    keep working); another thread's optimizer stepping in that moment would
    miss them.
    """
    pre = _optimizer_module._global_optimizer_pre_hooks
    post = _optimizer_module._global_optimizer_post_hooks
    if not pre and not post:
        yield
        return
    _optimizer_module._global_optimizer_pre_hooks = OrderedDict()
    _optimizer_module._global_optimizer_post_hooks = OrderedDict()
    try:
        yield
    finally:
        _optimizer_module._global_optimizer_pre_hooks = pre
        _optimizer_module._global_optimizer_post_hooks = post
