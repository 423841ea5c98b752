"""keras_accum for PyTorch: exact gradient accumulation, weight EMA and clipping.

The mirror of the Keras side, with the same names and the same numbers
(`docs/semantics.md`). Importing it loads torch and no TensorFlow, and
installs the once-per-update gates of torch's LR schedulers and
`GradScaler.update` (see `keras_accum.torch._hooks`), which act only when an
`AccumOptimizer` drives them.
"""

from keras_accum.torch import _hooks
from keras_accum.torch.optimizer import AccumOptimizer
from keras_accum.torch.update import apply_deferred, attach_optimizer, update_model

_hooks.install()

__all__ = ["AccumOptimizer", "apply_deferred", "attach_optimizer", "update_model"]
