"""Where the open window lives, and how it gets there and goes away.

docs/semantics.md, points 2, 4 and 15 (the torch part): by default autograd
sums the micro-batches in `.grad` itself and a micro-step does no tensor
work; with `accumulator_dtype` other than the parameter's, micro-step
weights, `on_nonfinite="raise"` or a sparse gradient, a parameter's window
lives in a side buffer (`opt.state[p]["accumulator"]`) and each micro-step
moves `w * .grad` into it. Here: which parameters are side-buffered, the
kept `.grad` references that catch a `model.zero_grad()` inside a window,
the move into the buffers, the window's tensors at the update, rescaling
them to a new loss scale, and the reset (by assignment, never arithmetic).

Functions take the `AccumOptimizer`; its attributes are the state.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from keras_accum.torch import _functional as F


def holds_sparse(p: torch.Tensor, state: Any) -> bool:
    """Whether `p`'s gradient (or its open window) is a sparse tensor."""
    if p.grad is not None and p.grad.is_sparse:
        return True
    acc = state[p].get("accumulator") if p in state else None
    return acc is not None and acc.is_sparse


#: The accumulator dtype of a complex parameter, by `accumulator_dtype`: the
#: complex type of those parts. There is no complex bfloat16, and torch's
#: complex32 lacks most kernels, so both half types accumulate in complex64.
_COMPLEX = {
    torch.float16: torch.complex64,
    torch.bfloat16: torch.complex64,
    torch.float32: torch.complex64,
    torch.float64: torch.complex128,
}


def acc_dtype(opt, p: torch.Tensor) -> torch.dtype:
    """The dtype `p`'s window is summed in: `accumulator_dtype`, else `p`'s own."""
    if opt._acc_dtype is None:
        return p.dtype
    return _COMPLEX[opt._acc_dtype] if p.is_complex() else opt._acc_dtype


def buffered(opt, p: torch.Tensor) -> bool:
    """Whether `p` accumulates in a side buffer (else in `.grad`)."""
    return (
        opt._weighted
        # "raise": `.grad` holds only the checked micro-step, so a caught
        # error leaves the window exactly as it was before that micro-batch.
        or opt._config.on_nonfinite == "raise"
        or (opt._acc_dtype is not None and p.dtype != acc_dtype(opt, p))
        # Sparse gradients (nn.Embedding(sparse=True)): autograd sums them
        # out of place, so the window is kept beside `.grad`, coalesced.
        or holds_sparse(p, opt.state)
    )


def grad_refs_only(opt) -> bool:
    """Whether no parameter can be side-buffered (`buffered` is False for all).

    Only a sparse gradient of this micro-step can change that; the caller
    looks at those.
    """
    return (
        not opt._weighted
        and opt._config.on_nonfinite != "raise"
        and opt._acc_dtype is None
        and not opt._sparse_seen
    )


def uses_side_buffers(opt) -> bool:
    return any(buffered(opt, p) for p in opt._params())


def in_grad(opt, params: list) -> list:
    """Each parameter's `.grad` where it holds the window, else None."""
    return [None if buffered(opt, p) else p.grad for p in params]


def keep_grad_refs(opt, params: list, grads: list | None = None) -> None:
    """Remembers the `.grad` tensors that hold the open window (default mode).

    A reference per parameter, no copy: between micro-steps autograd adds
    into these very tensors, in place. `grads`: the `.grad` of each of
    `params`, if the caller has the list already (step() does).
    """
    if grads is None:
        grads = [p.grad for p in params]
    if opt._weighted or opt._config.on_nonfinite == "raise":
        opt._grad_refs = None  # every parameter is side-buffered
    elif grad_refs_only(opt):
        opt._grad_refs = grads
    else:
        opt._grad_refs = [None if buffered(opt, p) else g for p, g in zip(params, grads)]


def check_grads_kept(opt, params: list, grads: list) -> bool:
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
    refs = opt._grad_refs
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
            f"({opt._window_steps} of {opt.merge_grad}), summed in `.grad`, are lost. "
            "Was `model.zero_grad()` called inside the window? Call `opt.zero_grad()` "
            "instead: it keeps an open window. Nothing was changed. If `.grad` is "
            "replaced on purpose (`backward(create_graph=True)`, out-of-place "
            "accumulation), pass `weight=` at every micro-step: the window then lives "
            "in side buffers."
        )
    return False


def check_can_switch_to_buffers(opt) -> None:
    """Refuses a first `weight` in the middle of a window (in every mode)."""
    if opt._window_steps > 0:
        raise RuntimeError(
            "A micro-step `weight` was first passed at window position "
            f"{opt._window_steps + 1} of {opt.merge_grad}: pass `weight` from the first "
            "micro-step of a window on (e.g. always). By default the earlier micro-steps "
            "of a window are summed inside `.grad`, where `w * g` cannot be formed, so "
            "the rule holds in every mode. Nothing was changed."
        )
    if opt._unreduced:
        raise RuntimeError(
            "Micro-step weights need side buffers, and a gradient moved into a "
            "buffer misses DDP's all-reduce: do not use `opt.no_sync(model)` "
            "together with `weight` (no_sync is a null context once weights are used)."
        )


