"""Saved state: `state_dict`/`load_state_dict`, their hooks, pickling and copies.

docs/semantics.md, point 12 (the torch part). The layout (`FORMAT_VERSION`),
tensors, numbers, strings, lists and dicts only, so that
`torch.load(weights_only=True)` reads it:

* `state`, `param_groups`: the wrapper's per-parameter state (`"ema"`,
  `"accumulator"`) and the shared groups, as torch packs them, then one
  more group, `MARKER_GROUP` (version 2). A window summed in `.grad` is
  saved here as `"accumulator"` (`.grad` is in no state dict, and losing it
  would change the run). Keys of `state` that are no parameter index (a
  state-dict hook's) are kept and loaded as torch does.
* `inner`: `inner_optimizer.state_dict()`, nested, never merged.
* `accum`: format version, state signature, config, counters, the open
  window's weight sum and scale, whether micro-step weights are in use, and
  `last_grad_norm`.

The dict is a snapshot of the window: its tensors are copies of the live
ones, so a `backward()` or `step()` after `state_dict()` does not change it
(the EMA and the inner optimizer's state are the live tensors, as in any
torch optimizer's state dict: an update changes them).

The marker group makes a plain optimizer's `load_state_dict` refuse the
dict (torch checks the number of groups first: "loaded state dict has a
different number of parameter groups") instead of loading the wrapper's
per-parameter state as its own; `state_dict()["inner"]` is what a plain
optimizer loads. A load checks the format, the signature
(`_core.check_state_signature`) and the fit to the parameters
(`check_fits`) before it changes anything; version 1 (no marker group)
still loads.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from keras_accum import _core
from keras_accum.torch import _distribute, _hooks, _window

#: Layout of the state dict. Version 1 had no `MARKER_GROUP`.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
#: The key of the last param group of a version-2 state dict, which holds
#: no parameter: what it says is for a person reading the dict.
MARKER_KEY = "keras_accum"
MARKER_GROUP = {
    "params": [],
    MARKER_KEY: (
        "AccumOptimizer state: load it with AccumOptimizer.load_state_dict; a plain "
        "optimizer loads state_dict()['inner'] (this group makes a plain optimizer "
        "refuse the whole dict)."
    ),
}

#: Instance attributes that pickling and copies leave out: rebuilt (the
#: kept `.grad` references, the EMA plan), or tied to this object (the owner
#: reference, a scheduler's patch of `step`, the inner optimizer's groups).
_NOT_PICKLED = ("param_groups", "step", "_grad_refs", "_ema_plan", _hooks.OWNER_ATTR)


def signature(config, inner_class: str) -> dict:
    """What the saved state means: the shared signature, this side's format version."""
    return dict(config.state_signature(inner_class), format_version=FORMAT_VERSION)


def state_dict(opt) -> dict[str, Any]:
    """The body of `AccumOptimizer.state_dict` (see its docstring)."""
    if opt._window_steps > 0:
        _distribute.check_window_reduced(opt, "state_dict()")
    with base_hooks_off(opt, "_optimizer_state_dict_post_hooks"):
        sd = torch.optim.Optimizer.state_dict(opt)
    # New dicts: torch's packed state shares each parameter's dict with
    # `opt.state`, and the update removes the window's key from it.
    sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
    sd["param_groups"].append(copy.deepcopy(MARKER_GROUP))
    params = opt._params()
    if opt._window_steps > 0:
        for i, grad in enumerate(_window.in_grad(opt, params)):
            # Copies: the live window changes at the next backward() (in
            # `.grad`) or step() (a side buffer), a snapshot must not; and
            # FSDP2's sharded `.grad` can be a view into a reduce buffer whose
            # storage it later frees, which `torch.save` cannot write.
            window = grad if grad is not None else sd["state"].get(i, {}).get("accumulator")
            if window is not None:
                sd["state"][i] = {**sd["state"].get(i, {}), "accumulator": window.detach().clone()}
    sd["inner"] = opt.inner_optimizer.state_dict()
    sd["accum"] = {
        "format_version": FORMAT_VERSION,
        "signature": dict(opt._signature),
        "config": opt._config.to_dict(),
        "iterations": torch.tensor(opt._iterations, dtype=torch.int64),
        "micro_steps": torch.tensor(opt._micro_steps, dtype=torch.int64),
        "skipped_updates": torch.tensor(opt._skipped_updates, dtype=torch.int64),
        "window_steps": torch.tensor(opt._window_steps, dtype=torch.int64),
        "window_weight": torch.tensor(opt._window_weight, dtype=torch.float64),
        "weighted": opt._weighted,
        "window_scale": opt._window_scale,
        "last_grad_norm": opt._last_grad_norm,
    }
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


