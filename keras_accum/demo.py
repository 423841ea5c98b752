"""The main job: accumulation on small batches equals training on large batches.

Run it with `keras-accum-demo` or `python -m keras_accum.demo`. It trains the
same small model twice on data made with NumPy (nothing is downloaded):
once with `AccumOptimizer(merge_grad=4)` on batches of 8, once with the
plain optimizer on batches of 32, with the same learning-rate schedule, and
prints both losses and the largest weight difference.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _data(n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    w = rng.normal(size=(10, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _train(x, y, batch_size, merge_grad, epochs, seed, builtin=False):
    import keras

    from keras_accum import AccumOptimizer

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=200)
    if builtin:  # Keras's own accumulation, for comparison
        optimizer = keras.optimizers.Adam(schedule, gradient_accumulation_steps=merge_grad)
    elif merge_grad > 1:
        optimizer = AccumOptimizer(keras.optimizers.Adam(schedule), merge_grad=merge_grad)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge-grad", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np

    x, y = _data(args.samples, args.seed)
    k, b = args.merge_grad, args.micro_batch
    small, small_loss = _train(x, y, b, k, args.epochs, args.seed)
    large, large_loss = _train(x, y, k * b, 1, args.epochs, args.seed)
    builtin, _ = _train(x, y, b, k, args.epochs, args.seed, builtin=True)

    def max_diff(model):
        return max(
            float(np.max(np.abs(p - q))) for p, q in zip(model.get_weights(), large.get_weights())
        )

    print(f"AccumOptimizer(merge_grad={k}) on batches of {b}  vs  Adam on batches of {k * b}")
    print("epoch   loss (accumulated)   loss (large batch)")
    for epoch, (a, c) in enumerate(zip(small_loss, large_loss), start=1):
        print(f"{epoch:5d}   {a:18.6f}   {c:18.6f}")
    diff = max_diff(small)
    updates = int(small.optimizer.iterations.numpy())
    micro = int(small.optimizer.micro_steps.numpy())
    print(f"updates: {updates} (from {micro} micro-steps); large-batch updates: "
          f"{int(large.optimizer.iterations.numpy())}")
    print(f"largest weight difference: {diff:.3g}")
    print(f"(Keras's built-in gradient_accumulation_steps={k}, whose schedule runs on "
          f"micro-steps: {max_diff(builtin):.3g})")
    ok = diff < 1e-4
    print("MATCH: accumulation reproduces large-batch training" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
