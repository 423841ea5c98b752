"""`AccumOptimizer`: exact gradient accumulation, EMA and clipping for PyTorch.

The torch mirror of `keras_accum.keras.AccumOptimizer`: same names, same
numbers (docs/semantics.md, points 1 to 16). The wrapper owns accumulation,
clipping, the non-finite policy and the EMA of weights; the inner optimizer is
called exactly once per update, so its state, step counter, weight decay and
any LR scheduler advance once per update.

This module is the public class: construction, `step`, `zero_grad`,
`flush`, the param groups, the state-dict entry points and the properties.
Each concern lives in its own module, as functions of the optimizer:

* `_window.py`: where the open window lives (`.grad` or side buffers), the
  move into the buffers, the kept `.grad` references, rescale and reset.
* `_functional.py`: the tensor kernels (divide, norms, extremes, clipping).
* `_close.py`: closing a window (the decision, merge, clip, one inner step).
* `_ema.py`: the EMA (update, overwrite, swap, finalize).
* `_state.py`: `state_dict`/`load_state_dict`, pickling and copies.
* `_distribute.py`: DDP/FSDP2 `no_sync`, DTensor helpers.
* `_loss_scale.py`: GradScaler cooperation.
* `_hooks.py`: the scheduler and `GradScaler.update` gates, step hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from keras_accum import _core
from keras_accum.torch import (
    _close,
    _distribute,
    _ema,
    _hooks,
    _loss_scale,
    _state,
    _window,
)

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _dtype_name(dtype: Any) -> Any:
    """A torch.dtype as its name, for the shared validation; anything else as is."""
    if isinstance(dtype, torch.dtype):
        return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return dtype


class AccumOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer with exact gradient accumulation, EMA and clipping.

    Use it in the plain torch loop, once per micro-batch:
    `loss.backward(); opt.step(); scheduler.step(); opt.zero_grad()`.
    Every `merge_grad`-th `step()` (an update) hands the merged gradient to the
    inner optimizer, once:

        acc_i     += w * g_i                       (each micro-step, weight w)
        merged_i   = acc_i / sum(w)                (reduction="mean")
                   = acc_i                         (reduction="sum")
        merged     = clip(merged)                  (clipvalue, then clipnorm or
                                                    global_clipnorm)
        inner.step()                               (once per update)
        ema_i      = m * ema_i + (1 - m) * p_i     (after each update only)

    With equal micro-batches and `w = 1`, training with `merge_grad=k` on
    batches of `b` equals training on batches of `k * b`, for every inner
    optimizer, LR scheduler included. A parameter whose `.grad` is None in a
    micro-step contributes zero; one with no gradient in the whole window is
    handed `grad=None` (the inner optimizer leaves it and its state alone).

    Where the window lives, and what it costs:

    * Default (`accumulator_dtype=None` or equal to the parameter dtype, no
      `weight`): autograd accumulates into `.grad` itself. No extra memory;
      a non-update `step()` does no tensor work at all (counters only), and
      `zero_grad()` keeps `.grad` until the window closes. An update adds one
      divide (skipped when the divisor is 1) and one norm read pass
      (`last_grad_norm`, which also decides the non-finite check). With
      `clipnorm`/`global_clipnorm` on float32/float64 gradients the divide
      rides on the clipping's multiply: no pass beyond
      `clip_grad_norm_`'s. The update's first transform writes new tensors
      (one gradient-sized temporary while the inner optimizer steps), so
      that an exception anywhere in it leaves the window as it was.
    * A side buffer, per parameter, in `accumulator_dtype` (e.g. float32 for
      bfloat16 parameters), or in the parameter dtype once a micro-step
      `weight` is passed (`w * g` cannot be formed inside a `.grad` that
      already holds the earlier micro-steps; from then on the optimizer keeps
      using buffers, so pass `weight` at every micro-step or never). Costs
      one buffer per parameter (`numel * itemsize` of the accumulator dtype)
      while a window is open, and one pass over the gradients per micro-step
      (`buf = w * g` at the window's first, `buf += w * g` after); `step()`
      moves `.grad` into the buffer and sets `.grad = None`. At the update a
      buffer of the parameter's dtype becomes the `.grad` handed on (no
      copy); another dtype costs one cast copy. A complex parameter's
      buffer is complex (complex128 for float64, else complex64).
    * `on_nonfinite="raise"`: one min/max read pass and a host sync per
      micro-step, and side buffers in the parameter dtype, so that `.grad`
      holds only the micro-step being checked: after a caught
      `FloatingPointError` the window is exactly as before that micro-batch
      (`opt.zero_grad()` then drops the rejected gradient). The add moves
      from autograd into `step()` (about +3% per micro-step on CPU); one
      more gradient-sized buffer while a window is open; DDP `no_sync` is a
      null context. `"skip"` (the default): one host sync per update.
    * Default mode, every micro-step: an identity check of the `.grad`
      tensors against the last step's (no tensor work), which turns
      `model.zero_grad()` inside a window into an error instead of a
      silently dropped window.
    * A window whose `weight`s sum to 0 holds no samples: it applies
      nothing and is not counted as an update (nor as a skip).
    * `use_ema`: one float32 (float64 for float64 params, complex for
      complex ones) copy of every parameter, and one foreach `lerp_` per
      update (two passes, `ema *= m; ema += (1 - m) * p`, under
      `on_nonfinite="ignore"`, where a weight may be infinite).

    Every `step()` (and `flush()`) is all or nothing: whatever raises inside
    it (a check, the merge, the inner optimizer's step) leaves the window,
    `.grad`, the counters and this optimizer's state as they were before the
    call. Complex parameters work with every option: the finite check and
    `clipvalue` act on the real and imaginary parts, norms are those of
    `|g|`.

    The EMA covers exactly the parameters in the optimizer's param groups
    (Keras: the trainable variables). Buffers (BatchNorm running statistics,
    integer counters) are never averaged, swapped or overwritten: they are
    running averages already, and `swap_ema_weights()` leaves them alone.

    GradScaler: call `scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update()` every micro-step. The wrapper unscales once per update
    (before clipping), skips the window on overflow (whatever `on_nonfinite`
    says: the scaler's protocol) and lets the scale move only at updates.
    Do not call `scaler.unscale_(opt)`: clip with `clipnorm`/`global_clipnorm`.
    A scaler shared with a plain optimizer (stepped every micro-step) moves
    the scale inside windows: the open window is then rescaled by the ratio
    of scales (exact for GradScaler's powers of two), never discarded.

    DDP: wrap the backward in `with opt.no_sync(model):` to skip the
    all-reduce on micro-steps that do not update (only while gradients
    accumulate in `.grad`; with side buffers every micro-step all-reduces).

    Args:
        optimizer: a `torch.optim.Optimizer` (not an `AccumOptimizer`, not
            LBFGS); its param groups become this optimizer's (shared, so
            schedulers and `add_param_group` reach both).
        merge_grad: int >= 1, micro-steps per update. Defaults to 1 (then the
            wrapper is bit-identical to the inner optimizer).
        reduction: `"mean"` (default): the merged gradient is the weighted
            mean `sum(w * g) / sum(w)`; `"sum"`: `sum(w * g)`.
        accumulator_dtype: None (default: each parameter's own dtype, in
            `.grad`), a `torch.dtype` or its name (`"float32"`, ...).
        use_ema: bool, keep an exponential moving average of the parameters,
            moved after each update only. Defaults to False.
        ema_momentum: float in [0, 1], the EMA momentum `m`. Defaults to 0.99.
        ema_overwrite_frequency: int >= 1 or None; right after every
            `ema_overwrite_frequency`-th update the parameters are replaced
            by their EMA.
        ema_warmup: bool, use `m = min(ema_momentum, (1 + n) / (10 + n))`
            with `n` the number of updates before this one. Defaults to False.
        clipnorm: float > 0 or None, clip each merged gradient to this norm:
            `g * clipnorm / max(||g||, clipnorm)`.
        clipvalue: float > 0 or None, clip merged gradient values to
            `[-clipvalue, clipvalue]` (before any norm clipping).
        global_clipnorm: float > 0 or None, clip the merged gradients to this
            global norm. Exclusive with `clipnorm`.
        on_nonfinite: `"skip"` (default): a window with an inf or NaN is
            discarded at its update (parameters, inner state, EMA, schedulers
            and `iterations` do not move) and counted in `skipped_updates`;
            `"raise"`: `FloatingPointError` at the micro-step that produced
            it, before any state changes (the window stays as it was: catch
            it, `opt.zero_grad()`, go on); `"ignore"`: pass it on.

    Raises:
        TypeError: `optimizer` is not a `torch.optim.Optimizer`, or an
            argument of the wrong kind (`merge_grad="4"`).
        ValueError: a bad value, an `AccumOptimizer` or LBFGS as `optimizer`,
            an `optimizer` already wrapped by another AccumOptimizer, both
            `clipnorm` and `global_clipnorm`, or an `optimizer` with
            `differentiable=True` and `merge_grad > 1` or a clip (the merge
            and the clip run outside autograd).

    Example:

    ```python
    opt = keras_accum.torch.AccumOptimizer(torch.optim.AdamW(model.parameters()), merge_grad=4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=n_updates)
    for x, y in loader:  # micro-batches of 8: the updates of batches of 32
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()  # advances once per update
        opt.zero_grad()  # clears only after an update
    opt.flush()  # apply a last, partial window
    ```
    """

    # GradScaler.step then calls step(grad_scaler=scaler) instead of
    # unscaling .grad itself at every micro-step (which would unscale the
    # earlier micro-steps of the window again and again).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        merge_grad: int = 1,
        reduction: str = "mean",
        accumulator_dtype: torch.dtype | str | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        ema_warmup: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "`optimizer` must be a torch.optim.Optimizer (e.g. "
                f"torch.optim.AdamW(model.parameters())). Received: optimizer={optimizer!r}"
            )
        if isinstance(optimizer, AccumOptimizer):
            raise ValueError(
                "`optimizer` must not be an AccumOptimizer: wrapping one in another "
                "would merge the gradients twice. Pass the inner optimizer, and the "
                f"product of the merge_grad values. Received: optimizer={optimizer!r}"
            )
        if _hooks.owner(optimizer) is not None:
            # Its scheduler gate, GradScaler records and param groups would
            # follow the newest wrapper, silently leaving the first one's.
            raise ValueError(
                "`optimizer` is already wrapped by another AccumOptimizer: one inner "
                "optimizer can be driven by one wrapper only. Build a new inner optimizer, "
                f"or keep using the first wrapper. Received: optimizer={optimizer!r}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "`optimizer` must not be LBFGS: it re-evaluates a closure several "
                "times per step, which a merged gradient cannot serve. "
                f"Received: optimizer={optimizer!r}"
            )
        config = _core.AccumConfig.create(
            allow_none_dtype=True,
            merge_grad=merge_grad,
            reduction=reduction,
            accumulator_dtype=_dtype_name(accumulator_dtype),
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            ema_warmup=ema_warmup,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
        )
        if (config.merge_grad > 1 or config.clips) and any(
            g.get("differentiable", False) for g in optimizer.param_groups
        ):
            # The merge and the clip run outside autograd: the update's value
            # would be right and its derivative wrong (or an in-place error).
            raise ValueError(
                "`optimizer` must not have `differentiable=True` unless merge_grad=1 and no "
                "clipping is set: AccumOptimizer merges and clips the gradients outside "
                "autograd, so the derivative of the update with respect to them would be "
                f"wrong. Received: optimizer with differentiable=True, merge_grad="
                f"{config.merge_grad}, clipnorm={config.clipnorm}, clipvalue="
                f"{config.clipvalue}, global_clipnorm={config.global_clipnorm}"
            )
        self.inner_optimizer = optimizer
        self._config = config
        self._acc_dtype = (
            None if config.accumulator_dtype is None else _NAME_DTYPES[config.accumulator_dtype]
        )
        self._signature = _state.signature(config, type(optimizer).__name__)
        # The base constructor runs hooks set-up and add_param_group for the
        # inner optimizer's groups (the dicts themselves, so they are shared);
        # then the list itself is shared, so a later add_param_group on either
        # optimizer, or a scheduler writing group["lr"], reaches both.
        self._sharing_groups = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self._sharing_groups = True
        # From here on `param_groups` is the inner optimizer's attribute (see
        # the property), whichever object is loaded or assigned.
        self.__dict__.pop("param_groups", None)

        # Counters are host ints: whether a step updates is host control flow
        # (it decides whether inner.step() runs at all), so device counters
        # would cost a sync per micro-step. They are saved as tensors.
        self._iterations = 0
        self._micro_steps = 0
        self._skipped_updates = 0
        self._window_steps = 0
        self._window_weight = 0.0
        # Sticky: a micro-step `weight` was passed, so every parameter
        # accumulates in a side buffer from then on.
        self._weighted = False
        # The GradScaler scale the open window was accumulated at.
        self._window_scale: torch.Tensor | None = None
        self._last_grad_norm: torch.Tensor | None = None
        # This micro-step's backward ran inside model.no_sync().
        self._unreduced: bool | str = False  # the running micro-step skips the reduction
        self._window_unsynced: bool | str = False  # the window's last micro-step skipped it
        self._sparse_seen = False  # a sparse gradient was met: some windows live beside .grad
        self._ema_backup: list | None = None
        self._ema_plan: tuple | None = None  # `_ema.make_plan`'s lists, while they hold
        # The `.grad` tensors holding the open window (default mode), as left
        # by the last micro-step: `model.zero_grad()` inside a window shows as
        # a replaced tensor at the next step().
        self._grad_refs: list | None = None
        _hooks.set_owner(self, self)
        _hooks.set_owner(optimizer, self)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> _core.AccumConfig:
        """The validated configuration (shared with the Keras side)."""
        return self._config

    @property
    def merge_grad(self) -> int:
        """Micro-steps per update."""
        return self._config.merge_grad

    @property
    def reduction(self) -> str:
        """`"mean"` (divide by the window's weight sum) or `"sum"`."""
        return self._config.reduction

    @property
    def accumulator_dtype(self) -> torch.dtype | None:
        """The accumulators' dtype; None: each parameter's own, in `.grad`."""
        return self._acc_dtype

    @property
    def use_ema(self) -> bool:
        """Whether an EMA of the parameters is kept."""
        return self._config.use_ema

    @property
    def on_nonfinite(self) -> str:
        """What a window with an inf or NaN does: `"skip"`, `"raise"` or `"ignore"`."""
        return self._config.on_nonfinite

    # ---------------------------------------------------------------- counters
    @property
    def iterations(self) -> int:
        """Updates applied (skipped windows do not count)."""
        return self._iterations

    @property
    def micro_steps(self) -> int:
        """Micro-steps taken (calls of `step()`)."""
        return self._micro_steps

    @property
    def skipped_updates(self) -> int:
        """Windows discarded by the non-finite policy (or a GradScaler overflow)."""
        return self._skipped_updates

    @property
    def window_steps(self) -> int:
        """Micro-steps in the open window."""
        return self._window_steps

    @property
    def window_weight(self) -> float:
        """Sum of the micro-step weights in the open window."""
        return self._window_weight

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """Global L2 norm of the last merged gradient, before clipping.

        A float32 tensor (float64 when a gradient is float64); inf/nan for a
        skipped window; None before the first window.
        """
        return self._last_grad_norm

    @property
    def next_step_updates(self) -> bool:
        """Whether the next `step()` closes a window."""
        return self._window_steps + 1 >= self._config.merge_grad

    def __repr__(self) -> str:
        defaults = _core.AccumConfig.create(allow_none_dtype=True).to_dict()
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config.to_dict().items() if v != defaults[k])
        inner = "\n    ".join(repr(self.inner_optimizer).splitlines())
        return f"AccumOptimizer({cfg + ', ' if cfg else ''}optimizer=\n    {inner}\n)"

    # ------------------------------------------------------------ param groups
    @property
    def param_groups(self) -> list:
        """The inner optimizer's param groups (one list, shared).

        Read through to the inner optimizer, so that they stay shared whichever
        object is loaded (`inner_optimizer.load_state_dict` builds a new list)
        or assigned: a scheduler on this optimizer always drives the inner LR.
        """
        # getattr, not __dict__: Lightning's LightningOptimizer runs our methods
        # on itself and forwards missing attributes to us.
        if getattr(self, "_sharing_groups", False):
            return self.inner_optimizer.param_groups
        return self.__dict__["param_groups"]  # the base constructor's own list

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        if getattr(self, "_sharing_groups", False):
            self.inner_optimizer.param_groups = value
        else:
            self.__dict__["param_groups"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to the inner optimizer (and so to this one)."""
        if not self._sharing_groups:
            # Base constructor: register the inner optimizer's own dicts.
            super().add_param_group(param_group)
        else:
            self.inner_optimizer.add_param_group(param_group)

    def _params(self) -> list:
        """Parameters in param-group order: the indices of `state_dict()`."""
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------- micro-step
    # Wrapped below the class by `_hooks.observe_step` (a graph break under
    # torch.compile; torch's step hooks and profiler label when they are on).
    # No `no_grad` here: a micro-step that does not update makes no tensor op;
    # the functions that do enter it themselves.
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        weight: float | torch.Tensor | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Any:
        """Takes one micro-step; every `merge_grad`-th one updates.

        Under `torch.compile` this is a graph break: it runs eagerly, so its
        host-side counters cause no guard and no recompile.

        Args:
            closure: optional callable that re-evaluates the model (with
                backward) and returns the loss; called once, before merging.
            weight: optional number (or 0-dim tensor, read on the host) >= 0,
                this micro-step's weight `w` (a sample or token count).
                Defaults to 1. Passing a weight moves accumulation to side
                buffers for good, so it must come from the first micro-step
                of a window on.
            grad_scaler: passed by `GradScaler.step(opt)`; do not pass it.

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError, ValueError: a bad `weight` (nothing changes).
            FloatingPointError: `on_nonfinite="raise"` and a non-finite
                gradient (or `w * g`) in this micro-step (nothing changes).
            RuntimeError: an unsupported combination (a first `weight` in the
                middle of a window, a sparse gradient, `scaler.unscale_(opt)`,
                a GradScaler used on only some micro-steps of a window, a step
                while the EMA is swapped in, a `.grad` holding the window
                replaced since the last step, e.g. by `model.zero_grad()`, a
                gradient transformed for a `differentiable=True` inner
                optimizer); nothing changes.

        Whatever raises, the inner optimizer's step included, leaves the
        window, `.grad`, the counters and this optimizer's state as they
        were before the call.
        """
        w = self._validate_weight(weight)
        _ema.check_not_swapped(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        all_grads = [p.grad for p in params]
        kept = _window.check_grads_kept(self, params, all_grads)
        grads = [g for g in all_grads if g is not None]
        _distribute.check_sparse_reduced(self, grads)
        switch_to_buffers = weight is not None and not self._weighted
        if switch_to_buffers:
            _window.check_can_switch_to_buffers(self)
        scale = _loss_scale.scale(self, grad_scaler)
        if self.on_nonfinite == "raise" and scale is None:
            # Under a GradScaler, overflow is the scaler's business (it skips).
            _close.raise_if_nonfinite(self, grads, w)

        if self._window_steps + 1 >= self._config.merge_grad:
            # The update: all or nothing (see `_close`).
            skipped, device = _close.close_window(
                self, params, grad_scaler, w, scale, switch_to_buffers
            )
            _loss_scale.report(self, grad_scaler, True, skipped, device)
            return loss
        # Validation done: state changes from here on.
        if switch_to_buffers:
            self._weighted = True
        try:
            _window.accumulate(self, params, w, grads, dense=kept)
        except BaseException:
            if switch_to_buffers:
                self._weighted = False
            raise
        _loss_scale.open_window(self, scale)
        self._micro_steps += 1
        self._window_steps += 1
        self._window_weight += w
        self._window_unsynced, self._unreduced = self._unreduced, False
        _window.keep_grad_refs(self, params, all_grads)
        _loss_scale.report(self, grad_scaler, False, False, None)
        return loss

    @staticmethod
    def _validate_weight(weight: Any) -> float:
        if isinstance(weight, torch.Tensor):
            if weight.numel() != 1 or weight.is_complex() or weight.dtype == torch.bool:
                raise TypeError(
                    "`weight` must be a finite number >= 0 (a sample or token count). "
                    f"Received: weight={weight!r}"
                )
            weight = weight.item()
        w = _core.validate_weight(weight)
        return 1.0 if w is None else w

    @_hooks.on_owner
    @torch.compiler.disable
    def flush(self) -> bool:
        """Applies the open window now, with its true divisor (`window_weight`).

        Call it after the last `step()` of an epoch (or of training) when the
        number of micro-batches is not a multiple of `merge_grad`; until then
        the open window stays in `.grad`/the buffers and in `state_dict()`.
        A flushed update counts like any other (`iterations`, schedulers,
        EMA); under a GradScaler the window is unscaled with the scale it was
        accumulated at. Afterwards every accumulator is clear, `.grad`
        included (set to None, as `zero_grad()` would), so that the next
        backward starts the next window from nothing.

        Returns:
            True if a window was applied (or skipped by the non-finite
            policy); False, with nothing changed, if the window was empty.
        """
        if self._window_steps == 0:
            return False
        _distribute.check_window_reduced(self, "flush()")
        _close.close_window(self, self._params())
        return True

    @torch.compiler.disable
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears `.grad`, but only when no window is open.

        Inside a window `.grad` holds the micro-steps summed so far (default
        mode), so the call does nothing; after an update (or before the first
        micro-step) it clears as `torch.optim.Optimizer.zero_grad` does. Use
        this, not `model.zero_grad()`, which would drop the open window.
        A side-buffered parameter's `.grad` is never part of the window: it
        is cleared inside a window too (after a step() that raised, it holds
        the rejected micro-batch).
        """
        if self._window_steps > 0:
            _window.clear_buffered_grads(self, set_to_none)
            return
        super().zero_grad(set_to_none=set_to_none)

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Skips gradient communication when the next `step()` does not update.

        Wrap the forward and backward of each micro-step with it. Under DDP it
        is `model.no_sync()`: the all-reduce runs once per window, on the
        summed `.grad`. Under FSDP2 (a module wrapped by `fully_shard`) it is
        `model.set_requires_gradient_sync(False)`, switched back on after the
        backward: the reduce-scatter runs once per window, on the summed
        unsharded gradients. Under FSDP2 the open window's partial sums then
        live unreduced inside FSDP, out of reach of `state_dict()`; under DDP
        they differ between ranks. So `flush()` and `state_dict()` refuse a
        window whose last micro-step ran inside `no_sync`: run the micro-step
        before a flush or a mid-window save outside `no_sync` (its reduction
        moves the partial sums into `.grad`, the same on every rank, or each
        rank's shard under FSDP2); the window's result is the same. Sparse
        gradients live in side buffers and refuse `no_sync`. With side buffers (`accumulator_dtype` other than the
        parameter dtype, or micro-step weights) every micro-step must
        all-reduce, so this is a null context.

        Example:

        ```python
        with opt.no_sync(ddp_model):
            loss_fn(ddp_model(x), y).backward()
        opt.step()
        ```
        """
        return _distribute.no_sync(self, model)

    # --------------------------------------------------------------------- EMA
    def _update_ema(self, params: list) -> None:
        """`_ema.update` (the benchmarks time it alone, under `torch.no_grad()`)."""
        _ema.update(self, params)

    @_hooks.on_owner
    def swap_in_ema(self) -> None:
        """Copies the EMA into the parameters, keeping the raw ones bit-exactly.

        Idempotent. Parameters without an EMA yet (before the first update)
        keep their values. Buffers are not touched.
        """
        _ema.swap_in(self)

    @_hooks.on_owner
    def swap_out_ema(self) -> None:
        """Puts the raw parameters back (copies); a no-op if not swapped in."""
        _ema.swap_out(self)

    @contextlib.contextmanager
    def swap_ema_weights(self) -> Iterator[AccumOptimizer]:
        """Context manager: the parameters hold their EMA inside, the raw values after.

        Swapping is by copies, so the raw parameters come back bit-exactly;
        it costs one copy of the parameters while inside.

        Example:

        ```python
        with opt.swap_ema_weights():
            evaluate(model)
        ```
        """
        self.swap_in_ema()
        try:
            yield self
        finally:
            self.swap_out_ema()

    @_hooks.on_owner
    def finalize_variable_values(self) -> None:
        """Writes the EMA into the parameters for good (no-op without EMA)."""
        _ema.finalize(self)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state nested with this one's.

        Layout (tensors, numbers, strings, lists and dicts only, so
        `torch.load(weights_only=True)` reads it):

        * `state`, `param_groups`: this optimizer's per-parameter state
          (`"ema"`, `"accumulator"`) and the shared groups, as torch packs
          them, then one group without parameters that marks the dict as
          ours: a plain optimizer's `load_state_dict` refuses the dict
          ("different number of parameter groups") instead of taking our
          per-parameter state for its own. A window summed in `.grad` is
          saved here as `"accumulator"` (`.grad` is in no state dict, and
          losing it would change the run).
        * `inner`: `inner_optimizer.state_dict()`, what a plain optimizer
          loads.
        * `accum`: format version, state signature, config, counters, the
          open window's weight sum, scale and seen parameters.

        The window in it is a copy: a later `backward()` or `step()` does not
        change the dict. The EMA and the inner optimizer's state are the
        live tensors, as in any torch optimizer's state dict. Save between
        micro-steps (after `step()`), as with any optimizer. State-dict
        post-hooks run last, on the whole dict, as on a plain optimizer
        (their result, if not None, is returned).
        """
        return _state.state_dict(self)

    @torch.compiler.disable
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads `state_dict()` output; raises, changing nothing, on a mismatch.

        Per-parameter tensors keep their saved dtype (torch's own loader
        would cast a float32 accumulator or EMA of a bfloat16 parameter to
        bfloat16); a window saved from `.grad` is put back into `.grad`; the
        param groups are shared with the inner optimizer again. As on a plain
        optimizer, load pre-hooks run first (on a shallow copy; what they
        return is what gets checked and loaded) and post-hooks last. The
        hyperparameters loaded are those of the top-level `param_groups` (the
        ones hooks see), for both optimizers.

        State dicts of format version 1 (before the marker group) load too.
        Keys of `state` that are no parameter index (a state-dict hook's)
        are kept in `opt.state`, as torch does.

        Raises:
            ValueError: the state was not saved by an AccumOptimizer, was
                saved by a differently configured one (another `merge_grad`,
                `reduction`, `accumulator_dtype`, `use_ema` or inner class)
                or in a format version this keras_accum does not read, or
                does not fit the parameters.
        """
        _state.load_state_dict(self, state_dict)

    # ------------------------------------------------------------ copy, pickle
    def __getstate__(self) -> dict[str, Any]:
        """What `copy.deepcopy`, `pickle` and `torch.save(opt)` keep: a working optimizer.

        torch's `Optimizer.__getstate__` keeps only defaults, state and param
        groups; a copy of ours needs the inner optimizer, the configuration,
        the counters and the open window. A window summed in `.grad` is kept
        too: no Parameter pickles or deep-copies its `.grad`. As torch does,
        hooks are not kept, nor a scheduler's patch of `step`.
        """
        return _state.getstate(self)

    def __copy__(self):
        # A shallow copy would share the inner optimizer (and its state) with
        # this one: two wrappers on one inner optimizer, refused at construction too.
        raise TypeError(
            "AccumOptimizer cannot be shallow-copied: the copy would share the inner "
            "optimizer with the original. Use copy.deepcopy(opt) (or pickle/torch.save)."
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        _state.setstate(self, state)


_hooks.observe_step(AccumOptimizer)
