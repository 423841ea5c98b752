"""The Markdown table (`results.md`) and the plot (`plot.png`) from the sections' results.

`python -m benchmarks.report DIR` writes them again from `DIR/results.json`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

KERAS_CONTEXTS = (
    "eager loop, jit_compile=True",
    "eager loop, jit_compile=False",
    "tf.function",
    "model.fit, jit_compile=False",
    "model.fit, jit_compile=True",
)
KERAS_ROWS = {
    "accum": "AccumOptimizer(Adam)",
    "builtin": "Adam(gradient_accumulation_steps=4)",
    "plain": "plain Adam",
    "floor": "floor: bare assign_add",
    # Eager tables only: the built-in run inside a tf.function, interleaved with
    # the eager rows (the eager target's reference, measured at the same time).
    "builtin_tf": "Adam(gradient_accumulation_steps=4) inside a tf.function",
}
# Keras on JAX (`jax_bench`): `fit` both ways, and Keras's documented custom loop.
JAX_CONTEXTS = (
    "model.fit, jit_compile=True",
    "model.fit, jit_compile=False",
    "jax.jit train step, stateless_apply",
    "jax.jit train step, stateless_apply, state donated",
)
JAX_ROWS = {
    "accum": "AccumOptimizer(Adam)",
    "builtin": "Adam(gradient_accumulation_steps=4)",
    "plain": "plain Adam",
    "optax": "optax MultiSteps(adam, every_k_schedule=4), jitted step",
    "floor": "floor: bare accumulate",
}
# How the targets name the rows they divide by.
_SHORT = {"plain": "plain Adam", "builtin": "built-in"}
# Keras on torch (`keras_torch_bench`): `fit` as the torch backend runs it.
KERAS_TORCH_CONTEXTS = ("model.fit, jit_compile=False",)
KERAS_TORCH_ROWS = {
    "accum": "AccumOptimizer(Adam)",
    "builtin": "Adam(gradient_accumulation_steps=4)",
    "plain": "plain Adam",
    "floor": "floor: bare accumulate",
}
# The Keras sections of other backends than TensorFlow: results key, title,
# contexts, row labels, and the packages they need (a section whose packages
# are not installed is skipped by the runner, and said so here).
BACKEND_SECTIONS = {
    "jax": ("JAX", JAX_CONTEXTS, JAX_ROWS),
    "keras_torch": ("Keras on torch", KERAS_TORCH_CONTEXTS, KERAS_TORCH_ROWS),
}
TORCH_CONTEXTS = (
    "training (forward, backward, step)",
    "optimizer alone (step, zero_grad)",
    "EMA update alone",
)
TORCH_ROWS = {
    "hand": "hand-written loop",
    "accum": "AccumOptimizer(AdamW)",
    "hand_clip": "hand-written loop + clip_grad_norm_",
    "accum_clip": "AccumOptimizer(AdamW, global_clipnorm)",
    "accum_ema": "AccumOptimizer(AdamW, use_ema)",
    "accum_ema_update": "AccumOptimizer EMA update",
    "bare_lerp": "bare torch._foreach_lerp_",
}
# Which row each torch row is compared with.
TORCH_BASE = {
    "accum": "hand",
    "accum_clip": "hand_clip",
    "accum_ema": "hand",
    "accum_ema_update": "bare_lerp",
}
MEMORY_ROWS = {
    ("keras", "accum"): ("AccumOptimizer(Adam)", "one accumulator per variable: 1.00x"),
    ("keras", "accum_ema"): ("AccumOptimizer(Adam, use_ema)", "accumulator + EMA: 2.00x"),
    ("keras", "builtin"): ("Adam(gradient_accumulation_steps=4)", "one accumulator: 1.00x"),
    ("torch", "accum"): ("AccumOptimizer(AdamW)", "none: 0"),
    ("torch", "accum_clip"): ("AccumOptimizer(AdamW, global_clipnorm)", "none: 0"),
    ("torch", "accum_ema"): ("AccumOptimizer(AdamW, use_ema)", "float32 EMA: 1.00x"),
}
# A log-log slope this far above 1 between the two largest sizes still reads
# as linear: timings on a shared machine move by that much.
LINEAR_SLACK = 1.15


def _index(rows):
    return {(r["context"], r["row"], r["size"]): r for r in rows}


def _ms(value):
    return "—" if value is None else f"{value * 1e3:.3f}"


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _x(value):
    return "—" if value is None else f"{value:.2f}x"


def _get(index, context, row, size, field):
    r = index.get((context, row, size))
    return None if r is None else r[field]


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _params(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def keras_tables(results):
    return optimizer_tables(results, "keras", "Keras", KERAS_CONTEXTS, KERAS_ROWS)


def optimizer_tables(results, section, title, contexts, labels):
    """One table per context of a Keras section: each row's times, and its ratios
    to the floor, the built-in (ours only), plain Adam and optax (ours only,
    where measured), all taken between rows of the same context and size."""
    idx = _index(results[section]["rows"])
    sizes = results["sizes"]
    params = {r["size"]: r["params"] for r in results[section]["rows"]}
    with_optax = any(r["row"] == "optax" for r in results[section]["rows"])
    out = []
    header = [
        "params", "optimizer", "non-update ms", "update ms", "window ms",
        "non-update ÷ floor", "window ÷ floor",
        "non-update ÷ built-in", "update ÷ built-in", "window ÷ built-in",
        "update ÷ plain", "window ÷ plain",
    ] + (["window ÷ optax"] if with_optax else [])  # fmt: skip
    for context in contexts:
        rows = []
        for size in sizes:
            for key, label in labels.items():
                r = idx.get((context, key, size))
                if r is None:
                    continue

                def vs(other, field, r=r, size=size, key=key, context=context):
                    if other == key:
                        return None
                    return _ratio(r[field], _get(idx, context, other, size, field))

                ours = key == "accum"
                row = [
                    _params(params[size]), label,
                    _ms(r["non_update"]), _ms(r["update"]), _ms(r["window"]),
                    _x(vs("floor", "non_update")), _x(vs("floor", "window")),
                    _x(vs("builtin", "non_update") if ours else None),
                    _x(vs("builtin", "update") if ours else None),
                    _x(vs("builtin", "window") if ours else None),
                    _x(vs("plain", "update")), _x(vs("plain", "window")),
                ]  # fmt: skip
                if with_optax:
                    row.append(_x(vs("optax", "window") if ours else None))
                rows.append(row)
        if rows:
            out += [f"### {title}, {context}", ""] + _table(header, rows) + [""]
    return out


def torch_tables(results):
    idx = _index(results["torch"]["rows"])
    sizes = results["sizes"]
    params = {r["size"]: r["params"] for r in results["torch"]["rows"]}
    header = [
        "params", "loop", "non-update ms", "update ms", "window ms",
        "compared with", "update ÷ it", "window ÷ it",
    ]  # fmt: skip
    out = []
    for context in TORCH_CONTEXTS:
        rows = []
        for size in sizes:
            for key, label in TORCH_ROWS.items():
                r = idx.get((context, key, size))
                if r is None:
                    continue
                base = TORCH_BASE.get(key)
                b = idx.get((context, base, size)) if base else None
                rows.append([
                    _params(params[size]), label,
                    _ms(r["non_update"]), _ms(r["update"]), _ms(r["window"]),
                    TORCH_ROWS[base] if b else "—",
                    _x(_ratio(r["update"], b["update"]) if b else None),
                    _x(_ratio(r["window"], b["window"]) if b else None),
                ])  # fmt: skip
        out += [f"### torch, {context}", ""] + _table(header, rows) + [""]
    return out


def memory_table(results):
    rows = []
    for side in ("keras", "torch"):
        for m in results[side]["memory"]:
            label, expected = MEMORY_ROWS[(side, m["row"])]
            saved = m.get("saved_extra")
            rows.append([
                side, label, _params(m["params"]), f"{m['trainable'] / 2**20:.2f}",
                f"{m['extra']:,}", f"{m['extra'] / m['trainable']:.4f}x",
                "—" if saved is None else f"{saved:,}",
                "—" if saved is None else f"{saved / m['trainable']:.4f}x",
                _peak(m, "peak_non_update"), _peak(m, "peak_update"),
                expected,
            ])  # fmt: skip
    header = [
        "side", "optimizer", "params", "trainable MiB", "extra bytes held",
        "held ÷ trainable", "extra bytes in a .keras file", "file ÷ trainable",
        "peak temporaries, non-update ÷ trainable", "peak temporaries, update ÷ trainable",
        "expected",
    ]  # fmt: skip
    return _table(header, rows)


def _peak(memory_row, key):
    value = memory_row.get(key)
    return "—" if value is None else f"{value / memory_row['trainable']:.2f}x"


def _builtin_tf(index, size):
    """The built-in's window inside a tf.function, as the eager target's reference.

    Measured in the eager group, interleaved with the eager rows; results
    written before that row existed have only the tf.function group's.
    """
    window = _get(index, "eager loop, jit_compile=True", "builtin_tf", size, "window")
    return window if window is not None else _get(index, "tf.function", "builtin", size, "window")


def targets(results):
    """Each target of the suite: (description, limit, {size: measured}, met)."""
    k = _index(results["keras"]["rows"])
    t = _index(results["torch"]["rows"])
    sizes = results["sizes"]
    out = []

    def add(text, limit, fn):
        """`limit` None: a reference row, read beside the targets (met is None)."""
        values = {s: fn(s) for s in sizes}
        out.append((text, limit, values, _met(values, limit)))

    eager = "eager loop, jit_compile=True"
    add(
        "Keras eager, jit on: non-update ÷ XLA floor", 1.5,
        lambda s: _ratio(_get(k, eager, "accum", s, "non_update"),
                         _get(k, eager, "floor", s, "non_update")),
    )  # fmt: skip
    add(
        "Keras eager, jit on: window ÷ built-in's window in tf.function", 1.0,
        lambda s: _ratio(_get(k, eager, "accum", s, "window"), _builtin_tf(k, s)),
    )  # fmt: skip
    for context in ("tf.function", "model.fit, jit_compile=False"):
        for field, limit in (("non_update", 1.0), ("update", 1.1), ("window", 1.0)):
            add(
                f"Keras {context}: {field.replace('_', '-')} ÷ built-in", limit,
                lambda s, c=context, f=field: _ratio(_get(k, c, "accum", s, f),
                                                     _get(k, c, "builtin", s, f)),
            )  # fmt: skip
    fit_xla = "model.fit, jit_compile=True"
    add(
        "Keras fit, jit on: window ÷ built-in", 1.0,
        lambda s: _ratio(_get(k, fit_xla, "accum", s, "window"),
                         _get(k, fit_xla, "builtin", s, "window")),
    )  # fmt: skip
    add(
        "Keras fit, jit on: window ÷ plain Adam (if XLA can avoid the write-back)", 1.0,
        lambda s: _ratio(_get(k, fit_xla, "accum", s, "window"),
                         _get(k, fit_xla, "plain", s, "window")),
    )  # fmt: skip
    train = "training (forward, backward, step)"
    for key in ("accum", "accum_clip"):
        base = TORCH_BASE[key]
        add(
            f"torch training: {TORCH_ROWS[key]} window ÷ {TORCH_ROWS[base]}", 1.05,
            lambda s, key=key, base=base: _ratio(_get(t, train, key, s, "window"),
                                                 _get(t, train, base, s, "window")),
        )  # fmt: skip
    add(
        "torch: EMA update ÷ bare foreach lerp", 1.1,
        lambda s: _ratio(_get(t, "EMA update alone", "accum_ema_update", s, "update"),
                         _get(t, "EMA update alone", "bare_lerp", s, "update")),
    )  # fmt: skip
    mem = {(m["row"], m["size"]): m["extra"] for m in results["torch"]["memory"]}
    add("torch: extra bytes by default", 0, lambda s: mem.get(("accum", s)))
    if "jax" in results:
        j = _index(results["jax"]["rows"])
        # The targets for our `fit` on JAX, the trainer's jit on (JAX's
        # default) and off; optax MultiSteps's own ratios as references.
        for jit in (True, False):
            fit = f"model.fit, jit_compile={jit}"
            for base, limit in (("plain", 1.15), ("builtin", 0.5)):
                add(
                    f"JAX fit, jit_compile={jit}: window ÷ {_SHORT[base]}", limit,
                    lambda s, c=fit, b=base: _ratio(_get(j, c, "accum", s, "window"),
                                                    _get(j, c, b, s, "window")),
                )  # fmt: skip
        fit = "model.fit, jit_compile=True"
        for base in ("plain", "builtin"):
            add(
                f"JAX fit, jit_compile=True, reference: optax MultiSteps window ÷ {_SHORT[base]}",
                None,
                lambda s, b=base: _ratio(_get(j, fit, "optax", s, "window"),
                                         _get(j, fit, b, s, "window")),
            )  # fmt: skip
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for context in KERAS_CONTEXTS:
            ref = ", ".join(
                f"{KERAS_ROWS[row]}: {_fmt(_slope(k, context, row, a, b))}"
                for row in ("builtin", "plain", "floor")
            )
            add(
                f"linear: Keras {context}, AccumOptimizer window, log-log slope {a}→{b} "
                f"(same slope for {ref})",
                LINEAR_SLACK, lambda s, c=context: _slope(k, c, "accum", a, b) if s == b else None,
            )  # fmt: skip
        add(
            f"linear: torch training, AccumOptimizer window, log-log slope {a}→{b} "
            f"(hand-written loop: {_fmt(_slope(t, train, 'hand', a, b))})",
            LINEAR_SLACK, lambda s: _slope(t, train, "accum", a, b) if s == b else None,
        )  # fmt: skip
    return out


def _met(values, limit):
    """Whether every known value is within `limit` (None for a reference row)."""
    if limit is None:
        return None
    known = [v for v in values.values() if v is not None]
    return bool(known) and all(v <= limit for v in known)


def _fmt(value):
    return "—" if value is None else f"{value:.2f}"


def _slope(index, context, row, a, b):
    ra, rb = index.get((context, row, a)), index.get((context, row, b))
    if ra is None or rb is None or not ra["window"] or not rb["window"]:
        return None
    return math.log(rb["window"] / ra["window"]) / math.log(rb["params"] / ra["params"])


def target_rows(results):
    """Each target: (description, limit, {size: value}, met, {size: (low, high)}, runs met).

    One run: the run's ratios, no range. Several (`--runs`): each ratio is
    still taken within one run, between rows measured side by side; the
    value is the median over the runs of that run's ratio, the range its
    lowest and highest, and the target is met when the median is within the
    limit. The descriptions (the linear targets quote the reference rows'
    slopes) are those of the runs' median timings.
    """
    main = targets(results)
    per_run = results.get("per_run") or []
    if len(per_run) < 2:
        return [(text, limit, values, met, None, None) for text, limit, values, met in main]
    runs = [targets(dict(results, **run)) for run in per_run]
    out = []
    for i, (text, limit, _, _) in enumerate(main):
        values, spread = {}, {}
        for s in results["sizes"]:
            seen = [run[i][2][s] for run in runs if run[i][2][s] is not None]
            # Byte counts stay whole numbers.
            whole = all(isinstance(v, int) for v in seen)
            median = statistics.median_low if whole else statistics.median
            values[s] = median(seen) if seen else None
            spread[s] = (min(seen), max(seen)) if seen else None
        runs_met = None if limit is None else sum(run[i][3] for run in runs)
        out.append((text, limit, values, _met(values, limit), spread, runs_met))
    return out


def _cell(value, spread):
    if value is None:
        return ""
    if isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:.2f}"
    if spread is not None and spread[0] != spread[1]:
        text += f" ({spread[0]:.2f}–{spread[1]:.2f})"
    return text


def targets_table(results):
    sizes = results["sizes"]
    rows = []
    several = len(results.get("per_run") or []) >= 2
    for text, limit, values, met, spread, runs_met in target_rows(results):
        cells = [_cell(values[s], spread[s] if spread else None) for s in sizes]
        if limit is None:
            row = [text, "—", *cells, "reference"]
        else:
            row = [text, f"<= {limit}", *cells, "met" if met else "**missed**"]
        if several:
            row.append("—" if runs_met is None else f"{runs_met} of {len(results['per_run'])}")
        rows.append(row)
    header = ["target", "limit", *sizes, "result"] + (["runs met"] if several else [])
    return _table(header, rows)


def markdown(results):
    m = results["machine"]
    loaded = m["load_start"][0] > m["cores"] or m["load_end"][0] > m["cores"]
    lines = [
        "# keras_accum benchmarks",
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['system']}; intra-op threads: "
        f"TensorFlow {_threads(results['keras'].get('threads'))}, "
        f"torch {results['torch'].get('threads', '?')}"
        + "".join(
            f", {title} {_threads(results[key].get('threads'))}"
            for key, (title, _, _) in BACKEND_SECTIONS.items()
            if key in results
        )
        + ".",
        f"- Load average (1, 5, 15 min): {_load(m['load_start'])} at the start, "
        f"{_load(m['load_end'])} at the end."
        + (
            " **Taken on a loaded machine (load above the core count): timings are "
            "noisy, ratios within a row group are the figures to read.**"
            if loaded
            else ""
        ),
        f"- TensorFlow's CPU allocator: {m.get('tf_cpu_allocator', 'system malloc')}; "
        f"glibc malloc, Keras and JAX sections: {_malloc(m.get('malloc'))}; "
        f"{_malloc_sections(results)}: {_malloc(m.get('torch_malloc', m.get('malloc')))}.",
        f"- Versions: Python {m['python']}, TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, torch {m['torch']}, NumPy {m['numpy']}"
        + (f", JAX {m['jax']} (jaxlib {m['jaxlib']}), optax {m['optax']}" if "jax" in m else "")
        + ".",
        f"- Commit: `{m['commit']}`; {m['date']}; {results['mode']} run, "
        f"{results['seconds']:.0f} s in all.",
        f"- merge_grad={results['merge_grad']}, batches of {results['batch']} for "
        "fit and torch training; an MLP of 4 square Dense/Linear layers of each size. "
        "Each figure is a median over windows of "
        f"{results['merge_grad']} micro-steps ({_repeats(results)}).",
        *_runs_note(results),
        "",
        "Milliseconds per micro-step. *non-update*: a micro-step that only "
        "accumulates (mean over the window's first 3); *update*: the micro-step "
        "that closes the window; *window*: the mean over the window's micro-steps, "
        "what training pays per micro-batch. Plain Adam updates at every micro-step, "
        "the floor never does. Ratios are taken between rows of the same run and context.",
        "",
        "## Targets",
        "",
        *targets_table(results),
        "",
        "## Keras",
        "",
        "The optimizer alone on fixed gradients (eager loop, tf.function), and "
        "`model.fit` (forward and backward included). In the eager loop the "
        "built-in and plain Adam run eagerly (they have no jit switch for an eager "
        "call; one measurement, shown under both settings, all seven interleaved); the floor "
        "is XLA-compiled with `jit_compile=True`, a plain tf.function otherwise, and "
        "in fit an optimizer whose `apply` only adds the gradients into buffers. The "
        "eager tables' last row is the built-in inside a tf.function, interleaved with "
        "the eager rows: the reference of the eager window target."
        + (
            " AccumOptimizer's `jit_compile=True` compiles with XLA only where a GPU or "
            "TPU is present; this section runs with `KERAS_ACCUM_FORCE_XLA=1`, so that "
            "its eager `jit_compile=True` rows are XLA on the CPU too."
            if results["keras"].get("xla_forced")
            else ""
        ),
        "",
        *keras_tables(results),
        *jax_section(results),
        *keras_torch_section(results),
        "## torch",
        "",
        "The hand-written loop: the same `AdamW(foreach=True)`, loss divided by k, "
        "`clip_grad_norm_(foreach=True)` before the step when the wrapper clips, "
        "`if (i + 1) % k == 0: step(); zero_grad()`. *optimizer alone*: `step()` "
        "and `zero_grad()` on fixed gradients; the hand loop's non-update micro-step "
        "does nothing.",
        "",
        *torch_tables(results),
        "## Memory",
        "",
        "Keras, held: bytes of the distinct variables the optimizer holds beyond its "
        "inner optimizer's and the model's (the built-in: beyond plain Adam's). "
        "Keras, in a `.keras` file: the optimizer's arrays in `model.save`'s file "
        "beyond plain Adam's, measured at the smallest size only. torch: bytes held "
        "by `.grad` and the optimizer states at the fullest point of a window, "
        "beyond the hand-written loop's.",
        "",
        *memory_table(results),
        "",
    ]
    return "\n".join(lines)


def _skipped(results, key):
    """The runner's note for a section it did not run (its packages missing), or None."""
    return (results.get("skipped") or {}).get(key)


