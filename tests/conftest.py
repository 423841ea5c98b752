"""Test set-up: quiet TensorFlow logs, make tests/ importable, split the CPU, mark backends.

The Keras tests run on the Keras backend that `KERAS_BACKEND` names
(TensorFlow when unset), one backend per pytest process: Keras picks its
backend once, at its first import. `KERAS_BACKEND=jax python -m pytest -m keras`
runs the Keras tests (the files `test_keras_*.py` and `test_parity.py`) on
JAX. A test that needs TensorFlow's own API (tf.distribute, `tf.function`,
`tf.GradientTape`, `tf.IndexedSlices`, checkpoints) is marked `tensorflow`
and skipped on the other backends.

`tf.distribute.MirroredStrategy` tests need several devices, and TensorFlow
fixes its devices once, at the first use: on the TensorFlow backend the CPU is
split into two logical devices here, before any test touches TensorFlow.
Tests without a strategy run on the first one, as they would on an unsplit CPU.
"""

import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
# `jit_compile=True` compiles with XLA only where a GPU or TPU is present (as
# the tf.keras optimizers did); the suite forces it on the CPU too, so that
# the XLA paths run in CI (fresh processes inherit it).
os.environ.setdefault("KERAS_ACCUM_FORCE_XLA", "1")
sys.path.insert(0, os.path.dirname(__file__))

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


def _split_cpu_into_two_logical_devices():
    try:
        import tensorflow as tf
    except ImportError:  # the torch side alone
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # already initialised by an earlier import
        pass


if BACKEND == "tensorflow":
    _split_cpu_into_two_logical_devices()


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name.startswith("test_keras_") or name == "test_parity.py":
            item.add_marker(pytest.mark.keras)
        if BACKEND != "tensorflow" and item.get_closest_marker("tensorflow"):
            item.add_marker(
                pytest.mark.skip(reason=f"needs Keras's TensorFlow backend (running {BACKEND})")
            )
