"""The tensor kernels of the torch side, apart from any class.

As `torch/optim/_functional` is to torch's optimizers: plain functions on
lists of tensors, one foreach call per (device, dtype) group, that know no
rule of the contract (when to divide, check or clip is decided in
`_close.py`). Divide, norms and the global norm, extremes (the exact
finite test), clipping, and the grouping by device and dtype they share.

The transforming kernels take `inplace`: False writes the result into new
tensors and leaves the inputs alone (the update's first transform, so that
an exception before the inner step leaves the window as it was), True
changes the inputs (tensors the update made itself). Both return the
result list.

Complex tensors: norms are those of `|z|` (torch's); the finite test and
`clipvalue` act on the real and imaginary parts (`torch.view_as_real`), as
torch's optimizers treat a complex parameter as a pair of real ones.
"""

from __future__ import annotations

import math

import torch

#: Half types: their norms are taken in float32, and a divisor is never
#: turned into a multiply by its reciprocal (see `divide`).
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Where a power-of-two divide is a multiply, and where the window's divide
#: may ride on the norm clipping's multiply (`_close.py`).
FULL_PRECISION = (torch.float32, torch.float64)


def by_device_and_dtype(tensors: list) -> dict:
    """Indices of `tensors` grouped by (device, dtype): the foreach fast path."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def one_dtype_and_device(tensors: list) -> bool:
    """Whether `tensors` (not empty) share one dtype and one device (cheaply)."""
    dtype, device = tensors[0].dtype, tensors[0].get_device()
    return all(t.dtype is dtype and t.get_device() == device for t in tensors)


def values_of(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor itself; a coalesced sparse one's values (an alias, not a copy)."""
    return tensor._values() if tensor.is_sparse else tensor


def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (a view), else itself."""
    if tensor.is_complex():
        return torch.view_as_real(tensor.resolve_conj())
    return tensor


def _apply(op, tensors: list, arg, inplace: bool) -> list:
    """`op` once per (device, dtype) group; `inplace`: `op` is the in-place kind.

    `arg`: a scalar, or a 0-dim tensor moved to each group's device and dtype.
    """
    out = list(tensors)
    for (dev, dtype), idx in by_device_and_dtype(tensors).items():
        a = arg.to(dev, dtype) if isinstance(arg, torch.Tensor) else arg
        result = op([tensors[i] for i in idx], a)
        if not inplace:
            for i, t in zip(idx, result):
                out[i] = t
    return out


def divide(tensors: list, divisor: float | torch.Tensor, inplace: bool) -> list:
    """`t / divisor`, one foreach pass per (device, dtype).

    A power-of-two divisor multiplies float32/float64 tensors by its
    reciprocal instead: the same real number, so the same rounded result bit
    for bit, and torch's CPU multiply is the faster kernel. Other types
    divide: a CPU kernel casts the scalar to the tensor's dtype, where a
    reciprocal may overflow (float16) or be rounded.
    """
    exact = (
        isinstance(divisor, float)
        and math.frexp(divisor)[0] == 0.5
        and 2.0**-60 <= divisor <= 2.0**60
    )
    out = list(tensors)
    for (dev, dtype), idx in by_device_and_dtype(tensors).items():
        if exact and dtype in FULL_PRECISION:
            op, arg = (torch._foreach_mul_ if inplace else torch._foreach_mul), 1.0 / divisor
        else:
            op = torch._foreach_div_ if inplace else torch._foreach_div
            arg = divisor.to(dev) if isinstance(divisor, torch.Tensor) else divisor
        result = op([tensors[i] for i in idx], arg)
        if not inplace:
            for i, t in zip(idx, result):
                out[i] = t
    return out


def mul(tensors: list, factor: torch.Tensor, inplace: bool) -> list:
    """`t * factor` (a 0-dim tensor, cast to each group's device and dtype)."""
    return _apply(torch._foreach_mul_ if inplace else torch._foreach_mul, tensors, factor, inplace)


def norms(tensors: list) -> list:
    """Per-tensor L2 norms (float32 for half types), aligned with `tensors`.

    One read pass. The squares are summed in the tensor's dtype (float32 for
    half types), so a finite tensor whose norm exceeds about 1.8e19 in
    float32 reads inf here: `safe_norms` is the fallback.
    """
    out = [None] * len(tensors)
    for (_, dtype), idx in by_device_and_dtype(tensors).items():
        kwargs = {"dtype": torch.float32} if dtype in LOW_PRECISION else {}
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)):
            out[i] = n
    return out


