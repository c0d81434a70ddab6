"""Converter memory and throughput on a synthetic checkpoint with the exact flux1-dev shapes.

    .venv/bin/python bench/convert_memory.py [--dir /tmp/fluxir-bench-convert] [--blocks N] [--keep]

Writes a BFL-layout `flux1-dev`-shaped safetensors file (bf16, random finite values; 780
tensors, about 23.8 GB), then measures, with the file's pages dropped from the page cache
before each run (posix_fadvise DONTNEED, so each starts cold), in `--repeats` interleaved rounds (medians reported):
  * a plain sequential read of the file (64 MiB reads) -> read throughput;
  * a plain copy of the file to the same disk (read + write + fsync) -> the I/O floor of any
    converter that writes its output next to its input;
  * `fluxir convert` of the file in a fresh subprocess -> wall time, throughput (source
    bytes / conversion time), peak RSS (kernel VmHWM, and 5 ms polling) and the same above
    the subprocess's baseline RSS measured after imports.
If the disk cannot hold the source plus the converted copy, fewer blocks are used (same
per-tensor shapes) and the record says so. Goals: peak RSS under 2 GiB, throughput at least
half the plain read. Writes bench/results/convert_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FLUX_DEV = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), guidance_embed=True)


def bfl_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(BFL key, BFL shape) of every tensor of a FluxConfig, from the Flax model's abstract params."""
    from flax import nnx

    from fluxir_convert import flux_map, formats
    from fluxir_jax.models.flux import Flux

    model = nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0)))
    specs = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        stacked = path[0] in ("double_blocks", "single_blocks")
        for layer in (range(var.shape[0]) if stacked else [None]):
            key, dummy = flux_map.flax_to_bfl(path, formats.shape_only(var.shape[1:] if stacked else var.shape), layer)
            specs.append((key, tuple(dummy.shape)))
    return sorted(specs)


