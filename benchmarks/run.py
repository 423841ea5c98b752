"""The runner: every section, each in its own process, then `results.md`, `results.json`, `plot.png`.

`python -m benchmarks [--quick] [--out DIR] [--sizes 1M,10M] [--runs N]`, from
the repository root. The sections: Keras on TensorFlow (`keras`), Keras on JAX
(`jax`), Keras on torch (`keras_torch`) and torch (`torch`); Keras picks its
backend once, at its first import, so each runs in a fresh process with its
`KERAS_BACKEND`. The full run measures 1M, 10M and 50M parameters; `--quick`
uses tiny sizes and few windows (a smoke test: its timings mean nothing).
`--runs N` runs every section N times over, each time in fresh processes:
the same ratio moves from one process to the next (where the allocator puts
each tensor, what else the machine runs), and N runs show by how much.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks import _common as C
from benchmarks import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("keras", "jax", "keras_torch", "torch")
# The Keras backend each Keras section runs on (its process's KERAS_BACKEND).
KERAS_BACKENDS = {"keras": "tensorflow", "jax": "jax", "keras_torch": "torch"}
# Sections that need packages beyond the test dependencies: skipped, and
# said so in `results.md`, where one is not installed.
OPTIONAL = {"jax": ("jax", "optax"), "keras_torch": ("torch",)}


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    def git(*args):
        return subprocess.run(
            ["git", "-C", ROOT, *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    # Results written into the tree by an earlier run do not make it dirty.
    changes = [
        line for line in git("status", "--porcelain").splitlines()
        if "benchmarks/results" not in line
    ]  # fmt: skip
    return commit + (" (with uncommitted changes)" if changes else "")


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine():
    return {
        "cores": _cores(),
        "cpu": _cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "torch": _version("torch"),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "optax": _version("optax"),
        "numpy": _version("numpy"),
        "commit": _commit(),
        # glibc's allocator settings change the cost of every fresh
        # temporary (see benchmarks/README.md): record them when set.
        "malloc": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _start(section, sizes, args, path):
    """Starts one section on some sizes in a fresh process (no framework shares it)."""
    command = [sys.executable, "-m", f"benchmarks.{section}_bench", "--json", path]
    command += ["--sizes", ",".join(sizes)]
    if args.quick:
        command.append("--quick")
    if args.threads:
        command += ["--threads", str(args.threads)]
    if section == "keras" and sizes[0] == args.all_sizes[0]:
        command.append("--saved-state")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if section in KERAS_BACKENDS:
        env["KERAS_BACKEND"] = KERAS_BACKENDS[section]
    if section == "keras":
        env[C.TF_BFC] = "true" if args.allocator == "steady" else "false"
        # `jit_compile=True` compiles the eager micro-step with XLA only where a
        # GPU or TPU is present; the eager "jit_compile=True" rows measure XLA
        # on the CPU, as they did before that rule (keras_bench.py).
        env["KERAS_ACCUM_FORCE_XLA"] = "1"
    elif args.allocator == "steady" and section != "jax":
        # torch allocates with glibc's malloc on the CPU: the same settings for
        # the Keras-on-torch section as for torch's. Not for JAX: XLA's CPU
        # client, whose buffers come from malloc too, grew its heap without
        # bound under them (1M, 10M, then 50M in one process: killed by the
        # kernel at 24 GB; 5.3 GB at most on the system's malloc).
        for key, value in C.STEADY_MALLOC.items():
            env.setdefault(key, value)  # the caller's own MALLOC_ settings win
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True
    )
    return section, proc, err, path


def _finish(job):
    section, proc, err, path = job
    for line in proc.stdout:  # progress, one line per size
        print(line, end="", flush=True)
    if proc.wait() != 0:
        err.seek(0)
        sys.stderr.write(err.read())
        raise SystemExit(f"benchmarks: the {section} section failed (exit {proc.returncode})")
    err.close()
    with open(path) as f:
        return json.load(f)


def missing(section):
    """The packages `section` needs that are not installed (none for most)."""
    return [name for name in OPTIONAL.get(section, ()) if importlib.util.find_spec(name) is None]


def _run_sections(args, folder):
    """Full run: one section at a time, so nothing else competes for the cores.
    Quick run: the Keras section's sizes each in its own process, every other
    section in one, all at once (a smoke test: its timings mean nothing, only
    its wall time matters; the JAX and Keras-on-torch sections run their first
    size only)."""
    sections = [s for s in SECTIONS if s not in args.skipped]
    if args.quick:
        plan = [("keras", [s]) for s in args.all_sizes]
        plan += [(section, args.all_sizes) for section in sections if section != "keras"]
    else:
        plan = [(section, args.all_sizes) for section in sections]
    paths = [os.path.join(folder, f"{sec}-{i}.json") for i, (sec, _) in enumerate(plan)]
    if args.quick:
        jobs = [_start(sec, sizes, args, p) for (sec, sizes), p in zip(plan, paths)]
        parts = [_finish(job) for job in jobs]
    else:
        parts = [_finish(_start(sec, sizes, args, p)) for (sec, sizes), p in zip(plan, paths)]
    merged = {}
    for (section, _), part in zip(plan, parts):
        into = merged.setdefault(section, {"rows": [], "memory": []})
        into["rows"] += part.pop("rows")
        into["memory"] += part.pop("memory")
        into.update(part)
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two windows (smoke test)")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results"), help="output folder"
    )
    parser.add_argument("--sizes", default=None, help="a subset of the sizes, e.g. 1M,10M")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="intra-op threads for TensorFlow and torch, Keras on torch included (default: "
        "theirs, all cores); the JAX section runs with XLA's own default",
    )  # fmt: skip
    parser.add_argument(
        "--allocator", choices=("steady", "system"), default="steady",
        help="steady (default): TensorFlow's BFC allocator for the Keras section and "
        "glibc's malloc keeping freed blocks in its heap for the others; "
        "system: the system's malloc with its own settings for all",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=1,
        help="run every section this many times, each time in fresh processes (default 1); "
        "the tables give each timing's median over the runs, the targets the median of "
        "each run's own ratio and its range",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be an integer >= 1. Received: --runs {args.runs}")
    widths = C.QUICK_WIDTHS if args.quick else C.FULL_WIDTHS
    sizes = args.sizes.split(",") if args.sizes else list(widths)
    unknown = [s for s in sizes if s not in widths]
    if unknown:
        parser.error(f"--sizes must be among {', '.join(widths)}. Received: {','.join(unknown)}")
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    info = machine()
    info["tf_cpu_allocator"] = "BFC" if args.allocator == "steady" else "system malloc"
    if args.allocator == "steady":
        info["torch_malloc"] = {**C.STEADY_MALLOC, **info["malloc"]}
    info["load_start"] = list(os.getloadavg())
    results = {
        "mode": "quick" if args.quick else "full",
        "sizes": sizes,
        "repeats": {s: C.QUICK_REPEATS if args.quick else C.FULL_REPEATS[s] for s in sizes},
        "merge_grad": C.MERGE_GRAD,
        "batch": C.BATCH,
    }
    args.all_sizes = sizes
    args.skipped = {}
    for section in SECTIONS:
        needs = missing(section)
        if needs:
            args.skipped[section] = f"needs {', '.join(needs)}, not installed"
            print(f"benchmarks: skipping the {section} section ({args.skipped[section]})")
    results["skipped"] = args.skipped
    runs = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"run {i + 1} of {args.runs}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(_run_sections(args, tmp))
    results.update(C.combine_runs(runs))
    results["runs"] = len(runs)
    if len(runs) > 1:
        results["per_run"] = runs  # each run's own rows: the targets' ranges
    info["load_end"] = list(os.getloadavg())
    results["machine"] = info
    results["seconds"] = time.perf_counter() - start

    C.write_json(os.path.join(args.out, "results.json"), results)
    report.write(results, args.out)
    print(f"wrote {args.out}/results.md, results.json, plot.png ({results['seconds']:.0f} s)")
    return 0
