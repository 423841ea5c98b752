"""The EMA of the parameters: its plan, the update, overwrite, swap, finalize.

docs/semantics.md, points 9 to 11 (the torch part). The shadow of each
parameter lives in `opt.state[p]["ema"]` (float32, float64 for float64
parameters, complex64/complex128 for complex ones), moves after each update
only, `ema = m * ema + (1 - m) * p` with the momentum
`keras_accum._core.ema_decay` gives for the update count; swapping copies,
so the raw parameters come back bit-exactly. Buffers are never touched.
"""

from __future__ import annotations

import torch

from keras_accum import _core
from keras_accum.torch import _functional as F


def update(opt, params: list, plan: tuple | None = None) -> None:
    """`ema = m * ema + (1 - m) * p` after an update (`iterations` already stepped).

    Under `on_nonfinite="ignore"`, the formula as written (two foreach
    passes: `ema *= m`, then `ema += (1 - m) * p`): an infinite weight is
    then the formula's inf. Elsewhere the weights are finite (the window
    passed the check), and one fused `lerp_(p, 1 - m)` computes the same
    number to rounding at about half the cost; `lerp` computes `ema +
    (1 - m) * (p - ema)`, NaN for an infinite weight (`inf - inf`).
    `plan`: what `prepare` returned before the inner step (made here if
    None). Runs under `torch.no_grad()` (inside the update), so the
    parameters are used as they are, not detached one by one; allocates
    nothing but what `lerp` of mixed dtypes needs (the shadows made for new
    parameters are `prepare`'s).
    """
    if plan is None:
        plan = prepare(opt, params)
    cfg = opt._config
    m = _core.ema_decay(opt._iterations - 1, cfg.ema_momentum, cfg.ema_warmup)
    formula = cfg.on_nonfinite == "ignore"
    _, emas, ps, one_device, new = plan
    for p, shadow in new:
        # The first update (or a parameter added since): a copy.
        opt.state[p]["ema"] = shadow.copy_(p)
    if not emas:
        pass
    elif one_device and all(e.dtype is p.dtype for e, p in zip(emas, ps)):
        _move(emas, ps, m, formula)  # the common case: one call per pass
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
                _move(es, ps_, m, formula)
            else:
                # bf16/fp16 parameters: one parameter at a time (a list
                # would hold a float32 copy of all of them at once).
                for e, p in zip(es, ps_):
                    if formula:
                        e.mul_(m).add_(p, alpha=1.0 - m)
                    else:
                        e.lerp_(p.to(ema_dtype), 1.0 - m)
    f = cfg.ema_overwrite_frequency
    if f is not None and opt._iterations % f == 0:
        for p in params:
            p.copy_(opt.state[p]["ema"])


def _move(emas: list, ps: list, m: float, formula: bool) -> None:
    """`ema = m * ema + (1 - m) * p` on lists of one dtype and device."""
    if formula:
        torch._foreach_mul_(emas, m)
        torch._foreach_add_(emas, ps, alpha=1.0 - m)
    else:
        # lerp_(p, 1 - m) = ema + (1 - m) * (p - ema), one fused pass.
        torch._foreach_lerp_(emas, ps, 1.0 - m)


def prepare(opt, params: list) -> tuple:
    """The EMA update's plan, made before the inner step (so a failure changes nothing).

    (params, their EMAs, the params with one, one device?, new): `new` holds
    `(p, shadow)` for each parameter without an EMA (the first update, or a
    parameter added since), a tensor `update` fills with the updated
    parameter and stores; nothing is stored here. The plan is kept for the
    next updates while no shadow was made: looking each EMA up by its
    parameter (a tensor hashed in Python) and checking dtypes and devices
    cost about 16 us around a 90 to 150 us update at 1M parameters (8
    tensors). `load_state_dict` and unpickling, which replace the EMA
    tensors, drop it; the dtypes are still checked at each update (a
    `model.half()` between updates).
    """
    plan = opt._ema_plan
    if (
        plan is not None
        and len(plan[0]) == len(params)
        and all(a is b for a, b in zip(plan[0], params))
    ):
        return plan
    state = opt.state
    emas, ps, new = [], [], []
    for p in params:
        ema = state[p].get("ema") if p in state else None
        if ema is None:
            dtype = torch.promote_types(p.dtype, torch.float32)
            new.append((p, torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)))
        else:
            emas.append(ema)
            ps.append(p)
    plan = (tuple(params), emas, ps, bool(ps) and F.one_dtype_and_device(ps), new)
    opt._ema_plan = None if new else plan
    return plan


def require(opt, what: str) -> None:
    # The same message as the Keras side.
    if not opt.use_ema:
        raise ValueError(f"`{what}` needs `use_ema=True`. Received: use_ema=False")


@torch.no_grad()
def swap_in(opt) -> None:
    """Copies the EMA into the parameters, keeping the raw ones (idempotent)."""
    require(opt, "swap_in_ema")
    if opt._ema_backup is not None:
        return
    pairs = [(p, opt.state.get(p, {}).get("ema")) for p in opt._params()]
    pairs = [(p, e) for p, e in pairs if e is not None]
    opt._ema_backup = [(p, p.detach().clone()) for p, _ in pairs]
    for p, e in pairs:
        p.copy_(e)


@torch.no_grad()
def swap_out(opt) -> None:
    """Puts the raw parameters back (copies); a no-op if not swapped in."""
    require(opt, "swap_out_ema")
    if opt._ema_backup is None:
        return
    for p, raw in opt._ema_backup:
        p.copy_(raw)
    opt._ema_backup = None


@torch.no_grad()
def finalize(opt) -> None:
    """Writes the EMA into the parameters for good (no-op without EMA)."""
    if not opt.use_ema:
        return
    if opt._ema_backup is not None:
        swap_out(opt)
    for p in opt._params():
        ema = opt.state.get(p, {}).get("ema")
        if ema is not None:
            p.copy_(ema)


def check_not_swapped(opt) -> None:
    """Refuses a training step while the EMA is swapped into the model."""
    if opt._ema_backup is not None:
        raise RuntimeError(
            "step() was called while the EMA is swapped into the model: leave "
            "`swap_ema_weights()` (or call `swap_out_ema()`) before training."
        )