def accumulate(opt, params: list, w: float, grads: list, dense: bool = False) -> None:
    """Moves this micro-step's `w * .grad` into the side buffers (if any).

    `grads`: this micro-step's `.grad` tensors that are not None; `dense`:
    known to be dense (the tensors the last step kept). All-or-nothing: what
    can fail (allocations) comes before the first change.
    """
    if grad_refs_only(opt) and (dense or not any(g.is_sparse for g in grads)):
        return  # Every window lives in `.grad`: autograd did the work.
    sums, sparse = _add(opt, params, w, inplace=True)
    for p, t in sums.items():
        opt.state[p]["accumulator"] = t
        p.grad = None  # The buffer holds it now; the next backward starts afresh.
    if sparse:
        opt._sparse_seen = True


@torch.no_grad()
def _add(opt, params: list, w: float, inplace: bool) -> tuple[dict, bool]:
    """Each side-buffered parameter with a `.grad`: its buffer plus `w * .grad`.

    Returns `{p: sum}` and whether a gradient was sparse. A parameter's
    buffer exists from its first gradient in a window to the window's end
    (so "has a buffer" is "was seen in this window"). `inplace`: existing
    dense buffers are added into (after every new tensor is made, so that a
    failed allocation changes nothing); else every sum is a new tensor.
    """
    sums, groups, sparse = {}, {}, False
    for p in params:
        g = p.grad
        if g is None or not buffered(opt, p):
            continue  # In `.grad` mode autograd has already accumulated.
        buf = opt.state[p].get("accumulator") if p in opt.state else None
        dtype = acc_dtype(opt, p)
        if g.is_sparse:
            sparse = True
            # Memory: the distinct rows the window touched; time: a
            # coalesce (sort) of this micro-step's rows into them.
            g = g.to(dtype) * w
            sums[p] = (g if buf is None else buf + g).coalesce()
        elif buf is None:
            # The window's first gradient: the buffer starts as w * g, in
            # one pass. A new tensor: .grad may be a view into a DDP
            # bucket, so it is never taken over.
            if dtype == g.dtype:
                sums[p] = torch.mul(g, w)
            else:
                buf = g.to(dtype)
                sums[p] = buf if w == 1.0 else buf.mul_(w)
        else:
            groups.setdefault((buf.device, buf.dtype, g.dtype), []).append((p, buf, g))
    for group in groups.values():
        ps, bufs, gs = zip(*group)
        if inplace:
            torch._foreach_add_(list(bufs), list(gs), alpha=w)
            out = bufs
        else:
            out = torch._foreach_add(list(bufs), list(gs), alpha=w)
        sums.update(zip(ps, out))
    return sums, sparse


def window_sums(opt, params: list, w: float | None, single: bool) -> tuple[list, list, bool]:
    """The window's sums at its update, changing nothing: (sums, owners, sparse seen).

    `w`: the closing micro-step's weight (its gradients still in `.grad`),
    or None (a flush: nothing pending). `single`: the window is this
    micro-step alone and its merged gradient is `g` itself (reduction
    "mean": `w * g / w`), handed on as it came, sparse ones uncoalesced.
    A sum is a parameter's `.grad` (default mode), its buffer, or a new
    tensor (a buffer plus this micro-step's `w * g`); the update transforms
    them out of place, so that an exception before the inner step leaves the
    window as it was.
    """
    pending = w is not None
    if pending:
        owners = [p for p in params if p.grad is not None]
        grads = [p.grad for p in owners]
        sparse = any(g.is_sparse for g in grads)
        if single or (grad_refs_only(opt) and not sparse):
            return grads, owners, sparse
    added, sparse = _add(opt, params, w, inplace=False) if pending else ({}, False)
    sums, owners = [], []
    for p in params:
        if p in added:
            t = added[p]
        elif buffered(opt, p):
            t = opt.state[p].get("accumulator") if p in opt.state else None
        else:
            t = p.grad
        if t is not None:
            sums.append(t)
            owners.append(p)
    return sums, owners, sparse


@torch.no_grad()
def rescale(opt, old: torch.Tensor | None, new: torch.Tensor | None) -> None:
    """The GradScaler's scale moved from `old` to `new` while this window is open.

    Called by the gate on `GradScaler.update` (a scaler shared with a
    plain optimizer that steps every micro-step, or `update(new_scale)`):
    the partial sum, accumulated at `old`, is multiplied by `new / old`,
    exactly for GradScaler's own factors (powers of two). Costs one host
    read of the scale per such `update()`, and one pass over the window
    only when the scale really moved.
    """
    if opt._window_steps == 0 or opt._window_scale is None or old is None or new is None:
        return
    if torch.equal(new, old):
        return
    window, _, _ = window_sums(opt, opt._params(), None, False)
    F.mul(window, (new / old).to(torch.float32), inplace=True)
    opt._window_scale = new.detach().clone()


def clear_buffered_grads(opt, set_to_none: bool) -> None:
    """`zero_grad()` inside a window: clears the side-buffered parameters' `.grad`.

    Those are never part of the window (after a step() that raised, one
    holds the rejected micro-batch); a `.grad` holding the window is kept.
    """
    cfg = opt._config
    if opt._weighted or cfg.on_nonfinite == "raise" or opt._acc_dtype is not None:
        for p in opt._params():
            if p.grad is not None and buffered(opt, p):
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


def reset(opt, params: list, discard_grads: bool) -> None:
    """Resets by assignment, never by subtraction (one inf must not leak on)."""
    for p in params:
        state = opt.state.get(p)
        if state and state.pop("accumulator", None) is not None and not state:
            del opt.state[p]
    if discard_grads:
        # A skipped window: its sum in `.grad` goes (zero_grad() would too).
        for p in params:
            p.grad = None
    opt._window_steps = 0
    opt._window_weight = 0.0
    opt._window_scale = None
    opt._window_unsynced = False
    opt._grad_refs = None
