"""The Keras 3 side of keras_accum, on every Keras backend (TensorFlow, JAX, torch)."""

from keras_accum.keras.callbacks import FlushWindow, SwapEMAWeights
from keras_accum.keras.optimizer import AccumOptimizer
from keras_accum.keras.update import apply_deferred, update_model

__all__ = ["AccumOptimizer", "FlushWindow", "SwapEMAWeights", "apply_deferred", "update_model"]
