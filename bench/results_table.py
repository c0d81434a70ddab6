"""bench/results/README.md: one table of every figure in the results files, with its machine.

    .venv/bin/python bench/results_table.py [--results DIR]

Each `*.json` file holds one record, each `*.jsonl` file one record per line (a run appends).
For every configuration (the fields that say what was measured) the latest record is shown;
its figure is already the median over that run's repeats. Files this module knows get their
own rows; any other record shows its `"figures"` list (see bench/common.py) or, lacking that,
its numeric fields whose name contains "median".
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import Callable, NamedTuple

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Figure(NamedTuple):
    benchmark: str
    figure: str
    value: str  # formatted, with its unit
    repeats: str
    machine: str
    date: str


def read_records(path: pathlib.Path) -> list[dict]:
    """The records of a .json (one) or .jsonl (one per non-empty line) results file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rec = json.loads(text)
    return rec if isinstance(rec, list) else [rec]


def machine(rec: dict) -> str:
    """Accelerator (if any), CPU model, core count and load average as recorded; "not recorded" where missing."""
    parts = []
    device = str(rec.get("device") or rec.get("gpu") or "")
    if device and device.lower() != "cpu":
        parts.append(device)
    cores = rec.get("cores") or rec.get("machine_cpus") or rec.get("cpus")
    cpu = rec.get("cpu") or "CPU model not recorded"
    parts.append(f"{cpu}, {cores} cores" if cores else cpu)
    loads = [x[0] for x in (rec.get("load_avg_before"), rec.get("load_avg_after")) if x]
    # runs in several processes (bench/restore.py) also record each one's 1-minute load at its start and end
    for part in [rec] + [v for v in rec.values() if isinstance(v, dict)]:
        for k, v in part.items():
            if k.endswith("load_avg_1min") and isinstance(v, list):
                loads += v
    if loads:  # a shared machine: the 1-minute load average, the highest recorded before / during / after the run
        parts[-1] += f", load {max(loads):.1f}"
    return "; ".join(parts)


def _date(rec: dict) -> str:
    return str(rec.get("date", ""))[:10]


def _num(v: float, unit: str) -> str:
    if unit == "x":
        return f"{v:.2f}x"
    text = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{text} {unit}".strip()


