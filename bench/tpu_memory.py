"""Per-chip memory, fits, FLOPs, estimated step time / MFU and compile time of the paper's training
run (configs/train/fluxir-dev.yaml: flux-dev, 512^2, global batch 64) compiled for TPU slices on
this CPU machine (`fluxir train ... --compile-only --topology NAME`, libtpu's real compiler).

    .venv/bin/python bench/tpu_memory.py                          # the whole grid (slow: flux-dev compiles)
    .venv/bin/python bench/tpu_memory.py --accelerators v6e-8 --cases config full
    .venv/bin/python bench/tpu_memory.py --quick                  # tiny config on v5p-8 (smoke)

Grid per accelerator: `config` (the config as it is: its slice_knobs for the slice), `full` (the base
knobs with remat_policy=full, same batch), `1024` (1024^2 crops, per-chip batch 1). Every case but `config`
starts from the base knobs (`slice_knobs={}`). Opt-in cases: `base` (the base knobs alone), `splash` (the base knobs with attention=splash), `splash-4` / `splash-8` (splash, 4 / 8 examples per chip per micro-batch), `splash-8-qkv` (splash-8 with remat_policy=save_qkv_attention), `splash-none` (remat_policy=none,
attention=splash, accum_steps 8: no recompute, for the MFU question), `splash-none-rep` (the same with
model.frozen_sharding=replicated: no weight all-gathers), `splash-none-N` (remat none with N
examples per chip per micro-batch), `splash-none-rep-N` (the same with the frozen weights whole), `1024-full` (1024^2, remat_policy=full), `1024-splash`
(1024^2, splash attention), `1024-splash-full` (the same with remat_policy=full). Every case runs in its own process; its record is
merged into bench/results/tpu_memory.json (keyed by accelerator and case) as soon as it ends, so
partial grids keep what finished. Step time and MFU are estimates (see docs/tpu.md): no TPU ran.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, cpu_name  # noqa: E402

CONFIG = ROOT / "configs" / "train" / "fluxir-dev.yaml"
TINY = ROOT / "configs" / "train" / "tiny.yaml"
CHIPS = {"v5p-8": 4, "v6e-8": 8}


def case_overrides(case: str, accelerator: str) -> list[str]:
    """The command line of a case: `config` is the config as it is (with its slice_knobs for the slice),
    `config-*` the config with a knob more; every other case starts from its base knobs
    (`slice_knobs={}`), as all of them did before slice_knobs."""
    if case == "config":
        return []
    if case == "config-single-whole":  # the config with its slice_knobs, the single blocks' frozen weights whole on
        # every chip (v6e-8, one single block, 8 per chip: 13.37 -> 13.21 ms est. with libtpu_env's flags, 15.73 with
        # XLA's windowed einsums counted once; about +7.5 GiB per chip)
        return ["model.frozen_replicated=[^single_blocks/]"]
    return ["slice_knobs={}", *_case_knobs(case, accelerator)]


def _case_knobs(case: str, accelerator: str) -> list[str]:
    if case == "base":  # the config without its slice_knobs: knobs that fit both v5p-8 and v6e-8
        return []
    if case == "full":
        return ["model.remat_policy=full"]
    if case == "splash":  # the config's knobs with splash attention (fits v6e-8, where remat none does not)
        return ["model.attention=splash"]
    if case == "splash-4":  # splash with micro-batches of 4 per chip on v6e-8 (libtpu's v6e model runs flux-dev's
        # matmuls at 58% of peak with 2 examples per chip, 73% with 4: bench/tpu_matmul.py)
        return ["model.attention=splash", f"optim.accum_steps={64 // (4 * CHIPS[accelerator])}"]
    if case == "splash-8":  # splash with micro-batches of 8 per chip (no accumulation on v6e-8): every FSDP weight
        # gather (one per block, forward and backward, per micro-batch) serves 8 examples instead of 2 or 4
        return ["model.attention=splash", f"optim.accum_steps={max(1, 64 // (8 * CHIPS[accelerator]))}"]
    if case == "splash-8-qkv":  # splash-8, keeping the qkv projections and the single blocks' modulated inputs too:
        # the backward recomputes less (no qkv matmuls in the double blocks) for 9.2 GiB more per v6e-8 chip (measured)
        return [*_case_knobs("splash-8", accelerator), "model.remat_policy=save_qkv_attention"]
    if case == "splash-none":  # no remat recompute, flash attention (no L x L probabilities to keep); micro-batches
        # of 2 per chip on v5p-8, 1 on v6e-8
        return ["model.remat_policy=none", "model.attention=splash", "optim.accum_steps=8"]
    if case == "splash-none-rep":  # splash-none with the frozen weights whole on every chip: no weight all-gathers
        return [*_case_knobs("splash-none", accelerator), "model.frozen_sharding=replicated"]
    prefix, _, per_chip = case.rpartition("-")
    if prefix in ("splash-none", "splash-none-rep") and per_chip.isdigit():  # no remat, N examples per chip per
        # micro-batch, frozen weights FSDP-split or (rep) whole on every chip (v5p-8: 4 per chip needed 119.8 GiB
        # before remat "none" stopped keeping the norms' float32 copies, GELU's terms and per-layer copies of the
        # weight views; measured)
        return ["model.remat_policy=none", "model.attention=splash",
                f"optim.accum_steps={max(1, 64 // (int(per_chip) * CHIPS[accelerator]))}",
                *(["model.frozen_sharding=replicated"] if prefix == "splash-none-rep" else [])]
    if case == "1024":
        return ["crop_size=1024", f"batch_size={CHIPS[accelerator]}", "optim.accum_steps=1"]
    if case == "1024-full":  # v6e-8: one 1024^2 example per chip with save_attention needs 51.7 GiB (measured)
        return [*_case_knobs("1024", accelerator), "model.remat_policy=full"]
    if case == "1024-splash":  # v6e-8: XLA attention's 4608 x 4608 matrices are what does not fit at 1024^2
        return [*_case_knobs("1024", accelerator), "model.attention=splash"]
    if case == "1024-splash-full":  # v6e-8: the save_attention compile of 1024-splash needs more than 24 GB of host RAM
        return [*_case_knobs("1024-splash", accelerator), "model.remat_policy=full"]
    raise SystemExit(f"unknown case {case!r}")


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(tempfile.gettempdir()) / "fluxir_tpu_memory.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def merge(path: pathlib.Path, key: str, entry: dict) -> None:
    """Add or replace `key` in the results file (several bench processes may run at once)."""
    with _locked(path):
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(benchmark="TPU memory (compile-only)", cpu=cpu_name(), cores=os.cpu_count(),
                    device="no TPU attached: libtpu compile-only on this CPU machine (shared)",
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        data["what"] = ("fluxir train configs/train/fluxir-dev.yaml --compile-only --topology NAME: per-chip memory from "
                        "XLA's memory_analysis, FLOPs, XLA's estimated seconds and est. MFU (estimates), compile time")
        # each case names its own machine and date: cases merged later must not relabel earlier ones
        entry.setdefault("cpu", cpu_name())
        entry.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        data.setdefault("cases", {})[key] = entry
        data["figures"] = [f for k, e in sorted(data["cases"].items()) for f in figures(k, e)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def rederive(record: dict) -> dict:
    """`aot.rederive` for a record of this benchmark (the model preset it names; its micro-batches)."""
    from fluxir_jax import aot
    from fluxir_jax.models import presets

    model = presets.get(record["base"])
    return aot.rederive(record, model.depth, model.depth_single_blocks, record["accum_steps"])


def run_case(config: pathlib.Path, accelerator: str, overrides: list[str], timeout: float,
             memory_only: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "compile.json"
        cmd = [sys.executable, "-m", "fluxir_jax.cli", "train", str(config), "--compile-only", "--topology", accelerator,
               "--out", str(out), f"run_dir={tmp}/run", *overrides, *(["--memory-only"] if memory_only else [])]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"overrides": overrides, "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        entry = {"overrides": overrides, "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
                 **({"memory_only": True} if memory_only else {})}
        if out.is_file():
            entry["record"] = json.loads(out.read_text())
        else:
            entry["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == 2 and proc.stderr.strip():
            entry["message"] = proc.stderr.strip().splitlines()[-1]
        return entry


def figures(key: str, entry: dict) -> list[dict]:
    """Table rows (bench/results_table.py) of one case."""
    rec = entry.get("record")
    own = {k: entry[k] for k in ("cpu", "date") if k in entry}  # the case's machine and date (bench/results_table.py)
    if not rec:
        return [{"figure": f"{key}: result", "value": entry.get("error", "failed"), "repeats": 1, **own}]
    gib = 1024**3
    mem = rec["per_chip_bytes"]
    rows = [("per-chip bytes" if mem.get("total") else "per-chip temporaries (compiler refused)",
             (mem.get("total") or mem.get("temporaries") or 0) / gib, "GiB"),
            ("fits HBM", "yes" if rec["fits"] else "no", ""), ("compile time", rec["compile_seconds"], "s")]
    timed = rec.get("est_mfu") is not None  # MFU is given only with XLA's time estimate
    # which program the whole-step XLA figures were read off (docs/tpu.md "One block's cost, read two ways")
    reading = f", {rec.get('xla_cost_analysis', {}).get('reading', 'unrolled')} reading" if timed else ""
    if rec.get("est_step_seconds") is not None:
        fl = rec["flops_per_step"]
        rows += [("FLOPs per step, model / analytic (recompute) / XLA",
                  " / ".join(f"{fl[k] / 1e12:.0f}" if fl.get(k) else "-" for k in ("model", "analytic", "xla")), "TFLOP"),
                 (f"est. step time (estimate{reading})" if timed else "step-time lower bound (FLOP bound; no XLA time estimate)",
                  rec["est_step_seconds"], "s")]
    if timed:
        if "est_hfu" in rec:
            rows += [(f"est. MFU (model FLOPs, estimate{reading})", 100 * rec["est_mfu"], "%"),
                     ("est. HFU (recompute counted, estimate)", 100 * rec["est_hfu"], "%")]
        else:  # records written before the model-FLOPs count: est_mfu counted the recompute
            rows += [("est. HFU (recompute counted, estimate)", 100 * rec["est_mfu"], "%")]
    return [{"figure": f"{key}: {name}", "value": value, "unit": unit, "repeats": 1, **own} for name, value, unit in rows]


def summary(key: str, entry: dict) -> str:
    rec = entry.get("record")
    if not rec:
        return f"{key}: {entry.get('error')}"
    if not rec["fits"] or rec["per_chip_bytes"].get("total") is None:
        return f"{key}: does not fit: {entry.get('message') or rec.get('compiler_error')}"
    gib = 1024**3
    xla = rec["flops_per_step"].get("xla")
    if rec.get("est_mfu") is not None:
        step = (f"est. step {rec['est_step_seconds']:.3g} s, est. MFU {rec['est_mfu']:.1%} "
                f"(HFU {rec.get('est_hfu', rec['est_mfu']):.1%})")
    else:
        step = f"no XLA time estimate: step >= {rec['est_step_seconds']:.3g} s (FLOP bound), no MFU estimate"
    return (f"{key}: {rec['per_chip_bytes']['total'] / gib:.1f} / {rec['hbm_bytes'] / gib:.0f} GiB per chip, "
            f"fits={rec['fits']}, {rec['flops_per_step']['analytic']:.3g} FLOPs (analytic), "
            f"{f'{xla:.3g}' if xla else '-'} (XLA), {step}, compile {rec['compile_seconds']:.0f} s "
            f"(wall {entry['wall_seconds']:.0f} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerators", nargs="+", default=["v5p-8", "v6e-8"], choices=sorted(CHIPS),
                    help="TPU slices to compile for")
    ap.add_argument("--cases", nargs="+", default=["config", "full", "1024"], help="grid cases: config, full, 1024 (default); opt-in: config-single-whole, base, splash, splash-4, splash-8, splash-8-qkv, 1024-full, 1024-splash, 1024-splash-full, "
                    "splash-none, splash-none-rep, splash-none-N, splash-none-rep-N (N examples per chip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny config on v5p-8 only")
    ap.add_argument("--rederive", nargs="+", metavar="KEY", default=[],
                    help="no compile: derive the time estimates of these recorded cases (e.g. v6e-8/base) again "
                         "from the libtpu figures they kept, with today's rules (aot.rederive)")
    ap.add_argument("--memory-only", action="store_true",
                    help="per-chip memory and fits only (fluxir train --memory-only: one compile per case, no time "
                         "estimate); such records are kept under CASE+memory")
    ap.add_argument("--timeout", type=float, default=6 * 3600,
                    help="seconds per case (a flux-dev case, the scanned step plus three FLOP variants, took "
                         "16-62 min wall on a 2-core AMD EPYC, up to 2 h on a loaded Intel Xeon)")
    args = ap.parse_args(argv)
    path = RESULTS / "tpu_memory.json"
    failed = 0
    if args.rederive:
        for key in args.rederive:
            entry = json.loads(path.read_text())["cases"][key]
            entry = {**entry, "record": rederive(entry["record"]),
                     "rederived": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            merge(path, key, entry)
            print(summary(key, entry), flush=True)
        return 0
    if args.quick:
        entry = run_case(TINY, "v5p-8", [], args.timeout)
        merge(path, "tiny/v5p-8", entry)
        print(summary("tiny/v5p-8", entry))
        return 0 if "record" in entry else 1
    for acc in args.accelerators:
        for case in args.cases:
            key = f"{acc}/{case}" + ("+memory" if args.memory_only else "")
            entry = run_case(CONFIG, acc, case_overrides(case, acc), args.timeout, args.memory_only)
            merge(path, key, entry)
            print(summary(key, entry), flush=True)
            failed += "record" not in entry
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
