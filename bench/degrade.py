"""Degradation throughput: our numpy/OpenCV pipeline vs the same pipeline in torch ops, one core.

    .venv/bin/python bench/degrade.py [--size 512] [--pairs 30] [--repeats 5]

Both pipelines run the same sampled choices (`sample_degradation`, default config) on the same
512x512 GT crops of scikit-image photos. The torch side works the way BasicSR's Real-ESRGAN
model does: blur with a grouped ``conv2d`` on a ``reflect``-padded tensor (21x21 padded
kernels), ``F.interpolate`` (``scale_factor`` for the first resize), Gaussian noise with the
colour field always drawn and the gray field drawn when needed, Poisson noise via
``torch.unique`` and ``torch.poisson``, JPEG with the same OpenCV codec, clamp and round, and
a bicubic ``lq_up``. One thread each (torch, OpenCV, BLAS); the two are interleaved repeat by
repeat and the medians of pairs/s (wall clock; also pairs per CPU-second of the process, which
other load on a shared machine disturbs less) are compared. Prints the figures and the CPU, writes
``bench/results/degrade.json``.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import RESULTS as BENCH_RESULTS  # noqa: E402
from fluxir_jax.data import degrade as D  # noqa: E402
from fluxir_jax.data import kernels as K  # noqa: E402

RESULTS = BENCH_RESULTS / "degrade.json"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gt_crops(size: int) -> list[np.ndarray]:
    """A few natural GT crops of ``size`` (reflect-padded when a photo is smaller)."""
    from skimage import data

    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.hubble_deep_field(), data.retina(), data.coffee(), data.rocket()]
    return [D.prepare_gt(p.astype(np.float32) / 255, rng, D.GTConfig(crop_size=size, hflip_prob=0.5))[0] for p in photos]


# --- the torch pipeline (BasicSR style) -------------------------------------------------------


def t_filter2d(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Grouped conv2d of a [1, C, H, W] tensor with one padded kernel, reflect padding."""
    k = kernel.shape[0]
    c = x.shape[1]
    w = torch.from_numpy(kernel.astype(np.float32)).expand(c, 1, k, k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), w, groups=c)


def t_resize(x: torch.Tensor, mode: str, size=None, scale=None) -> torch.Tensor:
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=size, scale_factor=scale, mode=mode, **kw)


def t_noise(x: torch.Tensor, p: dict, gen: torch.Generator) -> torch.Tensor:
    gray = 1.0 if p["gray"] else 0.0
    if p["type"] == "gaussian":
        sigma = p["sigma"] / 255.0
        noise = torch.randn(x.shape, generator=gen) * sigma
        if p["gray"]:
            noise = noise * (1 - gray) + torch.randn(x.shape[2:], generator=gen) * sigma * gray
    else:
        img = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
        vals = 2 ** np.ceil(np.log2(len(torch.unique(img))))
        noise = torch.poisson(img * vals, generator=gen) / vals - img
        if p["gray"]:
            wts = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
            g = torch.clamp(((x * wts).sum(1, keepdim=True) * 255.0).round(), 0, 255) / 255.0
            gvals = 2 ** np.ceil(np.log2(len(torch.unique(g))))
            gnoise = torch.poisson(g * gvals, generator=gen) / gvals - g
            noise = noise * (1 - gray) + gnoise * gray
        noise = noise * p["scale"]
    return torch.clamp(x + noise, 0, 1)


def t_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The same libjpeg codec (OpenCV) on the uint8 image, back to a tensor."""
    u8 = torch.clamp((x[0] * 255.0).round(), 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(dec).permute(2, 0, 1)[None].float() / 255.0


def torch_degrade(hq: np.ndarray, p: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The default second-order pipeline with torch ops, for the choices in ``p``."""
    h, w = hq.shape[:2]
    x = torch.from_numpy(hq).permute(2, 0, 1)[None]
    if p["blur1"] is not None:
        x = t_filter2d(x, K.kernel_from_params(p["blur1"], 21))
    r1 = p["resize1"]
    if r1["direction"] != "keep":
        x = t_resize(x, r1["mode"], scale=r1["scale"])
    x = t_jpeg(torch.clamp(t_noise(x, p["noise1"], gen), 0, 1), p["jpeg1"]["quality"])
    if p["blur2"] is not None:
        x = t_filter2d(x, K.kernel_from_params(p["blur2"], 21))
    x = t_resize(x, p["resize2"]["mode"], size=tuple(p["resize2"]["out_hw"]))
    x = t_noise(x, p["noise2"], gen)
    sinc = K.kernel_from_params(p["final_sinc"], 21) if p["final_sinc"] else K.pulse_kernel(21)
    fr = p["final_resize"]
    if p["final_order"] == D.FINAL_ORDERS[0]:
        x = t_filter2d(t_resize(x, fr["mode"], size=tuple(fr["out_hw"])), sinc)
        x = t_jpeg(torch.clamp(x, 0, 1), p["jpeg2"]["quality"])
    else:
        x = t_jpeg(torch.clamp(x, 0, 1), p["jpeg2"]["quality"])
        x = t_filter2d(t_resize(x, fr["mode"], size=tuple(fr["out_hw"])), sinc)
    lq = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
    lq_up = torch.clamp(t_resize(lq, "bicubic", size=(h, w)), 0, 1)
    return lq, lq_up


