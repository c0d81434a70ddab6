"""FluxIR training step: Flax step time on 1 and 8 devices vs the PyTorch FluxIR; flux-dev compile-only.

    .venv/bin/python bench/train_step.py                     # small 256², 1 and 8 devices, torch, compile 512/1024
    .venv/bin/python bench/train_step.py --quick             # tiny 64², no compile-only runs
    .venv/bin/python bench/train_step.py --devices 8 --compile-res   # only the 8-device step

Step: the jitted, sharded train step of fluxir_jax.train_loop.Trainer (random `--model` base, its
VAE, a FluxIR adapter, AdamW) at `--res`², per-device batch `--per-device-batch`, on a mesh of N
emulated CPU devices (fsdp=N; each N runs in its own process because the device count is fixed
before JAX starts). First call = compile time; then medians over `--repeats` steps. With N=1
the same step runs through the PyTorch FluxIR (convert/torch_fluxir.py `fluxir_loss_torch` on
diffusers' FluxTransformer2DModel + AutoencoderKL holding the same weights, same batch, t, noise
and crop offsets) plus backward and torch AdamW on the adapter: the Flax/PyTorch ratio.

Compile-only: `fluxir train configs/train/fluxir-dev.yaml --compile-only mesh.fsdp=8 crop_size=R`
on 8 CPU devices (abstract flux-dev, no weights; persistent compile cache off): per-device memory,
FLOPs per step (analytic and XLA), lower + compile time. Several minutes each on 2 cores.

Appends records with a `figures` list to bench/results/train_step.jsonl; each records the load
average (the benchmark machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base preset of the step runs (default small; tiny with --quick)")
    ap.add_argument("--res", type=int, default=None, help="crop size of the step runs (default 256; 64 with --quick)")
    ap.add_argument("--per-device-batch", type=int, default=1, help="examples per device per step")
    ap.add_argument("--devices", type=int, nargs="*", default=[1, 8], help="emulated device counts of the step runs")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; 2 with --quick)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch FluxIR step")
    ap.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: one per core)")
    ap.add_argument("--compile-res", type=int, nargs="*", default=None,
                    help="flux-dev compile-only crop sizes (default 512 1024; none with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset at 64², 2 repeats, no compile-only")
    ap.add_argument("--note", default=None, help="a remark stored with each record (e.g. why fewer repeats)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one step run on N devices
    a = ap.parse_args(argv)
    a.model = a.model or ("tiny" if a.quick else "small")
    a.res = a.res or (64 if a.quick else 256)
    a.repeats = a.repeats or (2 if a.quick else 5)
    if a.compile_res is None:
        a.compile_res = [] if a.quick else [512, 1024]
    return a


def machine() -> dict:
    from bench.common import cpu_name

    return dict(cpu=cpu_name(), cores=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"))


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_worker(args, n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip())
    cmd = [sys.executable, __file__, "--worker", str(n), "--model", args.model, "--res", str(args.res),
           "--per-device-batch", str(args.per_device_batch), "--repeats", str(args.repeats),
           "--torch-threads", str(args.torch_threads)]
    cmd += ["--no-torch"] if args.no_torch or n != 1 else []
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode:
        raise SystemExit(f"train_step worker on {n} devices failed (exit {out.returncode})")
    return _last_json(out.stdout)


def step_record(r: dict) -> dict:
    n, what = r["devices"], f"{r['model']} {r['res']}², batch {r['batch']} ({r['per_device_batch']}/device)"
    figs = [dict(figure=f"{what}, {n} CPU device(s): Flax step", value=1e3 * r["step_median_s"], unit="ms"),
            dict(figure=f"{what}, {n} CPU device(s): Flax images/s", value=r["batch"] / r["step_median_s"], unit="img/s"),
            dict(figure=f"{what}, {n} CPU device(s): Flax compile (first call)", value=r["compile_s"], unit="s", repeats=1)]
    if "torch_median_s" in r:
        figs += [dict(figure=f"{what}: PyTorch FluxIR step (diffusers)", value=1e3 * r["torch_median_s"], unit="ms"),
                 dict(figure=f"{what}: PyTorch step time / Flax step time (1 device)", value=r["torch_over_flax"], unit="x")]
    return dict(benchmark="train step", kind="step", **r, figures=figs)


def compile_record(res: int) -> dict:
    """`fluxir train configs/train/fluxir-dev.yaml --compile-only mesh.fsdp=8 crop_size=res` on 8 CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fluxir_jax.cli", "train", "configs/train/fluxir-dev.yaml", "--compile-only",
               "mesh.fsdp=8", f"crop_size={res}", f"run_dir={tmp}/run"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"compile-only at {res}² failed (exit {out.returncode})")
    rep = _last_json(out.stdout)
    mem, fl = rep["per_chip_bytes"], rep["flops_per_step"]
    what = f"flux-dev FluxIR step {res}², global batch {rep['batch_size']}, fsdp=8 (CPU compile-only)"
    gib = lambda b: b / 2**30  # noqa: E731
    figs = [dict(figure=f"{what}: per-device memory total", value=gib(mem["total"]), unit="GiB"),
            dict(figure=f"{what}: per-device arguments / temporaries", value=f"{gib(mem['arguments']):.2f} / "
                 f"{gib(mem['temporaries']):.2f} GiB"),
            dict(figure=f"{what}: FLOPs per step, analytic", value=fl["analytic"] / 1e12, unit="TFLOP"),
            dict(figure=f"{what}: FLOPs per step, XLA", value=fl["xla"] / 1e12, unit="TFLOP"),
            dict(figure=f"{what}: compile time (lower + compile)", value=rep["lower_s"] + rep["compile_s"], unit="s")]
    for f in figs:
        f["repeats"] = 1
    return dict(benchmark="train step", kind="compile_only", res=res, report=rep, wall_s=round(wall, 1),
                load_avg_before=[round(x, 2) for x in load0], load_avg_after=[round(x, 2) for x in os.getloadavg()],
                device="cpu", **machine(), figures=figs)

