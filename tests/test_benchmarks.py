"""`python -m benchmarks --quick`: the runner writes its table and plot with every row.

A smoke test of the suite on tiny sizes: it checks what is written, never a
timing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERAS_CONTEXTS = (
    "eager loop, jit_compile=True",
    "eager loop, jit_compile=False",
    "tf.function",
    "model.fit, jit_compile=False",
    "model.fit, jit_compile=True",
)
KERAS_ROWS = (
    "AccumOptimizer(Adam)",
    "Adam(gradient_accumulation_steps=4)",
    "plain Adam",
    "floor: bare assign_add",
)
TORCH_ROWS = {
    "training (forward, backward, step)": (
        "hand-written loop",
        "AccumOptimizer(AdamW)",
        "hand-written loop + clip_grad_norm_",
        "AccumOptimizer(AdamW, global_clipnorm)",
        "AccumOptimizer(AdamW, use_ema)",
    ),
    "EMA update alone": ("AccumOptimizer EMA update", "bare torch._foreach_lerp_"),
}
# Keras on JAX and on torch: the rows of each context (the first quick size).
JAX_ROWS = {
    "model.fit, jit_compile=True": (
        "AccumOptimizer(Adam)",
        "Adam(gradient_accumulation_steps=4)",
        "plain Adam",
        "optax MultiSteps(adam, every_k_schedule=4), jitted step",
        "floor: bare accumulate",
    ),
    "model.fit, jit_compile=False": (
        "AccumOptimizer(Adam)",
        "Adam(gradient_accumulation_steps=4)",
        "plain Adam",
        "floor: bare accumulate",
    ),
    "jax.jit train step, stateless_apply": ("AccumOptimizer(Adam)", "plain Adam"),
    "jax.jit train step, stateless_apply, state donated": ("AccumOptimizer(Adam)", "plain Adam"),
}
KERAS_TORCH_ROWS = {
    "model.fit, jit_compile=False": (
        "AccumOptimizer(Adam)",
        "Adam(gradient_accumulation_steps=4)",
        "plain Adam",
        "floor: bare accumulate",
    ),
}
JAX_TARGETS = (
    "JAX fit, jit_compile=True: window ÷ plain Adam | <= 1.15 |",
    "JAX fit, jit_compile=True: window ÷ built-in | <= 0.5 |",
    "JAX fit, jit_compile=False: window ÷ plain Adam | <= 1.15 |",
    "JAX fit, jit_compile=False: window ÷ built-in | <= 0.5 |",
    "JAX fit, jit_compile=True, reference: optax MultiSteps window ÷ plain Adam | — |",
    "JAX fit, jit_compile=True, reference: optax MultiSteps window ÷ built-in | — |",
)
TARGETS = (
    "Keras eager, jit on: non-update ÷ XLA floor",
    "Keras tf.function: update ÷ built-in",
    "Keras model.fit, jit_compile=False: window ÷ built-in",
    "Keras fit, jit on: window ÷ plain Adam",
    "torch training: AccumOptimizer(AdamW) window ÷ hand-written loop",
    "torch: EMA update ÷ bare foreach lerp",
    "torch: extra bytes by default",
    "linear: Keras tf.function",
)


def _section(markdown, title):
    """The Markdown table under `### {title}` (up to the next heading)."""
    start = markdown.index(f"### {title}\n")
    end = markdown.find("\n#", start + 1)
    return markdown[start : end if end > 0 else None]


def _installed(*names):
    return all(importlib.util.find_spec(name) is not None for name in names)


def _assert_rows(md, title, rows_by_context, label):
    """Each row of each context once in its table, with a timing cell filled in."""
    for context, rows in rows_by_context.items():
        table = _section(md, f"{title}, {context}")
        for row in rows:
            line = f"| {label} | {row} |"
            assert table.count(line) == 1, (title, context, line)
            cells = table.split(line, 1)[1].split("\n", 1)[0].split("|")[1:4]
            assert any(c.strip() not in ("", "—") for c in cells), (title, context, line)


@pytest.mark.slow
def test_quick_run_writes_the_table_and_the_plot_with_every_row(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    png = (out / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    results = json.loads((out / "results.json").read_text())
    sizes = results["sizes"]
    assert len(sizes) >= 2 and results["mode"] == "quick"
    md = (out / "results.md").read_text()
    for fact in ("cores (", "TensorFlow 2.", "Keras 3.", "torch 2.", "Commit: `"):
        assert fact in md, fact

    params = {r["size"]: r["params"] for r in results["keras"]["rows"]}
    assert len(params) == len(sizes)
    for context in KERAS_CONTEXTS:
        table = _section(md, f"Keras, {context}")
        for size in sizes:
            label = f"{params[size] / 1e3:.1f}k"
            for row in KERAS_ROWS:
                line = f"| {label} | {row} |"
                assert table.count(line) == 1, (context, line)
                # Every timing cell of the row is filled in.
                cells = table.split(line, 1)[1].split("\n", 1)[0].split("|")[1:4]
                assert any(c.strip() not in ("", "—") for c in cells), (context, line)
    for context in KERAS_CONTEXTS[:2]:  # the eager target's reference, interleaved there
        table = _section(md, f"Keras, {context}")
        row = "Adam(gradient_accumulation_steps=4) inside a tf.function"
        assert table.count(f"| {row} |") == len(sizes), (context, row)
    for context, rows in TORCH_ROWS.items():
        table = _section(md, f"torch, {context}")
        for size in sizes:
            for row in rows:
                assert table.count(f"| {params[size] / 1e3:.1f}k | {row} |") == 1, (context, row)

    # Keras on JAX and on torch: each in its own process, on the first size
    # only in a quick run; JAX only where jax and optax are installed.
    first = f"{params[sizes[0]] / 1e3:.1f}k"
    if _installed("jax", "optax"):
        assert results["jax"]["sizes"] == sizes[:1]
        _assert_rows(md, "JAX", JAX_ROWS, first)
        rows = {(r["context"], r["row"]) for r in results["jax"]["rows"]}
        assert len(rows) == sum(len(r) for r in JAX_ROWS.values()) == len(results["jax"]["rows"])
    else:
        assert "## Keras on JAX\n\nNot run: needs " in md
    assert results["keras_torch"]["sizes"] == sizes[:1]
    _assert_rows(md, "Keras on torch", KERAS_TORCH_ROWS, first)
    # The TensorFlow section's eager "jit_compile=True" rows are XLA on the CPU.
    assert results["keras"]["xla_forced"] is True
    assert "runs with `KERAS_ACCUM_FORCE_XLA=1`" in md

    targets = md[md.index("## Targets") : md.index("## Keras\n")]
    for target in TARGETS:
        assert target in targets, target
    if _installed("jax", "optax"):
        for target in JAX_TARGETS:
            assert f"| {target}" in targets, target
    memory = md[md.index("## Memory") :]
    for row in ("| keras | AccumOptimizer(Adam) |", "| keras | AccumOptimizer(Adam, use_ema) |",
                "| keras | Adam(gradient_accumulation_steps=4) |",
                "| torch | AccumOptimizer(AdamW) |", "| torch | AccumOptimizer(AdamW, use_ema) |"):
        assert memory.count(row) == len(sizes), row
    # Memory is exact, not a timing: one accumulator per variable (plus a few
    # counters) on the Keras side, no extra tensor on the torch side.
    held = {(m["row"], m["size"]): m["extra"] / m["trainable"] for m in results["keras"]["memory"]}
    for size in sizes:
        assert 1.0 <= held[("accum", size)] < 1.05
        assert 2.0 <= held[("accum_ema", size)] < 2.05
    assert all(m["extra"] == 0 for m in results["torch"]["memory"] if m["row"] == "accum")


def _benchmarks():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import _common, report

    return _common, report


def test_several_runs_give_each_target_its_median_and_range():
    """`--runs N`: medians over runs of each run's own ratio, and their range.

    Built from the committed results (real rows): three runs in which our
    rows cost 1.0x, 1.2x and 0.9x what they cost in the committed run, all
    else equal. Every target whose numerator is our row then has the
    committed ratio as median and 0.9x to 1.2x of it as range, and is met in
    as many runs as the scaled ratios are within the limit.
    """
    common, report = _benchmarks()
    with open(os.path.join(ROOT, "benchmarks", "results", "results.json")) as f:
        base = json.load(f)
    base.pop("per_run", None)

    def scaled(factor):
        run = {}
        for section in ("keras", "torch"):
            part = json.loads(json.dumps(base[section]))
            for row in part["rows"]:
                if row["row"] == "accum":
                    for field in ("non_update", "update", "window"):
                        if row[field] is not None:
                            row[field] *= factor
            run[section] = part
        return run

    factors = (1.0, 1.2, 0.9)
    runs = [scaled(f) for f in factors]
    combined = dict(base, **common.combine_runs(runs), per_run=runs, runs=len(runs))

    # Each timing is the median over the runs: here the committed one.
    for got, want in zip(combined["keras"]["rows"], base["keras"]["rows"]):
        assert got["window"] == pytest.approx(want["window"], rel=1e-12)
    assert combined["torch"]["memory"] == base["torch"]["memory"]

    single = {text: (values, limit) for text, limit, values, _ in report.targets(base)}
    checked = 0
    for text, limit, values, met, spread, runs_met in report.target_rows(combined):
        ours = ("Keras", "torch training: AccumOptimizer(AdamW) window")
        if not text.startswith(ours):  # numerators other than our default row
            continue
        want, _ = single[text]
        for size, value in want.items():
            if value is None:
                continue
            assert values[size] == pytest.approx(value, rel=1e-12), (text, size)
            assert spread[size] == pytest.approx((0.9 * value, 1.2 * value), rel=1e-12)
        known = [v for v in want.values() if v is not None]
        assert met == all(v <= limit for v in known), text
        assert runs_met == sum(all(f * v <= limit for v in known) for f in factors), text
        checked += 1
    assert checked >= 10

    md = report.markdown(combined)
    targets = md[md.index("## Targets") : md.index("## Keras\n")]
    assert "| runs met |" in targets and " of 3 |" in targets
    assert "3 runs, each section in fresh processes" in md


def _jax_section(sizes, accum=1.1, plain=1.0, builtin=2.0, optax=1.5):
    """A JAX section of made-up window times (ms) at `sizes`: ours, plain, built-in, optax."""
    rows = []
    for context in JAX_ROWS:
        for key, window in (("accum", accum), ("plain", plain), ("builtin", builtin),
                            ("optax", optax), ("floor", 0.5)):  # fmt: skip
            if key == "optax" and context != "model.fit, jit_compile=True":
                continue
            for size in sizes:
                rows.append(dict(context=context, row=key, size=size, params=1_000_000,
                                 non_update=None, update=None, window=window * 1e-3))  # fmt: skip
    return {"rows": rows, "memory": [], "threads": "XLA default", "sizes": sizes}


def test_the_jax_targets_take_each_runs_own_ratio_and_optax_is_a_reference():
    """The issue's JAX targets (<= 1.15x plain Adam, <= 0.5x the built-in) on
    made-up rows, worked by hand: ours at 1.1 ms, plain Adam at 1.0, the
    built-in at 2.0, optax at 1.5; then three runs with ours at 1.0x, 1.2x
    and 0.9x of that."""
    common, report = _benchmarks()
    with open(os.path.join(ROOT, "benchmarks", "results", "results.json")) as f:
        base = json.load(f)
    base.pop("per_run", None)
    base["jax"] = _jax_section(base["sizes"])
    found = {text: (limit, values, met) for text, limit, values, met in report.targets(base)}
    for jit in (True, False):
        limit, values, met = found[f"JAX fit, jit_compile={jit}: window ÷ plain Adam"]
        assert limit == 1.15 and met is True
        assert all(v == pytest.approx(1.1) for v in values.values())
        limit, values, met = found[f"JAX fit, jit_compile={jit}: window ÷ built-in"]
        assert limit == 0.5 and met is False
        assert all(v == pytest.approx(0.55) for v in values.values())
    limit, values, met = found[
        "JAX fit, jit_compile=True, reference: optax MultiSteps window ÷ built-in"
    ]
    assert limit is None and met is None
    assert all(v == pytest.approx(0.75) for v in values.values())

    runs = []
    for factor in (1.0, 1.2, 0.9):
        run = {k: json.loads(json.dumps(base[k])) for k in ("keras", "torch")}
        run["jax"] = _jax_section(base["sizes"], accum=1.1 * factor)
        runs.append(run)
    combined = dict(base, **common.combine_runs(runs), per_run=runs, runs=len(runs))
    rows = {text: rest for text, *rest in report.target_rows(combined)}
    limit, values, met, spread, runs_met = rows["JAX fit, jit_compile=True: window ÷ plain Adam"]
    assert all(v == pytest.approx(1.1) for v in values.values()) and met is True
    assert all(r == pytest.approx((0.99, 1.32)) for r in spread.values())
    assert runs_met == 2  # 1.1 and 0.99 are within 1.15, 1.32 is not
    limit, values, met, spread, runs_met = rows[
        "JAX fit, jit_compile=True, reference: optax MultiSteps window ÷ plain Adam"
    ]
    assert met is None and runs_met is None
    assert all(v == pytest.approx(1.5) for v in values.values())

    md = report.markdown(combined)
    targets = md[md.index("## Targets") : md.index("## Keras\n")]
    assert (
        "| JAX fit, jit_compile=True: window ÷ plain Adam | <= 1.15 | 1.10 (0.99–1.32) " in targets
    )
    assert "| JAX fit, jit_compile=False: window ÷ built-in | <= 0.5 | 0.55 (0.50–0.66) " in targets
    line = next(
        x for x in targets.splitlines() if "reference: optax MultiSteps window ÷ plain" in x
    )
    assert line.endswith("| reference | — |"), line
    jax_tables = md[md.index("## Keras on JAX") : md.index("## torch")]
    assert "### JAX, model.fit, jit_compile=True" in jax_tables
    assert "| 1.10x | 0.73x |" in jax_tables  # ours: window ÷ plain, window ÷ optax


def test_the_report_reads_results_without_the_new_sections_and_says_what_was_skipped(tmp_path):
    """Results written before the JAX and Keras-on-torch sections existed still
    make their table and plot; a section the runner skipped is said so."""
    pytest.importorskip("matplotlib")
    _, report = _benchmarks()
    with open(os.path.join(ROOT, "benchmarks", "results", "results.json")) as f:
        base = json.load(f)
    # As the runner wrote them before those sections existed.
    for section in ("jax", "keras_torch"):
        base.pop(section, None)
    base["skipped"] = {}
    md = report.markdown(base)
    assert "## Keras on JAX" not in md and "JAX fit" not in md
    assert "## Keras on torch" not in md
    report.plot(base, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")

    skipped = dict(base, skipped={"jax": "needs jax, optax, not installed"})
    md = report.markdown(skipped)
    assert "## Keras on JAX\n\nNot run: needs jax, optax, not installed.\n" in md
    assert "JAX fit" not in md


def test_runs_must_be_at_least_one():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--runs", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--runs must be an integer >= 1. Received: --runs 0" in result.stderr


@pytest.mark.slow
def test_the_keras_profile_names_the_kernels_of_each_micro_step():
    """`python -m benchmarks.profile_keras`: a smoke run on a tiny model.

    Checks what it attributes, never a timing: the adds of a micro-step that
    accumulates, and the norm's `L2Loss` kernels in ours when it closes the
    window (the built-in has no norm).
    """
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_keras", "--size", "2k", "--windows", "2",
         "--top", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    blocks = out.split("\nmicro-step ")
    assert len(blocks) == 5, out
    accumulates, closes = blocks[2], blocks[4]
    assert accumulates.startswith("2 of 4 (accumulates)") and "AssignAddVariableOp" in accumulates
    assert closes.startswith("4 of 4 (closes the window)")
    walls = [float(x) for x in closes.split("\n  wall", 1)[1].split("\n", 1)[0].split()]
    assert len(walls) == 2 and all(w > 0 for w in walls), closes
    l2 = [line for line in closes.splitlines() if line.strip().startswith("L2Loss")]
    assert len(l2) == 1 and l2[0].split()[2] == "(8)" and l2[0].split()[-1] == "(0)", closes

    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_keras", "--size", "3M"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "Received: --size 3M" in bad.stderr


@pytest.mark.slow
def test_the_jax_profile_counts_the_copies_and_times_each_position():
    """`python -m benchmarks.profile_jax`: a smoke run on a tiny model.

    Checks what it reports, never a timing: the floor's step copies nothing
    and has no loop; ours closes its window in a while loop (a 0-or-1-trip
    loop, so that a micro-step that does not update writes nothing back).
    """
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_jax", "--size", "2k", "--windows", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    hlo = {line.split("full-size copies:")[0].strip(): line for line in out.splitlines()
           if "full-size copies:" in line}  # fmt: skip
    assert hlo["floor: bare accumulate"].endswith(
        "full-size copies: 0 (none); while loops: 0; conditionals: 0"
    )
    assert int(hlo["AccumOptimizer(Adam)"].split("while loops: ")[1].split(";")[0]) >= 1
    timings = out.split("by position in the window:\n", 1)[1].splitlines()[1:]
    assert len(timings) == 4, out
    for line, name in zip(timings, ("AccumOptimizer(Adam)", "plain Adam")):
        assert line.strip().startswith(name)
    positions = [float(t) for t in timings[0].split(")", 1)[1].split()[:4]]
    assert all(t > 0 for t in positions), timings[0]

    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_jax", "--size", "3M"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "Received: --size 3M" in bad.stderr
