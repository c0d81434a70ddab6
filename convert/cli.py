"""Command lines: `fluxir convert`, `fluxir compare`, `fluxir encode-prompts`.

`register_convert`, `register_compare` and `register_encode_prompts` each add one subcommand
(entry points of the `fluxir.commands` group in setup.cfg). Heavy libraries are imported only
when a command runs.
"""
from __future__ import annotations

import argparse
import pathlib

from fluxir_jax.errors import UserError


def _add_text_len(p: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """`--text-len L` (and the former spelling `--t5-len`, accepted but not listed)."""
    p.add_argument("--text-len", type=int, default=default, metavar="L", dest="text_len", help=help)
    p.add_argument("--t5-len", type=int, dest="text_len", help=argparse.SUPPRESS)


def _axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return axes


# ----------------------------------------------------------------------------- convert


def run_convert(args) -> int:
    from .convert import convert

    convert(
        args.sources, args.out, fmt=args.format, dtype=args.dtype, overwrite=args.overwrite,
        axes_dim=args.axes_dim, vae_norm_groups=args.vae_norm_groups, t5=args.t5, clip=args.clip,
        text_len=args.text_len, text_dtype=args.text_dtype, progress=not args.no_progress,
    )
    return 0


def register_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert FLUX.1 PyTorch checkpoints (BFL files, diffusers folders) to Orbax",
        description="Convert FLUX.1 checkpoints to one Orbax checkpoint directory (transformer + vae + "
                    "config.json + text/empty.npz). Sources: flux1-*.safetensors, ae.safetensors, diffusers "
                    "transformer/ and vae/ folders, or a diffusers pipeline root holding both.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="BFL .safetensors file or diffusers folder")
    p.add_argument("-o", "--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--format", default="auto", choices=("auto", "bfl", "diffusers"), help="force the source layout")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="stored dtype (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--axes-dim", type=_axes, default=None, metavar="A,B,C",
                   help="RoPE axes (default: diffusers config.json, else BFL's proportions of the head dim)")
    p.add_argument("--vae-norm-groups", type=int, default=None, metavar="N",
                   help="VAE GroupNorm groups (default: config.json norm_num_groups, else 32)")
    p.add_argument("--t5", default=None, metavar="DIR", help="local T5 encoder folder (transformers, safetensors)")
    p.add_argument("--clip", default=None, metavar="DIR", help="local CLIP text encoder folder")
    _add_text_len(p, None, "text length: T5 tokens of the empty prompt (default 512 dev / 256 schnell)")
    p.add_argument("--text-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the text encoders run in")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)


# ----------------------------------------------------------------------------- compare


def run_compare(args) -> int:
    from .compare import compare

    if len(args.paths) < 2:
        raise UserError("compare needs SOURCE... CKPT: at least one source and the converted checkpoint")
    return compare(args.paths[:-1], args.paths[-1], tol=args.tol, layers=args.layers, seed=args.seed,
                   fmt=args.format, axes_dim=args.axes_dim, vae_norm_groups=args.vae_norm_groups,
                   adapter=args.adapter, adapter_steps=args.adapter_steps, restore_tol=args.restore_tol)


def register_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="check a converted checkpoint against the PyTorch source, block by block",
        description="Run the PyTorch reference (diffusers FluxTransformer2DModel / AutoencoderKL built from "
                    "SOURCE) and the converted Flax models on the same seeded random inputs in float32 and "
                    "print relative errors per block; exit 1 if any exceeds --tol.",
    )
    p.add_argument("paths", nargs="+", metavar="SOURCE... CKPT", help="source file(s)/folder(s), then the checkpoint")
    p.add_argument("--tol", type=float, default=1e-4, help="largest acceptable relative error (default 1e-4)")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="compare only the first N double and N single blocks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--format", default="auto", choices=("auto", "bfl", "diffusers"), help="force the source layout")
    p.add_argument("--axes-dim", type=_axes, default=None, metavar="A,B,C", help="RoPE axes, as given to convert")
    p.add_argument("--vae-norm-groups", type=int, default=None, metavar="N",
                   help="VAE GroupNorm groups, as given to convert")
    p.add_argument("--adapter", default=None, metavar="ADAPTER",
                   help="also compare a FluxIR adapter (exported .safetensors or Orbax adapter folder) with its "
                        "PyTorch twin: one step per block and a whole restoration (needs transformer and VAE sources)")
    p.add_argument("--adapter-steps", type=int, default=4, metavar="N", help="Euler steps of the compared restoration (default 4)")
    p.add_argument("--restore-tol", type=float, default=1e-3, help="largest acceptable relative error of the restoration (default 1e-3)")
    p.set_defaults(func=run_compare)


# ----------------------------------------------------------------------------- encode-prompts


def run_encode_prompts(args) -> int:
    import numpy as np

    from fluxir_jax import fileio

    from . import text

    path = pathlib.Path(args.prompts)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    try:
        prompts = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not UTF-8 text") from None
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (one per line)")
    out = pathlib.Path(args.out).absolute()
    fileio.check_output(out, args.overwrite)
    if args.text_len <= 0:
        raise UserError(f"--text-len must be positive, got {args.text_len}")
    emb = text.encode(prompts, t5_dir=args.t5, clip_dir=args.clip, text_len=args.text_len, dtype=args.text_dtype)
    with fileio.atomic_file(out, args.overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, txt=emb["txt"], y=emb["y"], prompts=np.array(prompts, dtype=str))
    print(f"wrote {out}: {len(prompts)} prompts, txt {list(emb['txt'].shape)}, y {list(emb['y'].shape)}")
    return 0


def register_encode_prompts(sub) -> None:
    p = sub.add_parser(
        "encode-prompts", help="encode prompts with local T5/CLIP folders to an .npz",
        description="Encode each line of --prompts with T5 (hidden states [L, d]) and CLIP (pooled [d]) as "
                    "FLUX does; writes an .npz with arrays txt [N, L, d] (T5), y [N, d] (CLIP pooled), prompts [N].",
    )
    p.add_argument("--t5", required=True, metavar="DIR", help="local T5 encoder folder (transformers, safetensors)")
    p.add_argument("--clip", required=True, metavar="DIR", help="local CLIP text encoder folder")
    p.add_argument("--prompts", required=True, metavar="FILE", help="UTF-8 text file, one prompt per line")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="output .npz")
    _add_text_len(p, 512, "text length: T5 tokens per prompt (512 dev, 256 schnell)")
    p.add_argument("--text-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the text encoders run in")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_encode_prompts)
