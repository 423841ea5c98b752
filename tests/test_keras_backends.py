"""What differs between Keras backends: each backend's own ways in, against large-batch runs.

The rest of the Keras suite runs on every backend; here are the paths that
exist on one backend only, or whose rule differs per backend:

- `jit_compile`: XLA for TensorFlow's eager step only where a GPU or TPU is
  present (the seed API's rule); `jax.jit` on JAX; no effect on torch.
- `update_model`'s gradients form on every backend; its loss form takes a
  `tf.GradientTape`.
- `fit` with `FlushWindow`: a last partial window per epoch is applied with
  its true divisor, as a large batch of the samples left.
- JAX: the custom loop Keras documents (`jax.jit` of a step that calls
  `stateless_apply`): the large batch's numbers, one trace, and no copy of
  the state in the compiled step; `keras.distribution` (two CPU devices, in
  a fresh process): `DataParallel` equals the single-device large batch, and
  under `ModelParallel` the accumulators and the EMA take their variable's
  layout.
- torch: `fit` with `jit_compile=True` (`torch.compile`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras_driver import BACKEND, small_data, small_model, values

import keras_accum
from keras_accum import AccumOptimizer, FlushWindow, update_model

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


def _schedule():
    return keras.optimizers.schedules.CosineDecay(0.05, decay_steps=20)


# ----------------------------------------------------------------- jit_compile
def test_jit_compile_resolves_by_the_backends_rule(monkeypatch):
    if BACKEND == "tensorflow":
        from keras_accum.keras._backend import tensorflow as tf_plumbing

        monkeypatch.setattr(tf_plumbing, "FORCE_XLA", False)
        # The seed API's rule: XLA only where a GPU or TPU is present.
        expected = tf_plumbing._xla_device_present()
    else:
        expected = BACKEND == "jax"
    assert AccumOptimizer("sgd", jit_compile=True).jit_compile is expected
    assert AccumOptimizer("sgd", jit_compile=False).jit_compile is False
    # The config keeps what was asked for, so a file moves between machines.
    assert AccumOptimizer("sgd", jit_compile=True).get_config()["jit_compile"] is True


# ---------------------------------------------------------------- update_model
def test_update_model_gradients_form_takes_one_micro_step_on_every_backend():
    x, y = small_data(16)
    model, plain = small_model(), small_model()
    model.compile(optimizer=AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(3)
    grads = [
        [rng.standard_normal(tuple(v.shape)).astype("float32") for v in model.trainable_variables]
        for _ in range(2)
    ]
    for g in grads:
        update_model(model, gradients=g)
    assert int(model.optimizer.iterations.numpy()) == 1
    merged = [keras.ops.convert_to_tensor((a + b) / 2) for a, b in zip(*grads)]
    plain.optimizer.apply_gradients(zip(merged, plain.trainable_variables))
    _close(model.get_weights(), plain.get_weights())


def test_update_model_loss_form_names_the_backend_it_needs():
    if BACKEND == "tensorflow":
        pytest.skip("the loss form runs here (test_keras_update_model.py)")
    model = small_model()
    model.compile(optimizer=AccumOptimizer("sgd", merge_grad=2), loss="mse")
    with pytest.raises(ValueError, match=rf"TensorFlow backend only.*backend='{BACKEND}'"):
        update_model(model, loss=1.0, tape=object())


# ------------------------------------------------------------------- FlushWindow
@pytest.mark.slow
@pytest.mark.parametrize("on", ["epoch_end", "train_end"])
def test_fit_with_flush_window_equals_the_large_batch_of_what_is_left(on):
    """40 samples, micro-batches of 8, merge_grad=2: windows of 16, 16 and a last
    micro-batch of 8, flushed (divided by its own weight): the large batch's
    batches of 16, 16 and 8. With `on="train_end"` only the last epoch's is
    flushed; earlier ones carry over, as Keras's epochs do with `steps`."""
    x, y = small_data(40)
    ours, large = small_model(), small_model()
    opt = AccumOptimizer(
        keras.optimizers.SGD(_schedule(), momentum=0.9),
        merge_grad=2,
        use_ema=True,
        ema_momentum=0.5,
    )
    ours.compile(optimizer=opt, loss="mse")
    large_opt = AccumOptimizer(
        keras.optimizers.SGD(_schedule(), momentum=0.9), use_ema=True, ema_momentum=0.5
    )
    large.compile(optimizer=large_opt, loss="mse")
    epochs = 2 if on == "epoch_end" else 1
    ours.fit(
        x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=[FlushWindow(on=on)]
    )
    large.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == int(large_opt.iterations.numpy()) == 3 * epochs
    assert int(opt.window_steps.numpy()) == 0
    _close(ours.get_weights(), large.get_weights())


