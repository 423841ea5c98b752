"""The tensor arithmetic of an update, in `keras.ops`: norms, the finite check, clipping.

Pure functions of tensors (the Keras mirror of the torch side's
`_functional.py`): no variable is read or written here. The contract they
implement is docs/semantics.md, points 7 (clipping) and 8 (the non-finite
check). `sum_of_squares` is the backend's kernel for `sum(t ** 2)` (one read
of `t` where the backend has one, e.g. TensorFlow's `l2_loss`).
"""

from __future__ import annotations

import keras
from keras import ops

_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def widest_dtype(dtypes) -> str:
    """The largest of several float dtypes (the first one among equal sizes)."""
    widest = None
    for dtype in dtypes:
        name = keras.backend.standardize_dtype(dtype)
        if widest is None or _SIZES.get(name, 0) > _SIZES.get(widest, 0):
            widest = name
    return widest


def all_finite(tensors):
    """True where every element of every tensor is finite (None entries skipped)."""
    checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    if len(checks) == 1:
        return checks[0]
    return ops.all(ops.stack(checks))


def global_norm(tensors, sum_of_squares):
    """`sqrt(sum_i ||t_i||^2)`, fast: one read of each tensor.

    Its squares can overflow (|x| > 1.8e19 in float32) although the norm
    itself is a finite number: see `norm_and_finite`.
    """
    if not tensors:
        return ops.convert_to_tensor(0.0, "float32")
    squares = [sum_of_squares(t) for t in tensors]
    dtype = widest_dtype([s.dtype for s in squares])
    total = (
        squares[0]
        if len(squares) == 1
        else ops.sum(ops.stack([ops.cast(s, dtype) for s in squares]))
    )
    return ops.sqrt(ops.cast(total, dtype))


def scaled_global_norm(tensors):
    """The global norm without overflow: `m * sqrt(sum((t / m) ** 2))`, `m = max |t|`.

    Two reads of each tensor; the exact path for when the fast norm's
    squares overflowed.
    """
    dtype = widest_dtype([t.dtype for t in tensors])
    peaks = [ops.cast(ops.max(ops.abs(t)), dtype) for t in tensors]
    peak = peaks[0] if len(peaks) == 1 else ops.max(ops.stack(peaks))
    divisor = ops.where(peak > 0, peak, ops.ones_like(peak))
    squares = [ops.sum(ops.square(ops.cast(t, dtype) / divisor)) for t in tensors]
    total = squares[0] if len(squares) == 1 else ops.sum(ops.stack(squares))
    return peak * ops.sqrt(total)


def norm_and_finite(tensors, sum_of_squares):
    """`(global norm, all finite)` of `tensors`, exact even where the squares overflow.

    The fast norm is finite iff every element is finite and the squares did
    not overflow; only when it is not are the tensors looked at again (the
    finite check, and the scaled norm if they are all finite), so the usual
    update reads each tensor once.
    """
    norm = global_norm(tensors, sum_of_squares)
    if not tensors:
        return norm, ops.convert_to_tensor(True)

    def fast():
        return norm, ops.convert_to_tensor(True)

    def exact():
        finite = all_finite(tensors)
        scaled = ops.cast(scaled_global_norm(tensors), norm.dtype)
        return ops.where(finite, scaled, norm), finite

    return ops.cond(ops.isfinite(norm), fast, exact)


def clip(merged, norm, config, sum_of_squares):
    """Clips the merged gradients once, in the contract's order (point 7).

    `clipvalue` first; then `clipnorm` on each gradient, or `global_clipnorm`
    on all of them. `norm` is the global norm of `merged` (it is taken again
    when `clipvalue` changed the gradients).
    """
    if config.clipvalue is not None:
        merged = [ops.clip(g, -config.clipvalue, config.clipvalue) for g in merged]
        norm = None
    if config.clipnorm is not None:
        c = config.clipnorm
        return [
            g * c / ops.cast(ops.maximum(norm_and_finite([g], sum_of_squares)[0], c), g.dtype)
            for g in merged
        ]
    if config.global_clipnorm is not None:
        c = config.global_clipnorm
        if norm is None:
            norm, _ = norm_and_finite(merged, sum_of_squares)
        scale = c / ops.maximum(norm, ops.cast(c, norm.dtype))
        return [g * ops.cast(scale, g.dtype) for g in merged]
    return merged
