"""Micro-step cost of AccumOptimizer against the plain inner optimizer and Keras's built-in accumulation.

Run: `python benchmarks/bench_keras.py [--params-per-layer 512] [--steps 200]`.
Prints seconds per call and ratios measured in the same run, on the same
gradients (no forward/backward: the optimizer alone). The non-update
micro-step is the hot path: it should cost about one add per element.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_accum import AccumOptimizer  # noqa: E402


def _variables(width, layers, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        out.append(keras.Variable(rng.normal(size=(width, width)).astype("float32"), name=f"k{i}"))
        out.append(keras.Variable(np.zeros(width, "float32"), name=f"b{i}"))
    return out


def _compiled_apply(opt, variables):
    # Variables are captured, not passed: tf.function would turn them into tensors.
    return tf.function(lambda g: opt.apply(g, variables), jit_compile=True)


def _time(fn, steps):
    fn()  # trace / compile
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--merge-grad", type=int, default=4)
    args = parser.parse_args(argv)
    k = args.merge_grad

    results = {}
    for name in ("plain", "builtin", "accum"):
        variables = _variables(args.width, args.layers)
        grads = [tf.random.normal(v.shape, seed=1) * 1e-3 for v in variables]
        if name == "plain":
            opt = keras.optimizers.Adam(1e-4)
        elif name == "builtin":
            opt = keras.optimizers.Adam(1e-4, gradient_accumulation_steps=k)
        else:
            opt = AccumOptimizer(keras.optimizers.Adam(1e-4), merge_grad=k)
        opt.build(variables)
        if name == "accum":

            def step(opt=opt, variables=variables, grads=grads):
                opt.apply(grads, variables)  # eager call: XLA-jitted by the wrapper

        else:
            compiled = _compiled_apply(opt, variables)

            def step(compiled=compiled, grads=grads):
                compiled(grads)

        # Average over whole windows: k-1 accumulate-only steps and 1 update.
        per_call = _time(step, args.steps * k) if name != "plain" else _time(step, args.steps)
        results[name] = per_call

        if name == "accum":
            # The hot path alone: micro-steps that never close a window.
            hot = AccumOptimizer(keras.optimizers.Adam(1e-4), merge_grad=10**9)
            hot.build(variables)
            results["accum_non_update"] = _time(lambda: hot.apply(grads, variables), args.steps)
            graph = AccumOptimizer(keras.optimizers.Adam(1e-4), merge_grad=10**9, jit_compile=False)
            graph.build(variables)
            graph_step = tf.function(lambda g: graph.apply(g, variables))
            results["accum_non_update_graph"] = _time(lambda: graph_step(grads), args.steps)

            # What it should cost: one XLA add of each gradient into a buffer.
            buffers = [tf.Variable(tf.zeros_like(g)) for g in grads]
            add = tf.function(
                lambda g: [b.assign_add(x) for b, x in zip(buffers, g)], jit_compile=True
            )
            results["bare_add"] = _time(lambda: add(grads), args.steps)

    n = sum(int(np.prod(v.shape)) for v in _variables(args.width, args.layers))
    print(f"{n / 1e6:.2f}M parameters, merge_grad={k}, Adam, XLA, CPU threads={os.cpu_count()}")
    for key, value in results.items():
        print(f"{key:>18}: {value * 1e3:8.3f} ms/call")
    print(f"accum / plain          (per micro-step, window avg): {results['accum'] / results['plain']:.2f}")
    print(f"accum / builtin        (per micro-step, window avg): {results['accum'] / results['builtin']:.2f}")
    print(f"accum non-update / plain                           : {results['accum_non_update'] / results['plain']:.2f}")
    print(f"accum non-update / bare add into buffers           : {results['accum_non_update'] / results['bare_add']:.2f}")


if __name__ == "__main__":
    main()
