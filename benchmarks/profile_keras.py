"""Where a Keras micro-step's time goes: TensorFlow's profiler, kernel by kernel.

`python -m benchmarks.profile_keras [--size 1M] [--windows 20] [--top 12]`
profiles the optimizer alone inside a `tf.function` (the "tf.function"
context of the suite): AccumOptimizer(Adam) and Adam with
`gradient_accumulation_steps`, merge_grad=4, on the same fixed gradients.
For each micro-step of the window it prints the wall time and the time
spent in each kind of TensorFlow kernel (`AssignAddVariableOp`, `L2Loss`,
...), summed over the kernels of that kind and averaged over the windows.

Kernels of one micro-step may run at the same time on different cores, so
their sum can exceed the wall time, and a kernel that waits for memory
beside another one is slower than alone: read the kinds and counts side by
side, and confirm a lead with an A/B of whole micro-steps (`python -m
benchmarks`), as benchmarks/README.md does.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # as the suite's Keras section

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import keras_bench as B  # noqa: E402

K = C.MERGE_GRAD
WIDTHS = {**C.FULL_WIDTHS, **C.QUICK_WIDTHS}


def _kernel_kind(name):
    """`node/path:OpType` -> `OpType`; None for the runtime's own events."""
    if ":" not in name or " " in name or "::" in name:  # `ExecutorState::Process`, ...
        return None
    kind = name.rsplit(":", 1)[1]
    return kind if kind[:1].isupper() and kind.isalnum() else None


def profile(optimizer, variables, grads, windows):
    """{position in the window: (wall µs, Counter(kind -> µs), Counter(kind -> count))}."""
    optimizer.build(variables)
    step = tf.function(lambda g: optimizer.apply(g, variables))
    for _ in range(2 * K):  # trace, create slots, settle the allocator
        step(grads)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(windows):
            for i in range(K):
                with tf.profiler.experimental.Trace(f"micro-step {i}"):
                    step(grads)
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    spans, kernels = [], []
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for e in line.events:
                name = names.get(e.metadata_id, "")
                start = line.timestamp_ns * 1000 + e.offset_ps
                if name.startswith("micro-step "):
                    spans.append((start, start + e.duration_ps, int(name.split()[-1])))
                elif _kernel_kind(name):
                    kernels.append((start, e.duration_ps, _kernel_kind(name)))
    spans.sort()
    out = {i: [0.0, collections.Counter(), collections.Counter()] for i in range(K)}
    for start, end, i in spans:
        out[i][0] += (end - start) / 1e6 / windows
    for start, duration, kind in kernels:
        for s0, s1, i in spans:
            if s0 <= start < s1:
                out[i][1][kind] += duration / 1e6 / windows
                out[i][2][kind] += 1 / windows
                break
    return {i: tuple(v) for i, v in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_keras", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", default="1M", help=f"one of {', '.join(WIDTHS)}")
    parser.add_argument("--windows", type=int, default=20, help="profiled windows")
    parser.add_argument("--top", type=int, default=12, help="kernel kinds shown per micro-step")
    args = parser.parse_args(argv)
    if args.size not in WIDTHS:
        parser.error(f"--size must be one of {', '.join(WIDTHS)}. Received: --size {args.size}")
    if args.windows < 1:
        parser.error(f"--windows must be an integer >= 1. Received: --windows {args.windows}")
    variables = B._variables(WIDTHS[args.size])
    grads = B._gradients(variables)
    rows = {
        "AccumOptimizer(Adam)": profile(B._accum(), variables, grads, args.windows),
        f"Adam(gradient_accumulation_steps={K})": profile(
            B._adam(gradient_accumulation_steps=K), variables, grads, args.windows
        ),
    }
    print(f"tf.function, {args.size} parameters, merge_grad={K}, {args.windows} windows")
    for i in range(K):
        what = "closes the window" if i == K - 1 else "accumulates"
        print(f"\nmicro-step {i + 1} of {K} ({what}): µs per micro-step")
        kinds = collections.Counter()
        for stats in rows.values():
            kinds.update(stats[i][1])
        shown = [kind for kind, _ in kinds.most_common(args.top)]
        names = list(rows)
        print(f"  {'':28}" + "".join(f"{n[:36]:>38}" for n in names))
        print(f"  {'wall':28}" + "".join(f"{rows[n][i][0]:>38.1f}" for n in names))
        print(
            f"  {'all kernels':28}"
            + "".join(f"{sum(rows[n][i][1].values()):>38.1f}" for n in names)
        )
        for kind in shown:
            cells = "".join(
                f"{f'{rows[n][i][1][kind]:.1f} ({rows[n][i][2][kind]:.0f})':>38}" for n in names
            )
            print(f"  {kind[:28]:28}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
