"""`fluxir convert`: FLUX.1 PyTorch checkpoints (BFL files, diffusers folders) -> one Orbax checkpoint.

Output directory (written under a hidden temporary name next to it, renamed when complete):

    config.json        resolved model configs, source files (names, sizes), stored dtypes,
                       provenance of the text embeddings
    transformer/       Orbax PyTree item (OCDBT, zarr3): the `Flux` NNX Param tree, BFL names,
                       blocks stacked on a leading layer axis (chunks: `fluxir_jax.chunking`)
    vae/               Orbax PyTree item: the `AutoEncoder` NNX Param tree
    text/empty.npz     empty-prompt `t5` [L, d] and CLIP pooled `clip` [d] (float32); zeros,
                       flagged as such, when no --t5/--clip folders were given
    (plus Orbax's _CHECKPOINT_METADATA)

Param keys are the NNX paths joined per level, digits as strings
(`double_blocks/img_mlp/0/kernel`). Read them back with `fluxir_jax.checkpoint`.

Before a byte is written, the whole conversion is planned from the safetensors headers:
the model config is inferred from shapes, every expected tensor is matched to a source
tensor (missing, unexpected and wrongly shaped tensors are user errors naming the key), and
truncated files are caught by checking header offsets against file sizes. Writing then streams
one tensor (one layer of a stacked parameter) at a time; see `fluxir_jax.checkpoint_writer`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from fluxir_jax import checkpoint_writer as writer
from fluxir_jax.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from fluxir_jax.errors import UserError
from fluxir_jax.fileio import format_size

from . import flux_map, formats, vae_map

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
TEXT_FILE = writer.TEXT_FILE


# ----------------------------------------------------------------------------- array helpers


def _transpose_into(x: np.ndarray, out: np.ndarray) -> None:
    """out[...] = x.T, a band of `rows` rows of x at a time.

    numpy's own transposing copy is cache-hostile (~0.7 GB/s for bf16 here); bands of 16-24
    rows keep the reads and the scattered writes in L1 (~3-4.7 GB/s on the FLUX shapes, against
    ~1.5 GB/s for 256x256 tiles). Wide rows (>= 8 KiB) alias in the cache with more rows.
    """
    rows = 16 if x.shape[1] * x.itemsize >= 8192 else 24
    for i in range(0, x.shape[0], rows):
        out[:, i:i + rows] = x[i:i + rows].T


def _finish(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`y` (any strides, e.g. a transposed view of a read buffer) as a new C-contiguous `dtype` array.

    2-D transposed views (Linear W.T) take the tiled transpose; bf16 -> fp32 is exact bit
    placement (much faster than ml_dtypes' cast); other casts round through numpy.
    """
    out = np.empty(y.shape, dtype)
    src, dst, shift = y, out, False
    if y.dtype.name == "bfloat16" and dtype == np.float32:
        src, dst, shift = y.view(np.uint16), out.view(np.uint32), True
    elif y.dtype == dtype and y.dtype.itemsize in (1, 2, 4, 8):
        src, dst = y.view(f"u{y.dtype.itemsize}"), out.view(f"u{y.dtype.itemsize}")
    if y.ndim == 2 and not y.flags.c_contiguous and y.T.flags.c_contiguous:
        _transpose_into(src.T, dst)  # src.T is the C-contiguous array that was read
    else:
        np.copyto(dst, src, casting="unsafe")
    if shift:
        dst <<= 16
    return out


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Plan:
    """Everything needed to write one item: the lazy tree, its config, byte count, dtypes."""

    name: str
    config: object
    tree: dict
    nbytes: int
    dtypes: dict[str, int]  # stored dtype name -> number of parameters
    settings: dict = dataclasses.field(default_factory=dict)  # setting -> {"value", "from"} (not in the shapes)

    @property
    def main_dtype(self) -> str:
        return max(self.dtypes, key=self.dtypes.get)


