"""`fluxir info`: versions, devices, and the model presets with their parameter counts."""
from __future__ import annotations

import argparse


def count_flux_params(config) -> int:
    """Parameter count from abstract shapes only (nothing is allocated)."""
    import jax
    from flax import nnx

    from fluxir_jax.models.flux import Flux

    abstract = nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def run(args: argparse.Namespace) -> int:
    import jax

    import fluxir_jax
    from fluxir_jax.models import presets

    print(f"fluxir-jax {fluxir_jax.__version__}  jax {jax.__version__}  backend {jax.default_backend()}  devices {jax.device_count()}")
    names = [args.model] if args.model else presets.names()
    for name in names:
        cfg = presets.get(name)
        n = count_flux_params(cfg)
        print(
            f"  {name:13s} {n / 1e6:10.1f} M params  hidden {cfg.hidden_size}, heads {cfg.num_heads}, "
            f"blocks {cfg.depth}+{cfg.depth_single_blocks}, guidance {'yes' if cfg.guidance_embed else 'no'}"
        )
        if cfg.hidden_size >= 256:
            from fluxir_jax.models.adapter import FluxIRConfig, count_params

            text_len = 512 if cfg.guidance_embed else 256
            n_ad = count_params(FluxIRConfig(text_len=text_len), cfg)
            print(f"  {'':13s} {n_ad / 1e6:10.1f} M params  FluxIR adapter (default FluxIRConfig, text length {text_len})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions, devices, model presets and parameter counts")
    p.add_argument("--model", help="only this preset (e.g. flux-dev)")
    p.set_defaults(func=run)
