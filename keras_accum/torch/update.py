"""`update_model` for torch modules: FastEstimator's entry point, on plain torch.

`keras_accum.torch.update_model(model, gradients=..., ...)` is one micro-step
(`step()` call) of the module's optimizer. With an `AccumOptimizer` its
`merge_grad` behaves as FastEstimator's `UpdateOp`: for every `merge_grad`
calls, only the last one updates the module; the others only accumulate.
The Keras mirror is `keras_accum.update_model`.

Which optimizer: the `optimizer=` argument when given, else the one attached
to the module with `attach_optimizer(model, optimizer)`. Nothing else is
looked up (not a `model.optimizer` attribute, not FastEstimator's
`current_optimizer`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from keras_accum import _update
from keras_accum._update import Deferred, apply_deferred

__all__ = ["apply_deferred", "attach_optimizer", "update_model"]

# Module -> optimizer. Weak keys: attaching keeps nothing alive, and a copy of
# the module (`copy.deepcopy`, an EMA model) carries no optimizer along.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_INPLACE_ERROR = "one of the variables needed for gradient computation has been modified"


def _trainable(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _check_module(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        hint = ""
        if type(model).__module__.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
            hint = " For a Keras model use `keras_accum.update_model`."
        raise TypeError(
            f"`model` must be a `torch.nn.Module`.{hint} Received: model of type "
            f"{type(model).__module__}.{type(model).__name__}"
        )


def _check_covers(optimizer: torch.optim.Optimizer, params: list) -> None:
    """Every trainable parameter must be stepped by `optimizer`.

    A parameter outside its param groups would get a `.grad` that no step
    applies and no `zero_grad()` clears, growing at every call.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in held]
    if missing:
        raise ValueError(
            "`optimizer` must hold every trainable parameter of `model` (those with "
            "requires_grad) in its param groups. Received: an optimizer without "
            f"{len(missing)} of the {len(params)} (first: parameter {missing[0]}, shape "
            f"{tuple(params[missing[0]].shape)})"
        )


def attach_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """Attaches `optimizer` to `model`, for `update_model` calls without `optimizer=`.

    The torch counterpart of Keras's `model.compile(optimizer=...)` (and of
    FastEstimator's `fe.build`). The link is weak and lives outside the
    module: it adds no attribute, no state-dict entry, and a deep copy of the
    module has no optimizer attached. Attaching again replaces the optimizer.

    Args:
        model: the `torch.nn.Module` whose trainable parameters `optimizer`
            steps (for DDP, attach to the module you pass to `update_model`).
        optimizer: a `torch.optim.Optimizer` (e.g. a
            `keras_accum.torch.AccumOptimizer`) holding every parameter of
            `model` with `requires_grad`.

    Returns:
        `model`, so that `model = attach_optimizer(Net(), opt)` style chains work.

    Raises:
        TypeError: `model` is not a module or `optimizer` not an optimizer.
        ValueError: `optimizer` lacks some trainable parameter of `model`.

    Example:

    ```python
    from keras_accum.torch import attach_optimizer, update_model

    attach_optimizer(model, AccumOptimizer(torch.optim.Adam(model.parameters()), merge_grad=4))
    update_model(model, loss=loss_fn(model(x[:8]), y[:8]))
    ```
    """
    _check_module(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "`optimizer` must be a `torch.optim.Optimizer`. "
            f"Received: optimizer={optimizer!r}"
        )
    _check_covers(optimizer, _trainable(model))
    _ATTACHED[model] = optimizer
    return model


def _find_optimizer(model: torch.nn.Module, optimizer: Any) -> torch.optim.Optimizer:
    if optimizer is None:
        optimizer = _ATTACHED.get(model)
        if optimizer is None:
            raise ValueError(
                "`model` has no optimizer: pass `optimizer=` or attach one first with "
                "`keras_accum.torch.attach_optimizer(model, optimizer)`. Received: "
                f"optimizer=None for a {type(model).__name__} with none attached"
            )
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "`optimizer` must be a `torch.optim.Optimizer` or None. "
            f"Received: optimizer={optimizer!r}"
        )
    return optimizer