@contextlib.contextmanager
def base_hooks_off(opt, *names: str) -> Iterator[None]:
    """Runs base-class code with these hook dicts empty: we run the hooks ourselves.

    `torch.optim.Optimizer.state_dict`/`load_state_dict` run them on the
    plain part only; ours must see the whole dict. The same dict objects
    are put back, so `RemovableHandle`s keep working.
    """
    saved = {name: getattr(opt, name) for name in names}
    try:
        for name in names:
            setattr(opt, name, OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            setattr(opt, name, hooks)


def load_state_dict(opt, state_dict: dict[str, Any]) -> None:
    """The body of `AccumOptimizer.load_state_dict` (see its docstring)."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()  # shallow, as torch's loader does
        for hook in opt._optimizer_load_state_dict_pre_hooks.values():
            result = hook(opt, state_dict)
            if result is not None:
                state_dict = result
    accum = state_dict.get("accum") if isinstance(state_dict, dict) else None
    if not isinstance(accum, dict) or "signature" not in accum or "inner" not in state_dict:
        raise ValueError(
            "Cannot load optimizer state into AccumOptimizer: it was not saved by an "
            "AccumOptimizer (no 'accum' section; nothing was loaded). To load a plain "
            "optimizer's state, use `opt.inner_optimizer.load_state_dict(...)`."
        )
    saved = accum["signature"]
    saved = json.loads(saved) if isinstance(saved, (str, bytes, bytearray)) else dict(saved)
    version = saved.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(
            "Cannot load optimizer state into AccumOptimizer: it was saved in state "
            f"format version {version!r}, and this keras_accum reads versions "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))} (saved by a newer "
            "keras_accum? nothing was loaded)."
        )
    _core.check_state_signature(saved, dict(opt._signature, format_version=version))
    groups = state_dict["param_groups"]
    if groups and isinstance(groups[-1], dict) and MARKER_KEY in groups[-1]:
        state_dict["param_groups"] = groups = groups[:-1]
    params = opt._params()
    check_fits(opt, state_dict, params)

    saved_own = {i: dict(s) for i, s in state_dict["state"].items() if isinstance(i, int)}
    with base_hooks_off(
        opt, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
    ):
        torch.optim.Optimizer.load_state_dict(opt, state_dict)
    opt.__dict__.pop("param_groups", None)  # the base loader's list; ours is the inner's
    # Both sections hold the same groups; the top-level one is what a
    # load pre-hook sees and may have edited (e.g. a new lr).
    opt.inner_optimizer.load_state_dict(
        {**state_dict["inner"], "param_groups": state_dict["param_groups"]}
    )
    # Both loads built new param_groups lists (torch's `load_state_dict` does): share the inner
    # optimizer's again (its __setstate__ also filled in its defaults),
    # or a scheduler on this optimizer would stop reaching the inner LR.
    opt.param_groups = opt.inner_optimizer.param_groups

    opt._iterations = int(accum["iterations"])
    opt._micro_steps = int(accum["micro_steps"])
    opt._skipped_updates = int(accum["skipped_updates"])
    opt._window_steps = int(accum["window_steps"])
    opt._window_weight = float(accum["window_weight"])
    opt._weighted = bool(accum["weighted"])
    scale = accum.get("window_scale")
    opt._window_scale = None if scale is None else scale.detach().clone()
    norm = accum.get("last_grad_norm")
    opt._last_grad_norm = None if norm is None else norm.detach().clone()
    opt._ema_backup = None
    opt._ema_plan = None  # the EMA tensors are replaced below
    opt._unreduced = False
    opt._window_unsynced = False

    for i, p in enumerate(params):
        saved = saved_own.get(i, {})
        state = opt.state[p]
        if "ema" in saved:
            state["ema"] = saved["ema"].to(device=p.device, copy=True)
        acc = saved.get("accumulator")
        if acc is not None and acc.is_sparse:
            opt._sparse_seen = True  # a window lives beside `.grad`
        if _window.buffered(opt, p):
            if acc is not None:
                state["accumulator"] = acc.to(device=p.device, copy=True)
        else:
            state.pop("accumulator", None)
            with torch.no_grad():
                p.grad = None if acc is None else acc.to(p.device, p.dtype, copy=True)
        if not state:
            opt.state.pop(p, None)
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        # A sparse `.grad` left on a parameter (its window lives beside
        # it): the kept references below must not pass for dense ones.
        opt._sparse_seen = True
    opt._grad_refs = None
    if opt._window_steps > 0:
        _window.keep_grad_refs(opt, params)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def getstate(opt) -> dict[str, Any]:
    """The body of `AccumOptimizer.__getstate__` (see its docstring)."""
    state = {
        k: v
        for k, v in opt.__dict__.items()
        if not (k.startswith("_optimizer_") and k.endswith("_hooks")) and k not in _NOT_PICKLED
    }
    state["_window_grads"] = _window.in_grad(opt, opt._params()) if opt._window_steps > 0 else None
    return state


def setstate(opt, state: dict[str, Any]) -> None:
    """The body of `AccumOptimizer.__setstate__`."""
    state = dict(state)
    grads = state.pop("_window_grads", None)
    state.setdefault("_grad_refs", None)
    state.setdefault("_ema_plan", None)
    torch.optim.Optimizer.__setstate__(opt, state)  # torch's: fresh hook dicts, the step patch
    _hooks.set_owner(opt, opt)
    _hooks.set_owner(opt.inner_optimizer, opt)
    if grads is not None:
        with torch.no_grad():
            for p, g in zip(opt._params(), grads):
                if g is not None:
                    p.grad = g
        _window.keep_grad_refs(opt, opt._params())


def check_fits(opt, state_dict: dict, params: list) -> None:
    """Checks group sizes and per-parameter shapes before anything is loaded."""

    def sizes(groups):
        return [len(g["params"]) for g in groups]

    ours = sizes(opt.param_groups)
    for where, groups in (
        ("param_groups", state_dict["param_groups"]),
        ("inner param_groups", state_dict["inner"]["param_groups"]),
    ):
        if sizes(groups) != ours:
            raise ValueError(
                "Cannot load optimizer state: its "
                f"{where} hold {sizes(groups)} parameters, this optimizer's {ours} "
                "(nothing was loaded)."
            )
    for i, saved in state_dict["state"].items():
        if not isinstance(i, int):
            continue  # not a parameter's: kept as it is, as torch does
        if not 0 <= i < len(params):
            raise ValueError(
                f"Cannot load optimizer state: unknown parameter index {i!r} (nothing was loaded)."
            )
        for key in ("ema", "accumulator"):
            t = saved.get(key)
            if t is not None and tuple(t.shape) != tuple(params[i].shape):
                raise ValueError(
                    f"Cannot load optimizer state: parameter {i} has shape "
                    f"{tuple(params[i].shape)}, its saved {key!r} {tuple(t.shape)} "
                    "(nothing was loaded)."
                )
