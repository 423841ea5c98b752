"""keras_accum: exact gradient accumulation, weight EMA and clipping.

`keras_accum.AccumOptimizer` wraps any Keras 3 optimizer; the PyTorch mirror
lives in `keras_accum.torch` and has the same names and the same numbers.

`import keras_accum` loads the Keras side (so that `keras.models.load_model`
finds the registered optimizer without `custom_objects`) and no torch;
`import keras_accum.torch` loads torch and no TensorFlow.
"""

from __future__ import annotations

import sys

from keras_accum._core import AccumConfig

__version__ = "0.1.0"

__all__ = [
    "AccumConfig",
    "AccumOptimizer",
    "SwapEMAWeights",
    "FlushWindow",
    "apply_deferred",
    "update_model",
    "__version__",
]

_KERAS_NAMES = ("AccumOptimizer", "SwapEMAWeights", "FlushWindow", "apply_deferred", "update_model")


def _importing_torch_side_only() -> bool:
    """True while this package is imported as the parent of `keras_accum.torch`.

    Python imports a package before its submodule, so `import keras_accum.torch`
    runs this file first. Loading TensorFlow here would break the promise that
    the torch mirror imports no TensorFlow, so we look at the import machinery's
    frames for the name being imported. (CPython's `importlib._bootstrap` keeps
    it in `_find_and_load*`'s `name`; elsewhere we simply load lazily.)
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("_find_and_load", "_find_and_load_unlocked"):
            name = frame.f_locals.get("name")
            if isinstance(name, str) and name.startswith(_LATE_KERAS):
                return True
        # `python -m keras_accum.demo`: runpy imports this package first.
        if frame.f_code.co_name in ("_get_module_details", "_run_module_as_main"):
            name = frame.f_locals.get("mod_name")
            if isinstance(name, str) and name.startswith(_LATE_KERAS):
                return True
        frame = frame.f_back
    return False


# Submodules imported without loading the Keras side first: the torch mirror
# (no TensorFlow at all) and the demo (which silences TensorFlow's start-up
# logs before loading it).
_LATE_KERAS = (__name__ + ".torch", __name__ + ".demo")


def __getattr__(name: str):
    if name in _KERAS_NAMES:
        from keras_accum import keras as _keras_side

        return getattr(_keras_side, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _importing_torch_side_only():
    try:
        from keras_accum.keras import (  # noqa: F401
            AccumOptimizer,
            FlushWindow,
            SwapEMAWeights,
            apply_deferred,
            update_model,
        )
    except ImportError:  # TensorFlow/Keras missing: keep the torch side usable.
        pass