def jax_section(results):
    if "jax" not in results and not _skipped(results, "jax"):
        return []  # results written before the section existed
    lines = ["## Keras on JAX", ""]
    if "jax" not in results:
        return lines + [f"Not run: {_skipped(results, 'jax')}.", ""]
    repeats = results["jax"].get("repeats") or {}
    lines += [
        "`KERAS_BACKEND=jax`, in its own process. `model.fit` with the model's "
        "`jit_compile=True` (JAX's default: the trainer jits its train step and donates "
        "the state) and `False` (the step runs op by op; AccumOptimizer's own "
        "`jit_compile=True` still jits its micro-step), the same micro-batches for every "
        "row, each batch timed by a callback that waits for the batch's state. optax: "
        "`optax.MultiSteps(optax.adam(lr), every_k_schedule=4)` in a `jax.jit` train step "
        "(state donated) taking `jax.value_and_grad` of the same model through "
        "`model.stateless_call`, then `optax.apply_updates`; a reference row, timed per "
        "step. The floor: an optimizer whose `apply` only adds the gradients into "
        "buffers. *jax.jit train step, stateless_apply*: the custom loop Keras documents "
        "for JAX, a `jax.jit` step (no donation, as written there) calling "
        "`optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)`. "
        "Windows per size (jit on and the custom loop / jit off): "
        + ", ".join(
            f"{size}: {r['jit_compile=True']} / {r['jit_compile=False']}"
            for size, r in repeats.items()
        )
        + ".",
        "",
    ]
    title, contexts, labels = BACKEND_SECTIONS["jax"]
    return lines + optimizer_tables(results, "jax", title, contexts, labels)