# --------------------------------------------------------------------------- JAX
@pytest.mark.skipif(BACKEND != "jax", reason="the JAX custom loop")
def test_jax_custom_loop_with_stateless_apply_equals_the_large_batch():
    """Keras's JAX training loop (`jax.jit` of a step calling `stateless_apply`,
    the state donated): the large batch's weights and EMA, one trace for update and
    non-update micro-steps, and a compiled step that copies no weight, slot or
    accumulator (the update is a loop of 0 or 1 iterations)."""
    import jax

    x, y = small_data(64)
    model = small_model()
    config = dict(global_clipnorm=0.5, use_ema=True, ema_momentum=0.5)
    opt = AccumOptimizer(keras.optimizers.Adam(_schedule()), merge_grad=4, **config)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError()

    def compute_loss(trainable, non_trainable, xb, yb):
        y_pred, non_trainable = model.stateless_call(trainable, non_trainable, xb)
        return loss_fn(yb, y_pred), non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def train_step(state, xb, yb):
        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, xb, yb)
        trainable, optimizer_variables = opt.stateless_apply(optimizer_variables, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    step = jax.jit(train_step, donate_argnums=0)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in opt.variables],
    )
    hlo = step.lower(state, x[:8], y[:8]).compile().as_text()
    for _ in range(2):
        for i in range(0, 64, 8):
            _, state = step(state, x[i : i + 8], y[i : i + 8])
    assert step._cache_size() == 1
    for v, value in zip(model.trainable_variables, state[0]):
        v.assign(value)
    for v, value in zip(opt.variables, state[2]):
        v.assign(value)
    opt.finalize_variable_values(model.trainable_variables)  # as `fit` does at its end

    large = small_model()
    large_opt = AccumOptimizer(keras.optimizers.Adam(_schedule()), **config)
    large.compile(optimizer=large_opt, loss="mse")
    large.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == int(large_opt.iterations.numpy()) == 4
    _close(values(model.trainable_variables), values(large.trainable_variables), rtol=1e-5)
    _close(values(opt.ema_variables), values(large_opt.ema_variables), rtol=1e-5)
    # The compiled step holds the update as loops and copies no state-sized buffer.
    assert " while(" in hlo
    for v in model.trainable_variables:
        if len(v.shape) == 2:
            dims = ",".join(str(d) for d in v.shape)
            assert not re.findall(rf"= f32\[{dims}\]\{{[0-9,]*\}} copy\(", hlo), v.path


