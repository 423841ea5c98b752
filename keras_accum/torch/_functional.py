"""The tensor kernels of the torch side, apart from any class.

As `torch/optim/_functional` is to torch's optimizers: plain functions on
lists of tensors, one foreach call per (device, dtype) group, that know no
rule of the contract (when to divide, check or clip is decided in
`_close.py`). Divide, norms and the global norm, extremes (the exact
finite test), clipping, and the grouping by device and dtype they share.
"""

from __future__ import annotations

import math

import torch

#: Half types: their norms are taken in float32, and a divisor is never
#: turned into a multiply by its reciprocal (see `divide_`).
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


def norms(tensors: list) -> list:
    """Per-tensor L2 norms (float32 for half types), aligned with `tensors`."""
    out = [None] * len(tensors)
    for (_, dtype), idx in by_device_and_dtype(tensors).items():
        kwargs = {"dtype": torch.float32} if dtype in LOW_PRECISION else {}
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)):
            out[i] = n
    return out


def divide_(tensors: list, divisor: float | torch.Tensor) -> None:
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
    for (dev, dtype), idx in by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in idx]
        if exact and dtype in FULL_PRECISION:
            torch._foreach_mul_(group, 1.0 / divisor)
        else:
            d = divisor.to(dev) if isinstance(divisor, torch.Tensor) else divisor
            torch._foreach_div_(group, d)


def stack(scalars: list, device: torch.device) -> torch.Tensor:
    """0-dim tensors as one float32 vector on `device`."""
    return torch.stack([s.to(device=device, dtype=torch.float32) for s in scalars])


def global_norm(norms: list, device: torch.device) -> torch.Tensor:
    """`sqrt(sum_i norm_i**2)`, float32 (0 when there is no tensor)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    if all(
        type(n) is torch.Tensor and n.dtype is torch.float32 and n.device == device for n in norms
    ):
        # The common case: one stack, no per-norm cast.
        return torch.linalg.vector_norm(torch.stack(norms))
    return torch.linalg.vector_norm(stack(norms, device))


def extremes(tensors: list, device: torch.device) -> torch.Tensor:
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
    return stack([m for t in tensors for m in torch.aminmax(t)], device)


def clip_value_(tensors: list, clipvalue: float) -> None:
    """Clamps every element to `[-clipvalue, clipvalue]`, in place."""
    for idx in by_device_and_dtype(tensors).values():
        ts = [tensors[i] for i in idx]
        torch._foreach_clamp_min_(ts, -clipvalue)
        torch._foreach_clamp_max_(ts, clipvalue)


def clip_norm_(tensors: list, norms: list, clipnorm: float, divisor: float = 1.0) -> None:
    """`t *= clipnorm / max(||t||, clipnorm) / divisor`, each tensor by its own norm."""
    c = clipnorm
    for t, n in zip(tensors, norms):
        t.mul_((c / torch.clamp(n, min=c) / divisor).to(t.dtype))


def mul_(tensors: list, factor: torch.Tensor) -> None:
    """`t *= factor` in place (a 0-dim tensor, cast to each group's device and dtype)."""
    for (dev, dtype), idx in by_device_and_dtype(tensors).items():
        torch._foreach_mul_([tensors[i] for i in idx], factor.to(dev, dtype))


def clip_global_norm_(
    tensors: list, total: torch.Tensor, global_clipnorm: float, divisor: float = 1.0
) -> None:
    """`t *= global_clipnorm / max(total, global_clipnorm) / divisor`, every tensor."""
    c = global_clipnorm
    mul_(tensors, c / torch.clamp(total, min=c) / divisor)
