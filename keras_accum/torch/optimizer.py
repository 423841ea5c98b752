"""`AccumOptimizer`: exact gradient accumulation, EMA and clipping for PyTorch.

The torch mirror of `keras_accum.keras.AccumOptimizer`: same names, same
numbers (docs/semantics.md, points 1 to 15). The wrapper owns accumulation,
clipping, the non-finite policy and the EMA of weights; the inner optimizer is
called exactly once per update, so its state, step counter, weight decay and
any LR scheduler advance once per update.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import optimizer as _optimizer_module

from keras_accum import _core
from keras_accum.torch import _hooks

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FULL_PRECISION = (torch.float32, torch.float64)


def _fsdp2_modules(model: Any) -> list:
    """The FSDP2 (`fully_shard`) modules in `model`, itself included; [] if none."""
    if not (isinstance(model, torch.nn.Module) and torch.distributed.is_available()):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _set_gradient_sync(fsdp_modules: list, sync: bool) -> None:
    # Each module on its own (recurse=False): a plain root may hold sharded layers.
    for m in fsdp_modules:
        m.set_requires_gradient_sync(sync, recurse=False)


def _is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor as the whole tensor (every rank gets the same), else itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _one_dtype_and_device(tensors: list) -> bool:
    """Whether `tensors` (not empty) share one dtype and one device (cheaply)."""
    dtype, device = tensors[0].dtype, tensors[0].get_device()
    return all(t.dtype is dtype and t.get_device() == device for t in tensors)


def _dtype_name(dtype: Any) -> Any:
    """A torch.dtype as its name, for the shared validation; anything else as is."""
    if isinstance(dtype, torch.dtype):
        return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return dtype


def _by_device_and_dtype(tensors: list) -> dict:
    """Indices of `tensors` grouped by (device, dtype): the foreach fast path."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _norms(tensors: list) -> list:
    """Per-tensor L2 norms (float32 for half types), aligned with `tensors`."""
    out = [None] * len(tensors)
    for (_, dtype), idx in _by_device_and_dtype(tensors).items():
        kwargs = {"dtype": torch.float32} if dtype in _LOW_PRECISION else {}
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)):
            out[i] = n
    return out


def _divide_(tensors: list, divisor: float | torch.Tensor) -> None:
    """`t /= divisor` in place, one foreach pass per (device, dtype).

    A power-of-two divisor multiplies float32/float64 tensors by its
    reciprocal instead: the same real number, so the same rounded result bit
    for bit, and torch's CPU multiply is the faster kernel. Half types divide:
    a CPU kernel casts the scalar to the tensor's dtype, where a reciprocal
    may overflow (float16) or be rounded.
    """
    exact = (
        isinstance(divisor, float)
        and math.frexp(divisor)[0] == 0.5
        and 2.0**-60 <= divisor <= 2.0**60
    )
    for (dev, dtype), idx in _by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in idx]
        if exact and dtype in _FULL_PRECISION:
            torch._foreach_mul_(group, 1.0 / divisor)
        else:
            d = divisor.to(dev) if isinstance(divisor, torch.Tensor) else divisor
            torch._foreach_div_(group, d)


def _stack(scalars: list, device: torch.device) -> torch.Tensor:
    return torch.stack([s.to(device=device, dtype=torch.float32) for s in scalars])


def _global_norm(norms: list, device: torch.device) -> torch.Tensor:
    """`sqrt(sum_i norm_i**2)`, float32 (0 when there is no tensor)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    if all(type(n) is torch.Tensor and n.dtype is torch.float32 and n.device == device for n in norms):
        # The common case: one stack, no per-norm cast.
        return torch.linalg.vector_norm(torch.stack(norms))
    return torch.linalg.vector_norm(_stack(norms, device))


def _holds_sparse(p: torch.Tensor, state: Any) -> bool:
    """Whether `p`'s gradient (or its open window) is a sparse tensor."""
    if p.grad is not None and p.grad.is_sparse:
        return True
    acc = state[p].get("accumulator") if p in state else None
    return acc is not None and acc.is_sparse


