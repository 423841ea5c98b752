"""The saved state: its layout, its signature, and loading it all or nothing.

docs/semantics.md, point 12. `optimizer.variables` is the inner optimizer's
state, then ours (so `variables[0]` is the inner step counter, `iterations`,
as Keras code expects of an optimizer). A `.keras` file stores them by
position, plus a signature (the state-defining configuration, the inner
class and the layout's format version). Loading checks the signature, the
count, every shape and dtype before the first assignment: a refused load
changes nothing (Keras itself only warns and skips).

Format versions, each still read:

- 1: the base class's two unused variables (`iteration`, `learning_rate`),
  the inner slots, our state, the model's weights, the inner state;
- 2: the two unused variables, our state, the inner state;
- 3: the inner state, then our state.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from keras_accum import _core

SIGNATURE_KEY = "keras_accum_signature"
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)


def signature(config, inner) -> str:
    """The state signature of an optimizer of `config` around `inner`, as JSON."""
    return _core.encode_signature(
        dict(config.state_signature(type(inner).__name__), format_version=FORMAT_VERSION)
    )


def own_variables(opt) -> list:
    """The wrapper's own state, in its saved order (no inner state, no weights)."""
    own = list(opt._accumulators)
    own += [
        opt._seen,
        opt._window_weight,
        opt._window_steps,
        opt._micro_steps,
        opt._skipped_updates,
        opt._last_grad_norm,
    ]
    if opt.use_ema:
        own += list(opt._ema) + [opt._ema_swapped]
        own += [b for b in opt._raw_backup if b is not None]
    # A subclass's own variables (made in its `build`), in creation order.
    known = {id(v) for v in own}
    known.update(id(v) for v in opt.inner_optimizer.variables)
    known.update(id(v) for v in opt._trainable_variables)
    known.update((id(opt._iterations), id(opt._learning_rate)))
    own += [v for v in opt._variables if id(v) not in known]
    return own


def layout(opt, version) -> list:
    """The saved entries of a format, in order: `(variable, assign)` pairs.

    Entries of older formats that are not state (the base class's unused
    counter and learning rate, the inner slots and model weights that format
    1 repeated) are checked but not assigned.
    """
    own = own_variables(opt)
    inner = list(opt.inner_optimizer.variables)
    if version == FORMAT_VERSION:
        return [(v, True) for v in inner + own]
    unused = [(opt._iterations, False), (opt._learning_rate, False)]
    if version == 2:
        return unused + [(v, True) for v in own + inner]
    inner_slots = []
    for group in opt._inner_slots:
        inner_slots.extend(x for x in group if all(x is not y for y in inner_slots))
    return (
        unused
        + [(v, False) for v in inner_slots]
        + [(v, True) for v in own]
        + [(v, False) for v in opt._trainable_variables]
        + [(v, True) for v in inner]
    )


def save(opt, store) -> None:
    for i, variable in enumerate(opt.variables):
        store[str(i)] = variable.numpy()
    store[SIGNATURE_KEY] = np.frombuffer(opt._signature.encode("utf-8"), dtype=np.uint8)


def load(opt, store) -> None:
    """Loads what `save` wrote (any readable format); raises instead of skipping."""
    keys = list(store.keys())
    if SIGNATURE_KEY not in keys:
        raise ValueError(
            f"Cannot load optimizer state into AccumOptimizer '{opt.name}': "
            "it was not saved by an AccumOptimizer (no signature; nothing was loaded)."
        )
    saved = json.loads(bytes(np.asarray(store[SIGNATURE_KEY], dtype=np.uint8)).decode("utf-8"))
    version = saved.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(
            f"Cannot load optimizer state into AccumOptimizer '{opt.name}': it was "
            f"saved in state format version {version!r}, and this keras_accum reads "
            f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))} (saved by "
            "a newer keras_accum? nothing was loaded)."
        )
    # Every check comes before the first assignment, the inner state's
    # included: a refused load leaves all of it as it was.
    current = dict(json.loads(opt._signature), format_version=version)
    _core.check_state_signature(saved, current)
    entries = layout(opt, version)
    n_saved = len(keys) - 1
    if n_saved != len(entries):
        raise ValueError(
            f"Cannot load optimizer state into AccumOptimizer '{opt.name}': "
            f"it has {len(entries)} variables, the saved state {n_saved} "
            "(build the optimizer on the same model first; nothing was loaded)."
        )
    values = [np.asarray(store[str(i)]) for i in range(n_saved)]
    for (v, _), value in zip(entries, values):
        check_loadable(v, value)
    for (v, assign), value in zip(entries, values):
        if assign:
            v.assign(value)


def check_loadable(variable, value) -> None:
    """Raises unless `value` loads into `variable` exactly (shape, dtype, range)."""
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(
            f"Cannot load optimizer state: variable '{variable.path}' has shape "
            f"{tuple(variable.shape)}, the saved value {tuple(value.shape)} "
            "(nothing was loaded)."
        )
    if not loadable(value, variable.dtype):
        raise ValueError(
            f"Cannot load optimizer state: variable '{variable.path}' has dtype "
            f"{keras.backend.standardize_dtype(variable.dtype)}, the saved value "
            f"{keras.backend.standardize_dtype(value.dtype)} (nothing was loaded)."
        )


#: Saved float dtypes that load into a variable of a wider dtype without loss.
_WIDENINGS = {
    ("float16", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float64"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
}


def loadable(value, variable_dtype) -> bool:
    """Whether a saved array loads into a variable of `variable_dtype` exactly.

    The same dtype; a float widening (state saved when float64 variables
    still accumulated in float32); or integers that fit (JAX keeps 64-bit
    counters as int32, TensorFlow as int64: a file moves between them).
    """
    saved = keras.backend.standardize_dtype(value.dtype)
    target = keras.backend.standardize_dtype(variable_dtype)
    if saved == target or (saved, target) in _WIDENINGS:
        return True
    if saved.startswith("int") and target.startswith("int"):
        info = np.iinfo(target)
        return value.size == 0 or (int(value.min()) >= info.min and int(value.max()) <= info.max)
    return False
