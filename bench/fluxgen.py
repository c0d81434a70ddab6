"""FluxGen throughput: images/s of generation on N emulated devices, pmap vs sharded, vs diffusers' FluxPipeline.

    .venv/bin/python bench/fluxgen.py [--model small] [--res 256] [--steps 4] [--devices 8] [--repeats 3]
    .venv/bin/python bench/fluxgen.py --quick      # tiny preset at 192² (NIQE's minimum), 2 steps, 1 repeat

A random-weight checkpoint of `--model` (`fluxir init`, `--txt` text tokens) is generated from
with the device program of `fluxir gen` (fluxir_jax/fluxgen.py `make_program`: sample with
`--steps` Euler steps, VAE-decode, quantise) through `infer.Engine` in each mode, one global
batch of `--devices` images (1 per device) per timed call; the first call (compile) is reported
apart. Per image, the time splits into sampling (program time minus a decode-only program's
time on the same engine), decoding, scoring (NIQE, `score_batch` chunks as `fluxir gen`),
PNG encoding and degradation (`fluxgen_select.degrade_example`, one process). The host stages
run on one thread each, one after another here; `fluxir gen` overlaps them with generation.

PyTorch: diffusers' `FluxPipeline` with the same transformer and VAE weights (bench/torch_twin.py),
FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift, the same steps, guidance, noise
(passed as `latents`) and text embeddings (`prompt_embeds` / `pooled_prompt_embeds`; no text
encoders), the whole batch in one call: sampling + decoding per image, and its ratio to ours
(and the relative difference of the images, as a check that it is the same computation).
Appends a record with a `figures` list to bench/results/fluxgen.jsonl.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default 256; 192 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default 4; 2 with --quick)")
    ap.add_argument("--txt", type=int, default=128, help="text tokens of the checkpoint's empty-prompt embedding")
    ap.add_argument("--devices", type=int, default=8, help="emulated CPU devices (global batch: 1 image per device)")
    ap.add_argument("--modes", nargs="+", default=["pmap", "sharded"], choices=["pmap", "sharded"], help="engine modes")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; 1 with --quick)")
    ap.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: one per core)")
    ap.add_argument("--no-torch", action="store_true", help="skip diffusers' FluxPipeline")
    ap.add_argument("--quick", action="store_true", help="smoke run on the tiny preset")
    ap.add_argument("--note", default=None, help="a remark stored with the record (e.g. why fewer repeats)")
    a = ap.parse_args(argv)
    a.model = a.model or ("tiny" if a.quick else "small")
    a.res = a.res or (192 if a.quick else 256)
    a.steps = a.steps or (2 if a.quick else 4)
    a.repeats = a.repeats or (1 if a.quick else 3)
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


def decode_program(graphdefs, per_example: bool):
    """program(params, {"z": latents}) -> {"image": uint8}: the decode + quantise part of `make_program`."""
    def images(params, z):
        img = nnx.merge(graphdefs["vae"], params["vae"]).decode(z)
        img = jnp.clip((img.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
        return jnp.round(img * 255.0).astype(jnp.uint8)

    def program(params, batch):
        if per_example:
            return {"image": jax.lax.map(lambda z: images(params, z[None])[0], batch["z"])}
        return {"image": images(params, batch["z"])}

    return program


def host_stages(cfg, images: np.ndarray, repeats: int) -> dict:
    """Median seconds per image of scoring, PNG encoding and degradation (as `fluxir gen` does them)."""
    from fluxir_jax import fluxgen_select as fs
    from fluxir_jax.data.dataset import PairExample
    from fluxir_jax.iqa.registry import get_metric

    metric = get_metric("niqe")
    n = len(images)

    def score():
        for k in range(0, n, cfg.score_batch):
            metric(images[k:k + cfg.score_batch].astype(np.float32) / np.float32(255))

    pngs = []

    def encode():
        pngs[:] = [fs.encode_png(im, cfg.png_compress_level) for im in images]

    def degrade():
        for i, png in enumerate(pngs):
            fs.degrade_example((PairExample(id=fs.image_id(i), hq_png=png, seed=cfg.seed + i), cfg.degrade,
                                cfg.png_compress_level))

    score()  # first call: metric set-up
    out = {}
    for name, fn in (("score", score), ("encode_png", encode), ("degrade", degrade)):
        out[name] = timed(fn, repeats)[0] / n
    return out


def torch_pipeline(args, cfg, base, vae, text, noise_tokens, want: np.ndarray) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from bench import torch_twin

    torch_twin.set_threads(args.torch_threads)

    dm, dv = torch_twin.diffusers_flux(base), torch_twin.diffusers_vae(vae, vae.config)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=dv, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=dm)
    pipe.set_progress_bar_config(disable=True)
    b = noise_tokens.shape[0]
    txt = torch.from_numpy(np.broadcast_to(np.asarray(text["txt"], np.float32), (b, *text["txt"].shape)).copy())
    y = torch.from_numpy(np.broadcast_to(np.asarray(text["y"], np.float32), (b, *text["y"].shape)).copy())
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, height=args.res, width=args.res, num_inference_steps=args.steps,
              guidance_scale=cfg.guidance, latents=torch.from_numpy(np.asarray(noise_tokens, np.float32)), output_type="np")
    with torch.inference_mode():
        out = pipe(**kw).images  # warm-up, and the images for the check
        med, all_s = timed(lambda: pipe(**kw), args.repeats)
    got = np.round(np.clip(out, 0, 1) * 255.0)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return dict(torch_batch_s=round(med, 3), torch_all_s=[round(x, 3) for x in all_s], torch_per_image_s=round(med / b, 4), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), torch_vs_ours_image_rel_diff=rel)


def main():
    args = ARGS
    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax import fluxgen, sampling
    from fluxir_jax.fluxgen_config import load_config
    from fluxir_jax.infer import Engine
    from fluxir_jax.init_checkpoint import init_checkpoint

    load0 = os.getloadavg()
    n = jax.device_count()
    rec = dict(benchmark="fluxgen", model=args.model, res=args.res, steps=args.steps, txt=args.txt, devices=n,
               images_per_call=n, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        init_checkpoint(args.model, pathlib.Path(tmp) / "ckpt", text_len=args.txt)
        d = str(pathlib.Path(tmp) / "ckpt")
        base, vae, text = ckpt.load_flux(d), ckpt.load_autoencoder(d), ckpt.load_text_embeddings(d)
    cfg = load_config(str(ROOT / "configs/gen/tiny.yaml"), [f"resolution={args.res}", f"steps={args.steps}",
                                                             f"batch_size={n}", "metrics=[niqe]"])
    graphdefs, params = {}, {}
    for name, module in (("base", base), ("vae", vae)):
        graphdefs[name], params[name] = nnx.split(module)
    params["txt"], params["y"] = np.asarray(text["txt"], np.float32), np.asarray(text["y"], np.float32)
    seeds = np.arange(n, dtype=np.uint32) + np.uint32(cfg.seed)
    f = vae.config.downsample_factor
    lh = lw = args.res // f
    z = np.random.default_rng(0).standard_normal((n, lh, lw, vae.config.z_channels)).astype(np.float32)
    images = None
    for mode in args.modes:
        engine = Engine(params, parallel=mode, devices=n, batch_per_device=1)
        program = fluxgen.make_program(graphdefs, base.config, vae.config, cfg, per_example=mode == "pmap")
        dec = decode_program(graphdefs, per_example=mode == "pmap")
        t0 = time.perf_counter()
        out = engine.run(program, {"seed": seeds})["image"]
        first = time.perf_counter() - t0
        images = out if images is None else images
        engine.run(dec, {"z": z})  # compile
        gen_s, gen_all = timed(lambda: engine.run(program, {"seed": seeds}), args.repeats)
        dec_s, _ = timed(lambda: engine.run(dec, {"z": z}), args.repeats)
        rec[mode] = dict(first_call_s=round(first, 2), program_s=round(gen_s, 3), program_all_s=[round(x, 3) for x in gen_all],
                         decode_s=round(dec_s, 3), images_per_s=round(n / gen_s, 3),
                         per_image_s=dict(sampling=round((gen_s - dec_s) / n, 4), decoding=round(dec_s / n, 4)))
        engine = None  # free this mode's placed weights before the next
    host = host_stages(cfg, images, args.repeats)
    rec["host_per_image_s"] = {k: round(v, 4) for k, v in host.items()}
    if not args.no_torch:
        noise = np.asarray(sampling.pack(sampling.get_noise(jnp.asarray(seeds), lh, lw, vae.config.z_channels)))
        rec.update(torch_pipeline(args, cfg, base, vae, text, noise, images.astype(np.float64)))
    rec.update(load_avg_before=[round(x, 2) for x in load0], load_avg_after=[round(x, 2) for x in os.getloadavg()],
               backend=jax.default_backend(), device="cpu", cpu=cpu_name(), cores=os.cpu_count(), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"), peak_rss_GiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    rec.update({"note": args.note} if args.note else {})
    rec["figures"] = figures(rec)
    append_record("fluxgen.jsonl", rec)


def figures(r: dict) -> list[dict]:
    what = f"{r['model']} {r['res']}², {r['steps']} steps, {r['devices']} CPU devices x 1 image"
    rep, figs = r["repeats"], []
    for mode in ("pmap", "sharded"):
        if mode not in r:
            continue
        m = r[mode]
        figs += [dict(figure=f"{what}, {mode}: images/s (sample + decode)", value=m["images_per_s"], unit="img/s"),
                 dict(figure=f"{what}, {mode}: per image sampling / decoding",
                      value=f"{m['per_image_s']['sampling']:.3g} / {m['per_image_s']['decoding']:.3g} s"),
                 dict(figure=f"{what}, {mode}: first call (compile + run)", value=m["first_call_s"], unit="s", repeats=1)]
    h = r["host_per_image_s"]
    figs.append(dict(figure=f"{r['res']}² images: per image scoring (NIQE) / PNG encoding / degradation, one thread",
                     value=f"{h['score']:.3g} / {h['encode_png']:.3g} / {h['degrade']:.3g} s"))
    if "torch_per_image_s" in r:
        figs.append(dict(figure=f"{what}: diffusers FluxPipeline per image (sample + decode, batch {r['devices']})",
                         value=r["torch_per_image_s"], unit="s"))
        for mode in ("pmap", "sharded"):
            if mode in r:
                figs.append(dict(figure=f"{what}: FluxPipeline time / ours ({mode})",
                                 value=r["torch_per_image_s"] * r[mode]["images_per_s"], unit="x"))
    for fg in figs:
        fg.setdefault("repeats", rep)
    return figs


if __name__ == "__main__":
    main()