def latest(records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """The last record of each configuration, in order of first appearance."""
    out: dict[tuple, dict] = {}
    for r in records:
        out[key(r)] = r
    return list(out.values())


# ----------------------------------------------------------------------------- known files


def _flux_forward(records):
    key = lambda r: (r.get("model"), r.get("res"), r.get("txt"), r.get("batch"), r.get("dtype"), r.get("device"))  # noqa: E731
    for r in latest(records, key):
        what = f"{r['model']} {r['res']}² ({r['tokens']} img + {r['txt']} txt tokens), batch {r['batch']}, {r['dtype']}"
        rep, m, d = str(r.get("repeats", "")), machine(r), _date(r)
        yield Figure("transformer forward", f"{what}: JAX", _num(1e3 * r["jax_median_s"], "ms"), rep, m, d)
        if "torch_median_s" in r:
            yield Figure("transformer forward", f"{what}: PyTorch (diffusers)", _num(1e3 * r["torch_median_s"], "ms"), rep, m, d)
            yield Figure("transformer forward", f"{what}: PyTorch time / JAX time", _num(r["torch_over_jax"], "x"), rep, m, d)


def _compile(records):
    key = lambda r: (r.get("model"), r.get("res"), r.get("txt"), r.get("batch"), r.get("grad"), r.get("remat"), r.get("device"))  # noqa: E731
    for r in latest(records, key):
        what = f"{r['model']} {r['res']}², batch {r['batch']}, " + (f"backward (remat {r['remat']})" if r.get("grad") else "forward")
        m, d = machine(r), _date(r)
        yield Figure("compile (AOT)", f"{what}: compile time", _num(r["compile_s"], "s"), "1", m, d)
        if r.get("temp_bytes") is not None:
            yield Figure("compile (AOT)", f"{what}: XLA temp memory", _num(r["temp_bytes"] / 2**30, "GiB"), "1", m, d)


def _convert_memory(records):
    for r in records:
        rep, m, d = str(r.get("repeats", 1)), machine(r), _date(r)
        what = f"checkpoint conversion ({r.get('note', '')}, {r['file_bytes'] / 1e9:.1f} GB)"
        conv = statistics.median(r["convert_all_s"]) if r.get("convert_all_s") else r["convert_s"]
        yield Figure("convert", f"{what}: wall time", _num(conv, "s"), rep, m, d)
        yield Figure("convert", f"{what}: throughput", _num(r["convert_MBps"], "MB/s"), rep, m, d)
        yield Figure("convert", f"{what}: throughput / plain read", _num(r["throughput_vs_plain_read"], "x"), rep, m, d)
        yield Figure("convert", f"{what}: peak RSS", _num(r["peak_rss_GiB"], "GiB"), rep, m, d)


def _degrade(records):
    for r in records:
        rep, m, d = str(r.get("repeats", "")), machine(r), _date(r)
        what = f"degradation pairs, GT {r['gt_size']}², one thread"
        med = r["median_pairs_per_s_per_core"]
        yield Figure("degrade", f"{what}: ours (numpy/OpenCV)", _num(med["ours"], "pairs/s"), rep, m, d)
        yield Figure("degrade", f"{what}: torch pipeline", _num(med["torch"], "pairs/s"), rep, m, d)
        yield Figure("degrade", f"{what}: ours / torch", _num(r["speedup_vs_torch"]["wall"], "x"), rep, m, d)


KNOWN = {"flux_forward": _flux_forward, "compile": _compile, "convert_memory": _convert_memory, "degrade": _degrade}


def _generic(name: str, records: list[dict]):
    listed: dict[tuple[str, str], Figure] = {}  # a figure measured again: the latest run's value, in first-seen order
    for r in records:
        m, d = machine(r), _date(r)
        for stale in r.get("retracts", []):  # figures of earlier runs this run shows to be out of date
            listed.pop((r.get("benchmark", name), stale), None)
        if isinstance(r.get("figures"), list):
            for f in r["figures"]:
                value = f["value"]
                text = _num(value, f.get("unit", "")) if isinstance(value, (int, float)) else str(value)
                # a figure may name its own machine and date (a file that gathers runs made at different times)
                fm = machine({**r, "cpu": f["cpu"]}) if "cpu" in f else m
                fd = _date(f) if "date" in f else d
                fig = Figure(r.get("benchmark", name), str(f["figure"]), text, str(f.get("repeats", r.get("repeats", ""))), fm, fd)
                listed[(fig.benchmark, fig.figure)] = fig
            continue
        for k, v in r.items():
            if "median" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                unit = "s" if k.endswith("_s") else ""
                yield Figure(r.get("benchmark", name), k, _num(v, unit), str(r.get("repeats", "")), m, d)
    yield from listed.values()


def figures(results: pathlib.Path) -> list[Figure]:
    """Every figure of every results file under `results` (files in name order)."""
    out = []
    for path in sorted(list(results.glob("*.json")) + list(results.glob("*.jsonl"))):
        records = read_records(path)
        fn = KNOWN.get(path.stem)
        out += list(fn(records) if fn else _generic(path.stem, records))
    return out


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def render(results: pathlib.Path) -> str:
    rows = figures(results)
    files = sorted(p.name for p in list(results.glob("*.json")) + list(results.glob("*.jsonl")))
    lines = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (`bench/run_all.py`; `bench/results_table.py` alone rebuilds it) from the "
        "results files in this folder; do not edit by hand. Each figure is the median over the repeats of the latest "
        "run of its configuration (earlier runs stay in the `.jsonl` files); *repeats* is how many timed runs that "
        "median is over; *machine* is where it was measured.",
        "",
        "| benchmark | figure | median | repeats | machine | date |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    lines += ["", "Sources: " + ", ".join(f"`{f}`" for f in files) + "."]
    return "\n".join(lines) + "\n"


def write(results: pathlib.Path) -> pathlib.Path:
    """Write `results`/README.md atomically; returns its path."""
    path = results / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(render(results))
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=pathlib.Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = ap.parse_args(argv)
    print(f"wrote {write(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
