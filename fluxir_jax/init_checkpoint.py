"""`fluxir init PRESET -o DIR`: a checkpoint of a model preset with random weights.

Writes exactly what `fluxir convert` writes (`transformer/`, `vae/`, `config.json`,
`text/empty.npz`; see `fluxir_jax.checkpoint`), with random values instead of converted ones,
so tests, the demo, benchmarks and `--compile-only` runs can use the real code paths without
the real weights. The VAE is the FLUX VAE's shape for flux-dev / flux-schnell and a small
one for `small` / `tiny` (`VAE_FOR_PRESET`). config.json records the weights and the text
embeddings as random (`"random": {...}`, `text.empty.random`), and every loader says so once.

Values (float32, then cast to the stored dtype): kernels N(0, 1/fan_in) (fan_in = all axes
but the output axis, per layer), biases N(0, 0.02^2), norm scales 1 + N(0, 0.02^2); the text
embeddings N(0, 1). Every piece (one layer of a stacked parameter, or a whole leaf) draws from
its own numpy Generator seeded by (seed, item, parameter path, layer), so the written values
depend only on the seed, not on the writing order or the number of writer threads, and the
12B-parameter presets are generated and written one layer at a time (host memory stays at a
few layers; flux-dev writes 23.8 GB).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import pathlib
import threading
from typing import Callable

import numpy as np

from fluxir_jax.errors import UserError

VAE_FOR_PRESET = {"tiny": "tiny", "small": "small", "flux-dev": "flux", "flux-schnell": "flux"}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
_STACKED = ("double_blocks", "single_blocks")
BIAS_STD = 0.02
SCALE_STD = 0.02


def default_text_len(guidance_embed: bool) -> int:
    """BFL's T5 length (as `fluxir convert`): 512 for guidance-distilled (dev-style) models, 256 otherwise."""
    return 512 if guidance_embed else 256


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    return np.dtype(name)


def _rng(seed: int, *name) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(n) for n in name).encode()).digest()
    words = [int(w) for w in np.frombuffer(digest, np.uint32)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *words])))


class _Scratch(threading.local):
    """Per-thread float32 / uint32 work buffers, reused: fresh multi-MB arrays cost a page fault per
    page, which on this project's VMs is most of the time (measured: 5 s to draw 66M normals into a
    new array, 1.4 s into a reused one)."""

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        buf = getattr(self, name, None)
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype)
            setattr(self, name, buf)
        return buf[:n]


