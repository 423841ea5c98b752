"""Closing a window: the decision, the merge, the clip, the inner step once.

docs/semantics.md, points 3 (merge), 5 (one inner step per update), 6
(flush), 7 (clipping) and 8 (the non-finite policy, both its per-micro-step
`"raise"` check and the update's `"skip"` decision), the torch part. A
window whose weights sum to 0 holds no samples and applies nothing; a
non-finite one (or a GradScaler overflow) is skipped and counted; any other
is divided by its weight sum (and loss scale), clipped, handed to the inner
optimizer once, and followed by the EMA. The tensor kernels are in
`_functional.py`, where the window lives in `_window.py`.

All or nothing: everything up to and including the inner optimizer's step
reads the window and writes only new tensors (the first transform of the
merge is out of place), so an exception anywhere there (a check, the merge,
the EMA's preparation, the inner step) puts the counters, `.grad` and the
wrapper's state back as they were before the call. What follows the inner
step (the EMA into shadows made beforehand, the reset) allocates nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from keras_accum.torch import _distribute, _ema, _hooks, _loss_scale, _window
from keras_accum.torch import _functional as F

#: What an update may change on the optimizer before its inner step, put
#: back by `_Snapshot.restore` when something raises.
_SNAPSHOT = (
    "_micro_steps",
    "_window_steps",
    "_window_weight",
    "_weighted",
    "_window_scale",
    "_window_unsynced",
    "_unreduced",
    "_grad_refs",
    "_sparse_seen",
    "_last_grad_norm",
    "_iterations",
    "_skipped_updates",
    "_ema_plan",
)


class _Snapshot:
    """The optimizer's counters and every parameter's `.grad`, to put back."""

    def __init__(self, opt, params: list):
        self.values = [getattr(opt, name) for name in _SNAPSHOT]
        self.grads = [p.grad for p in params]

    def restore(self, opt, params: list) -> None:
        for name, value in zip(_SNAPSHOT, self.values):
            setattr(opt, name, value)
        with torch.no_grad():
            for p, g in zip(params, self.grads):
                if p.grad is not g:
                    p.grad = g


@torch.no_grad()
def raise_if_nonfinite(opt, grads: list, w: float) -> None:
    """`on_nonfinite="raise"`: refuses a micro-step whose `w * g` is not finite."""
    if not grads:
        return
    extremes = F.extremes(grads, grads[0].device)
    # For w == 0 too: inf * 0 = nan still flags a non-finite g.
    if not bool(torch.isfinite(extremes * w).all()):
        raise FloatingPointError(
            f"on_nonfinite='raise': non-finite gradient at micro-step "
            f"{opt._micro_steps + 1} (window position {opt._window_steps + 1} "
            f"of {opt.merge_grad}); nothing was accumulated."
        )


@torch.no_grad()
def close_window(
    opt,
    params: list,
    grad_scaler: Any = None,
    w: float | None = None,
    scale: torch.Tensor | None = None,
    switch_to_buffers: bool = False,
) -> tuple[bool, torch.device]:
    """Counts the closing micro-step (if any), then merge, check, clip, one inner step, EMA, reset.

    `w`: the closing micro-step's weight, its gradients still in `.grad`
    (`scale`: its GradScaler scale; `switch_to_buffers`: its `weight` is the
    first); None for `flush()`, which then also clears `.grad` (the window
    applied, every accumulator is clear again). Returns whether the window was
    skipped as non-finite, and the device of that decision (GradScaler's
    `found_inf`). All or nothing up to the inner step (see the module).
    """
    snapshot = _Snapshot(opt, params)
    try:
        if w is not None:
            single = opt._window_steps == 0 and opt._config.reduction == "mean"
            if switch_to_buffers:
                opt._weighted = True
            _loss_scale.open_window(opt, scale)
            opt._micro_steps += 1
            opt._window_steps += 1
            opt._window_weight += w
            opt._window_unsynced, opt._unreduced = opt._unreduced, False
        else:
            single = False
        outcome, device, plan = _update(opt, params, grad_scaler, w, single)
    except BaseException:
        snapshot.restore(opt, params)
        raise
    # Committed: the inner step has run (or the window is skipped or empty).
    if outcome == "applied":
        opt._iterations += 1
        if opt._config.use_ema:
            _ema.update(opt, params, plan)
    elif outcome == "skipped":
        opt._skipped_updates += 1
    _window.reset(opt, params, discard_grads=outcome != "applied" or w is None)
    return outcome == "skipped", device


def _update(opt, params: list, grad_scaler: Any, w: float | None, single: bool):
    """Everything up to and including the inner step; changes no tensor it did not make.

    Returns the outcome (`"applied"`, `"skipped"` or `"empty"`), the device
    of the decision and the EMA plan.
    """
    cfg = opt._config
    sums, owners, sparse = _window.window_sums(opt, params, w, single)
    if sparse:
        opt._sparse_seen = True
    device = (
        opt._window_scale.device
        if opt._window_scale is not None
        else (sums[0].device if sums else params[0].device)
    )
    if opt._window_weight == 0.0:
        # Every micro-step weighed 0: the window holds no samples. Apply
        # nothing (0/0 would hand on NaN) and count no update, as a large
        # batch of no samples takes no step; not a skip either.
        return "empty", device, None
    mean = cfg.reduction == "mean" and not single
    divisor = _loss_scale.divisor(opt, opt._window_weight if mean else 1.0)
    # The merge, check and clip below work on dense tensors: a sparse sum
    # takes part through the values of its coalesced form (uncoalesced
    # gradients of a one-micro-step window are coalesced for them only).
    coalesced = [t.coalesce() if t.is_sparse else t for t in sums]
    merged = [F.values_of(t) for t in coalesced]
    # Norm clipping multiplies every tensor anyway: it takes the divide
    # into its multiply (one pass fewer), the norms being taken on the sum
    # and divided as numbers. Only for float32/float64 gradients (the
    # factor c / n / W is rounded to the gradient's dtype), a float divisor
    # >= 1 (sum / W cannot overflow where the sum did not), no clipvalue
    # (which needs the divided values), and the skip check on without a
    # GradScaler (its host read of the norm decides the rare fallback).
    check = cfg.on_nonfinite == "skip" or opt._window_scale is not None
    norm_clip = cfg.clipnorm is not None or cfg.global_clipnorm is not None
    fold = (
        cfg.clipvalue is None
        and norm_clip
        and isinstance(divisor, float)
        and divisor >= 1.0
        and check
        and grad_scaler is None
        and all(t.dtype in F.FULL_PRECISION for t in merged)
    )
    owned = False  # whether `merged` are tensors this update made
    if not fold:
        if merged and not (isinstance(divisor, float) and divisor == 1.0):
            merged = F.divide(merged, divisor, inplace=False)
            owned = True
        divisor = 1.0

    norms = F.norms(merged)
    if norms and divisor != 1.0:
        norms = torch._foreach_div(norms, divisor)
    total = F.global_norm(norms, device)
    opt._last_grad_norm = total
    skip, overflow = _decide(opt, merged, norms, total, grad_scaler, check, norm_clip)
    if skip:
        return "skipped", device, None
    if overflow:
        # Every element is finite, only the squares overflowed (rare): the
        # norms again, scaled so that they cannot (`F.safe_norms`).
        norms = F.safe_norms(merged)
        if divisor != 1.0:
            norms = torch._foreach_div(norms, divisor)
        total = opt._last_grad_norm = F.global_norm(norms, device, safe=True)
    if cfg.clips and merged:
        merged = clip(opt, merged, norms, total, device, divisor, inplace=owned)
        owned = True

    plan = _ema.prepare(opt, params) if cfg.use_ema else None
    if owned:
        handed = [
            torch.sparse_coo_tensor(
                c._indices(), m, c.shape, is_coalesced=True, check_invariants=False
            )
            if c.is_sparse
            else m
            for c, m in zip(coalesced, merged)
        ]
    else:
        handed = sums  # untransformed: the sums themselves (a sparse gradient as it came)
    handed = [g if g.dtype is p.dtype else g.to(p.dtype) for p, g in zip(owners, handed)]
    _check_differentiable(opt, owners, handed)
    if len(owners) != len(params):
        held = set(owners)
        for p in params:
            if p not in held and p.grad is not None:
                # A side-buffered parameter's `.grad` outside the window (the
                # micro-batch a caught "raise" rejected) is not the inner step's.
                p.grad = None
    for p, g in zip(owners, handed):
        # A buffer whose dtype is the parameter's is handed on itself (the
        # reset drops it from the state, so nothing else aliases it).
        if p.grad is not g:
            p.grad = g
    # One optimizer step, as the caller made one: the global step hooks fired
    # for this wrapper's step() already, so they do not fire again here.
    with _hooks.global_step_hooks_off():
        opt.inner_optimizer.step()
    return "applied", device, plan


def _decide(opt, merged, norms, total, grad_scaler, check: bool, norm_clip: bool):
    """Whether to skip the window, and whether its norm merely overflowed.

    One host read of the norm when the policy checks (`"skip"`, or a
    GradScaler) or a norm clip needs the true norm; none otherwise. Then
    `last_grad_norm` may read inf for finite gradients whose squares
    overflow (`"ignore"` or `"raise"` without norm clipping).
    """
    if check and grad_scaler is not None:
        bad = ~torch.isfinite(total)
        scale_moved = _loss_scale.scale_moved(opt, grad_scaler, total)
        if scale_moved is not None:
            bad = bad | scale_moved
        if not bool(bad):  # the update's one host read, with the scale check
            return False, False
        if scale_moved is not None and bool(scale_moved):
            _loss_scale.warn_scale_moved()
            return True, False
    elif not (check or norm_clip) or math.isfinite(total.item()):
        return False, False
    if _has_nonfinite(merged, norms, total):
        return check, False  # "ignore" and "raise" pass it on as it is
    return False, True


def _has_nonfinite(merged, norms, total) -> bool:
    """Whether an element is inf/nan, given a non-finite `total` (rare path).

    The L2 norm overflows while every element is finite when only the
    squares do: look at the tensors whose norm is not finite, exactly.
    """
    finite = _distribute.full(torch.isfinite(F.stack(norms, total.device))).tolist()
    suspects = [t for t, ok in zip(merged, finite) if not ok]
    if not suspects:
        return False  # Only the sum of squares overflowed.
    return not bool(_distribute.full(torch.isfinite(F.extremes(suspects, total.device))).all())


def clip(opt, merged: list, norms: list, total, device, divisor: float, inplace: bool) -> list:
    """Clips the merged gradients; returns them (new tensors unless `inplace`).

    `divisor`: the window's divisor when it is still to be applied (the
    caller folded it here); `norms` and `total` are those of the divided
    gradients either way.
    """
    cfg = opt._config
    if cfg.clipvalue is not None:
        merged = F.clip_value(merged, cfg.clipvalue, inplace)
        inplace = True
        if cfg.clipnorm is not None or cfg.global_clipnorm is not None:
            norms = F.norms(merged)  # Norm clipping sees the value-clipped gradient.
            total = F.global_norm(norms, device)
    if cfg.clipnorm is not None:
        merged = F.clip_norm(merged, norms, cfg.clipnorm, divisor, inplace)
    elif cfg.global_clipnorm is not None:
        merged = F.clip_global_norm(merged, total, cfg.global_clipnorm, divisor, inplace)
    return merged


def _check_differentiable(opt, owners: list, handed: list) -> None:
    """Refuses to hand a transformed gradient to a `differentiable=True` inner optimizer.

    The merge runs without autograd, so the derivative of the update with
    respect to the gradient would be wrong; the constructor refuses the
    configurations that always transform (`merge_grad > 1`, clipping), this
    the rest (a `"sum"` weight, a GradScaler, a group added since).
    """
    if not any(g.get("differentiable", False) for g in opt.param_groups):
        return
    if any(g is not p.grad for p, g in zip(owners, handed)):
        raise RuntimeError(
            "The inner optimizer has `differentiable=True`, and this update would hand it "
            "a gradient AccumOptimizer transformed (a micro-step weight with "
            "reduction='sum', a GradScaler's unscaling, or merge_grad > 1), whose "
            "derivative the update would not carry. Use merge_grad=1 without weights, "
            "GradScaler or clipping, or an inner optimizer without `differentiable`. "
            "Nothing was changed."
        )