def update_model(
    model: torch.nn.Module,
    gradients: list | None = None,
    loss: torch.Tensor | None = None,
    retain_graph: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    defer: bool = False,
    deferred: Deferred | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Applies one micro-step of the module's optimizer, from gradients or from a loss.

    The two forms of FastEstimator's `fe.backend.update_model`:

    * r1.2, `gradients`: a list with one gradient per parameter of
      `model.parameters()` that has `requires_grad`, in that order (None for
      one without gradient).
    * r1.1, `loss`: the gradients are `torch.autograd.grad(mean(loss),
      params, retain_graph=retain_graph)` (scaled by `scaler` first). A loss
      with more than one element is averaged, as FastEstimator did. Only this
      module's `.grad` is written: a loss that runs through another module
      (a generator's loss through a discriminator) leaves that module's
      `.grad` alone.

    Then the gradients are added to the parameters' `.grad` (which holds the
    open window of an `AccumOptimizer`), and the optimizer takes one step
    (`scaler.step(optimizer)` with a scaler), followed by
    `optimizer.zero_grad()` (which an `AccumOptimizer` ignores until its
    window closes). So each call is one micro-step: with a plain optimizer
    every call updates the module; with an `AccumOptimizer(merge_grad=k)`
    every k-th call does, on the merged gradient of the k calls.

    The optimizer is `optimizer=` when given, else the one attached with
    `attach_optimizer(model, optimizer)`; nothing else is looked up.

    Deferring (`defer=True`) takes the gradients now and stores the step in
    `deferred`; `apply_deferred(deferred)` runs everything stored. A GAN
    needs it: the generator's loss is backpropagated through the
    discriminator, and an optimizer step changes the discriminator's weights
    in place, so once the discriminator has been updated, autograd refuses
    the generator's backward. That `RuntimeError` is re-raised with this
    explanation. Deferring both updates is the same as taking both
    gradients before either update.

    Mixed precision: with `scaler`, the loss is scaled by `scaler.scale`
    before the gradients are taken, and the step goes through
    `scaler.step(optimizer)`, which unscales (an `AccumOptimizer` unscales
    once per window) and skips on overflow. Precomputed `gradients` are
    taken to be in the same, scaled form: compute them from
    `scaler.scale(loss)`. `scaler.update()` is left to you, once per
    training step after every update of the step (after `apply_deferred`),
    as torch's recipe for several optimizers sharing one scaler says.

    DDP: `torch.autograd.grad` bypasses DistributedDataParallel's
    all-reduce, so the `loss` form refuses a DDP module; pass gradients you
    reduced yourself, or use `loss.backward()` and `optimizer.step()` (with
    `AccumOptimizer.no_sync`) directly.

    Every error below is raised before anything is updated or stored.

    Args:
        model: the `torch.nn.Module` to update.
        gradients: list of tensors (or None), one per trainable parameter;
            copied, so later changes to them do not reach a deferred update.
            Exclusive with `loss`.
        loss: a loss tensor that requires grad. Exclusive with `gradients`.
        retain_graph: bool, keep the autograd graph after taking the
            gradients (so another loss can backpropagate through it).
            Defaults to True, as in FastEstimator.
        scaler: optional `torch.amp.GradScaler` (see mixed precision above).
        defer: bool, store the step in `deferred` instead of taking it.
            Defaults to False.
        deferred: dict, where deferred updates are stored (`model` -> list of
            callables, FastEstimator's layout); required with `defer=True`.
        optimizer: the optimizer to step; defaults to the attached one.

    Raises:
        TypeError: `model` is not a torch module (a Keras model: use
            `keras_accum.update_model`), `optimizer`, `scaler`, `loss`,
            a gradient, `defer`, `retain_graph` or `deferred` of the wrong
            kind.
        ValueError: no optimizer given or attached, an optimizer missing
            some trainable parameter, both or neither of `gradients` and
            `loss`, `gradients` of the wrong length or shape, or a `loss`
            that does not require grad or reaches no trainable parameter.
        RuntimeError: the loss's graph needs values that an earlier update
            changed in place (pass `defer=True` to that update), or a `loss`
            with a DistributedDataParallel module.

    Example:

    ```python
    from keras_accum.torch import apply_deferred, update_model

    deferred = {}
    for xb, yb in loader[:2]:
        loss = loss_fn(model(xb), yb)
        update_model(model, loss=loss, optimizer=opt, defer=True, deferred=deferred)
    apply_deferred(deferred)  # two micro-steps, on gradients taken before either
    ```
    """
    _update.check_common_args(gradients, loss, defer, deferred)
    _check_module(model)
    opt = _find_optimizer(model, optimizer)
    params = _trainable(model)
    _check_covers(opt, params)
    if not isinstance(retain_graph, bool):
        raise TypeError("`retain_graph` must be a bool. Received: retain_graph=" + repr(retain_graph))
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            "`scaler` must be a `torch.amp.GradScaler` or None. " f"Received: scaler={scaler!r}"
        )
    if gradients is not None:
        grads = _owned_gradients(gradients, params)
    else:
        grads = _gradients_of(model, loss, params, retain_graph, scaler)

    def run() -> None:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
        opt.zero_grad()

    _update.store_or_run(model, run, defer, deferred)


def _owned_gradients(gradients: Any, params: list) -> list:
    grads = _update.check_gradient_list(
        gradients, len(params), "trainable parameter (requires_grad)"
    )
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(
                f"`gradients[{i}]` must be a torch.Tensor or None. "
                f"Received: gradients[{i}] of type {type(g).__name__}"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise _update.shape_error(i, tuple(p.shape), tuple(g.shape), "parameter")
    # Copies in the parameter's dtype and device: the caller keeps its tensors,
    # and a deferred update sees the values of the call.
    return [
        None if g is None else g.detach().to(device=p.device, dtype=p.dtype, copy=True)
        for g, p in zip(grads, params)
    ]


def _gradients_of(model, loss, params, retain_graph, scaler) -> list:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(
            "update_model(loss=...) cannot serve a DistributedDataParallel module: the "
            "gradients are taken with torch.autograd.grad, which DDP's all-reduce does "
            "not see. Use `loss.backward()` (inside `opt.no_sync(model)` for an "
            "AccumOptimizer) and `opt.step()`, or pass `gradients=` you all-reduced."
        )
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"`loss` must be a torch.Tensor. Received: loss of type {type(loss).__name__}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "`loss` must require grad (computed from the model's output with autograd "
            f"enabled). Received: a loss of shape {tuple(loss.shape)} with requires_grad=False"
        )
    if loss.numel() != 1:
        loss = loss.mean()
    if scaler is not None:
        loss = scaler.scale(loss)
    try:
        grads = torch.autograd.grad(
            loss.reshape(()), params, retain_graph=retain_graph, allow_unused=True
        )
    except RuntimeError as e:
        if _INPLACE_ERROR not in str(e):
            raise
        raise RuntimeError(
            "update_model: the gradients of this loss need values from its forward pass "
            "that an in-place operation changed since: typically another model's weights, "
            "updated by an earlier `update_model` call before this loss was "
            "backpropagated through that model (a GAN's discriminator, updated before "
            "the generator's backward). " + _update.DEFER_ADVICE + " Nothing was updated. "
            f"(autograd: {str(e).splitlines()[0]})"
        ) from e
    if params and all(g is None for g in grads):
        raise ValueError(
            "`loss` does not depend on any trainable parameter of `model` (every gradient "
            "is None): compute it from the model's output. Nothing was updated."
        )
    out, storages = [], set()
    for g in grads:
        if g is not None:
            # `.grad` must own its memory: later micro-steps add into it in place.
            ptr = g.untyped_storage().data_ptr()
            if not g.is_contiguous() or ptr in storages:
                g = g.clone(memory_format=torch.contiguous_format)
            storages.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out
