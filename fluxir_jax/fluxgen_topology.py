"""`fluxir gen CONFIG --topology NAME`: compile the generation program (sample + decode) for a TPU slice.

Nothing is generated and no weights are read: the models come from the checkpoint's configs as
abstract shapes, and the program `fluxgen.make_program` builds (sharded mode: the global batch
over the slice's chips, parameters FSDP-sharded as `infer.Engine` does) is compiled by libtpu's
compiler from this machine. The record (see docs/tpu.md) goes to `<out>/compile.json` and is
printed as the last line; exit 2 when it does not fit the chips' HBM.
"""
from __future__ import annotations

import pathlib

import numpy as np

from fluxir_jax.errors import UserError

KNOBS = "batch_size (fewer images per chip), dtype=bfloat16, a bigger slice"


def abstract_models(base: str, dtype: str = ""):
    """(graphdefs, abstract params {base, vae, txt, y}, flux config, vae config) of a checkpoint, no weights read."""
    import jax
    from flax import nnx

    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax.models.autoencoder import AutoEncoder
    from fluxir_jax.models.flux import Flux

    if not pathlib.Path(base).is_dir():
        raise UserError(f"base: {base!r} is not a checkpoint directory")
    over = {"dtype": dtype} if dtype else {}
    flux_cfg, vae_cfg = ckpt.flux_config(base, **over), ckpt.autoencoder_config(base, **over)
    text = ckpt.load_text_embeddings(base)
    graphdefs, params = {}, {}
    for name, make in (("base", lambda: Flux(flux_cfg, rngs=nnx.Rngs(0))), ("vae", lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0)))):
        graphdefs[name], params[name] = nnx.split(nnx.eval_shape(make))
    for key in ("txt", "y"):
        params[key] = jax.ShapeDtypeStruct(np.shape(text[key]), np.float32)
    return graphdefs, params, flux_cfg, vae_cfg


def compile_gen(cfg, topology: str) -> dict:
    import jax

    from fluxir_jax import aot, fluxgen, tpu_topology
    from fluxir_jax.infer import MeshShape

    tpu_topology.parse_accelerator(topology)  # an unknown name fails before anything is read
    graphdefs, params, flux_cfg, vae_cfg = abstract_models(cfg.base, cfg.dtype)
    program = fluxgen.make_program(graphdefs, flux_cfg, vae_cfg, cfg, per_example=False)
    batch = {"seed": jax.ShapeDtypeStruct((cfg.batch_size,), np.uint32)}
    return aot.compile_sharded_program(
        program, params, batch, topology, MeshShape(),
        f"gen program: {cfg.steps} Euler steps at {cfg.resolution}^2 + VAE decode, global batch {cfg.batch_size}.",
        program="gen", base=cfg.base, batch_size=cfg.batch_size, resolution=cfg.resolution, steps=cfg.steps, knobs=KNOBS)


def run(cfg, topology: str) -> int:
    from fluxir_jax import aot

    record = compile_gen(cfg, topology)
    return aot.emit_record(record, pathlib.Path(cfg.out) / "compile.json" if cfg.out else None, "gen")