def _nest(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = leaf
    return tree


def _abstract_params(model_fn) -> tuple[dict[tuple, tuple[int, ...]], dict[tuple, tuple]]:
    """({path: shape}, {path: logical axes}) of a model's Params (the axes choose the chunking)."""
    from flax import nnx

    from fluxir_jax import chunking

    model = nnx.eval_shape(model_fn)
    shapes = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    axes = chunking.model_axes(model)
    return shapes, {p: axes[tuple(str(x) for x in p)] for p in shapes}


def _check_keys(v: formats.BflView, expected: dict[str, tuple], name_for_missing: Callable[[str], str]) -> None:
    """Strict key and shape match of a source against the expected BFL keys and shapes."""
    src = v.source.path
    for key in v.keys():
        if key not in expected:
            raise UserError(f"{src}: unexpected key {v.entries[key].origin!r} (not a parameter of the inferred model)")
    for key in expected:
        if key not in v:
            raise UserError(f"{src}: missing key {name_for_missing(key)!r}")
    for key, want in expected.items():
        got = v.entries[key].shape
        if tuple(got) != tuple(want):
            raise UserError(f"{src}: tensor {v.entries[key].origin!r} has shape {list(got)}, expected {list(want)}")


def _leaf(shape, dtype, pieces, stacked, axes) -> writer.LazyArray:
    return writer.LazyArray(shape, dtype, pieces, stacked, axes=axes)


def _produce_flux(v: formats.BflView, key: str, path: tuple, dtype: np.dtype, scratch: writer.ScratchBuffers) -> np.ndarray:
    got, _, y = flux_map.bfl_to_flax(key, v.read(key, scratch))
    if got != path:
        raise RuntimeError(f"{key} maps to {got}, planned for {path}")
    return _finish(y, dtype)


def _produce_vae(v: formats.BflView, key: str, dtype: np.dtype, scratch: writer.ScratchBuffers) -> np.ndarray:
    return _finish(vae_map.bfl_to_nnx(key, v.read(key, scratch))[1], dtype)


def plan_transformer(v: formats.BflView, config, dtype: str | None, scratch: writer.ScratchBuffers) -> Plan:
    """Validate a transformer source against `config` and build its lazy Param tree."""
    from fluxir_jax.models.flux import Flux
    from flax import nnx

    params, axes = _abstract_params(lambda: Flux(config, rngs=nnx.Rngs(0)))
    expected: dict[str, tuple] = {}
    where: dict[tuple, list[str]] = {}
    for path, shape in params.items():
        stacked = path[0] in ("double_blocks", "single_blocks")
        layers = range(shape[0]) if stacked else [None]
        per_shape = shape[1:] if stacked else shape
        for layer in layers:
            key, dummy = flux_map.flax_to_bfl(path, formats.shape_only(per_shape), layer)
            expected[key] = dummy.shape
            where.setdefault(path, []).append(key)

    def missing_name(key: str) -> str:
        if v.source.layout == "diffusers":
            return " + ".join(flux_map.diffusers_sources(key))
        return key

    _check_keys(v, expected, missing_name)
    flat, counts, total = {}, {}, 0
    for path, shape in params.items():
        keys = where[path]
        out_dtype = np.dtype(dtype) if dtype else v.entries[keys[0]].dtype
        stacked = len(keys) > 1 or path[0] in ("double_blocks", "single_blocks")

        pieces = [writer.Piece(i if stacked else None, functools.partial(_produce_flux, v, k, path, out_dtype, scratch))
                  for i, k in enumerate(keys)]
        flat[path] = _leaf(shape, out_dtype, pieces, stacked, axes[path])
        counts[out_dtype.name] = counts.get(out_dtype.name, 0) + flat[path].size
        total += flat[path].nbytes
    return Plan("transformer", config, _nest(flat), total, counts)


def plan_vae(v: formats.BflView, config, dtype: str | None, scratch: writer.ScratchBuffers) -> Plan:
    """Validate a VAE source against `config` and build its lazy Param tree."""
    from fluxir_jax.models.autoencoder import AutoEncoder
    from flax import nnx

    params, axes = _abstract_params(lambda: AutoEncoder(config, rngs=nnx.Rngs(0)))
    expected: dict[str, tuple] = {}
    key_of: dict[tuple, str] = {}
    for path, shape in params.items():
        key, dummy = vae_map.nnx_to_bfl(path, formats.shape_only(shape))
        expected[key] = dummy.shape
        key_of[path] = key
    levels = len(config.ch_mult)

    def missing_name(key: str) -> str:
        if v.source.layout == "diffusers":
            return vae_map.bfl_to_diffusers(key, formats.shape_only(expected[key]), levels)[0]
        return key

    _check_keys(v, expected, missing_name)
    flat, counts, total = {}, {}, 0
    for path, shape in params.items():
        key = key_of[path]
        out_dtype = np.dtype(dtype) if dtype else v.entries[key].dtype

        flat[path] = _leaf(shape, out_dtype, [writer.Piece(None, functools.partial(_produce_vae, v, key, out_dtype, scratch))],
                           False, axes[path])
        counts[out_dtype.name] = counts.get(out_dtype.name, 0) + flat[path].size
        total += flat[path].nbytes
    return Plan("vae", config, _nest(flat), total, counts)


def plan(sources: dict[str, formats.Source], *, dtype: str | None = None, axes_dim=None,
         vae_norm_groups: int | None = None, scratch: writer.ScratchBuffers | None = None) -> dict[str, Plan]:
    """Plans for every component found, each validated against its inferred config."""
    scratch = scratch or writer.ScratchBuffers()
    plans = {}
    if "transformer" in sources:
        v = formats.view(sources["transformer"])
        origins: dict = {}
        cfg = formats.infer_flux_config(v, axes_dim=axes_dim, origins=origins)
        plans["transformer"] = plan_transformer(v, cfg, dtype, scratch)
        main = plans["transformer"].main_dtype
        plans["transformer"].config = dataclasses.replace(cfg, dtype=main, param_dtype=main)
        plans["transformer"].settings = _settings(cfg, origins, {"axes_dim": "--axes-dim"})
    if "vae" in sources:
        v = formats.view(sources["vae"])
        origins = {}
        cfg = formats.infer_ae_config(v, norm_groups=vae_norm_groups, origins=origins)
        plans["vae"] = plan_vae(v, cfg, dtype, scratch)
        main = plans["vae"].main_dtype
        plans["vae"].config = dataclasses.replace(cfg, param_dtype=main)
        plans["vae"].settings = _settings(cfg, origins, {"norm_groups": "--vae-norm-groups"})
    return plans


def _settings(cfg, origins: dict, flags: dict) -> dict:
    """{setting: {"value", "from"}} for the settings the tensor shapes do not determine."""
    out = {}
    for name, origin in origins.items():
        value = getattr(cfg, name)
        out[name] = {"value": list(value) if isinstance(value, tuple) else value,
                     "from": flags.get(name, origin) if origin == "option" else origin}
    return out


# ----------------------------------------------------------------------------- text


def text_embeddings(flux_config, *, t5=None, clip=None, text_len=None, text_dtype="float32", log=print):
    """(txt [text_len, d], y [d], metadata) for the empty prompt; zeros of the model's shapes without encoders."""
    from . import text

    if (t5 is None) != (clip is None):
        raise UserError("--t5 and --clip go together (FLUX needs both encodings)")
    guidance = flux_config.guidance_embed if flux_config is not None else True
    length = int(text_len) if text_len else text.default_text_len(guidance)
    if length <= 0:
        raise UserError(f"--text-len must be positive, got {length}")
    if t5 is None:
        if flux_config is None:
            return None, None, {"computed": False, "note": "no transformer in this checkpoint: no text embeddings"}
        txt_arr = np.zeros((length, flux_config.context_in_dim), np.float32)
        y_arr = np.zeros((flux_config.vec_in_dim,), np.float32)
        note = ("zeros: no text encoders were given or found; recompute with fluxir convert --t5 T5_DIR --clip CLIP_DIR "
                "(or convert a diffusers pipeline root holding text_encoder/ and text_encoder_2/)")
        log(f"text embeddings: {note}")
        meta = {"computed": False, "note": note}
    else:
        log(f"text embeddings: encoding the empty prompt with T5 ({t5}, length {length}) and CLIP ({clip})")
        txt_arr, y_arr = text.empty(t5, clip, length, text_dtype)
        if flux_config is not None:
            if txt_arr.shape[-1] != flux_config.context_in_dim:
                raise UserError(f"--t5 {t5}: d_model {txt_arr.shape[-1]} does not match the transformer's "
                                f"context_in_dim {flux_config.context_in_dim}")
            if y_arr.shape[-1] != flux_config.vec_in_dim:
                raise UserError(f"--clip {clip}: pooled size {y_arr.shape[-1]} does not match the transformer's "
                                f"vec_in_dim {flux_config.vec_in_dim}")
        meta = {"computed": True, "t5": str(t5), "clip": str(clip), "dtype": text_dtype}
    meta.update(file=TEXT_FILE, prompt="", text_len=length, txt_shape=list(txt_arr.shape), y_shape=list(y_arr.shape))
    return txt_arr, y_arr, meta


# ----------------------------------------------------------------------------- convert


def convert(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, fmt: str = "auto",
            dtype: str | None = None, overwrite: bool = False, axes_dim: Sequence[int] | None = None,
            vae_norm_groups: int | None = None, t5=None, clip=None, text_len: int | None = None,
            text_dtype: str = "float32", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Convert `sources` (BFL files / diffusers folders) into an Orbax checkpoint at `out`.

    Returns the config.json content. Raises UserError (nothing left at `out`) on bad input.
    """
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r}: expected bf16 or fp32")
        dtype = DTYPES[dtype]
    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    found = formats.detect_all(sources, fmt)
    plans = plan(found, dtype=dtype, axes_dim=axes_dim, vae_norm_groups=vae_norm_groups)
    defaulted = []
    for name, p in plans.items():
        s = found[name]
        log(f"{name}: {s.layout} layout, {len(s.tensors.files)} file(s), {format_size(s.tensors.nbytes)} -> "
            f"{format_size(p.nbytes)} {'/'.join(sorted(p.dtypes))}")
        for key, st in p.settings.items():
            if st["from"].startswith("default"):
                value = tuple(st["value"]) if isinstance(st["value"], list) else st["value"]
                flag = {"axes_dim": " (pass --axes-dim A,B,C if the model uses others)",
                        "norm_groups": " (pass --vae-norm-groups N if the model uses another)"}.get(key, "")
                log(f"{name}: {key} = {value}: {st['from']}{flag}")
                defaulted.append(f"{name} {key}")
    flux_cfg = plans["transformer"].config if "transformer" in plans else None
    if t5 is None and clip is None and flux_cfg is not None:
        t5, clip = pipeline_text_encoders(sources, log)
    txt_arr, y_arr, text_meta = text_embeddings(flux_cfg, t5=t5, clip=clip, text_len=text_len,
                                                  text_dtype=text_dtype, log=log)

    from fluxir_jax.config import to_dict
    import orbax.checkpoint as ocp
    import fluxir_jax

    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "items": sorted(plans),
        "transformer": to_dict(plans["transformer"].config) if "transformer" in plans else None,
        "vae": to_dict(plans["vae"].config) if "vae" in plans else None,
        "stored_dtypes": {n: p.dtypes for n, p in plans.items()},
        "settings": {n: p.settings for n, p in plans.items()},
        "sources": [found[n].describe() for n in sorted(found)],
        "text": {"empty": text_meta},
        "converter": {"fluxir_jax": fluxir_jax.__version__, "orbax_checkpoint": ocp.__version__,
                      "dtype_option": dtype or "keep"},
    }

    text = None
    if txt_arr is not None:
        text = dict(txt=txt_arr, y=y_arr, computed=np.array(text_meta["computed"]))
    total, dt = writer.write_checkpoint(out, {n: p.tree for n, p in plans.items()}, config, text,
                                       progress=progress, desc="convert")
    line = f"wrote {out} ({format_size(total)} in {dt:.1f} s, {total / 2**20 / max(dt, 1e-9):.0f} MiB/s)"
    if defaulted:
        line += f"; defaulted (see above and config.json 'settings'): {', '.join(defaulted)}"
    if txt_arr is not None and not text_meta["computed"]:
        line += ("; WARNING: the empty-prompt text embeddings are ZEROS (no text encoders), so sampling will refuse "
                 "this checkpoint: convert again with --t5 T5_DIR --clip CLIP_DIR, or from a diffusers pipeline "
                 "root holding text_encoder/ and text_encoder_2/")
    log(line)
    return config


def pipeline_text_encoders(sources: Sequence, log: Callable[[str], None] = print):
    """(t5_dir, clip_dir) of a diffusers FLUX pipeline root among `sources`, else (None, None).

    A FLUX pipeline holds CLIP in `text_encoder/` (tokenizer `tokenizer/`) and T5 in
    `text_encoder_2/` (tokenizer `tokenizer_2/`); `text.py` finds the sibling tokenizers.
    """
    for src in sources:
        root = pathlib.Path(src)
        if not root.is_dir():
            continue
        t5, clip = root / "text_encoder_2", root / "text_encoder"
        if t5.is_dir() and clip.is_dir():
            log(f"text encoders: using the pipeline's {clip.name}/ (CLIP) and {t5.name}/ (T5)")
            return t5, clip
        if t5.is_dir() or clip.is_dir():
            log(f"text encoders: {root} holds only {(t5 if t5.is_dir() else clip).name}/; FLUX needs both "
                "text_encoder/ (CLIP) and text_encoder_2/ (T5)")
    return None, None