def write_synthetic(path: pathlib.Path, specs, *, seed: int = 0, chunk: int = 32 * 2**20) -> int:
    """Stream a bf16 safetensors file of random finite values (|x| < 2); returns its size."""
    header, offset = {}, 0
    for key, shape in specs:
        n = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = offset // 2
        while left:
            n = min(left, chunk // 2)
            block = rng.integers(0, 2**16, n, dtype=np.uint16) & np.uint16(0xBFFF)  # clear the top exponent bit
            f.write(block.tobytes())
            left -= n
    return path.stat().st_size


def drop_cache(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path: pathlib.Path, block: int = 64 * 2**20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def plain_copy(path: pathlib.Path, dst: pathlib.Path, block: int = 64 * 2**20) -> float:
    """Sequential read + write of the same bytes on the same disk, fsynced: a converter's I/O floor."""
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        while n := f.readinto(view):
            g.write(view[:n])
        os.fsync(g.fileno())
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


_CHILD = r"""
import gc, json, os, sys, threading, time
sys.path.insert(0, {root!r})
import numpy, jax, flax, tensorstore, orbax.checkpoint, psutil  # noqa: F401  (imports before the baseline)
from fluxir_convert.convert import convert
from fluxir_jax.models.flux import Flux  # noqa: F401
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
t0 = time.perf_counter()
cpu0 = sum(os.times()[:2])
convert({sources!r}, {out!r}, progress=False, log=lambda s: None, **{kwargs!r})
wall = time.perf_counter() - t0
done.set()
# VmHWM: the kernel's peak RSS of this process image (ru_maxrss would carry the parent's peak over fork+exec)
hwm = [int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
cpu = sum(os.times()[:2]) - cpu0
print("RESULT " + json.dumps(dict(baseline_rss=base, peak_rss_polled=peak[0], vm_hwm=hwm, wall_s=wall, cpu_s=cpu)))
"""


def measure_convert(sources: list[str], out: str, **kwargs) -> dict:
    """Run `convert` in a fresh interpreter; peak RSS above the baseline measured after imports."""
    code = _CHILD.format(root=str(ROOT), sources=[str(s) for s in sources], out=str(out), kwargs=kwargs)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        raise RuntimeError(f"convert subprocess failed ({res.returncode}):\n{res.stderr[-3000:]}")
    r = json.loads(lines[-1][7:])
    r["peak_above_baseline"] = max(r["peak_rss_polled"], r["vm_hwm"]) - r["baseline_rss"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/fluxir-bench-convert")
    ap.add_argument("--blocks", type=int, default=None, help="double blocks to keep (single = 2x); default: all that fit")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic file and the converted checkpoint")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (read, copy, convert); medians are reported")
    args = ap.parse_args()

    from fluxir_jax.models.flux import FluxConfig

    work = pathlib.Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    full = FluxConfig(**FLUX_DEV, dtype="bfloat16", param_dtype="bfloat16")
    full_bytes = sum(int(np.prod(s)) * 2 for _, s in bfl_specs(full))
    free = shutil.disk_usage(work).free
    depth = full.depth if args.blocks is None else args.blocks
    per_double = sum(int(np.prod(s)) * 2 for k, s in bfl_specs(full) if k.startswith("double_blocks.0."))
    per_single = sum(int(np.prod(s)) * 2 for k, s in bfl_specs(full) if k.startswith("single_blocks.0."))
    top = full_bytes - full.depth * per_double - full.depth_single_blocks * per_single
    margin = 10 * 2**30  # other users of the disk
    while depth > 1 and 2 * (top + depth * per_double + 2 * depth * per_single) + margin > free:  # src + out (or copy)
        depth -= 1
    cfg = FluxConfig(**dict(FLUX_DEV, depth=depth, depth_single_blocks=2 * depth), dtype="bfloat16", param_dtype="bfloat16")
    specs = bfl_specs(cfg)
    if depth == full.depth:
        note = "exact flux1-dev shapes"
    elif args.blocks is not None and depth == args.blocks:
        note = f"--blocks {depth}: {depth} double + {2 * depth} single blocks (flux1-dev tensor shapes)"
    else:
        note = (f"reduced to {depth} double + {2 * depth} single blocks (disk: {free / 2**30:.0f} GiB free; "
                f"the full model needs 2 x {full_bytes / 2**30:.1f} GiB)")
    print(f"{len(specs)} tensors, {note}")

    src = work / "flux1-dev-synthetic.safetensors"
    out = work / "converted"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    size = write_synthetic(src, specs)
    t_write = time.perf_counter() - t0
    print(f"wrote {size / 1e9:.2f} GB in {t_write:.0f} s")

    reads, copies, runs = [], [], []
    for k in range(args.repeats):  # interleaved rounds, each run starting cold
        drop_cache(src)
        reads.append(plain_read(src))
        drop_cache(src)
        copies.append(plain_copy(src, work / "copy.bin"))
        drop_cache(src)
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure_convert([str(src)], str(out)))
        print(f"round {k + 1}/{args.repeats}: read {reads[-1]:.1f} s, copy {copies[-1]:.1f} s, convert {runs[-1]['wall_s']:.1f} s")
    t_read, t_copy = statistics.median(reads), statistics.median(copies)
    r = dict(wall_s=statistics.median(x["wall_s"] for x in runs), cpu_s=statistics.median(x["cpu_s"] for x in runs),
             baseline_rss=statistics.median(x["baseline_rss"] for x in runs),
             peak_above_baseline=max(x["peak_above_baseline"] for x in runs))
    print(f"plain sequential read: {t_read:.1f} s, {size / t_read / 1e6:.0f} MB/s (median of {args.repeats})")
    print(f"plain copy on the same disk (read + write + fsync): {t_copy:.1f} s, {size / t_copy / 1e6:.0f} MB/s")
    conv_tp = size / r["wall_s"]
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"convert: {r['wall_s']:.1f} s, {conv_tp / 1e6:.0f} MB/s ({conv_tp / (size / t_read):.2f} x plain read), "
          f"peak RSS above baseline {r['peak_above_baseline'] / 2**30:.2f} GiB (baseline {r['baseline_rss'] / 2**30:.2f} GiB), "
          f"CPU {r['cpu_s']:.0f} s; {conv_tp / (size / t_copy):.2f} x plain copy")

    record = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), cpus=os.cpu_count(),
        load_avg_1m=os.getloadavg()[0], note=note, tensors=len(specs), depth=depth, depth_single=2 * depth,
        file_bytes=size, output_bytes=out_bytes, write_synthetic_s=t_write, repeats=args.repeats,
        plain_read_all_s=reads, plain_copy_all_s=copies, convert_all_s=[x["wall_s"] for x in runs],
        plain_read_s=t_read, plain_read_MBps=size / t_read / 1e6,
        plain_copy_s=t_copy, plain_copy_MBps=size / t_copy / 1e6,
        convert_s=r["wall_s"], convert_cpu_s=r["cpu_s"], convert_MBps=conv_tp / 1e6, throughput_vs_plain_read=conv_tp / (size / t_read),
        throughput_vs_plain_copy=conv_tp / (size / t_copy),
        baseline_rss_GiB=r["baseline_rss"] / 2**30, peak_rss_above_baseline_GiB=r["peak_above_baseline"] / 2**30,
        peak_rss_GiB=(r["baseline_rss"] + r["peak_above_baseline"]) / 2**30,
        goals=dict(peak_rss_under_2GiB=r["baseline_rss"] + r["peak_above_baseline"] < 2 * 2**30,
                   throughput_at_least_half_plain_read=conv_tp >= 0.5 * size / t_read),
    )
    res = ROOT / "bench" / "results" / "convert_memory.json"
    res.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {res}")
    if not args.keep:
        src.unlink()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
