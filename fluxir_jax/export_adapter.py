"""`fluxir export-adapter`: an Orbax FluxIR adapter checkpoint -> one .safetensors file."""
from __future__ import annotations

import pathlib

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError


def run(args) -> int:
    from fluxir_jax.models.adapter import check_compatible
    from fluxir_jax.models.adapter_io import export_safetensors, load_adapter, to_named_tensors
    from fluxir_jax.models.flux import FluxConfig

    adapter = load_adapter(args.checkpoint)
    if args.base:
        from fluxir_jax.models import presets

        base = (config_io.load(FluxConfig, args.base) if args.base.endswith((".yaml", ".yml")) else presets.get(args.base))
        check_compatible(adapter, base, args.text_len)
    elif args.text_len is not None and args.text_len != adapter.config.text_len:
        raise UserError(f"adapter was built for text length {adapter.config.text_len}, not {args.text_len}")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite)")
    export_safetensors(adapter, out)
    n = sum(v.size for v in to_named_tensors(adapter).values())
    print(f"wrote {out} ({n / 1e6:.1f} M parameters, {len(to_named_tensors(adapter))} tensors)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export-adapter", help="export a FluxIR adapter checkpoint to .safetensors",
                       description="Write the adapter's parameters under stable PyTorch-layout names, with its "
                                   "configs in the file's metadata (see fluxir_jax.models.adapter_io).")
    p.add_argument("checkpoint", help="Orbax adapter checkpoint directory (adapter.json + params/)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--base", help="check against this base: a preset name (flux-dev) or a FluxConfig YAML file")
    p.add_argument("--text-len", type=int, help="check against this text-embedding length (512 dev, 256 schnell)")
    p.set_defaults(func=run)
