"""`fluxir restore --checkpoint C --adapter A --topology NAME`: compile the restore program for a TPU slice.

The program one bucket runs (VAE encode of the upsampled LQ, the FluxIR-controlled Euler steps,
VAE decode, colour fix; `restore._make_program`) for a square LQ of `--lq-size` pixels, with
`batch_size` images per chip, compiled by libtpu's compiler from abstract shapes: no image is
read and no weights are loaded. The record (docs/tpu.md) is printed as the last line and written
to `<out>/compile.json` when `-o` is given; exit 2 when it does not fit the chips' HBM.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import numpy as np

from fluxir_jax.errors import UserError

KNOBS = "batch_size (images per chip), tile.size (tiles bound the per-program size), dtype=bfloat16, a bigger slice"


def abstract_adapter(directory: str, base_config):
    """(graphdef, abstract state) of an adapter checkpoint from its adapter.json only."""
    from flax import nnx

    from fluxir_jax.models import adapter_io
    from fluxir_jax.models.adapter import FluxIR, check_compatible

    meta_file = pathlib.Path(directory) / "adapter.json"
    if not meta_file.is_file():
        raise UserError(f"{directory} is not a FluxIR adapter checkpoint (no adapter.json)")
    cfg, base_cfg = adapter_io._configs_from(json.loads(meta_file.read_text()), str(directory))
    abstract = nnx.eval_shape(lambda: FluxIR(cfg, base_cfg, rngs=nnx.Rngs(0)))
    check_compatible(abstract, base_config)
    return nnx.split(abstract)


def compile_restore(checkpoint: str, adapter: str, cfg, topology: str, lq_size: int) -> dict:
    import jax

    from fluxir_jax import aot, restore, tpu_topology
    from fluxir_jax.fluxgen_topology import abstract_models

    tpu_topology.parse_accelerator(topology)  # an unknown name fails before anything is read
    graphdefs, params, base_cfg, vae_cfg = abstract_models(checkpoint, cfg.dtype)
    vae_cfg = dataclasses.replace(vae_cfg, tile_size=cfg.tile.size, tile_overlap=cfg.tile.overlap)
    graphdefs["adapter"], params["adapter"] = abstract_adapter(adapter, base_cfg)
    if lq_size < 1:
        raise UserError(f"--lq-size {lq_size}: must be >= 1")
    h, w = restore.output_size(lq_size, lq_size, cfg)
    bucket = (restore.padded(h), restore.padded(w))
    shim = types.SimpleNamespace(config=cfg, _graphdefs=graphdefs, base_config=base_cfg, vae_config=vae_cfg)
    tiled = cfg.tile.force or max(bucket) > cfg.tile.size
    program = restore._make_program(shim, bucket, tiled)
    sizes = cfg.mesh.resolve(len(tpu_topology.topology_devices(topology)))
    n = sizes[0] * sizes[1] * cfg.batch_size
    batch = {"lq": jax.ShapeDtypeStruct((n, *bucket, 3), np.float32), "seed": jax.ShapeDtypeStruct((n,), np.uint32)}
    return aot.compile_sharded_program(
        program, params, batch, topology, cfg.mesh,
        f"restore program: {lq_size}^2 LQ -> {bucket[0]}x{bucket[1]} ({'tiled' if tiled else 'one tile'}), "
        f"{cfg.steps} Euler steps, VAE encode + decode, colour fix, {cfg.batch_size} per chip.",
        program="restore", bucket=list(bucket), tiled=tiled, steps=cfg.steps, batch_size=n, knobs=KNOBS)


def run(args, cfg) -> int:
    from fluxir_jax import aot

    for flag in ("checkpoint", "adapter"):
        if not pathlib.Path(getattr(args, flag)).is_dir():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such folder")
    record = compile_restore(args.checkpoint, args.adapter, cfg, args.topology, args.lq_size)
    return aot.emit_record(record, pathlib.Path(args.out) / "compile.json" if args.out else None, "restore")
