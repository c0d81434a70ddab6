"""`fluxir export-adapter`: an Orbax FluxIR adapter checkpoint -> one .safetensors file."""
from __future__ import annotations

import pathlib

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError
from fluxir_jax.fileio import format_size


def base_config(base: str):
    """(FluxConfig, text length or None) of `--base`: a converted checkpoint directory (its
    config.json, and the length of its stored empty-prompt embeddings), a FluxConfig YAML file,
    or a preset name."""
    from fluxir_jax import checkpoint
    from fluxir_jax.models import presets
    from fluxir_jax.models.flux import FluxConfig

    path = pathlib.Path(base)
    if path.is_dir():
        cfg = checkpoint.read_config(path)
        text = (cfg.get("text") or {}).get("empty") or {}
        return checkpoint.flux_config(path), text.get("text_len")
    if base.endswith((".yaml", ".yml")):
        return config_io.load(FluxConfig, base), None
    return presets.get(base), None


def run(args) -> int:
    from fluxir_jax.models.adapter import check_compatible
    from fluxir_jax.models.adapter_io import export_safetensors, load_adapter, to_named_tensors

    adapter = load_adapter(args.checkpoint)
    if args.base:
        base, text_len = base_config(args.base)
        check_compatible(adapter, base, args.text_len if args.text_len is not None else text_len)
    elif args.text_len is not None and args.text_len != adapter.config.text_len:
        raise UserError(f"adapter was built for text length {adapter.config.text_len}, not {args.text_len}")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite)")
    export_safetensors(adapter, out)
    tensors = to_named_tensors(adapter)
    n = sum(v.size for v in tensors.values())
    print(f"wrote {out} ({n / 1e6:.1f} M parameters, {len(tensors)} tensors, {format_size(out.stat().st_size)})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export-adapter", help="export a FluxIR adapter checkpoint to .safetensors",
                       description="Write the adapter's parameters under stable PyTorch-layout names, with its "
                                   "configs in the file's metadata (see fluxir_jax.models.adapter_io).")
    p.add_argument("checkpoint", help="Orbax adapter checkpoint directory (adapter.json + params/)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--base", help="check against this base: a converted checkpoint directory, a preset name "
                                  "(flux-dev) or a FluxConfig YAML file")
    p.add_argument("--text-len", type=int, help="check against this text-embedding length (512 dev, 256 schnell)")
    p.set_defaults(func=run)