def keras_torch_section(results):
    if "keras_torch" not in results and not _skipped(results, "keras_torch"):
        return []
    lines = ["## Keras on torch", ""]
    if "keras_torch" not in results:
        return lines + [f"Not run: {_skipped(results, 'keras_torch')}.", ""]
    lines += [
        "`KERAS_BACKEND=torch`, in its own process: `model.fit` as the torch backend "
        "runs it by default, eagerly (`jit_compile=False`), each batch timed by a "
        "callback. The floor: an optimizer whose `apply` only adds the gradients into "
        "buffers, in place (`add_`). No target: rows to read.",
        "",
    ]
    title, contexts, labels = BACKEND_SECTIONS["keras_torch"]
    return lines + optimizer_tables(results, "keras_torch", title, contexts, labels)


def _malloc_sections(results):
    # The JAX section runs on the system's malloc (run.py says why).
    names = ["torch section"]
    if "keras_torch" in results:
        names.append(f"{BACKEND_SECTIONS['keras_torch'][0]} section")
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _runs_note(results):
    n = len(results.get("per_run") or [])
    if n < 2:
        return []
    return [
        f"- {n} runs, each section in fresh processes every time: each timing below is "
        "the median over the runs of the run's median, each ratio of the tables is "
        "taken between those; each target is the median over the runs of the run's "
        "own ratio, with its lowest and highest in brackets, and is met when the "
        "median is within its limit (*runs met*: in how many runs the run's own "
        "ratios all were)."
    ]


