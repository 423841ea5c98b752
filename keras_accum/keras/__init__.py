"""The Keras 3 side of keras_accum (TensorFlow backend)."""

from keras_accum.keras.callbacks import FlushWindow, SwapEMAWeights
from keras_accum.keras.optimizer import AccumOptimizer

__all__ = ["AccumOptimizer", "FlushWindow", "SwapEMAWeights"]