def step_config(args, n: int):
    """configs/train/fluxir-dev.yaml (the paper's step) on the `args.model` preset: float32, no remat, 128 text tokens, no accumulation."""
    from fluxir_jax import train_config

    over = [f"base={args.model}", f"crop_size={args.res}", f"batch_size={n * args.per_device_batch}", "mesh.data=1",
            f"mesh.fsdp={n}", "model.dtype=float32", "model.vae_dtype=float32", "model.remat_policy=none",
            f"adapter.text_len={16 if args.quick else 128}", f"loss.pixel_crop={min(256, args.res)}",
            "optim.accum_steps=1", "data.workers=0"]
    return train_config.load(str(ROOT / "configs/train/fluxir-dev.yaml"), over), over


def worker(args) -> dict:
    """One step run in this process (XLA_FLAGS fixed the device count); with 1 device also the PyTorch step."""
    import jax
    import numpy as np

    from bench.common import timed
    from fluxir_jax import parallel, train
    from fluxir_jax.train_loop import Trainer

    n = jax.device_count()
    cfg, over = step_config(args, n)
    mesh = parallel.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh, log=lambda *a: None)
    m, b = trainer.models, cfg.batch_size
    rng = np.random.default_rng(0)
    hq = rng.uniform(0, 1, (b, args.res, args.res, 3)).astype(np.float32)
    lq_up = np.clip(hq + 0.1 * rng.standard_normal(hq.shape), 0, 1).astype(np.float32)
    bsh = parallel.batch_sharding(mesh, 4)
    batch = {"hq": jax.device_put(hq, bsh), "lq_up": jax.device_put(lq_up, bsh)}
    twin = None
    if not args.no_torch:  # before the first step: the state is donated
        adapter0 = train.merge_pure(m.adapter_graphdef, m.adapter_abstract, jax.device_get(trainer.state.params))
        twin = (train.merge_pure(m.base_graphdef, m.base_abstract, jax.device_get(m.base)),
                train.merge_pure(m.vae_graphdef, m.vae_abstract, jax.device_get(m.vae)), adapter0)
    state = trainer.state

    def step():
        nonlocal state
        state, metrics = trainer.jitted(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        return metrics

    t0 = time.perf_counter()
    first = step()
    compile_s = time.perf_counter() - t0
    step()  # warm-up
    med, all_s = timed(step, args.repeats)
    rec = dict(model=args.model, res=args.res, batch=b, per_device_batch=args.per_device_batch, devices=n,
               mesh=dict(mesh.shape), config="configs/train/fluxir-dev.yaml " + " ".join(over), repeats=args.repeats,
               step_median_s=round(med, 4), step_all_s=[round(x, 4) for x in all_s], compile_s=round(compile_s, 2),
               images_per_s=round(b / med, 3), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
               jax=jax.__version__, flax_peak_rss_GiB=peak_rss_gib())
    if twin is not None:
        rec.update(torch_step(args, cfg, trainer, twin, hq, lq_up, float(first["loss"])))
        rec["torch_over_flax"] = round(rec["torch_median_s"] / med, 3)
        rec["peak_rss_GiB"] = peak_rss_gib()  # Flax and PyTorch in one process
    return rec


def peak_rss_gib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss: KiB on Linux


def torch_step(args, cfg, trainer, twin, hq, lq_up, flax_loss0: float) -> dict:
    """The same step through convert/torch_fluxir.py on diffusers modules: loss, backward, clip, AdamW."""
    import jax
    import numpy as np
    import torch

    from bench import torch_twin
    from bench.common import timed
    from fluxir_convert import torch_fluxir
    from fluxir_jax import train

    torch_twin.set_threads(args.torch_threads)
    base, vae, adapter = twin
    dm, dv = torch_twin.diffusers_flux(base), torch_twin.diffusers_vae(vae, trainer.models.vae_config)
    ta = torch_twin.torch_adapter(adapter, dm)
    lc, oc = cfg.loss, cfg.optim
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0), 0)  # the Flax step 0 draws
    t, noise, offsets = (np.asarray(a) for a in train.draw_inputs(key, hq.shape[0], (args.res // 8,) * 2, 16, lc))
    txt, y = np.asarray(trainer.models.txt), np.asarray(trainer.models.y)
    opt = torch.optim.AdamW(ta.parameters(), lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps, weight_decay=oc.weight_decay)
    g = lc.guidance if trainer.models.base_config.guidance_embed else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = torch_fluxir.fluxir_loss_torch(dm, dv, ta, hq, lq_up, t, noise, offsets, txt, y, g,
                                                 pixel_crop=lc.pixel_crop, pixel_weight=lc.pixel_weight,
                                                 t_min=lc.pix_t_min, t_max=lc.pix_t_max, pixel_loss=lc.pixel_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ta.parameters(), oc.clip_norm)
        opt.step()
        return float(loss)

    loss0 = step()
    step()  # warm-up
    med, _ = timed(step, args.repeats)
    return dict(torch_median_s=round(med, 4), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                step0_loss_flax=flax_loss0, step0_loss_torch=loss0,
                step0_loss_rel_diff=abs(loss0 - flax_loss0) / abs(flax_loss0))


def main(argv=None):
    args = parse(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return 0
    from bench.common import append_record

    for n in args.devices:
        load0 = os.getloadavg()
        r = run_worker(args, n)
        r.update(load_avg_before=[round(x, 2) for x in load0], load_avg_after=[round(x, 2) for x in os.getloadavg()],
                 **machine())
        r.update({"note": args.note} if args.note else {})
        append_record("train_step.jsonl", step_record(r))
    for res in args.compile_res:
        append_record("train_step.jsonl", dict(compile_record(res), **({"note": args.note} if args.note else {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