def _threads(value):
    return "default (all cores)" if value in (None, "default", 0) else str(value)


def _malloc(settings):
    if not settings:
        return "default settings"
    return ", ".join(f"`{k}={v}`" for k, v in settings.items())


def _load(values):
    return ", ".join(f"{v:.1f}" for v in values)


def _repeats(results):
    return ", ".join(f"{s}: {results['repeats'][s]}" for s in results["sizes"])


def plot(results, path):
    """One panel per Keras context of each backend's section, and one for torch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("keras", "Keras", c, KERAS_ROWS) for c in KERAS_CONTEXTS]
    for key, (title, contexts, labels) in BACKEND_SECTIONS.items():
        if key in results:
            panels += [(key, title, c, labels) for c in contexts]
    columns = 3 if len(panels) + 1 <= 6 else 4
    nrows = -(-(len(panels) + 1) // columns)
    fig, axes = plt.subplots(
        nrows, columns, figsize=(5 * columns, 4.25 * nrows), constrained_layout=True
    )
    t_idx = _index(results["torch"]["rows"])
    sizes = results["sizes"]
    styles = {
        "accum": "C0", "builtin": "C1", "plain": "C2", "floor": "C7", "builtin_tf": "C3",
        "optax": "C5",
    }  # fmt: skip
    used = list(axes.flat[: len(panels) + 1])
    for ax, (section, title, context, labels) in zip(used, panels):
        idx = _index(results[section]["rows"])
        for key, label in labels.items():
            pts = [idx.get((context, key, s)) for s in sizes]
            pts = [p for p in pts if p is not None]
            if not pts:
                continue
            x = [p["params"] for p in pts]
            ax.plot(x, [p["window"] * 1e3 for p in pts], "o-", color=styles[key], label=label)
            if key in ("accum", "builtin"):
                ax.plot(
                    x, [p["non_update"] * 1e3 for p in pts], "x--", color=styles[key],
                    label=f"{label}, non-update",
                )  # fmt: skip
        ax.set_title(f"{title}, {context}", fontsize=10)
    ax = used[-1]
    train, alone = "training (forward, backward, step)", "optimizer alone (step, zero_grad)"
    for context, marker in ((train, "o-"), (alone, "s--")):
        for key, color in (("hand", "C2"), ("accum", "C0"), ("accum_ema", "C4")):
            pts = [t_idx.get((context, key, s)) for s in sizes]
            pts = [p for p in pts if p is not None]
            if pts:
                ax.plot(
                    [p["params"] for p in pts], [p["window"] * 1e3 for p in pts], marker,
                    color=color, label=f"{TORCH_ROWS[key]}, {context.split(' (')[0]}",
                )  # fmt: skip
    ax.set_title("torch, AdamW(foreach=True)", fontsize=10)
    for ax in axes.flat[len(used) :]:
        ax.set_visible(False)
    ticks = sorted({r["params"] for r in results["keras"]["rows"]})
    names = {r["params"]: r["size"] for r in results["keras"]["rows"]}
    for ax in used:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [names[t] for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("parameters")
        ax.set_ylabel("ms per micro-step (window mean)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(
        f"keras_accum, merge_grad={results['merge_grad']}: {m['cores']} cores ({m['cpu']}), "
        f"load {m['load_start'][0]:.1f}; commit {m['commit'][:12]}"
        + (f"; median of {len(results['per_run'])} runs" if results.get("per_run") else ""),
        fontsize=11,
    )
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(results, folder):
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(folder, "plot.png"))


if __name__ == "__main__":
    folder = sys.argv[1]
    with open(os.path.join(folder, "results.json")) as f:
        write(json.load(f), folder)