# --- timing -----------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def run_ours(gts, seeds, cfg):
    """(pairs per wall second, pairs per CPU second of this process, PSNRs of lq_up)."""
    scores = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, s in enumerate(seeds):
        hq = gts[i % len(gts)]
        _, lq_up, _ = D.degrade(hq, np.random.default_rng(s), cfg)
        scores.append((hq, lq_up))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(seeds) / wall, len(seeds) / cpu, [psnr(u, h) for h, u in scores]


def run_torch(gts, seeds, cfg):
    """The same for the torch pipeline (parameter sampling included, as in ours)."""
    scores = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, s in enumerate(seeds):
        hq = gts[i % len(gts)]
        p = D.sample_degradation(np.random.default_rng(s), cfg, hq.shape[:2])
        _, lq_up = torch_degrade(hq, p, torch.Generator().manual_seed(s))
        scores.append((hq, lq_up))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(seeds) / wall, len(seeds) / cpu, [psnr(u[0].permute(1, 2, 0).numpy(), h) for h, u in scores]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=30, help="pairs per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = D.DegradationConfig()
    gts = gt_crops(args.size)
    seeds = list(range(args.pairs))
    run_ours(gts, seeds[:3], cfg)  # warm-up (tables, caches)
    run_torch(gts, seeds[:3], cfg)

    load_before = os.getloadavg()
    rates = {"ours": {"wall": [], "cpu": []}, "torch": {"wall": [], "cpu": []}}
    psnrs = {"ours": [], "torch": []}
    for r in range(args.repeats):
        rep_seeds = [1000 * r + s for s in seeds]
        for name, fn in (("ours", run_ours), ("torch", run_torch)):
            wall, cpu, ps = fn(gts, rep_seeds, cfg)
            rates[name]["wall"].append(round(wall, 2))
            rates[name]["cpu"].append(round(cpu, 2))
            psnrs[name] += ps
        print(f"repeat {r}: ours {rates['ours']['wall'][-1]:.1f} pairs/s ({rates['ours']['cpu'][-1]:.1f} per CPU-s), "
              f"torch {rates['torch']['wall'][-1]:.1f} pairs/s ({rates['torch']['cpu'][-1]:.1f} per CPU-s)", flush=True)
    load_after = os.getloadavg()

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rates.items()}
    ratio = {k: med["ours"][k] / med["torch"][k] for k in ("wall", "cpu")}
    record = {
        "benchmark": "degrade",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads_per_pipeline": 1,
        "machine_cpus": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__, "torch": torch.__version__},
        "gt_size": args.size,
        "pairs_per_repeat": args.pairs,
        "repeats": args.repeats,
        "rates_pairs_per_s": rates,
        "median_pairs_per_s_per_core": {n: round(m["wall"], 2) for n, m in med.items()},
        "median_pairs_per_cpu_s": {n: round(m["cpu"], 2) for n, m in med.items()},
        "speedup_vs_torch": {k: round(v, 2) for k, v in ratio.items()},
        "mean_psnr_lq_up_db": {n: round(float(np.mean(v)), 2) for n, v in psnrs.items()},
        "goals_met": {"pairs_per_s_per_core>=25": med["ours"]["wall"] >= 25, "speedup>=1.5": ratio["wall"] >= 1.5},
    }
    print(f"CPU: {record['cpu']}, {os.cpu_count()} cpus, load average {record['loadavg_1min_before_after']} (before, after)")
    print(f"GT {args.size}, median of {args.repeats} repeats x {args.pairs} pairs, one thread each:")
    for n in ("ours", "torch"):
        print(f"  {n:5s}: {med[n]['wall']:6.1f} pairs/s/core (wall)   {med[n]['cpu']:6.1f} pairs per CPU-second")
    print(f"  ratio: {ratio['wall']:.2f}x (wall), {ratio['cpu']:.2f}x (CPU time)")
    print(f"  mean PSNR(lq_up, GT): ours {record['mean_psnr_lq_up_db']['ours']} dB, torch {record['mean_psnr_lq_up_db']['torch']} dB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