def _run_jax_script(tmp_path, text, argument):
    """Runs `text` in a fresh JAX process (its own XLA_FLAGS); the dict it printed."""
    import json

    script = tmp_path / "script.py"
    script.write_text(text)
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="jax")
    out = subprocess.run(
        [sys.executable, str(script), argument], capture_output=True, text=True, env=env, timeout=300
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(line[len("RESULT ") :])


_DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import os, re, sys, json
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np, keras, jax
    sys.path.insert(0, {here!r})
    from keras_driver import small_data, small_model
    from keras_accum import AccumOptimizer

    mode = sys.argv[1]
    devices = jax.devices()
    assert len(devices) == 2, devices
    x, y = small_data(64)
    config = dict(global_clipnorm=0.5, use_ema=True, ema_momentum=0.5)

    def schedule():
        return keras.optimizers.schedules.CosineDecay(0.05, decay_steps=20)

    def fit(distribution, merge_grad, batch_size):
        keras.distribution.set_distribution(distribution)
        try:
            model = small_model()
            opt = AccumOptimizer(keras.optimizers.Adam(schedule()), merge_grad=merge_grad, **config)
            model.compile(optimizer=opt, loss="mse")
            model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
            return model, opt
        finally:
            keras.distribution.set_distribution(None)

    out = {{}}
    if mode == "data":
        dist = keras.distribution.DataParallel(devices=devices)
    else:
        mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices=devices)
        layouts = keras.distribution.LayoutMap(mesh)  # keys: regexes of whole paths
        layouts[".*/dense/kernel"] = (None, "model")
        layouts[".*/dense/bias"] = ("model",)
        dist = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    model, opt = fit(dist, 4, 8)
    large, large_opt = fit(None, 1, 32)
    if mode == "data":
        # fit's train step as fit compiles it, for ours and for plain Adam:
        # its all-reduces (GSPMD's, of the loss and the gradients, at every
        # micro-step), counted in the optimized HLO.
        from jax.sharding import NamedSharding, PartitionSpec

        def all_reduces(make_optimizer):
            keras.distribution.set_distribution(dist)
            try:
                m = small_model()
                m.compile(optimizer=make_optimizer(), loss="mse")
                m.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
                state = tuple([v.value for v in vs] for vs in (
                    m.trainable_variables, m.non_trainable_variables,
                    m.optimizer.variables, m.metrics_variables))
                batch = NamedSharding(dist.device_mesh.backend_mesh, PartitionSpec("batch"))
                data = (jax.device_put(x[:8], batch), jax.device_put(y[:8], batch))
                hlo = jax.jit(m.train_step).lower(state, data).compile().as_text()
                return len(re.findall(r" all-reduce(?:-start)?\\(", hlo))
            finally:
                keras.distribution.set_distribution(None)

        out["all_reduces"] = [
            all_reduces(lambda: AccumOptimizer(
                keras.optimizers.Adam(schedule()), merge_grad=4, **config)),
            all_reduces(lambda: keras.optimizers.Adam(schedule())),
        ]
    out["iterations"] = [int(opt.iterations.numpy()), int(large_opt.iterations.numpy())]
    out["weights"] = [float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), large.get_weights())]
    out["ema"] = [float(np.abs(np.asarray(a.numpy()) - np.asarray(b.numpy())).max())
                  for a, b in zip(opt.ema_variables, large_opt.ema_variables)]
    out["layouts"] = [
        [str(v.value.sharding.spec), str(a.value.sharding.spec), str(e.value.sharding.spec)]
        for v, a, e in zip(opt._trainable_variables, opt._accumulators, opt.ema_variables)
    ]
    print("RESULT", json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
@pytest.mark.parametrize("mode", ["data", "model"])
def test_keras_distribution_on_two_devices_equals_the_single_device_large_batch(mode, tmp_path):
    """`DataParallel` (each micro-batch split over two CPU devices) and `ModelParallel`
    (the first kernel split over them): the single-device large batch's weights
    and EMA; under `ModelParallel` each accumulator and EMA shadow has its
    variable's layout (a replicated one would gather the split kernel)."""
    result = _run_jax_script(tmp_path, _DISTRIBUTED_SCRIPT.format(here=HERE), mode)
    assert result["iterations"] == [4, 4]
    assert max(result["weights"]) < 1e-5, result["weights"]
    assert max(result["ema"]) < 1e-5, result["ema"]
    for variable, accumulator, ema in result["layouts"]:
        assert accumulator == variable and ema == variable, result["layouts"]
    if mode == "model":
        assert "model" in result["layouts"][0][0]  # the split kernel: not replicated
    else:
        # GSPMD all-reduces inside the backward pass at every micro-step;
        # the window (its decisions on replicated counters) adds none.
        ours, plain = result["all_reduces"]
        assert plain >= 1 and ours == plain, result["all_reduces"]


_SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import os, re, sys, json
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np, keras, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from keras_driver import small_data, small_model
    from keras_accum import AccumOptimizer

    mesh = jax.make_mesh((2,), ("batch",))
    x, y = small_data(64)

    def make(merge_grad):
        model = small_model()
        opt = AccumOptimizer(
            keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.05, decay_steps=20)),
            merge_grad=merge_grad, global_clipnorm=0.5, use_ema=True, ema_momentum=0.5,
        )
        opt.build(model.trainable_variables)
        return model, opt

    def grads_of(model, train, xb, yb):
        def loss(t):
            pred, _ = model.stateless_call(t, [], xb)
            return jnp.mean((pred - yb) ** 2)
        return jax.grad(loss)(train)

    def single(merge_grad, batch, steps, flush=False):
        model, opt = make(merge_grad)
        train = [v.value for v in model.trainable_variables]
        state = [v.value for v in opt.variables]
        step = jax.jit(lambda s, t, xb, yb: opt.stateless_apply(s, grads_of(model, t, xb, yb), t))
        for i in range(steps):
            train, state = step(state, train, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
        if flush:
            train, state = jax.jit(opt.stateless_flush)(state, train)
        return train, state, opt

    # Ours: micro-batches of 8 split over the two devices, merge_grad=4.
    model, opt = make(4)
    specs = opt.window_specs("batch")

    def local_step(state, train, xb, yb):
        grads = grads_of(model, train, xb, yb)  # this device's, not reduced
        train, state = opt.stateless_apply(state, grads, train, axis_name="batch")
        return state, train

    step = jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(), P("batch"), P("batch")),
                      out_specs=(specs, P()), check_vma=False),
        donate_argnums=(0, 1),
    )
    # From host copies: a donated step must not take the variables' own buffers.
    put = lambda v, spec: jax.device_put(np.asarray(v), NamedSharding(mesh, spec))
    state = [put(v, s) for v, s in zip(opt.split_window([v.value for v in opt.variables], 2), specs)]
    train = [put(v.value, P()) for v in model.trainable_variables]
    batch = lambda a, i: put(a[i * 8:(i + 1) * 8], P("batch"))
    out = {}
    hlo = step.lower(state, train, batch(x, 0), batch(y, 0)).compile().as_text()
    where, current = [], None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line
        if re.search(r" all-reduce(?:-start)?\\(", line):
            where.append(current.startswith("ENTRY"))
    out["all_reduces_in_entry"] = where
    mid = None
    for i in range(8):
        state, train = step(state, train, batch(x, i), batch(y, i))
        if i == 5:  # a window and a half: joined, as saved
            mid = ([np.asarray(t) for t in train], [np.asarray(v) for v in opt.join_window(state)])
    large_train, large_state, large_opt = single(1, 32, 2)
    out["iterations"] = [int(state[0]), int(large_state[0])]
    out["weights"] = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(train, large_train)]
    ema = [i for i, v in enumerate(opt.variables) if any(v is e for e in opt.ema_variables)]
    out["ema"] = [float(np.abs(np.asarray(state[i]) - np.asarray(large_state[i])).max()) for i in ema]
    # The joined mid-window state, flushed on one device, against one device's
    # run of the same six micro-batches of 8 with a flush.
    model2, opt2 = make(4)
    flushed_train, _ = jax.jit(opt2.stateless_flush)(mid[1], mid[0])
    ref_train, _, _ = single(4, 8, 6, flush=True)
    out["flushed"] = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(flushed_train, ref_train)]
    print("RESULT", json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="jax.shard_map")