def safe_norms(tensors: list) -> list:
    """`norms` without overflow of the squares: `m * ||t / m||`, `m = max |t|`.

    The rare path (two more read passes and a temporary per tensor), taken
    where the fast norm read inf while every element is finite. The result
    is inf only where the norm itself exceeds the dtype's largest number.
    """
    out = []
    for t, n in zip(tensors, norms(tensors)):
        if torch.isfinite(n) or not t.numel():
            out.append(n)
            continue
        m = t.abs().amax().to(n.dtype)
        if not (torch.isfinite(m) and m > 0):
            out.append(n)
            continue
        out.append(m * norms([t / m])[0])
    return out


def stack(scalars: list, device: torch.device) -> torch.Tensor:
    """0-dim tensors as one vector on `device`, in the widest of their dtypes.

    float32, or float64 when one of them is (norms of float64 tensors are
    not rounded to float32, where they may overflow).
    """
    dtype = torch.float64 if any(s.dtype is torch.float64 for s in scalars) else torch.float32
    return torch.stack([s.to(device=device, dtype=dtype) for s in scalars])


def global_norm(norms: list, device: torch.device, safe: bool = False) -> torch.Tensor:
    """`sqrt(sum_i norm_i**2)`, in the widest dtype of the norms (0 when there is none).

    `safe`: scale by the largest norm first, so that finite norms whose
    squares overflow combine to a finite total (the fallback of `safe_norms`).
    """
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    if all(
        type(n) is torch.Tensor and n.dtype is torch.float32 and n.device == device for n in norms
    ):
        # The common case: one stack, no per-norm cast.
        stacked = torch.stack(norms)
    else:
        stacked = stack(norms, device)
    if safe:
        m = stacked.amax()
        if torch.isfinite(m) and m > 0:
            return m * torch.linalg.vector_norm(stacked / m)
    return torch.linalg.vector_norm(stacked)


def extremes(tensors: list, device: torch.device) -> torch.Tensor:
    """Every tensor's min and max, stacked (inf/nan where a tensor has one).

    A tensor is all finite iff its min and max are (NaN propagates through
    both), and `w * t` is iff `w * min` and `w * max` are: an exact test in
    one read pass, where an L2 norm overflows for finite elements above
    ~1.8e19 (torch's float32 foreach norm) and the infinity norm is about 5x
    slower on CPU. Complex tensors: the min and max of their real and
    imaginary parts.
    """
    tensors = [real_view(values_of(t)) for t in tensors]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((0,), dtype=torch.float32, device=device)
    return stack([m for t in tensors for m in torch.aminmax(t)], device)


def clip_value(tensors: list, clipvalue: float, inplace: bool) -> list:
    """Clamps every element (each part of a complex one) to `[-clipvalue, clipvalue]`."""
    views = [real_view(t) for t in tensors]
    views = _apply(
        torch._foreach_clamp_min_ if inplace else torch._foreach_clamp_min,
        views,
        -clipvalue,
        inplace,
    )
    _apply(torch._foreach_clamp_max_, views, clipvalue, True)
    if inplace:
        return list(tensors)
    return [torch.view_as_complex(v) if t.is_complex() else v for t, v in zip(tensors, views)]


def clip_norm(tensors: list, norms: list, clipnorm: float, divisor: float, inplace: bool) -> list:
    """`t * clipnorm / max(||t||, clipnorm) / divisor`, each tensor by its own norm."""
    c = clipnorm
    factors = [(c / torch.clamp(n, min=c) / divisor).to(t.dtype) for t, n in zip(tensors, norms)]
    if inplace:
        for t, f in zip(tensors, factors):
            t.mul_(f)
        return list(tensors)
    return [t * f for t, f in zip(tensors, factors)]


def clip_global_norm(
    tensors: list, total: torch.Tensor, global_clipnorm: float, divisor: float, inplace: bool
) -> list:
    """`t * global_clipnorm / max(total, global_clipnorm) / divisor`, every tensor."""
    c = global_clipnorm
    return mul(tensors, c / torch.clamp(total, min=c) / divisor, inplace)
