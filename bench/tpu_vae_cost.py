"""What the frozen VAE costs in a FluxIR train step, in libtpu's estimate, compiled for a TPU slice on
this CPU machine (compile-only: no TPU runs):

    .venv/bin/python bench/tpu_vae_cost.py --accelerator v6e-8 --examples-per-chip 8   (~7 min of CPU)
    .venv/bin/python bench/tpu_vae_cost.py --quick      # the tiny VAE at 64² on v5p-8 (smoke)

The step's VAE work (`train.fluxir_loss`), bf16 as `model.vae_dtype` ships: the HQ and the LQ crops
encoded (forward only), and the pixel loss's latent crop (`loss.pixel_crop` / 8 per side) decoded,
forward and backward with respect to the latent (gradients flow through the decoder to the
adapter; the decoder's weights are not differentiated). The batch is split over the chips, the VAE
weights whole on every chip (as the training rules keep it: 84M parameters). Figures per chip:
XLA's optimal_seconds (no loops here, so nothing is counted once), the convolutions' FLOP bound at
the chip's peak, and their ratio, the VAE's share of peak. Estimates from the compiler: no TPU ran.
Appends to bench/results/tpu_vae_cost.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench.common import append_record, cpu_name  # noqa: E402
from fluxir_jax import aot, libtpu_env, tpu_topology  # noqa: E402
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder  # noqa: E402
from fluxir_jax.train import crop_latent  # noqa: E402


def vae_step_part(preset: str, batch: int, crop: int, pixel_crop: int):
    """(fn, abstract args): the VAE's work in one FluxIR step (see the module docstring)."""
    cfg = dataclasses.replace(AE_PRESETS[preset], dtype="bfloat16", param_dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0))))
    S = jax.ShapeDtypeStruct
    images = S((batch, crop, crop, 3), jnp.float32)
    offsets = S((batch, 2), jnp.int32)

    def fn(state, hq, lq_up, offsets):
        vae = nnx.merge(graphdef, state)
        z0 = vae.encode(2.0 * hq - 1.0, tiled=False)
        zc = vae.encode(2.0 * lq_up - 1.0, tiled=False)

        def pixel_loss(x0_hat):  # the decoded latent crop against the HQ pixels, L1
            dec = vae.decode(crop_latent(x0_hat, offsets, pixel_crop // 8), tiled=False).astype(jnp.float32)
            return jnp.mean(jnp.abs(dec - crop_latent(2.0 * hq - 1.0, offsets * 8, pixel_crop)))

        return jax.value_and_grad(pixel_loss)(z0 + zc)  # a stand-in for x0_hat, which depends on both

    return fn, (state, images, images, offsets)


def measure(accelerator: str, preset: str, per_chip: int, crop: int, pixel_crop: int) -> dict:
    acc = tpu_topology.parse_accelerator(accelerator)
    chips = acc.chips
    fn, args = vae_step_part(preset, per_chip * chips, crop, pixel_crop)
    flops = aot.analytic_flops(fn, *args)
    rec, _ = tpu_topology.compile_for_topology(
        fn, args, accelerator, (1, -1, 1),
        in_shardings=lambda mesh: (jax.tree.map(lambda _: P(), args[0]), P("fsdp"), P("fsdp"), P("fsdp")))
    if rec.xla_seconds is None:
        raise SystemExit(f"libtpu gave no time estimate for the VAE on {accelerator}")
    bound = flops / chips / acc.peak_bf16_flops
    return {"flops": flops, "xla_seconds": rec.xla_seconds, "flop_bound_seconds": bound,
            "share_of_peak": bound / rec.xla_seconds, "per_chip_bytes": rec.per_chip_bytes["total"],
            "compile_seconds": round(rec.compile_seconds, 1)}


def figures(accelerator: str, preset: str, per_chip: int, crop: int, pixel_crop: int, row: dict) -> list[dict]:
    what = (f"{accelerator}, {preset} VAE in a FluxIR step: 2 encodes of {crop}², decode of a {pixel_crop}² crop "
            f"fwd+bwd (dX), {per_chip}/chip, bf16")
    return [{"figure": f"{what}: XLA est. (estimate)", "value": row["xla_seconds"] * 1e3, "unit": "ms", "repeats": 1},
            {"figure": f"{what}: FLOP bound", "value": row["flop_bound_seconds"] * 1e3, "unit": "ms", "repeats": 1},
            {"figure": f"{what}: share of peak (libtpu estimate)", "value": 100 * row["share_of_peak"], "unit": "%",
             "repeats": 1}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerator", default="v6e-8")
    ap.add_argument("--examples-per-chip", type=int, default=8)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--pixel-crop", type=int, default=256)
    ap.add_argument("--vae", default="flux", choices=sorted(AE_PRESETS))
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny VAE at 64² on v5p-8, 1 per chip")
    args = ap.parse_args(argv)
    if args.quick:
        args.accelerator, args.vae, args.crop, args.pixel_crop, args.examples_per_chip = "v5p-8", "tiny", 64, 32, 1
    jax.config.update("jax_enable_compilation_cache", False)
    row = measure(args.accelerator, args.vae, args.examples_per_chip, args.crop, args.pixel_crop)
    append_record("tpu_vae_cost.jsonl", {
        "benchmark": "TPU VAE cost in a FluxIR step (compile-only)", "accelerator": args.accelerator, "vae": args.vae,
        "crop": args.crop, "pixel_crop": args.pixel_crop, "examples_per_chip": args.examples_per_chip, "row": row,
        "figures": figures(args.accelerator, args.vae, args.examples_per_chip, args.crop, args.pixel_crop, row),
        **libtpu_env.compile_settings(tpu_topology.topology_devices(args.accelerator)[0].device_kind), "cpu": cpu_name(), "cores": os.cpu_count(),
        "device": "no TPU attached: libtpu compile-only on this CPU machine", "date": time.strftime("%Y-%m-%d")})
    print(f"{args.accelerator} VAE: {row['xla_seconds'] * 1e3:.2f} ms est., FLOP bound "
          f"{row['flop_bound_seconds'] * 1e3:.2f} ms ({100 * row['share_of_peak']:.1f}% of peak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
