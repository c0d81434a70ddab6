"""Run every benchmark in bench/, then write bench/results/README.md (`make bench`).

    .venv/bin/python bench/run_all.py            # full runs; figures land in bench/results/
    .venv/bin/python bench/run_all.py --quick    # smoke runs on tiny sizes, into bench/results/quick/
    .venv/bin/python bench/run_all.py --table-only   # only rebuild README.md from the results files
    .venv/bin/python bench/run_all.py --only flux_forward degrade

Each benchmark runs in its own process (one after another: they time the whole machine) with
$FLUXIR_BENCH_RESULTS pointing at the results folder. `RUNS` gives the arguments of the
benchmarks this runner knows; any other `bench/*.py` is run with no arguments, and with
`--quick` in quick mode when it defines that option (otherwise it is skipped in quick mode).
A benchmark that fails is reported and the others still run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench import results_table  # noqa: E402

NOT_BENCHMARKS = {"__init__", "common", "run_all", "results_table", "gpu_flux", "torch_twin"}  # gpu_flux: bench/gpu.sh runs it

# name -> (full runs, quick runs, or None: not run in quick mode with the reason); each run is an argument list
RUNS: dict[str, tuple[list[list[str]], list[list[str]] | str]] = {
    "flux_forward": (
        [["--model", "tiny", "--res", "256", "--txt", "128"], ["--model", "small", "--res", "256", "--txt", "128"]],
        [["--model", "tiny", "--res", "64", "--txt", "16", "--repeats", "2"]],
    ),
    "compile_flux_dev": (
        [[], ["--grad", "--remat", "full"]],
        [["--model", "tiny", "--res", "128", "--txt", "16"]],
    ),
    "convert_memory": ([[]], "writes a flux1-dev-sized checkpoint (tens of GB)"),
    "degrade": ([[]], [["--size", "128", "--pairs", "2", "--repeats", "1"]]),
    # small 256² step on 1 and 8 devices vs PyTorch, then flux-dev compile-only at 512² and 1024² (minutes each)
    "train_step": ([[]], [["--quick"]]),
    "fluxgen": ([[]], [["--quick"]]),
    "restore": ([[]], [["--quick"]]),
}


def discover(bench: pathlib.Path = BENCH) -> list[str]:
    """Benchmarks present in `bench`: the known ones in `RUNS` order, then the others by name."""
    present = sorted(p.stem for p in bench.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    return [n for n in RUNS if n in present] + [n for n in present if n not in RUNS]


def plan(name: str, quick: bool, bench: pathlib.Path = BENCH) -> list[list[str]] | str:
    """The argument lists `name` runs with, or the reason it is skipped."""
    if name in RUNS:
        full, short = RUNS[name]
        return short if quick else full
    if not quick:
        return [[]]
    return [["--quick"]] if '"--quick"' in (bench / f"{name}.py").read_text() else "defines no --quick option"


def run(names: list[str], quick: bool, results: pathlib.Path, bench: pathlib.Path = BENCH) -> list[tuple[str, str, str]]:
    """Run the benchmarks; returns (name, arguments, outcome) per run."""
    env = dict(os.environ, FLUXIR_BENCH_RESULTS=str(results), PYTHONPATH=str(bench.parent))
    results.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for name in names:
        runs = plan(name, quick, bench)
        if isinstance(runs, str):
            print(f"== {name}: skipped ({runs})", flush=True)
            outcomes.append((name, "", f"skipped: {runs}"))
            continue
        for args in runs:
            print(f"== {name} {' '.join(args)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, str(bench / f"{name}.py"), *args], env=env, cwd=bench.parent).returncode
            took = time.perf_counter() - t0
            outcomes.append((name, " ".join(args), f"ok ({took:.0f} s)" if rc == 0 else f"FAILED (exit {rc})"))
            print(f"== {name}: {outcomes[-1][2]}", flush=True)
    return outcomes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke runs on tiny sizes (results in bench/results/quick/)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (file names without .py)")
    ap.add_argument("--table-only", action="store_true", help="run nothing; rebuild README.md from the results files")
    ap.add_argument("--results", type=pathlib.Path, default=None,
                    help="results folder (default bench/results, or bench/results/quick with --quick)")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and their runs, then exit")
    args = ap.parse_args(argv)
    results = args.results or (BENCH / "results" / "quick" if args.quick else BENCH / "results")
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"run_all: error: no benchmark {unknown[0]!r} in bench/ (present: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    if args.list:
        for n in names:
            p = plan(n, args.quick)
            print(f"{n}: " + (f"skipped ({p})" if isinstance(p, str) else "; ".join(" ".join(a) or "(defaults)" for a in p)))
        return 0
    outcomes = [] if args.table_only else run(names, args.quick, results)
    results.mkdir(parents=True, exist_ok=True)
    print(f"wrote {results_table.write(results)}")
    for name, a, outcome in outcomes:
        print(f"  {name} {a}: {outcome}")
    return 1 if any(o.startswith("FAILED") for _, _, o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