def _values_of(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor itself; a coalesced sparse one's values (an alias, not a copy)."""
    return tensor._values() if tensor.is_sparse else tensor


def _extremes(tensors: list, device: torch.device) -> torch.Tensor:
    """Every tensor's min and max, stacked, float32 (inf/nan where a tensor has one).

    A tensor is all finite iff its min and max are (NaN propagates through
    both), and `w * t` is iff `w * min` and `w * max` are: an exact test in
    one read pass, where an L2 norm overflows for finite elements above
    ~1.8e19 (torch's float32 foreach norm) and the infinity norm is about 5x
    slower on CPU.
    """
    tensors = [t._values() if t.is_sparse else t for t in tensors]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((0,), dtype=torch.float32, device=device)
    return _stack([m for t in tensors for m in torch.aminmax(t)], device)


def _on_owner(method):
    """Runs `method` on the AccumOptimizer itself when called through a proxy.

    Lightning's `LightningOptimizer` (what `self.optimizers()` returns) takes
    our class as a base and forwards missing attributes to us, so a method
    called on it would read our state but write its counters onto the proxy.
    The owner reference (forwarded too) finds the real optimizer.
    """

    @functools.wraps(method)
    def on_owner(self, *args, **kwargs):
        owner = _hooks.owner(self)
        if owner is not None and owner is not self:
            return getattr(owner, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return on_owner


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
      in-place divide (skipped when the divisor is 1) and one norm read pass
      (`last_grad_norm`, which also decides the non-finite check). With
      `clipnorm`/`global_clipnorm` on float32/float64 gradients the divide
      rides on the clipping's multiply: no pass beyond
      `clip_grad_norm_`'s.
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
      copy); another dtype costs one cast copy.
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
    * `use_ema`: one float32 (float64 for float64 params) copy of every
      parameter, and one foreach `lerp_` per update.

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
            an `optimizer` already wrapped by another AccumOptimizer, or both
            `clipnorm` and `global_clipnorm`.

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
        self.inner_optimizer = optimizer
        self._config = config
        self._acc_dtype = (
            None if config.accumulator_dtype is None else _NAME_DTYPES[config.accumulator_dtype]
        )
        self._signature = config.state_signature(type(optimizer).__name__)
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
        self._ema_plan: tuple | None = None  # `_plan_ema`'s lists, while they hold
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
        """Global L2 norm (float32 tensor) of the last merged gradient, before
        clipping; inf/nan for a skipped window; None before the first window."""
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

    def _buffered(self, p: torch.Tensor) -> bool:
        """Whether `p` accumulates in a side buffer (else in `.grad`)."""
        return (
            self._weighted
            # "raise": `.grad` holds only the checked micro-step, so a caught
            # error leaves the window exactly as it was before that micro-batch.
            or self._config.on_nonfinite == "raise"
            or (self._acc_dtype is not None and p.dtype != self._acc_dtype)
            # Sparse gradients (nn.Embedding(sparse=True)): autograd sums them
            # out of place, so the window is kept beside `.grad`, coalesced.
            or _holds_sparse(p, self.state)
        )

    def _grad_refs_only(self) -> bool:
        """Whether no parameter can be side-buffered (`_buffered` is False for all).

        Only a sparse gradient of this micro-step can change that; the caller
        looks at those.
        """
        return (
            not self._weighted
            and self._config.on_nonfinite != "raise"
            and self._acc_dtype is None
            and not self._sparse_seen
        )

    def _uses_side_buffers(self) -> bool:
        return any(self._buffered(p) for p in self._params())

    def _keep_grad_refs(self, params: list, grads: list | None = None) -> None:
        """Remembers the `.grad` tensors that hold the open window (default mode).

        A reference per parameter, no copy: between micro-steps autograd adds
        into these very tensors, in place. `grads`: the `.grad` of each of
        `params`, if the caller has the list already (step() does).
        """
        if grads is None:
            grads = [p.grad for p in params]
        if self._weighted or self._config.on_nonfinite == "raise":
            self._grad_refs = None  # every parameter is side-buffered
        elif self._grad_refs_only():
            self._grad_refs = grads
        else:
            self._grad_refs = [None if self._buffered(p) else g for p, g in zip(params, grads)]

    def _check_grads_kept(self, params: list, grads: list) -> bool:
        """Raises if a `.grad` holding the open window was replaced since the last step().

        Returns whether every `.grad` is the very tensor the last step() kept
        (then none of them can have turned sparse).

        `model.zero_grad()` (set_to_none, torch's default) inside a window
        drops the micro-steps summed so far; the next backward then makes a
        new `.grad`. An identity check per parameter, no tensor work. A new
        `.grad` that is a view is left alone: DDP's `gradient_as_bucket_view`
        swaps `.grad` for a view of its bucket (with the same sum) at the first
        all-reduce after `no_sync` micro-steps.
        """
        refs = self._grad_refs
        if refs is None or len(refs) != len(params):
            return False
        if all(map(operator.is_, grads, refs)):
            return True  # the common case: one C-level pass of identity checks
        for i, (p, g, kept) in enumerate(zip(params, grads, refs)):
            if kept is None or g is kept or (g is not None and g._is_view()):
                continue
            raise RuntimeError(
                f"The `.grad` of parameter {i} (shape {tuple(p.shape)}) was replaced since "
                f"the last micro-step: the earlier micro-steps of this window "
                f"({self._window_steps} of {self.merge_grad}), summed in `.grad`, are lost. "
                "Was `model.zero_grad()` called inside the window? Call `opt.zero_grad()` "
                "instead: it keeps an open window. Nothing was changed. If `.grad` is "
                "replaced on purpose (`backward(create_graph=True)`, out-of-place "
                "accumulation), pass `weight=` at every micro-step: the window then lives "
                "in side buffers."
            )
        return False

    @torch.no_grad()
    def _rescale_window(self, old: torch.Tensor | None, new: torch.Tensor | None) -> None:
        """The GradScaler's scale moved from `old` to `new` while this window is open.

        Called by the gate on `GradScaler.update` (a scaler shared with a
        plain optimizer that steps every micro-step, or `update(new_scale)`):
        the partial sum, accumulated at `old`, is multiplied by `new / old`,
        exactly for GradScaler's own factors (powers of two). Costs one host
        read of the scale per such `update()`, and one pass over the window
        only when the scale really moved.
        """
        if self._window_steps == 0 or self._window_scale is None or old is None or new is None:
            return
        if torch.equal(new, old):
            return
        ratio = (new / old).to(torch.float32)
        window = []
        for p in self._params():
            if self._buffered(p):
                t = self.state.get(p, {}).get("accumulator")
            else:
                t = p.grad
            if t is not None:
                window.append(t)
        for (dev, dtype), idx in _by_device_and_dtype(window).items():
            torch._foreach_mul_([window[i] for i in idx], ratio.to(dev, dtype))
        self._window_scale = new.detach().clone()

    # ------------------------------------------------------------- micro-step
    # Wrapped below the class by `_observed_step` (a graph break under
    # torch.compile; torch's step hooks and profiler label when they are on).
    # No `no_grad` here: a micro-step that does not update makes no tensor op;
    # the methods that do enter it themselves.
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
                replaced since the last step, e.g. by `model.zero_grad()`).
        """
        w = self._validate_weight(weight)
        if self._ema_backup is not None:
            raise RuntimeError(
                "step() was called while the EMA is swapped into the model: leave "
                "`swap_ema_weights()` (or call `swap_out_ema()`) before training."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        all_grads = [p.grad for p in params]
        kept = self._check_grads_kept(params, all_grads)
        grads = [g for g in all_grads if g is not None]
        if self._unreduced and any(g.is_sparse for g in grads):
            raise RuntimeError(
                "A sparse gradient (nn.Embedding(sparse=True)) came from a backward run "
                "inside `opt.no_sync(model)`: sparse windows are summed in side buffers, "
                "where a gradient that skipped the reduction would never be reduced. Do "
                "not use `opt.no_sync` with sparse gradients (every micro-step then "
                "reduces). Nothing was changed."
            )
        switch_to_buffers = weight is not None and not self._weighted
        if switch_to_buffers:
            self._check_can_switch_to_buffers(params)
        scale = self._scaler_scale(grad_scaler)
        if self._window_steps > 0 and (scale is None) != (self._window_scale is None):
            raise RuntimeError(
                "Every micro-step of a window must go through the same GradScaler "
                "(scaler.step(opt)) or none: the window's gradients would mix scales."
            )
        if self.on_nonfinite == "raise" and scale is None:
            # Under a GradScaler, overflow is the scaler's business (it skips).
            self._raise_if_nonfinite(grads, w)

        # Validation done: state changes from here on.
        if switch_to_buffers:
            self._weighted = True
        self._accumulate(params, w, grads, dense=kept)
        if self._window_steps == 0:
            self._window_scale = None if scale is None else scale.detach().clone()
        self._micro_steps += 1
        self._window_steps += 1
        self._window_weight += w
        self._window_unsynced, self._unreduced = self._unreduced, False
        if self._window_steps >= self._config.merge_grad:
            skipped, device = self._close_window(params, grad_scaler)
            if grad_scaler is not None:
                found_inf = torch.full((), float(skipped), dtype=torch.float32, device=device)
                grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"] = {
                    device: found_inf
                }
        else:
            self._keep_grad_refs(params, all_grads)
            if grad_scaler is not None:
                grad_scaler._per_optimizer_states[id(self)][_hooks.SCALER_HOLD_KEY] = self
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

    def _check_can_switch_to_buffers(self, params: list) -> None:
        if self._window_steps > 0 and not all(self._buffered(p) for p in params):
            raise RuntimeError(
                "A micro-step `weight` was first passed at window position "
                f"{self._window_steps + 1} of {self.merge_grad}, but the earlier micro-steps "
                "of this window were summed inside `.grad`, where `w * g` cannot be formed. "
                "Pass `weight` from the first micro-step of a window on (e.g. always)."
            )
        if self._unreduced:
            raise RuntimeError(
                "Micro-step weights need side buffers, and a gradient moved into a "
                "buffer misses DDP's all-reduce: do not use `opt.no_sync(model)` "
                "together with `weight` (no_sync is a null context once weights are used)."
            )

    def _scaler_scale(self, grad_scaler: Any) -> torch.Tensor | None:
        """The GradScaler's current scale, after checking its protocol state."""
        if grad_scaler is None or not grad_scaler.is_enabled():
            return None
        record = grad_scaler._per_optimizer_states[id(self)]
        if record["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "scaler.unscale_(opt) was called on an AccumOptimizer: it unscaled a "
                ".grad that holds several micro-steps. AccumOptimizer unscales once per "
                "update itself; clip with its `clipnorm`/`global_clipnorm` instead."
            )
        return grad_scaler._scale

    @torch.no_grad()
    def _raise_if_nonfinite(self, grads: list, w: float) -> None:
        if not grads:
            return
        extremes = _extremes(grads, grads[0].device)
        # For w == 0 too: inf * 0 = nan still flags a non-finite g.
        if not bool(torch.isfinite(extremes * w).all()):
            raise FloatingPointError(
                f"on_nonfinite='raise': non-finite gradient at micro-step "
                f"{self._micro_steps + 1} (window position {self._window_steps + 1} "
                f"of {self.merge_grad}); nothing was accumulated."
            )

    def _accumulate(self, params: list, w: float, grads: list, dense: bool = False) -> None:
        """Moves this micro-step's `w * .grad` into the side buffers (if any).

        `grads`: this micro-step's `.grad` tensors that are not None; `dense`:
        known to be dense (the tensors the last step kept).
        """
        if self._grad_refs_only() and (dense or not any(g.is_sparse for g in grads)):
            return  # Every window lives in `.grad`: autograd did the work.
        self._move_to_buffers(params, w)

    @torch.no_grad()
    def _move_to_buffers(self, params: list, w: float) -> None:
        """The side-buffered parameters' `w * .grad`, into their buffers.

        A parameter's buffer exists from its first gradient in a window to
        the window's end, so "has a buffer" is "was seen in this window".
        """
        moved, groups = [], {}
        for p in params:
            g = p.grad
            if g is None or not self._buffered(p):
                continue  # In `.grad` mode autograd has already accumulated.
            state = self.state[p]
            buf = state.get("accumulator")
            if g.is_sparse:
                self._sparse_seen = True
                # Memory: the distinct rows the window touched; time: a
                # coalesce (sort) of this micro-step's rows into them.
                g = g.to(self._acc_dtype or g.dtype) * w
                state["accumulator"] = (g if buf is None else buf + g).coalesce()
            elif buf is None:
                # The window's first gradient: the buffer starts as w * g, in
                # one pass. A new tensor: .grad may be a view into a DDP
                # bucket, so it is never taken over.
                dtype = self._acc_dtype or g.dtype
                if dtype == g.dtype:
                    state["accumulator"] = torch.mul(g, w)
                else:
                    buf = g.to(dtype)
                    state["accumulator"] = buf if w == 1.0 else buf.mul_(w)
            else:
                groups.setdefault((buf.device, buf.dtype, g.dtype), []).append((buf, g))
            moved.append(p)
        for group in groups.values():
            bufs, gs = zip(*group)
            torch._foreach_add_(list(bufs), list(gs), alpha=w)
        for p in moved:
            p.grad = None  # The buffer holds it now; the next backward starts afresh.

    # ------------------------------------------------------------------ update
    def _merged(self, params: list) -> tuple[list, list]:
        """The window's accumulators and their parameters (seen ones only)."""
        if self._grad_refs_only():
            # No side buffer can exist: the window is the `.grad`s (a sparse
            # one sets `_sparse_seen` in `_move_to_buffers`, before any close).
            owners = [p for p in params if p.grad is not None]
            return [p.grad for p in owners], owners
        tensors, owners = [], []
        for p in params:
            if self._buffered(p):
                acc = self.state.get(p, {}).get("accumulator")
                if acc is not None:
                    tensors.append(acc)
                    owners.append(p)
            elif p.grad is not None:
                tensors.append(p.grad)
                owners.append(p)
        return tensors, owners

    @torch.no_grad()
    def _close_window(self, params: list, grad_scaler: Any = None) -> tuple[bool, torch.device]:
        """Merge, check, clip, one inner step, EMA, reset.

        Returns whether the window was skipped as non-finite, and the device
        of that decision (GradScaler's `found_inf`).
        """
        cfg = self._config
        merged, owners = self._merged(params)
        side_buffers = any(t is not p.grad for t, p in zip(merged, owners))
        # The merge, check and clip below work on plain tensors: a sparse
        # accumulator (coalesced) takes part through its values, in place.
        accumulators = merged
        if side_buffers:
            merged = [_values_of(t) for t in merged]
        device = (
            self._window_scale.device
            if self._window_scale is not None
            else (merged[0].device if merged else params[0].device)
        )
        if self._window_weight == 0.0:
            # Every micro-step weighed 0: the window holds no samples. Apply
            # nothing (0/0 would hand on NaN) and count no update, as a large
            # batch of no samples takes no step; not a skip either.
            self._reset_window(params, discard_grads=True)
            return False, device
        divisor = self._window_weight if cfg.reduction == "mean" else 1.0
        if self._window_scale is not None:
            # Scales are powers of two, so dividing by scale * W in one pass is
            # the same as unscaling, then dividing by W.
            divisor = self._window_scale * divisor
        # Norm clipping multiplies every tensor anyway: it takes the divide
        # into its multiply (one pass fewer), the norms being taken on the sum
        # and divided as numbers. Only for float32/float64 gradients (the
        # factor c / n / W is rounded to the gradient's dtype), a float divisor
        # >= 1 (sum / W cannot overflow where the sum did not), no clipvalue
        # (which needs the divided values), and the skip check on without a
        # GradScaler (its host read of the norm also decides the rare unfold).
        check = cfg.on_nonfinite == "skip" or self._window_scale is not None
        fold = (
            cfg.clipvalue is None
            and (cfg.clipnorm is not None or cfg.global_clipnorm is not None)
            and isinstance(divisor, float)
            and divisor >= 1.0
            and check
            and grad_scaler is None
            and all(t.dtype in _FULL_PRECISION for t in merged)
        )
        if not fold:
            if merged and not (isinstance(divisor, float) and divisor == 1.0):
                _divide_(merged, divisor)
            divisor = 1.0

        norms = _norms(merged)
        if norms and divisor != 1.0:
            norms = torch._foreach_div(norms, divisor)
        total = _global_norm(norms, device)
        self._last_grad_norm = total
        # The update's one host read (without a GradScaler, which reads its own).
        total_finite = None
        if check and grad_scaler is None:
            total_finite = math.isfinite(total.item())
        skip = check and not total_finite and self._is_nonfinite(merged, norms, total, grad_scaler)
        if skip:
            self._skipped_updates += 1
        else:
            if divisor != 1.0 and not total_finite:
                # Folded, and only the sum of squares overflowed (rare): the
                # unfolded order, whose norms are taken on the divided values.
                _divide_(merged, divisor)
                divisor = 1.0
                norms = _norms(merged)
                total = self._last_grad_norm = _global_norm(norms, device)
            self._clip(merged, norms, total, device, divisor)
            if side_buffers:
                for t, p in zip(accumulators, owners):
                    if t is not p.grad:
                        # The buffer itself when the dtypes agree (it is
                        # dropped below, so nothing aliases it), else a cast
                        # copy.
                        p.grad = t.to(dtype=p.dtype)
            self.inner_optimizer.step()
            self._iterations += 1
            if cfg.use_ema:
                self._update_ema(params)
        self._reset_window(params, discard_grads=skip)
        return skip, device

    def _is_nonfinite(self, merged, norms, total, grad_scaler) -> bool:
        """Whether the merged window holds an inf/nan (one host sync).

        Called when no host read has found `total` finite already.
        """
        bad = ~torch.isfinite(total)
        scale_moved = None
        if grad_scaler is not None and self._window_scale is not None:
            # A safety net: our gate keeps the scale fixed inside a window, but
            # a scaler shared with an optimizer stepping every micro-step, or a
            # manual update(new_scale), moves it, and the window then mixes
            # scales: discard it rather than apply it.
            scale_moved = grad_scaler._scale.to(total.device) != self._window_scale
            bad = bad | scale_moved
        if not bool(bad):
            return False
        if scale_moved is not None and bool(scale_moved):
            warnings.warn(
                "The GradScaler's scale changed inside an open window without "
                "`scaler.update()` (e.g. `scaler.load_state_dict(...)` or a direct edit): "
                "the window's gradients mix two scales, so it is skipped (counted in "
                "`skipped_updates`). Change the scale only through `scaler.update()`, or "
                "between windows.",
                RuntimeWarning,
                stacklevel=2,
            )
            return True
        # The L2 norm may overflow while every element is finite: look at the
        # tensors whose norm is not finite, exactly (rare path).
        finite = _full(torch.isfinite(_stack(norms, total.device))).tolist()
        suspects = [t for t, ok in zip(merged, finite) if not ok]
        if not suspects:
            return False  # Only the sum of squares overflowed.
        return not bool(_full(torch.isfinite(_extremes(suspects, total.device))).all())

    def _clip(self, merged: list, norms: list, total, device, divisor: float = 1.0) -> None:
        """Clips the merged gradients in place.

        `divisor`: the window's divisor when it is still to be applied (the
        caller folded it here); `norms` and `total` are those of the divided
        gradients either way.
        """
        cfg = self._config
        if not merged or not cfg.clips:
            return
        groups = _by_device_and_dtype(merged).values()
        if cfg.clipvalue is not None:
            for idx in groups:
                ts = [merged[i] for i in idx]
                torch._foreach_clamp_min_(ts, -cfg.clipvalue)
                torch._foreach_clamp_max_(ts, cfg.clipvalue)
            if cfg.clipnorm is not None or cfg.global_clipnorm is not None:
                norms = _norms(merged)  # Norm clipping sees the value-clipped gradient.
                total = _global_norm(norms, device)
        if cfg.clipnorm is not None:
            c = cfg.clipnorm
            for t, n in zip(merged, norms):
                t.mul_((c / torch.clamp(n, min=c) / divisor).to(t.dtype))
        elif cfg.global_clipnorm is not None:
            c = cfg.global_clipnorm
            factor = c / torch.clamp(total, min=c) / divisor
            for (dev, dtype), idx in _by_device_and_dtype(merged).items():
                torch._foreach_mul_([merged[i] for i in idx], factor.to(dev, dtype))

    def _reset_window(self, params: list, discard_grads: bool) -> None:
        """Resets by assignment, never by subtraction (one inf must not leak on)."""
        for p in params:
            state = self.state.get(p)
            if state and state.pop("accumulator", None) is not None and not state:
                del self.state[p]
        if discard_grads:
            # A skipped window: its sum in `.grad` goes (zero_grad() would too).
            for p in params:
                p.grad = None
        self._window_steps = 0
        self._window_weight = 0.0
        self._window_scale = None
        self._window_unsynced = False
        self._grad_refs = None

    @_on_owner
    @torch.compiler.disable
    @torch.no_grad()
    def flush(self) -> bool:
        """Applies the open window now, with its true divisor (`window_weight`).

        Call it after the last `step()` of an epoch (or of training) when the
        number of micro-batches is not a multiple of `merge_grad`; until then
        the open window stays in `.grad`/the buffers and in `state_dict()`.
        A flushed update counts like any other (`iterations`, schedulers,
        EMA); under a GradScaler the window is unscaled with the scale it was
        accumulated at.

        Returns:
            True if a window was applied (or skipped by the non-finite
            policy); False, with nothing changed, if the window was empty.
        """
        if self._window_steps == 0:
            return False
        self._check_window_reduced("flush()")
        self._close_window(self._params())
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
            cfg = self._config
            if self._weighted or cfg.on_nonfinite == "raise" or self._acc_dtype is not None:
                for p in self._params():
                    if p.grad is not None and self._buffered(p):
                        if set_to_none:
                            p.grad = None
                        else:
                            p.grad.zero_()
            return
        super().zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
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
        skip = not self.next_step_updates and not self._uses_side_buffers()
        fsdp = _fsdp2_modules(model)
        if fsdp:
            if not skip:
                # The closing micro-step reduce-scatters the whole window, even
                # if the user's own code left the sync off.
                _set_gradient_sync(fsdp, True)
                yield
                return
            # FSDP2 has no `no_sync()`: its switch keeps the unsharded
            # gradients and skips the reduce-scatter until it is back on.
            _set_gradient_sync(fsdp, False)
            try:
                self._unreduced = "FSDP2"
                yield
            finally:
                _set_gradient_sync(fsdp, True)
            return
        if not skip or not hasattr(model, "no_sync"):
            yield
            return
        with model.no_sync():
            self._unreduced = "DDP"
            yield

    def _check_window_reduced(self, what: str) -> None:
        """Refuses to flush or save a window whose last micro-step skipped the reduction."""
        engine = self._window_unsynced
        if not engine:
            return
        where = (
            "in FSDP2's unsharded gradient buffers, which no state dict holds"
            if engine == "FSDP2"
            else "in each rank's own `.grad`, different on every rank"
        )
        raise RuntimeError(
            f"{what} was called in the middle of a window whose last micro-step ran inside "
            f"`opt.no_sync(model)` ({engine}): the window's gradient sums are not reduced "
            f"across processes yet (they are {where}). Run the micro-step before a flush() "
            "or a mid-window save outside `opt.no_sync` (its backward reduces the window "
            "so far), or save at a window boundary. Nothing was changed."
        )

    # --------------------------------------------------------------------- EMA
    def _update_ema(self, params: list) -> None:
        """`ema = m * ema + (1 - m) * p` after an update (`iterations` already stepped).

        Runs under `torch.no_grad()` (inside `_close_window`), so the
        parameters are used as they are, not detached one by one.
        """
        cfg = self._config
        m = _core.ema_decay(self._iterations - 1, cfg.ema_momentum, cfg.ema_warmup)
        plan = self._ema_plan
        if plan is None or len(plan[0]) != len(params) or any(
            a is not b for a, b in zip(plan[0], params)
        ):
            plan = self._plan_ema(params)
        _, emas, ps, one_device = plan
        if not emas:
            pass  # the first update: the copies `_plan_ema` made are the EMA
        elif one_device and all(e.dtype is p.dtype for e, p in zip(emas, ps)):
            # The common case, one call: lerp_(p, 1 - m) = ema + (1 - m) *
            # (p - ema), one fused pass.
            torch._foreach_lerp_(emas, ps, 1.0 - m)
        else:
            # One foreach call per (device, dtype): a mixed list would take
            # the per-tensor path of the CUDA kernels.
            groups: dict = {}
            for e, p in zip(emas, ps):
                group = groups.setdefault((p.device, p.dtype, e.dtype), ([], []))
                group[0].append(e)
                group[1].append(p)
            for (_, p_dtype, ema_dtype), (es, ps_) in groups.items():
                if p_dtype == ema_dtype:
                    torch._foreach_lerp_(es, ps_, 1.0 - m)
                else:
                    # bf16/fp16 parameters: lerp needs one dtype, so upcast
                    # one parameter at a time (a list would hold a float32
                    # copy of all of them at once).
                    for e, p in zip(es, ps_):
                        e.lerp_(p.to(ema_dtype), 1.0 - m)
        f = cfg.ema_overwrite_frequency
        if f is not None and self._iterations % f == 0:
            for p in params:
                p.copy_(self.state[p]["ema"])

    def _plan_ema(self, params: list) -> tuple:
        """The EMA update's lists: (params, their EMAs, the params with one, one device?).

        Makes the EMA of a parameter that has none (the first update, or a
        parameter added since): a copy, not updated this time. The plan is
        kept for the next updates while no copy was made: looking each EMA up
        by its parameter (a tensor hashed in Python) and checking dtypes and
        devices cost about 16 us around a 90 to 150 us lerp at 1M parameters
        (8 tensors). `load_state_dict` and unpickling, which replace the EMA
        tensors, drop it; the dtypes are still checked at each update (a
        `model.half()` between updates).
        """
        state = self.state
        emas, ps, made = [], [], False
        for p in params:
            ema = state[p].get("ema")
            if ema is None:
                state[p]["ema"] = p.detach().to(
                    dtype=torch.promote_types(p.dtype, torch.float32), copy=True
                )
                made = True
            else:
                emas.append(ema)
                ps.append(p)
        plan = (tuple(params), emas, ps, bool(ps) and _one_dtype_and_device(ps))
        self._ema_plan = None if made else plan
        return plan

    def _require_ema(self, what: str) -> None:
        # The same message as the Keras side.
        if not self.use_ema:
            raise ValueError(f"`{what}` needs `use_ema=True`. Received: use_ema=False")

    @_on_owner
    @torch.no_grad()
    def swap_in_ema(self) -> None:
        """Copies the EMA into the parameters, keeping the raw ones bit-exactly.

        Idempotent. Parameters without an EMA yet (before the first update)
        keep their values. Buffers are not touched.
        """
        self._require_ema("swap_in_ema")
        if self._ema_backup is not None:
            return
        pairs = [(p, self.state.get(p, {}).get("ema")) for p in self._params()]
        pairs = [(p, e) for p, e in pairs if e is not None]
        self._ema_backup = [(p, p.detach().clone()) for p, _ in pairs]
        for p, e in pairs:
            p.copy_(e)

    @_on_owner
    @torch.no_grad()
    def swap_out_ema(self) -> None:
        """Puts the raw parameters back (copies); a no-op if not swapped in."""
        self._require_ema("swap_out_ema")
        if self._ema_backup is None:
            return
        for p, raw in self._ema_backup:
            p.copy_(raw)
        self._ema_backup = None

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

    @_on_owner
    @torch.no_grad()
    def finalize_variable_values(self) -> None:
        """Writes the EMA into the parameters for good (no-op without EMA)."""
        if not self.use_ema:
            return
        if self._ema_backup is not None:
            self.swap_out_ema()
        for p in self._params():
            ema = self.state.get(p, {}).get("ema")
            if ema is not None:
                p.copy_(ema)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state nested with this one's.

        Layout (tensors, numbers, strings, lists and dicts only, so
        `torch.load(weights_only=True)` reads it):

        * `state`, `param_groups`: this optimizer's per-parameter state
          (`"ema"`, `"accumulator"`) and the shared groups, as torch packs
          them. A window summed in `.grad` is saved here as `"accumulator"`
          (`.grad` is in no state dict, and losing it would change the run).
        * `inner`: `inner_optimizer.state_dict()`.
        * `accum`: format version, state signature, config, counters, the
          open window's weight sum, scale and seen parameters.

        Save between micro-steps (after `step()`), as with any optimizer.
        State-dict post-hooks run last, on the whole dict, as on a plain
        optimizer (their result, if not None, is returned).
        """
        if self._window_steps > 0:
            self._check_window_reduced("state_dict()")
        with self._base_hooks_off("_optimizer_state_dict_post_hooks"):
            sd = super().state_dict()
        params = self._params()
        if self._window_steps > 0:
            for i, p in enumerate(params):
                if not self._buffered(p) and p.grad is not None:
                    # A new dict: the packed state shares its dicts with self.state.
                    # A copy: FSDP2's sharded `.grad` can be a view into a
                    # reduce buffer whose storage it later frees, which
                    # `torch.save` cannot write (an open window only).
                    grad = p.grad.detach().clone() if _is_dtensor(p.grad) else p.grad
                    sd["state"][i] = {**sd["state"].get(i, {}), "accumulator": grad}
        sd["inner"] = self.inner_optimizer.state_dict()
        sd["accum"] = {
            "format_version": _core.FORMAT_VERSION,
            "signature": dict(self._signature),
            "config": self._config.to_dict(),
            "iterations": torch.tensor(self._iterations, dtype=torch.int64),
            "micro_steps": torch.tensor(self._micro_steps, dtype=torch.int64),
            "skipped_updates": torch.tensor(self._skipped_updates, dtype=torch.int64),
            "window_steps": torch.tensor(self._window_steps, dtype=torch.int64),
            "window_weight": torch.tensor(self._window_weight, dtype=torch.float64),
            "weighted": self._weighted,
            "window_scale": self._window_scale,
            "last_grad_norm": self._last_grad_norm,
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @contextlib.contextmanager
    def _base_hooks_off(self, *names: str) -> Iterator[None]:
        """Runs base-class code with these hook dicts empty: we run the hooks ourselves.

        `torch.optim.Optimizer.state_dict`/`load_state_dict` run them on the
        plain part only; ours must see the whole dict. The same dict objects
        are put back, so `RemovableHandle`s keep working.
        """
        saved = {name: getattr(self, name) for name in names}
        try:
            for name in names:
                setattr(self, name, OrderedDict())
            yield
        finally:
            for name, hooks in saved.items():
                setattr(self, name, hooks)

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

        Raises:
            ValueError: the state was not saved by an AccumOptimizer, was
                saved by a differently configured one (another `merge_grad`,
                `reduction`, `accumulator_dtype`, `use_ema` or inner class),
                or does not fit the parameters.
        """
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # shallow, as torch's loader does
            for hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
        accum = state_dict.get("accum") if isinstance(state_dict, dict) else None
        if not isinstance(accum, dict) or "signature" not in accum or "inner" not in state_dict:
            raise ValueError(
                "Cannot load optimizer state into AccumOptimizer: it was not saved by an "
                "AccumOptimizer (no 'accum' section; nothing was loaded). To load a plain "
                "optimizer's state, use `opt.inner_optimizer.load_state_dict(...)`."
            )
        _core.check_state_signature(accum["signature"], self._signature)
        params = self._params()
        self._check_fits(state_dict, params)

        saved_own = {i: dict(s) for i, s in state_dict["state"].items()}
        with self._base_hooks_off(
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ):
            super().load_state_dict(state_dict)
        self.__dict__.pop("param_groups", None)  # the base loader's list; ours is the inner's
        # Both sections hold the same groups; the top-level one is what a
        # load pre-hook sees and may have edited (e.g. a new lr).
        self.inner_optimizer.load_state_dict(
            {**state_dict["inner"], "param_groups": state_dict["param_groups"]}
        )
        # Both loads built new param_groups lists (torch's `load_state_dict` does): share the inner
        # optimizer's again (its __setstate__ also filled in its defaults),
        # or a scheduler on this optimizer would stop reaching the inner LR.
        self.param_groups = self.inner_optimizer.param_groups

        self._iterations = int(accum["iterations"])
        self._micro_steps = int(accum["micro_steps"])
        self._skipped_updates = int(accum["skipped_updates"])
        self._window_steps = int(accum["window_steps"])
        self._window_weight = float(accum["window_weight"])
        self._weighted = bool(accum["weighted"])
        scale = accum.get("window_scale")
        self._window_scale = None if scale is None else scale.detach().clone()
        norm = accum.get("last_grad_norm")
        self._last_grad_norm = None if norm is None else norm.detach().clone()
        self._ema_backup = None
        self._ema_plan = None  # the EMA tensors are replaced below
        self._unreduced = False
        self._window_unsynced = False

        for i, p in enumerate(params):
            saved = saved_own.get(i, {})
            state = self.state[p]
            if "ema" in saved:
                state["ema"] = saved["ema"].to(device=p.device, copy=True)
            acc = saved.get("accumulator")
            if acc is not None and acc.is_sparse:
                self._sparse_seen = True  # a window lives beside `.grad`
            if self._buffered(p):
                if acc is not None:
                    state["accumulator"] = acc.to(device=p.device, copy=True)
            else:
                state.pop("accumulator", None)
                with torch.no_grad():
                    p.grad = None if acc is None else acc.to(p.device, p.dtype, copy=True)
            if not state:
                self.state.pop(p, None)
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            # A sparse `.grad` left on a parameter (its window lives beside
            # it): the kept references below must not pass for dense ones.
            self._sparse_seen = True
        self._grad_refs = None
        if self._window_steps > 0:
            self._keep_grad_refs(params)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------ copy, pickle
    def __getstate__(self) -> dict[str, Any]:
        """What `copy.deepcopy`, `pickle` and `torch.save(opt)` keep: a working optimizer.

        torch's `Optimizer.__getstate__` keeps only defaults, state and param
        groups; a copy of ours needs the inner optimizer, the configuration,
        the counters and the open window. A window summed in `.grad` is kept
        too: no Parameter pickles or deep-copies its `.grad`. As torch does,
        hooks are not kept, nor a scheduler's patch of `step`.
        """
        state = {
            k: v
            for k, v in self.__dict__.items()
            if not (k.startswith("_optimizer_") and k.endswith("_hooks"))
            and k not in ("param_groups", "step", "_grad_refs", "_ema_plan", _hooks.OWNER_ATTR)
        }
        state["_window_grads"] = (
            [None if self._buffered(p) else p.grad for p in self._params()]
            if self._window_steps > 0
            else None
        )
        return state

    def __copy__(self):
        # A shallow copy would share the inner optimizer (and its state) with
        # this one: two wrappers on one inner optimizer, refused at construction too.
        raise TypeError(
            "AccumOptimizer cannot be shallow-copied: the copy would share the inner "
            "optimizer with the original. Use copy.deepcopy(opt) (or pickle/torch.save)."
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        grads = state.pop("_window_grads", None)
        state.setdefault("_grad_refs", None)
        state.setdefault("_ema_plan", None)
        super().__setstate__(state)  # torch's: fresh hook dicts, the step patch
        _hooks.set_owner(self, self)
        _hooks.set_owner(self.inner_optimizer, self)
        if grads is not None:
            with torch.no_grad():
                for p, g in zip(self._params(), grads):
                    if g is not None:
                        p.grad = g
            self._keep_grad_refs(self._params())

    def _check_fits(self, state_dict: dict, params: list) -> None:
        """Checks group sizes and per-parameter shapes before anything is loaded."""

        def sizes(groups):
            return [len(g["params"]) for g in groups]

        ours = sizes(self.param_groups)
        for where, groups in (
            ("param_groups", state_dict["param_groups"]),
            ("inner param_groups", state_dict["inner"]["param_groups"]),
        ):
            if sizes(groups) != ours:
                raise ValueError(
                    "Cannot load optimizer state: its "
                    f"{where} hold {sizes(groups)} parameters, this optimizer's {ours} "
                    "(nothing was loaded)."
                )
        for i, saved in state_dict["state"].items():
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(
                    f"Cannot load optimizer state: unknown parameter index {i!r} "
                    "(nothing was loaded)."
                )
            for key in ("ema", "accumulator"):
                t = saved.get(key)
                if t is not None and tuple(t.shape) != tuple(params[i].shape):
                    raise ValueError(
                        f"Cannot load optimizer state: parameter {i} has shape "
                        f"{tuple(params[i].shape)}, its saved {key!r} {tuple(t.shape)} "
                        "(nothing was loaded)."
                    )


# torch wraps every optimizer's `step` in its hook runner (step pre/post hooks,
# a profiler label): about 16 us per call with none registered, most of a
# micro-step that does not update, and several times that right after a
# backward has emptied the caches. AccumOptimizer calls that same runner only
# when something observes the step: a hook (its own or global) or a running
# profiler. A subclass that overrides `step` is wrapped by torch as usual, and
# its `super().step()` then runs the body alone (hooks run once).
_unobserved_step = AccumOptimizer.step
_hooked_step = torch.optim.Optimizer.profile_hook_step(_unobserved_step)


@functools.wraps(_unobserved_step)
@torch.compiler.disable
def _observed_step(self, *args, **kwargs):
    if type(self).step is _observed_step and (
        self._optimizer_step_pre_hooks
        or self._optimizer_step_post_hooks
        or _optimizer_module._global_optimizer_pre_hooks
        or _optimizer_module._global_optimizer_post_hooks
        or torch._C._autograd._profiler_enabled()
    ):
        return _hooked_step(self, *args, **kwargs)
    return _unobserved_step(self, *args, **kwargs)


_observed_step.hooked = True  # torch's `_patch_step_function`: already wrapped
AccumOptimizer.step = _observed_step
