"""Keras-on-torch section: AccumOptimizer(Adam) in Keras's torch-backend `fit`, against plain Adam, the built-in and the floor.

Run by `python -m benchmarks` in its own process (`KERAS_BACKEND=torch`);
alone: `KERAS_BACKEND=torch python -m benchmarks.keras_torch_bench [--quick]
[--sizes 1M,10M] --json out.json`.

`model.fit` as Keras's torch backend runs it by default: eagerly (the model's
`jit_compile=False`; Keras's torch trainer calls `optimizer.apply` under
`torch.no_grad()` after zeroing `.grad` at every batch). Measured as the
TensorFlow section measures `fit` (`_keras_fit`): an MLP of 4 square Dense
layers of each size, batches of 8, merge_grad=4, Adam, float32;
AccumOptimizer(Adam), plain Adam on the same micro-batches, Keras's
`Adam(gradient_accumulation_steps=4)` and the floor (an optimizer whose
`apply` only adds the gradients into buffers, in place) interleaved window
by window, each figure the median over windows. No target: rows to read.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _keras_fit as F  # noqa: E402

K = C.MERGE_GRAD
QUICK_REPEATS = 1  # `--quick`: one round (its timings mean nothing)


def _fit(width, repeats, warmup):
    x, y = F.fit_data(width)
    return F.fit_rows(width, x, y, jit_compile=False, repeats=repeats, warmup=warmup)


def main(argv=None):
    parser = C.section_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    F.require_backend(parser, "torch", "Keras-on-torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = C.QUICK_WIDTHS if args.quick else C.FULL_WIDTHS
    sizes = args.sizes.split(",") if args.sizes else list(widths)
    if args.quick:
        sizes = sizes[:1]  # a smoke test of every row: one size, one round, no warm-up
    warmup = 0 if args.quick else 1
    rows, repeats = [], {}
    for size in sizes:
        width = widths[size]
        repeats[size] = QUICK_REPEATS if args.quick else C.FULL_REPEATS[size]
        start = time.perf_counter()
        size_rows = _fit(width, repeats[size], warmup)
        for r in size_rows:
            r.update(size=size, params=C.n_params(width))
        rows += size_rows
        print(f"keras_torch {size}: {time.perf_counter() - start:.1f} s", flush=True)
    C.write_json(
        args.json,
        {
            "rows": rows,
            "memory": [],
            "merge_grad": K,
            "threads": torch.get_num_threads(),
            "sizes": sizes,
            "repeats": repeats,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
