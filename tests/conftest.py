"""Test set-up: quiet TensorFlow logs, make tests/ importable, split the CPU.

`tf.distribute.MirroredStrategy` tests need several devices, and TensorFlow
fixes its devices once, at the first use: the CPU is split into two logical
devices here, before any test touches TensorFlow. Tests without a strategy
run on the first one, as they would on an unsplit CPU.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
# `jit_compile=True` compiles with XLA only where a GPU or TPU is present (as
# the tf.keras optimizers did); the suite forces it on the CPU too, so that
# the XLA paths run in CI (fresh processes inherit it).
os.environ.setdefault("KERAS_ACCUM_FORCE_XLA", "1")
sys.path.insert(0, os.path.dirname(__file__))


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


_split_cpu_into_two_logical_devices()
