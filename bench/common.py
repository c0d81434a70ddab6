"""Shared by the benchmarks: the machine's name, median timing, and appending results.

Results go to bench/results/, or to $FLUXIR_BENCH_RESULTS when set (`bench/run_all.py --quick`
uses that so smoke runs never mix with real figures). A record may carry its own table rows as
`"figures": [{"figure": ..., "value": ..., "unit": ..., "repeats": ...}]`; bench/results_table.py
turns every results file into bench/results/README.md.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

RESULTS = pathlib.Path(os.environ.get("FLUXIR_BENCH_RESULTS") or pathlib.Path(__file__).resolve().parent / "results")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, all seconds) of `repeats` calls of fn()."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), out


def append_record(name: str, rec: dict) -> None:
    """Print `rec` and append it as one JSON line to bench/results/`name`."""
    print(json.dumps(rec, indent=1))
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / name).open("a") as f:
        f.write(json.dumps(rec) + "\n")
