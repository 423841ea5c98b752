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
    idx = _index(results["keras"]["rows"])
    sizes = results["sizes"]
    params = {r["size"]: r["params"] for r in results["keras"]["rows"]}
    out = []
    header = [
        "params", "optimizer", "non-update ms", "update ms", "window ms",
        "non-update ÷ floor", "window ÷ floor",
        "non-update ÷ built-in", "update ÷ built-in", "window ÷ built-in",
        "update ÷ plain", "window ÷ plain",
    ]  # fmt: skip
    for context in KERAS_CONTEXTS:
        rows = []
        for size in sizes:
            for key, label in KERAS_ROWS.items():
                r = idx.get((context, key, size))
                if r is None:
                    continue

                def vs(other, field, r=r, size=size, key=key, context=context):
                    if other == key:
                        return None
                    return _ratio(r[field], _get(idx, context, other, size, field))

                rows.append([
                    _params(params[size]), label,
                    _ms(r["non_update"]), _ms(r["update"]), _ms(r["window"]),
                    _x(vs("floor", "non_update")), _x(vs("floor", "window")),
                    _x(vs("builtin", "non_update") if key == "accum" else None),
                    _x(vs("builtin", "update") if key == "accum" else None),
                    _x(vs("builtin", "window") if key == "accum" else None),
                    _x(vs("plain", "update")), _x(vs("plain", "window")),
                ])  # fmt: skip
        out += [f"### Keras, {context}", ""] + _table(header, rows) + [""]
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
        values = {s: fn(s) for s in sizes}
        known = [v for v in values.values() if v is not None]
        out.append((text, limit, values, bool(known) and all(v <= limit for v in known)))

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
    runs = [targets(dict(results, keras=run["keras"], torch=run["torch"])) for run in per_run]
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
        known = [v for v in values.values() if v is not None]
        met = bool(known) and all(v <= limit for v in known)
        out.append((text, limit, values, met, spread, sum(run[i][3] for run in runs)))
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
        row = [text, f"<= {limit}", *cells, "met" if met else "**missed**"]
        if several:
            row.append(f"{runs_met} of {len(results['per_run'])}")
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
        f"torch {results['torch'].get('threads', '?')}.",
        f"- Load average (1, 5, 15 min): {_load(m['load_start'])} at the start, "
        f"{_load(m['load_end'])} at the end."
        + (
            " **Taken on a loaded machine (load above the core count): timings are "
            "noisy, ratios within a row group are the figures to read.**"
            if loaded
            else ""
        ),
        f"- TensorFlow's CPU allocator: {m.get('tf_cpu_allocator', 'system malloc')}; "
        f"glibc malloc, Keras section: {_malloc(m.get('malloc'))}; torch section: "
        f"{_malloc(m.get('torch_malloc', m.get('malloc')))}.",
        f"- Versions: Python {m['python']}, TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, torch {m['torch']}, NumPy {m['numpy']}.",
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
        "the eager rows: the reference of the eager window target.",
        "",
        *keras_tables(results),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    k_idx = _index(results["keras"]["rows"])
    t_idx = _index(results["torch"]["rows"])
    sizes = results["sizes"]
    styles = {"accum": "C0", "builtin": "C1", "plain": "C2", "floor": "C7", "builtin_tf": "C3"}
    for ax, context in zip(axes.flat, KERAS_CONTEXTS):
        for key, label in KERAS_ROWS.items():
            pts = [k_idx.get((context, key, s)) for s in sizes]
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
        ax.set_title(f"Keras, {context}", fontsize=10)
    ax = axes.flat[-1]
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
    ticks = sorted({r["params"] for r in results["keras"]["rows"]})
    names = {r["params"]: r["size"] for r in results["keras"]["rows"]}
    for ax in axes.flat:
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
