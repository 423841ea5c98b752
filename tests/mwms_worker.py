"""One worker of a two-process `MultiWorkerMirroredStrategy` run (started by the tests).

Usage: python mwms_worker.py OUT.npz (with TF_CONFIG set). Trains the tests'
MLP twice under the strategy with `AccumOptimizer(Adam, merge_grad=2,
global_clipnorm, use_ema)` on global micro-batches of 8 (4 rows per worker)
in a custom `tf.function` loop over `distribute_datasets_from_function`.
(`model.fit` is not run: under this strategy Keras 3.15's own `fit` fails
before any optimizer is called, for plain Keras optimizers too, with "Attempt
to convert a value (PerReplica...)".) Writes the weights, the EMA and the
counters; the test compares them with a single-device large-batch run it
makes itself.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_accum import AccumOptimizer  # noqa: E402

B, K, N = 8, 2, 64


def data():
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((N, 5)).astype(np.float32),
        rng.standard_normal((N, 2)).astype(np.float32),
    )


def mlp():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )


def make_optimizer():
    return AccumOptimizer(
        keras.optimizers.Adam(0.01), merge_grad=K, global_clipnorm=0.3, use_ema=True
    )


def custom_loop(strategy, x, y):
    with strategy.scope():
        model, opt = mlp(), make_optimizer()

    def dataset_fn(context):
        # This worker's share of every global micro-batch: rows [t*B + i*h, t*B + (i+1)*h).
        n, i = context.num_input_pipelines, context.input_pipeline_id
        h = B // n
        rows = np.concatenate([np.arange(t * B + i * h, t * B + (i + 1) * h) for t in range(N // B)])
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(h)

    @tf.function
    def train_step(batch):
        def step_fn(inputs):
            xb, yb = inputs
            with tf.GradientTape() as tape:
                per_example = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=B)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(step_fn, args=(batch,))

    for batch in strategy.distribute_datasets_from_function(dataset_fn):
        train_step(batch)
    return model, opt


def main(out):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data()
    result = {}
    for name, run in (("loop", custom_loop),):
        model, opt = run(strategy, x, y)
        for i, w in enumerate(model.get_weights()):
            result[f"{name}_w{i}"] = w
        for i, e in enumerate(opt._ema):
            result[f"{name}_ema{i}"] = e.numpy()
        result[f"{name}_counters"] = np.array(
            [int(opt.iterations.numpy()), int(opt.micro_steps.numpy()),
             int(opt.skipped_updates.numpy())]
        )
    np.savez(out, **result)
    print(json.dumps({"worker": json.loads(os.environ["TF_CONFIG"])["task"]["index"]}))


if __name__ == "__main__":
    main(sys.argv[1])
