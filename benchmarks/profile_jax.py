"""Where a JAX `fit` micro-step's time goes: the compiled train step, position by position.

`python -m benchmarks.profile_jax [--size 1M] [--windows 30] [--dump DIR]`
(sets `KERAS_BACKEND=jax`) compiles Keras's JAX train step as `model.fit`
does with the model's `jit_compile=True` (`jax.jit(model.train_step,
donate_argnums=0)`) for AccumOptimizer(Adam), plain Adam, Keras's
`Adam(gradient_accumulation_steps=4)` and the floor (an optimizer whose
`apply` only adds the gradients into buffers), merge_grad=4, batches of 8,
on the MLP of the suite. For each it prints:

- from the optimized HLO (`.lower(...).compile().as_text()`): the copies of
  full-size tensors (the `width x width` kernels and what has their shape:
  Adam's slots, the accumulators), where they are (the entry computation or
  a loop body or branch), and the `while` loops and conditionals;
- the median time of each micro-step position of a window (the 4th updates),
  the steps called directly (no `fit` loop, callbacks or iterator around
  them), the configurations interleaved window by window.

XLA on the CPU records no per-op events in `jax.profiler` traces here, so the
HLO counts stand in for a kernel profile: a copy is a full read and write
pass that the floor and plain Adam do not make. `--dump DIR` writes each
optimized HLO module to `DIR/<config>.txt`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _keras_fit as F  # noqa: E402

K = C.MERGE_GRAD
WIDTHS = {**C.FULL_WIDTHS, **C.QUICK_WIDTHS}
CONFIGS = {
    "AccumOptimizer(Adam)": F.accum,
    "plain Adam": F.adam,
    "Adam(gradient_accumulation_steps=4)": lambda: F.adam(gradient_accumulation_steps=K),
    "floor: bare accumulate": F.FloorOptimizer,
}


def hlo_counts(text, width):
    """Full-size copies per computation, and the while loops and conditionals, of an HLO module."""
    copy = re.compile(rf"= f32\[{width},{width}\]\{{[^}}]*\}} copy\(")
    copies = collections.Counter()
    computation = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = "entry" if line.startswith("ENTRY") else "loop body or branch"
        elif copy.search(line):
            copies[computation] += 1
    return {
        "copies": dict(copies),
        "while": text.count(" while("),
        "conditional": text.count(" conditional("),
    }


def compiled_step(width, optimizer, batch):
    """Keras's JAX train step for a fresh model, jitted and donating as `fit` does."""
    x, y = F.fit_data(width)
    model = F.mlp(width, optimizer, jit_compile=True)
    model.fit(x[: K * C.BATCH], y[: K * C.BATCH], batch_size=C.BATCH, verbose=0)  # builds
    # The trainer's own state (a private Keras helper: what `fit` passes in),
    # copied, since the step donates it.
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    state = jax.tree.map(jnp.copy, state)
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, batch).compile()
    return compiled, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1M")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--dump", default=None, help="write each optimized HLO module here")
    args = parser.parse_args(argv)
    if args.size not in WIDTHS:
        parser.error(f"--size must be one of {', '.join(WIDTHS)}. Received: --size {args.size}")
    if keras.backend.backend() != "jax":
        parser.error(
            "needs Keras's JAX backend: set KERAS_BACKEND=jax before Keras is imported. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
    width = WIDTHS[args.size]
    x, y = F.fit_data(width)
    batches = [
        (jnp.asarray(x[i : i + C.BATCH]), jnp.asarray(y[i : i + C.BATCH]))
        for i in range(0, K * C.BATCH, C.BATCH)
    ]
    steps = {}
    print(f"size {args.size} ({C.n_params(width):,} parameters), merge_grad={K}, batch {C.BATCH}")
    print("optimized HLO of the fit train step (full-size: f32[width, width]):")
    for name, make in CONFIGS.items():
        compiled, state = compiled_step(width, make(), batches[0])
        text = compiled.as_text()
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            with open(os.path.join(args.dump, f"{slug}.txt"), "w") as f:
                f.write(text)
        counts = hlo_counts(text, width)
        where = ", ".join(f"{n} in {c}" for c, n in counts["copies"].items()) or "none"
        print(
            f"  {name:38} full-size copies: {sum(counts['copies'].values())} ({where}); "
            f"while loops: {counts['while']}; conditionals: {counts['conditional']}"
        )
        steps[name] = [compiled, state]

    def window(name):
        compiled, state = steps[name]
        times = []
        for batch in batches:
            start = time.perf_counter()
            _, state = compiled(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        steps[name][1] = state
        return times

    for name in steps:  # warm-up: a window each
        window(name)
    per_window = {name: [] for name in steps}
    for name in C.interleaved(steps, args.windows):
        per_window[name].append(window(name))
    medians = {
        name: [statistics.median(w[i] for w in ws) * 1e3 for i in range(K)]
        for name, ws in per_window.items()
    }
    floor = statistics.fmean(medians["floor: bare accumulate"])
    plain = statistics.fmean(medians["plain Adam"])
    print(f"ms per micro-step, median over {args.windows} windows, by position in the window:")
    print(
        f"  {'':38}"
        + "".join(f"{i + 1:>9}" for i in range(K))
        + "   positions 1-3 ÷ floor, 4 ÷ plain Adam (their means)"
    )
    for name, m in medians.items():
        ratios = ""
        if name in ("AccumOptimizer(Adam)", "Adam(gradient_accumulation_steps=4)"):
            non_update = statistics.fmean(m[:-1]) / floor
            ratios = f"   {non_update:.2f}x, {m[-1] / plain:.2f}x"
        print(f"  {name:38}" + "".join(f"{t:9.3f}" for t in m) + ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
