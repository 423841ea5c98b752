"""DDP and FSDP2 plumbing: `no_sync`, gradient-sync toggles, DTensor helpers.

Which micro-steps may skip the gradient communication (those that do not
close a window, while the window lives in `.grad`), and the refusal to flush
or save a window whose last micro-step skipped it (docs/semantics.md,
point 14, the torch part). No rule of the merge itself lives here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from keras_accum.torch import _window


def fsdp2_modules(model: Any) -> list:
    """The FSDP2 (`fully_shard`) modules in `model`, itself included; [] if none."""
    if not (isinstance(model, torch.nn.Module) and torch.distributed.is_available()):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(fsdp_modules: list, sync: bool) -> None:
    # Each module on its own (recurse=False): a plain root may hold sharded layers.
    for m in fsdp_modules:
        m.set_requires_gradient_sync(sync, recurse=False)


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor as the whole tensor (every rank gets the same), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@contextlib.contextmanager
def no_sync(opt, model: torch.nn.Module) -> Iterator[None]:
    """The body of `AccumOptimizer.no_sync` (see its docstring)."""
    skip = not opt.next_step_updates and not _window.uses_side_buffers(opt)
    fsdp = fsdp2_modules(model)
    if fsdp:
        if not skip:
            # The closing micro-step reduce-scatters the whole window, even
            # if the user's own code left the sync off.
            set_gradient_sync(fsdp, True)
            yield
            return
        # FSDP2 has no `no_sync()`: its switch keeps the unsharded
        # gradients and skips the reduce-scatter until it is back on.
        set_gradient_sync(fsdp, False)
        try:
            opt._unreduced = "FSDP2"
            yield
        finally:
            set_gradient_sync(fsdp, True)
        return
    if not skip or not hasattr(model, "no_sync"):
        yield
        return
    with model.no_sync():
        opt._unreduced = "DDP"
        yield


def check_window_reduced(opt, what: str) -> None:
    """Refuses to flush or save a window whose last micro-step skipped the reduction."""
    engine = opt._window_unsynced
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


def check_sparse_reduced(opt, grads: list) -> None:
    """Refuses a sparse gradient whose backward skipped the reduction."""
    if opt._unreduced and any(g.is_sparse for g in grads):
        raise RuntimeError(
            "A sparse gradient (nn.Embedding(sparse=True)) came from a backward run "
            "inside `opt.no_sync(model)`: sparse windows are summed in side buffers, "
            "where a gradient that skipped the reduction would never be reduced. Do "
            "not use `opt.no_sync` with sparse gradients (every micro-step then "
            "reduces). Nothing was changed."
        )
