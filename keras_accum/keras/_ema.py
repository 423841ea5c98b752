"""The EMA of the weights: its shadows, its update after each update, swapping it in.

docs/semantics.md, points 9 to 11:

    ema = m * ema + (1 - m) * w        after each update only
    m   = 0 at the first update (a copy), then `ema_momentum`, or with
          warm-up min(ema_momentum, (1 + n) / (10 + n)), n = updates before

`ema_overwrite_frequency=f` writes the EMA into the weights after every f-th
update; swapping it in and out copies (never adds and subtracts), so the
raw weights come back bit for bit. Before the first update there is no
average yet: the EMA is the weights themselves.
"""

from __future__ import annotations

import contextlib

from keras import ops

from keras_accum.keras import _window
from keras_accum.keras._backend import host_value


def build(opt, var_list) -> None:
    """Creates the shadows, the swap flag and the raw-weight backups."""
    plumbing, acc_dtype = opt._plumbing, opt.accumulator_dtype
    if not opt.use_ema:
        opt._ema = []
        return
    opt._ema = [
        plumbing.shadow(
            v, _window.accumulation_dtype(acc_dtype, v.dtype), f"{_window.var_name(v)}_ema"
        )
        for v in var_list
    ]
    opt._ema_swapped = plumbing.counter((), "int32", "ema_swapped")
    # Raw weights while the EMA is swapped in. A variable of its shadow's
    # dtype trades places with it (no extra memory); others need a copy in
    # their own dtype (a cast would round).
    opt._raw_backup = [
        None
        if _same_dtype(v.dtype, _window.accumulation_dtype(acc_dtype, v.dtype))
        else plumbing.shadow(v, v.dtype, f"{_window.var_name(v)}_raw_backup")
        for v in var_list
    ]


def _same_dtype(a, b) -> bool:
    from keras import backend

    return backend.standardize_dtype(a) == backend.standardize_dtype(b)


def update(opt) -> None:
    """`ema = m * ema + (1 - m) * var`, after an update (`iterations` already stepped)."""
    cfg = opt._config
    plumbing = opt._plumbing
    dtype = _widest_ema_dtype(opt)  # float64 shadows (of float64 variables) get a float64 m
    n = ops.cast(opt.iterations, dtype) - 1.0  # updates before this one
    m = ops.convert_to_tensor(cfg.ema_momentum, dtype)
    if cfg.ema_warmup:
        m = ops.minimum(m, (1.0 + n) / (10.0 + n))
    m = ops.where(n > 0, m, ops.zeros_like(m))
    for ema, v in zip(opt._ema, opt._trainable_variables):
        m_ema = ops.cast(m, ema.dtype)
        ema.assign(m_ema * ema.value + (1.0 - m_ema) * plumbing.stored_value(v, ema.dtype))
    f = cfg.ema_overwrite_frequency
    if f is not None:
        # A select, not a branch: it runs inside the update's own branch.
        overwrite = ops.equal(opt.iterations % f, 0)
        for ema, v in zip(opt._ema, opt._trainable_variables):
            v.assign(ops.where(overwrite, ops.cast(ema.value, v.dtype), v.value))


def _widest_ema_dtype(opt) -> str:
    from keras_accum.keras import _functional as F

    return F.widest_dtype([opt.accumulator_dtype] + [e.dtype for e in opt._ema])


def ready(opt) -> bool:
    """Whether an update has made an average yet (read eagerly)."""
    return int(host_value(opt.iterations)) > 0


def swapped(opt) -> bool:
    return bool(int(host_value(opt._ema_swapped)))


def swap_in(opt) -> None:
    """Puts the EMA into the variables, keeping the raw weights; idempotent.

    Before the first update the EMA is the weights themselves: the shadows
    are set to them first, so the variables keep their values.
    """
    if swapped(opt):
        return
    if not ready(opt):
        for ema, v in zip(opt._ema, opt._trainable_variables):
            ema.assign(opt._plumbing.stored_value(v, ema.dtype))
    for v, ema, backup in zip(opt._trainable_variables, opt._ema, opt._raw_backup):
        if backup is None:
            raw = opt._plumbing.snapshot(v)
            v.assign(ema.value)
            ema.assign(raw)  # the shadow holds the raw weights meanwhile
        else:
            backup.assign(v.value)
            v.assign(ops.cast(ema.value, v.dtype))
    opt._ema_swapped.assign(1)


def swap_out(opt) -> None:
    """Puts the raw weights back after `swap_in`; a no-op if not swapped."""
    if not swapped(opt):
        return
    for v, ema, backup in zip(opt._trainable_variables, opt._ema, opt._raw_backup):
        if backup is None:
            shown = opt._plumbing.snapshot(v)
            v.assign(ema.value)
            ema.assign(shown)
        else:
            v.assign(backup.value)
    opt._ema_swapped.assign(0)


def finalize(opt, var_list) -> None:
    """Writes the EMA into `var_list` for good (nothing before the first update)."""
    swap_out(opt)
    if not ready(opt):
        return
    for v in var_list:
        ema = opt._ema[opt._get_variable_index(v)]
        v.assign(ops.cast(ema.value, v.dtype))


@contextlib.contextmanager
def swapped_in(opt):
    swap_in(opt)
    try:
        yield opt
    finally:
        swap_out(opt)
