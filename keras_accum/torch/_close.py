"""Closing a window: the decision, the merge, the clip, the inner step once.

docs/semantics.md, points 3 (merge), 5 (one inner step per update), 6
(flush), 7 (clipping) and 8 (the non-finite policy, both its per-micro-step
`"raise"` check and the update's `"skip"` decision), the torch part. A
window whose weights sum to 0 holds no samples and applies nothing; a
non-finite one (or a GradScaler overflow) is skipped and counted; any other
is divided by its weight sum (and loss scale), clipped, handed to the inner
optimizer once, and followed by the EMA. The tensor kernels are in
`_functional.py`, where the window lives in `_window.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from keras_accum.torch import _distribute, _ema, _loss_scale, _window
from keras_accum.torch import _functional as F


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
def close_window(opt, params: list, grad_scaler: Any = None) -> tuple[bool, torch.device]:
    """Merge, check, clip, one inner step, EMA, reset.

    Returns whether the window was skipped as non-finite, and the device
    of that decision (GradScaler's `found_inf`).
    """
    cfg = opt._config
    merged, owners = _window.accumulators(opt, params)
    side_buffers = any(t is not p.grad for t, p in zip(merged, owners))
    # The merge, check and clip below work on plain tensors: a sparse
    # accumulator (coalesced) takes part through its values, in place.
    accumulators = merged
    if side_buffers:
        merged = [F.values_of(t) for t in merged]
    device = (
        opt._window_scale.device
        if opt._window_scale is not None
        else (merged[0].device if merged else params[0].device)
    )
    if opt._window_weight == 0.0:
        # Every micro-step weighed 0: the window holds no samples. Apply
        # nothing (0/0 would hand on NaN) and count no update, as a large
        # batch of no samples takes no step; not a skip either.
        _window.reset(opt, params, discard_grads=True)
        return False, device
    divisor = _loss_scale.divisor(opt, opt._window_weight if cfg.reduction == "mean" else 1.0)
    # Norm clipping multiplies every tensor anyway: it takes the divide
    # into its multiply (one pass fewer), the norms being taken on the sum
    # and divided as numbers. Only for float32/float64 gradients (the
    # factor c / n / W is rounded to the gradient's dtype), a float divisor
    # >= 1 (sum / W cannot overflow where the sum did not), no clipvalue
    # (which needs the divided values), and the skip check on without a
    # GradScaler (its host read of the norm also decides the rare unfold).
    check = cfg.on_nonfinite == "skip" or opt._window_scale is not None
    fold = (
        cfg.clipvalue is None
        and (cfg.clipnorm is not None or cfg.global_clipnorm is not None)
        and isinstance(divisor, float)
        and divisor >= 1.0
        and check
        and grad_scaler is None
        and all(t.dtype in F.FULL_PRECISION for t in merged)
    )
    if not fold:
        if merged and not (isinstance(divisor, float) and divisor == 1.0):
            F.divide_(merged, divisor)
        divisor = 1.0

    norms = F.norms(merged)
    if norms and divisor != 1.0:
        norms = torch._foreach_div(norms, divisor)
    total = F.global_norm(norms, device)
    opt._last_grad_norm = total
    # The update's one host read (without a GradScaler, which reads its own).
    total_finite = None
    if check and grad_scaler is None:
        total_finite = math.isfinite(total.item())
    skip = check and not total_finite and is_nonfinite(opt, merged, norms, total, grad_scaler)
    if skip:
        opt._skipped_updates += 1
    else:
        if divisor != 1.0 and not total_finite:
            # Folded, and only the sum of squares overflowed (rare): the
            # unfolded order, whose norms are taken on the divided values.
            F.divide_(merged, divisor)
            divisor = 1.0
            norms = F.norms(merged)
            total = opt._last_grad_norm = F.global_norm(norms, device)
        clip(opt, merged, norms, total, device, divisor)
        if side_buffers:
            for t, p in zip(accumulators, owners):
                if t is not p.grad:
                    # The buffer itself when the dtypes agree (it is
                    # dropped below, so nothing aliases it), else a cast
                    # copy.
                    p.grad = t.to(dtype=p.dtype)
        opt.inner_optimizer.step()
        opt._iterations += 1
        if cfg.use_ema:
            _ema.update(opt, params)
    _window.reset(opt, params, discard_grads=skip)
    return skip, device


def is_nonfinite(opt, merged, norms, total, grad_scaler) -> bool:
    """Whether the merged window holds an inf/nan (one host sync).

    Called when no host read has found `total` finite already.
    """
    bad = ~torch.isfinite(total)
    scale_moved = _loss_scale.scale_moved(opt, grad_scaler, total)
    if scale_moved is not None:
        bad = bad | scale_moved
    if not bool(bad):
        return False
    if scale_moved is not None and bool(scale_moved):
        _loss_scale.warn_scale_moved()
        return True
    # The L2 norm may overflow while every element is finite: look at the
    # tensors whose norm is not finite, exactly (rare path).
    finite = _distribute.full(torch.isfinite(F.stack(norms, total.device))).tolist()
    suspects = [t for t, ok in zip(merged, finite) if not ok]
    if not suspects:
        return False  # Only the sum of squares overflowed.
    return not bool(_distribute.full(torch.isfinite(F.extremes(suspects, total.device))).all())


def clip(opt, merged: list, norms: list, total, device, divisor: float = 1.0) -> None:
    """Clips the merged gradients in place.

    `divisor`: the window's divisor when it is still to be applied (the
    caller folded it here); `norms` and `total` are those of the divided
    gradients either way.
    """
    cfg = opt._config
    if not merged or not cfg.clips:
        return
    if cfg.clipvalue is not None:
        F.clip_value_(merged, cfg.clipvalue)
        if cfg.clipnorm is not None or cfg.global_clipnorm is not None:
            norms = F.norms(merged)  # Norm clipping sees the value-clipped gradient.
            total = F.global_norm(norms, device)
    if cfg.clipnorm is not None:
        F.clip_norm_(merged, norms, cfg.clipnorm, divisor)
    elif cfg.global_clipnorm is not None:
        F.clip_global_norm_(merged, total, cfg.global_clipnorm, divisor)
