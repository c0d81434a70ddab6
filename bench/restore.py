"""FluxIR restoration throughput: images/s of `Restorer` pmap vs sharded vs one device, vs the PyTorch FluxIR.

    .venv/bin/python bench/restore.py [--model small] [--res 512] [--steps 4] [--devices 8] [--repeats 2]
    .venv/bin/python bench/restore.py --quick      # tiny preset, 64² output, 2 steps, 1 repeat

A random-weight checkpoint of `--model` (`fluxir init`, `--txt` text tokens) and a FluxIR adapter
with every parameter random are restored with (fluxir_jax/restore.py `Restorer`, as `fluxir
restore` does): `--devices` LQ images of (res/4)² -> res² outputs, `--steps` Euler steps, per-
device batch 1, colour fix off (the PyTorch path has none), in pmap and sharded mode over
`--devices` emulated CPU devices and in pmap mode on one device (the images then run one after
another). First call (compile) apart; medians over `--repeats` calls of `restore_float`.

PyTorch: `fluxir_convert.torch_fluxir.restore_torch` on diffusers' FluxTransformer2DModel +
AutoencoderKL holding the same weights (bench/torch_twin.py), the adapter loaded from its
`export_safetensors` file, the same LQ images, noise and steps, the whole batch in one call;
the relative difference of its images to ours is recorded as a check. Appends a record with a
`figures` list to bench/results/restore.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--res", type=int, default=None, help="output side in pixels, LQ = res / 4 (default 512; 64 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default 4; 2 with --quick)")
    ap.add_argument("--txt", type=int, default=128, help="text tokens of the checkpoint's empty-prompt embedding")
    ap.add_argument("--devices", type=int, default=8, help="emulated CPU devices; also the number of images per call")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default 2; 1 with --quick)")
    ap.add_argument("--modes", nargs="+", default=["pmap", "sharded", "one-device"], choices=["pmap", "sharded", "one-device"],
                    help="modes to run, in this order (PyTorch is checked against the first)")
    ap.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: one per core)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch FluxIR")
    ap.add_argument("--quick", action="store_true", help="smoke run on the tiny preset")
    ap.add_argument("--note", default=None, help="a remark stored with the record (e.g. why fewer repeats)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one mode (or "torch") in this process
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)  # internal: the folder the parent wrote
    a = ap.parse_args(argv)
    a.model = a.model or ("tiny" if a.quick else "small")
    a.res = a.res or (64 if a.quick else 512)
    a.steps = a.steps or (2 if a.quick else 4)
    a.repeats = a.repeats or (1 if a.quick else 2)
    return a


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None:  # the device count is fixed when JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import append_record, cpu_name, timed  # noqa: E402

MODES = (("pmap", "pmap", 0), ("sharded", "sharded", 0), ("one device", "pmap", 1))  # (name, parallel, devices)


def random_adapter(base_cfg, text_len: int, seed: int = 3):
    """A FluxIR adapter with every parameter random (no zero gates or zero lq_in)."""
    from fluxir_jax.models.adapter import FluxIR, FluxIRConfig

    adapter = FluxIR(FluxIRConfig(text_len=text_len), base_cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(adapter, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape)
        leaf = path[-1]
        x = (noise / np.sqrt(var.shape[-2]) if leaf == "kernel" else 1.0 + 0.1 * noise if leaf == "scale"
             else 0.5 * noise if leaf == "gamma" else noise if leaf in ("theta_p", "theta_y") else 0.1 * noise)
        var.set_value(jnp.asarray(x, jnp.float32))
    nnx.update(adapter, state)
    return adapter


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss: KiB on Linux


def torch_restore(args, d: str, adapter, lq: np.ndarray, seeds: np.ndarray, want: np.ndarray) -> dict:
    import torch

    from bench import torch_twin

    torch_twin.set_threads(args.torch_threads)
    from fluxir_convert import torch_fluxir
    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax import sampling

    base, vae, text = ckpt.load_flux(d), ckpt.load_autoencoder(d), ckpt.load_text_embeddings(d)
    dm, dv = torch_twin.diffusers_flux(base), torch_twin.diffusers_vae(vae, vae.config)
    ta = torch_twin.torch_adapter(adapter, dm)
    f, zc, g = vae.config.downsample_factor, vae.config.z_channels, 3.5 if base.config.guidance_embed else None
    del base, vae  # the Flax copies: only the torch twins stay in memory
    noise = np.asarray(sampling.get_noise(jnp.asarray(seeds), args.res // f, args.res // f, zc))

    def run():
        with torch.inference_mode():
            return torch_fluxir.restore_torch(dm, dv, ta, lq, noise, args.steps, g, text["txt"], text["y"]).numpy()

    out = run()  # warm-up, and the images for the check
    med, all_s = timed(run, args.repeats)
    rel = float(np.linalg.norm(out - want) / np.linalg.norm(want))
    return dict(torch_batch_s=round(med, 3), torch_all_s=[round(x, 3) for x in all_s], torch_per_image_s=round(med / len(lq), 4),
                torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_vs_ours_image_rel_diff=rel,
                torch_max_abs_diff=float(np.abs(out - want).max()), torch_peak_rss_GiB=peak_rss_gib())


def worker(args) -> dict:
    """One mode (MODES index) or "torch", in this process, on the checkpoint, adapter and inputs in args.dir."""
    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax.models import adapter_io
    from fluxir_jax.restore import Restorer

    tmp = pathlib.Path(args.dir)
    d, lq, seeds = str(tmp / "ckpt"), np.load(tmp / "lq.npy"), np.load(tmp / "seeds.npy")
    if args.worker == "torch":
        adapter = adapter_io.load_adapter(str(tmp / "adapter"), base_config=ckpt.flux_config(d))
        return torch_restore(args, d, adapter, lq, seeds, np.load(tmp / "images_first.npy"))
    k = int(args.worker)
    name, parallel, devices = MODES[k]
    r = Restorer(d, str(tmp / "adapter"), steps=args.steps, parallel=parallel, devices=devices,
                 batch_size=1, color_fix="none", allow_zero_text=True)
    t0 = time.perf_counter()
    out = np.stack(r.restore_float(list(lq), seeds))
    first = time.perf_counter() - t0
    np.save(tmp / f"images_{k}.npy", out)
    med, all_s = timed(lambda: r.restore_float(list(lq), seeds), args.repeats)
    return dict(first_call_s=round(first, 2), batch_s=round(med, 3), all_s=[round(x, 3) for x in all_s],
                images_per_s=round(len(lq) / med, 4), peak_rss_GiB=peak_rss_gib())


def run_worker(args, tmp: pathlib.Path, which: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--dir", str(tmp), "--model", args.model, "--res", str(args.res),
           "--steps", str(args.steps), "--txt", str(args.txt), "--devices", str(args.devices), "--repeats",
           str(args.repeats), "--torch-threads", str(args.torch_threads)]
    load0 = os.getloadavg()
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode:
        raise SystemExit(f"restore: the {which} run failed (exit {out.returncode})")
    rec = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    rec["load_avg_1min"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    return rec


def main():
    args = ARGS
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return
    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax.init_checkpoint import init_checkpoint
    from fluxir_jax.models import adapter_io

    load0 = os.getloadavg()
    n = jax.device_count()
    rng = np.random.default_rng(0)
    lq = rng.uniform(0, 1, (n, args.res // 4, args.res // 4, 3)).astype(np.float32)
    seeds = np.arange(n, dtype=np.uint32)
    rec = dict(benchmark="restore", model=args.model, res=args.res, lq=args.res // 4, steps=args.steps, txt=args.txt,
               devices=n, images_per_call=n, per_device_batch=1, color_fix="none", repeats=args.repeats,
               isolation="each mode and the PyTorch run in its own process, one after another")
    rec.update({"note": args.note} if args.note else {})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        d = str(tmp / "ckpt")
        init_checkpoint(args.model, d, text_len=args.txt)
        adapter_io.save_adapter(random_adapter(ckpt.flux_config(d), args.txt), tmp / "adapter")
        np.save(tmp / "lq.npy", lq)
        np.save(tmp / "seeds.npy", seeds)
        names = [m[0] for m in MODES]
        for i, mode in enumerate(args.modes):
            k = names.index(mode.replace("-", " "))
            rec[MODES[k][0]] = run_worker(args, tmp, str(k))
            if i == 0:
                (tmp / f"images_{k}.npy").rename(tmp / "images_first.npy")
            else:
                rec[MODES[k][0]][f"max_abs_diff_vs_{args.modes[0]}"] = float(
                    np.abs(np.load(tmp / f"images_{k}.npy") - np.load(tmp / "images_first.npy")).max())
        rec["torch_checked_against"] = args.modes[0]
        if not args.no_torch:
            t = run_worker(args, tmp, "torch")
            rec["torch_load_avg_1min"] = t.pop("load_avg_1min")
            rec.update(t)
    rec.update(load_avg_before=[round(x, 2) for x in load0], load_avg_after=[round(x, 2) for x in os.getloadavg()],
               backend=jax.default_backend(), device="cpu", cpu=cpu_name(), cores=os.cpu_count(), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"))
    rec["figures"] = figures(rec)
    append_record("restore.jsonl", rec)


def figures(r: dict) -> list[dict]:
    what = f"{r['model']} {r['lq']}² -> {r['res']}², {r['steps']} steps, {r['images_per_call']} images"
    figs = []
    for name, _, _ in MODES:
        if name in r:
            dev = "1 CPU device" if name == "one device" else f"{r['devices']} CPU devices, {name}"
            figs += [dict(figure=f"{what}, {dev}: images/s", value=r[name]["images_per_s"], unit="img/s"),
                     dict(figure=f"{what}, {dev}: first call (compile + run)", value=r[name]["first_call_s"], unit="s",
                          repeats=1)]
    if "torch_per_image_s" in r:
        figs.append(dict(figure=f"{what}: PyTorch FluxIR (restore_torch, one batch) per image", value=r["torch_per_image_s"],
                         unit="s"))
        for name, _, _ in MODES:
            if name in r:
                figs.append(dict(figure=f"{what}: PyTorch time / ours ({name})",
                                 value=r["torch_per_image_s"] * r[name]["images_per_s"], unit="x"))
    for fg in figs:
        fg.setdefault("repeats", r["repeats"])
    return figs


if __name__ == "__main__":
    main()