_SCRATCH = _Scratch()
_CHUNK = 1 << 22


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 `x` (overwritten) as a new `dtype` array; bfloat16 by round-to-nearest-even on the bits."""
    if dtype.name == "bfloat16":
        u = x.reshape(-1).view(np.uint32)
        out = np.empty(u.size, np.uint16)
        for i in range(0, u.size, _CHUNK):  # in chunks: the carry buffer stays small
            part = u[i:i + _CHUNK]
            carry = _SCRATCH.get("carry", part.size, np.uint32)
            np.right_shift(part, 16, out=carry)
            carry &= 1
            carry += 0x7FFF
            part += carry
            part >>= 16
            np.copyto(out[i:i + _CHUNK], part, casting="unsafe")
        return out.view(dtype).reshape(x.shape)
    return x.astype(dtype)


def random_piece(seed: int, item: str, path: tuple, layer: int | None, shape: tuple, dtype) -> np.ndarray:
    """The values of one piece: parameter `path` of `item` (layer `layer` of a stacked one), `shape` per piece.

    Returns a new array (the writer keeps it until written).
    """
    dtype = np.dtype(dtype)
    rng = _rng(seed, item, *path, "layer" if layer is None else layer)
    n = int(np.prod(shape))
    x = np.empty(shape, np.float32) if dtype == np.float32 else _SCRATCH.get("f32", n, np.float32).reshape(shape)
    rng.standard_normal(out=x, dtype=np.float32)
    name = str(path[-1])
    if name == "kernel":
        x *= np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))
    elif name == "scale":
        x *= np.float32(SCALE_STD)
        x += np.float32(1.0)
    else:
        x *= np.float32(BIAS_STD)
    return x if dtype == np.float32 else _to_dtype(x, dtype)


@dataclasses.dataclass
class InitPlan:
    """What `fluxir init` writes: the lazy trees, configs, text arrays and byte counts."""

    preset: str
    seed: int
    flux_config: object
    vae_config: object
    trees: dict  # item -> nested dict of checkpoint_writer.LazyArray
    dtypes: dict  # item -> {stored dtype name: parameter count}
    text: dict  # txt [text_len, context], y [vec], computed, random

    @property
    def nbytes(self) -> int:
        from fluxir_jax.checkpoint_writer import iter_leaves

        return sum(leaf.nbytes for tree in self.trees.values() for leaf in iter_leaves(tree))


def _lazy_tree(model_fn: Callable, item: str, seed: int, dtype) -> tuple[dict, dict]:
    from flax import nnx

    from fluxir_jax import chunking
    from fluxir_jax.checkpoint_writer import LazyArray, Piece

    model = nnx.eval_shape(model_fn)
    axes = chunking.model_axes(model)
    tree: dict = {}
    counts: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, shape = tuple(str(p) for p in path), tuple(var.shape)
        stacked = path[0] in _STACKED
        if stacked:
            pieces = [Piece(i, functools.partial(random_piece, seed, item, path, i, shape[1:], dtype))
                      for i in range(shape[0])]
        else:
            pieces = [Piece(None, functools.partial(random_piece, seed, item, path, None, shape, dtype))]
        leaf = LazyArray(shape, dtype, pieces, stacked, axes=axes[path])
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
        counts[leaf.dtype.name] = counts.get(leaf.dtype.name, 0) + leaf.size
    return tree, counts


def plan(preset: str, seed: int = 0, *, dtype: str | None = None, text_len: int | None = None) -> InitPlan:
    """Configs and lazy random trees for `preset` (nothing is generated until written)."""
    from flax import nnx

    from fluxir_jax.models import presets
    from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder
    from fluxir_jax.models.flux import Flux

    if preset not in VAE_FOR_PRESET:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(sorted(VAE_FOR_PRESET))})")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected bf16 or fp32")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    flux_cfg = presets.get(preset)
    if dtype is not None:
        flux_cfg = dataclasses.replace(flux_cfg, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    vae_cfg = AE_PRESETS[VAE_FOR_PRESET[preset]]
    length = default_text_len(flux_cfg.guidance_embed) if text_len is None else int(text_len)
    if length <= 0:
        raise UserError(f"--text-len must be positive, got {length}")
    trees, dtypes = {}, {}
    trees["transformer"], dtypes["transformer"] = _lazy_tree(lambda: Flux(flux_cfg, rngs=nnx.Rngs(0)), "transformer",
                                                             seed, _np_dtype(flux_cfg.param_dtype))
    trees["vae"], dtypes["vae"] = _lazy_tree(lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0)), "vae", seed,
                                             _np_dtype(vae_cfg.param_dtype))
    text = {
        "txt": _rng(seed, "text", "t5").standard_normal((length, flux_cfg.context_in_dim), dtype=np.float32),
        "y": _rng(seed, "text", "clip").standard_normal((flux_cfg.vec_in_dim,), dtype=np.float32),
        "computed": np.array(False),
        "random": np.array(True),
    }
    return InitPlan(preset, int(seed), flux_cfg, vae_cfg, trees, dtypes, text)


def config_json(p: InitPlan) -> dict:
    """config.json for plan `p`: the keys `fluxir convert` writes, plus `random`."""
    import orbax.checkpoint as ocp

    import fluxir_jax
    from fluxir_jax.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    from fluxir_jax.checkpoint_writer import TEXT_FILE
    from fluxir_jax.config import to_dict

    note = f"random: written by fluxir init {p.preset} --seed {p.seed}, not an encoding of any prompt"
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "items": sorted(p.trees),
        "transformer": to_dict(p.flux_config),
        "vae": to_dict(p.vae_config),
        "stored_dtypes": p.dtypes,
        "sources": [],
        "random": {"weights": True, "text": True, "preset": p.preset, "vae_preset": VAE_FOR_PRESET[p.preset],
                   "seed": p.seed, "command": f"fluxir init {p.preset} --seed {p.seed}"},
        "text": {"empty": {"computed": False, "random": True, "note": note, "file": TEXT_FILE, "prompt": "",
                           "text_len": int(p.text["txt"].shape[0]), "txt_shape": list(p.text["txt"].shape),
                           "y_shape": list(p.text["y"].shape)}},
        "converter": {"fluxir_jax": fluxir_jax.__version__, "orbax_checkpoint": ocp.__version__,
                      "dtype_option": "preset", "command": "fluxir init"},
    }


def init_checkpoint(preset: str, out, *, seed: int = 0, dtype: str | None = None, text_len: int | None = None,
                    overwrite: bool = False, progress: bool | None = None, log: Callable[[str], None] = print) -> dict:
    """Write a random checkpoint of `preset` at `out` (atomic). Returns the config.json content.

    `progress` None: a progress bar when the checkpoint is over 1 GiB.
    """
    from fluxir_jax import checkpoint_writer

    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    p = plan(preset, seed, dtype=dtype, text_len=text_len)
    config = config_json(p)
    if progress is None:
        progress = p.nbytes >= 2**30
    total, dt = checkpoint_writer.write_checkpoint(out, p.trees, config, p.text, progress=progress, desc="init")
    log(f"wrote {out}: preset {preset} with RANDOM weights and text embeddings (seed {seed}), "
        f"{_size(total)} in {dt:.1f} s")
    return config


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    init_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype, text_len=args.text_len,
                    overwrite=args.overwrite, progress=False if args.no_progress else None)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "init", help="write a checkpoint of a model preset with random weights",
        description="Write a checkpoint in the format `fluxir convert` writes (transformer, VAE, config.json, "
                    "text/empty.npz) for a model preset, with random weights and random empty-prompt "
                    "embeddings, recorded as random. For tests, demos, benchmarks; its samples are noise.",
    )
    p.add_argument("preset", choices=sorted(VAE_FOR_PRESET), help="model preset (VAE: the FLUX VAE for "
                   "flux-dev/flux-schnell, a small one for small/tiny)")
    p.add_argument("-o", "--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same values (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stored dtype of the transformer (default: the preset's)")
    p.add_argument("--text-len", type=int, default=None, metavar="L",
                   help="length of the random T5 embeddings (default 512 with guidance, else 256, as convert)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one for checkpoints over 1 GiB)")
    p.set_defaults(func=run)
