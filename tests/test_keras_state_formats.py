"""Saved-state formats: a `.keras` file of an older layout loads on every Keras backend.

`tests/data/format2_adam_merge4_ema.keras` was written by the state format 2
code (tests/data/README.md says how): the base class's unused counter and
learning rate, our state, then the inner state. Today's layout (format 3) is
the inner state, then ours. The file's values are compared with the arrays
stored in it, never with a recomputation (which may differ in the last bit on
another CPU); a resume is compared, bit for bit, with a resume from the same
state set by hand on this machine.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import keras
import numpy as np
import pytest
from keras_driver import small_data, values

import keras_accum  # noqa: F401  (registers AccumOptimizer for `load_model`)

HERE = os.path.dirname(__file__)
FORMAT2_FILE = os.path.join(HERE, "data", "format2_adam_merge4_ema.keras")


def _stored(path):
    """The model weights and optimizer entries stored in a `.keras` file, in order."""
    with zipfile.ZipFile(path) as archive:
        weights_file = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    with weights_file:
        layers = weights_file["layers"]
        weights = [
            np.array(layers[name]["vars"][str(i)])
            for name in ("dense", "dense_1")
            for i in range(len(layers[name]["vars"]))
        ]
        entries = weights_file["optimizer"]["vars"]
        signature = json.loads(bytes(np.array(entries["keras_accum_signature"])).decode())
        optimizer = [np.array(entries[str(i)]) for i in range(len(entries) - 1)]
    return weights, optimizer, signature


def _same(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_array_equal(a, np.asarray(e).astype(a.dtype), err_msg=f"{what}[{i}]")


def _batches():
    x, y = small_data(n=48)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]


def _format3_order(opt, stored):
    """Format 2's entries (2 unused, own, inner) in today's order (inner, own)."""
    n_inner = len(opt.inner_optimizer.variables)
    return stored[-n_inner:] + stored[2:-n_inner]


def test_keras_file_of_state_format_2_loads_the_values_stored_in_it():
    weights, stored, signature = _stored(FORMAT2_FILE)
    assert signature["format_version"] == 2
    loaded = keras.models.load_model(FORMAT2_FILE)
    opt = loaded.optimizer
    _same(loaded.get_weights(), weights, "model")
    _same(values(opt.variables), _format3_order(opt, stored), "optimizer state")
    assert int(opt.iterations.numpy()) == 1
    assert int(opt.micro_steps.numpy()) == 6 and int(opt.window_steps.numpy()) == 2


@pytest.mark.slow
def test_format_2_resume_equals_a_resume_from_the_same_state_set_by_hand(tmp_path):
    """Bit for bit on this machine; then saved again, in today's format."""
    weights, stored, _ = _stored(FORMAT2_FILE)
    loaded = keras.models.load_model(FORMAT2_FILE)
    # The same program (model, loss, optimizer from the file's configs), its
    # state overwritten, then set by hand from the stored arrays.
    by_hand = keras.models.load_model(FORMAT2_FILE)
    by_hand_opt = by_hand.optimizer
    by_hand.set_weights([np.zeros_like(w) for w in weights])
    by_hand_opt.set_weights([np.zeros_like(v) for v in values(by_hand_opt.variables)])
    by_hand.set_weights(weights)
    by_hand_opt.set_weights(_format3_order(by_hand_opt, stored))
    for xb, yb in _batches():
        loaded.train_on_batch(xb, yb)
        by_hand.train_on_batch(xb, yb)
    _same(loaded.get_weights(), by_hand.get_weights(), "model after resume")
    _same(values(loaded.optimizer.variables), values(by_hand_opt.variables), "state")
    assert int(loaded.optimizer.iterations.numpy()) == 3
    path = str(tmp_path / "again.keras")
    loaded.save(path)
    _, again, signature = _stored(path)
    assert signature["format_version"] == 3
    _same(values(loaded.optimizer.variables), again, "saved again")