def test_shard_map_step_reduces_once_per_update_and_equals_the_large_batch(tmp_path):
    """`stateless_apply(..., axis_name="batch")` in a `jax.shard_map` step over two CPU
    devices, each with its own gradients: one all-reduce, inside the update's
    loop (none in the steps that do not update); the single-device large
    batch's weights and EMA; a mid-window state joined (`join_window`) and
    flushed on one device equals one device's run of the same micro-batches."""
    result = _run_jax_script(tmp_path, _SHARD_MAP_SCRIPT, HERE)
    assert result["all_reduces_in_entry"] == [False], result["all_reduces_in_entry"]
    assert result["iterations"] == [2, 2]
    assert max(result["weights"]) < 1e-5, result["weights"]
    assert len(result["ema"]) == 4 and max(result["ema"]) < 1e-5, result["ema"]
    assert max(result["flushed"]) < 1e-5, result["flushed"]


def test_axis_name_is_refused_where_it_cannot_hold():
    """`axis_name` on a backend other than JAX, outside a traced step, or with
    accumulators that were not split: a ValueError naming what to do, nothing changed."""
    model = small_model()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), merge_grad=2)
    opt.build(model.trainable_variables)
    before = values(opt.variables)
    if BACKEND != "jax":
        with pytest.raises(ValueError, match="axis_name.*JAX backend"):
            opt.window_specs("batch")
        return
    import jax

    state = [v.value for v in opt.variables]
    train = [v.value for v in model.trainable_variables]
    grads = [np.ones(v.shape, "float32") for v in model.trainable_variables]
    with pytest.raises(ValueError, match="outside a traced step"):
        opt.stateless_apply(state, grads, train, axis_name="batch")
    with pytest.raises(ValueError, match="leading device axis.*split_window"):
        jax.jit(lambda s, g, t: opt.stateless_apply(s, g, t, axis_name="batch"))(state, grads, train)
    with pytest.raises(ValueError, match="num_devices"):
        opt.split_window(state, 0)
    split = jax.sharding.PartitionSpec("batch")
    assert [spec == split for spec in opt.window_specs("batch")] == [
        any(v is a for a in opt._accumulators) for v in opt.variables
    ]
    for a, b in zip(values(opt.variables), before):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- torch
@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile through Keras's torch trainer")
def test_torch_fit_with_jit_compile_equals_the_large_batch():
    """`model.compile(jit_compile=True)` on the torch backend wraps the train step in
    `torch.compile`: the large batch's weights, the window decided at each step."""
    x, y = small_data(64)
    config = dict(global_clipnorm=0.5, use_ema=True, ema_momentum=0.5)
    ours, large = small_model(), small_model()
    opt = AccumOptimizer(keras.optimizers.Adam(_schedule()), merge_grad=4, **config)
    ours.compile(optimizer=opt, loss="mse", jit_compile=True)
    large_opt = AccumOptimizer(keras.optimizers.Adam(_schedule()), **config)
    large.compile(optimizer=large_opt, loss="mse")
    ours.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    large.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == int(large_opt.iterations.numpy()) == 4
    _close(ours.get_weights(), large.get_weights())


def test_the_package_names_every_backend_it_runs_on():
    assert keras_accum.AccumOptimizer is AccumOptimizer
    opt = AccumOptimizer("adam", merge_grad=2, use_ema=True)
    assert repr(opt).startswith("<AccumOptimizer name=") and "merge_grad=2" in repr(opt)
    assert type(opt._plumbing).__module__.endswith(f"_backend.{BACKEND}")
