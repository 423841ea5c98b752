"""GradScaler cooperation: the scale of the window, unscaled once per update.

docs/semantics.md, point 16 (the torch part). `GradScaler.step(opt)` hands
itself to `step(grad_scaler=...)` (the optimizer declares
`_step_supports_amp_scaling`) instead of unscaling `.grad` at every
micro-step. A window remembers the scale its first micro-step was taken at;
the update divides the window's sum by that scale times its divisor, in one
pass; an overflow (or a scale moved behind the scaler's back) skips the
window, whatever `on_nonfinite` says; the scaler learns the outcome through
its per-optimizer record. The gate that keeps `scaler.update()` from moving
the scale inside a window is in `_hooks.py`; rescaling an open window when
the scale does move is `_window.rescale`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from keras_accum.torch import _hooks


def scale(opt, grad_scaler: Any) -> torch.Tensor | None:
    """The GradScaler's current scale, after checking its protocol state.

    None without a scaler (or with a disabled one). Refuses a window that
    mixes scaled and unscaled micro-steps, and `scaler.unscale_(opt)`.
    """
    current = None
    if grad_scaler is not None and grad_scaler.is_enabled():
        record = grad_scaler._per_optimizer_states[id(opt)]
        if record["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "scaler.unscale_(opt) was called on an AccumOptimizer: it unscaled a "
                ".grad that holds several micro-steps. AccumOptimizer unscales once per "
                "update itself; clip with its `clipnorm`/`global_clipnorm` instead."
            )
        current = grad_scaler._scale
    if opt._window_steps > 0 and (current is None) != (opt._window_scale is None):
        raise RuntimeError(
            "Every micro-step of a window must go through the same GradScaler "
            "(scaler.step(opt)) or none: the window's gradients would mix scales."
        )
    return current


def open_window(opt, current: torch.Tensor | None) -> None:
    """At a window's first micro-step: the scale its gradients are taken at."""
    if opt._window_steps == 0:
        opt._window_scale = None if current is None else current.detach().clone()


def divisor(opt, window_divisor: float) -> float | torch.Tensor:
    """The update's one divisor: the window's, times its loss scale if any.

    Scales are powers of two, so dividing by `scale * W` in one pass is the
    same as unscaling, then dividing by `W`.
    """
    if opt._window_scale is not None:
        return opt._window_scale * window_divisor
    return window_divisor


def scale_moved(opt, grad_scaler: Any, total: torch.Tensor) -> torch.Tensor | None:
    """Whether the scaler's scale differs from the window's (a 0-dim bool tensor).

    A safety net: our gate keeps the scale fixed inside a window, but a
    scaler shared with an optimizer stepping every micro-step, or a manual
    `update(new_scale)`, moves it, and the window then mixes scales: it is
    discarded rather than applied. None when no scaler drives the window.
    """
    if grad_scaler is None or opt._window_scale is None:
        return None
    return grad_scaler._scale.to(total.device) != opt._window_scale


def warn_scale_moved() -> None:
    warnings.warn(
        "The GradScaler's scale changed inside an open window without "
        "`scaler.update()` (e.g. `scaler.load_state_dict(...)` or a direct edit): "
        "the window's gradients mix two scales, so it is skipped (counted in "
        "`skipped_updates`). Change the scale only through `scaler.update()`, or "
        "between windows.",
        RuntimeWarning,
        stacklevel=3,
    )


def report(opt, grad_scaler: Any, closed: bool, skipped: bool, device) -> None:
    """Tells the scaler what this micro-step did, through its per-optimizer record.

    An update: whether it found an inf (GradScaler's `found_inf`, which backs
    the scale off). A micro-step inside a window: a mark that holds the scale
    at the next `update()` (the gate in `_hooks.py`).
    """
    if grad_scaler is None:
        return
    record = grad_scaler._per_optimizer_states[id(opt)]
    if closed:
        found_inf = torch.full((), float(skipped), dtype=torch.float32, device=device)
        record["found_inf_per_device"] = {device: found_inf}
    else:
        record[_hooks.SCALER_HOLD_KEY] = opt
