"""What the Keras and torch sections share: sizes, the window protocol, statistics.

Imports neither framework: each section runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

MERGE_GRAD = 4
BATCH = 8
LAYERS = 4

# TensorFlow's own best-fit-with-coalescing allocator on the CPU (the one it
# uses on GPUs): it keeps freed memory for the next tensor. With the system's
# malloc, each fresh full-size temporary may be a new mapping whose pages
# fault on first touch, which of them does changes from call to call, and
# that noise swamps the differences measured (benchmarks/README.md).
TF_BFC = "TF_CPU_ALLOCATOR_USE_BFC"

# torch allocates on the CPU with glibc's malloc. By default glibc gives the
# free space at the top of its heap back to the system once it exceeds the
# trim threshold (twice the largest mapped block freed so far), and the next
# temporaries there fault their pages in again; whether the freed
# temporaries of an AdamW step lie at the top depends on everything the
# process allocated before. At 1M the same inner AdamW step took 0 to 944
# faults (up to half its time) depending on which configuration ran before
# it. These settings keep freed memory in the heap, as TensorFlow's BFC
# allocator does: blocks below 32 MiB (glibc's largest mmap threshold) are
# not mapped, and `MALLOC_MMAP_MAX_=0` maps no block at all, so that a 50M
# layer's 50 MB tensors are not mapped and unmapped at each step either
# (with them mapped, a torch section spent 36 s of its 64 s in the kernel,
# and every configuration's 10M -> 50M slope read 1.4 to 1.5).
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "MALLOC_MMAP_MAX_": "0",
}

# Hidden width -> parameters of an MLP of `LAYERS` Dense(width, width) layers
# (kernels and biases): 4 * (w * w + w). The number of variables (8) is the
# same at every size, so the growth with size is the per-element cost.
FULL_WIDTHS = {"1M": 500, "10M": 1581, "50M": 3535}
QUICK_WIDTHS = {"2k": 22, "20k": 70}

# Timed windows per size (medians over these); the first windows (trace,
# compile, slot creation) are never timed. Fewer at 50M: the whole full run
# must fit in about ten minutes on two cores.
FULL_REPEATS = {"1M": 31, "10M": 9, "50M": 5}
QUICK_REPEATS = 2


def n_params(width: int, layers: int = LAYERS) -> int:
    return layers * (width * width + width)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(names, repeats: int):
    """The configurations in turn, one window each, `repeats` times.

    Every other round runs them in reverse, so that none always follows the
    same neighbour (whose big tensors have just emptied the caches).
    """
    names = list(names)
    for r in range(repeats):
        yield from (names if r % 2 == 0 else names[::-1])


def window_stats(times: list[float], k: int = MERGE_GRAD) -> dict:
    """One window's micro-step times (k of them, the last one updates) summarised."""
    assert len(times) == k, times
    return {
        "non_update": statistics.fmean(times[:-1]) if k > 1 else None,
        "update": times[-1],
        "window": statistics.fmean(times),
    }


def uniform_stats(times: list[float], kind: str) -> dict:
    """Micro-steps that are all alike: all updates (plain) or none (the floor)."""
    t = statistics.fmean(times)
    return {
        "non_update": t if kind == "non_update" else None,
        "update": t if kind == "update" else None,
        "window": t,
    }


def median_stats(per_repeat: list[dict]) -> dict:
    """Medians over repeats of each field (None stays None); times in seconds."""
    out = {}
    for key in ("non_update", "update", "window"):
        values = [r[key] for r in per_repeat if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["repeats"] = len(per_repeat)
    return out


def combine_runs(runs: list[dict]) -> dict:
    """Several full runs' sections as one: each timing the median over the runs.

    `runs`: one `{section: {"rows": [...], "memory": [...], ...}}` per run,
    with the same rows. The memory rows are exact, not timings: the first
    run's are kept, as is everything else a section reports.
    """
    out = {}
    for section, first in runs[0].items():
        combined = dict(first)
        rows = []
        for row in first["rows"]:
            key = (row["context"], row["row"], row["size"])
            same = [
                r for run in runs for r in run[section]["rows"]
                if (r["context"], r["row"], r["size"]) == key
            ]  # fmt: skip
            if len(same) != len(runs):
                raise ValueError(f"row {key} is in {len(same)} of the {len(runs)} runs")
            merged = dict(row)
            for field in ("non_update", "update", "window"):
                values = [r[field] for r in same if r[field] is not None]
                merged[field] = statistics.median(values) if values else None
            rows.append(merged)
        combined["rows"] = rows
        out[section] = combined
    return out


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)


def section_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark section takes (the runner passes them on)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated size names")
    parser.add_argument("--json", required=True)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    return parser
