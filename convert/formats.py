"""Checkpoint formats read by `fluxir convert` / `fluxir compare`: detection, lazy tensor access, configs.

Four layouts are recognised (automatically, or forced with `--format bfl|diffusers`):

    BFL transformer   flux1-dev.safetensors / flux1-schnell.safetensors (`double_blocks.N...`;
                      an optional `model.diffusion_model.` prefix is stripped)
    BFL VAE           ae.safetensors (`encoder.down.N...`, `decoder.up.N...`)
    diffusers         `transformer/` (FluxTransformer2DModel) and `vae/` (AutoencoderKL) folders:
                      config.json + one or more *.safetensors (+ the `.index.json` of shards);
                      a pipeline root holding both folders is also accepted

Whatever the layout, a component is seen through a `BflView`: BFL key names, their shapes and
dtypes straight from the safetensors headers (nothing read), and `read(key)` returning one
tensor in BFL layout (diffusers q/k/v fused, VAE levels renumbered...) via `convert.flux_map`
and `convert.vae_map`.

Tensors are read with plain positioned reads into fresh buffers, never memory-mapped: pages
of a mapped 24 GB file count as resident memory of the process until the kernel drops them,
which would defeat the converter's bounded-memory promise. Pickle checkpoints (.pt/.bin/.ckpt)
are refused by extension and by content, never opened with a pickle loader.

Model configs come from tensor shapes (`infer_flux_config`, `infer_ae_config`), cross-checked
against config.json when there is one; nothing assumes the FLUX sizes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import struct
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import flux_map, vae_map
from fluxir_jax.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20

try:  # bfloat16 as a numpy dtype (ships with jax)
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
if _BF16 is not None:
    DTYPES["BF16"] = _BF16


# ----------------------------------------------------------------------------- safetensors


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file, stored key, dtype, shape, absolute byte range."""

    file: pathlib.Path
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def refuse_pickle(path: pathlib.Path) -> None:
    """UserError for pickle-based checkpoints (by suffix or by content); never unpickles."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: {path.suffix} checkpoints are pickles and are refused (never unpickled); "
                        "convert it to .safetensors first")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise UserError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; refused (never unpickled)")


class SafetensorsFile:
    """One safetensors file: the header parsed and checked up front, tensors read on demand.

    The header is validated against the file size, so a truncated download is reported before
    anything is converted. `read(key)` does one positioned read into a new numpy array.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        refuse_pickle(self.path)
        self.size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{self.path}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or n > self.size - 8:
                if n <= _MAX_HEADER:
                    raise UserError(f"{self.path}: truncated safetensors file (header needs {n} bytes, "
                                    f"file has {self.size - 8})")
                raise UserError(f"{self.path}: not a safetensors file (bad header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        end_max = 0
        for key, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{self.path}: unsupported or malformed header entry for tensor {key!r}") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise UserError(f"{self.path}: header entry for {key!r} is inconsistent (shape {list(shape)}, "
                                f"{end - begin} bytes)")
            self.tensors[key] = TensorInfo(self.path, key, dtype, shape, data_start + begin, end - begin)
            end_max = max(end_max, end)
        if data_start + end_max > self.size:
            raise UserError(f"{self.path}: truncated safetensors file (header describes {data_start + end_max} "
                            f"bytes, file has {self.size})")

    def read(self, key: str) -> np.ndarray:
        return read_tensor(self.tensors[key])


def read_into(info: TensorInfo, out: np.ndarray) -> None:
    """Positioned reads of one tensor's bytes into `out` (uint8, at least `info.nbytes` long)."""
    view = memoryview(out)[: info.nbytes]
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got <= 0:
                raise UserError(f"{info.file}: truncated while reading tensor {info.key!r}")
            done += got
    finally:
        os.close(fd)


def read_tensor(info: TensorInfo, buffer: np.ndarray | None = None) -> np.ndarray:
    """One tensor, read into `buffer` (uint8, reused by the caller) or a new array; no mmap."""
    out = np.empty(info.nbytes, np.uint8) if buffer is None else buffer[: info.nbytes]
    read_into(info, out)
    return out.view(info.dtype).reshape(info.shape)


class TensorSet:
    """The tensors of one component, spread over one or more safetensors files (shards)."""

    def __init__(self, files: Sequence[pathlib.Path], index: Mapping[str, str] | None = None):
        self.files = [SafetensorsFile(p) for p in files]
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for key, info in f.tensors.items():
                if key in self.tensors:
                    raise UserError(f"tensor {key!r} appears in both {self.tensors[key].file.name} and {f.path.name}")
                self.tensors[key] = info
        if index is not None:
            for key, fname in index.items():
                if key not in self.tensors:
                    raise UserError(f"{self.files[0].path.parent}: missing key {key!r} (the shard index puts it "
                                    f"in {fname}, which lacks it)")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        return read_tensor(self.tensors[key])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """One model component found at a path the user named."""

    component: str  # "transformer" | "vae"
    layout: str  # "bfl" | "diffusers"
    path: pathlib.Path
    tensors: TensorSet
    config: dict | None = None  # diffusers config.json, if any

    def describe(self) -> dict:
        return {
            "component": self.component,
            "layout": self.layout,
            "path": str(self.path),
            "files": [{"name": f.path.name, "size": f.size} for f in self.tensors.files],
        }


def _component_from_keys(keys: Iterable[str]) -> tuple[str, str] | None:
    """(component, layout) guessed from key names, or None."""
    keys = [flux_map.strip_prefix(k) for k in keys]
    has = lambda pat: any(re.match(pat, k) for k in keys)  # noqa: E731
    if has(r"(double_blocks|single_blocks)\.\d+\.") or has(r"img_in\."):
        return "transformer", "bfl"
    if has(r"(transformer_blocks|single_transformer_blocks)\.\d+\.") or has(r"x_embedder\."):
        return "transformer", "diffusers"
    if has(r"(encoder|decoder)\.(down|up)_blocks\.") or has(r"(encoder|decoder)\.mid_block\."):
        return "vae", "diffusers"
    if has(r"(encoder|decoder)\.(down|up)\.\d+\.") or has(r"(encoder|decoder)\.mid\."):
        return "vae", "bfl"
    return None


def _folder_files(folder: pathlib.Path) -> tuple[list[pathlib.Path], dict | None]:
    """The safetensors files of a diffusers component folder, and the shard index if any."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise UserError(f"{folder}: more than one shard index ({', '.join(p.name for p in indexes)})")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{indexes[0]}: not a valid safetensors shard index") from None
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        for p in files:
            if not p.is_file():
                raise UserError(f"{p}: shard listed in {indexes[0].name} is missing")
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{folder}: only pickle weights ({', '.join(pickles)}); these are refused "
                            "(never unpickled), use the .safetensors variant")
        raise UserError(f"{folder}: no .safetensors files")
    return files, None


def _read_config(folder: pathlib.Path) -> dict | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: expected a JSON object")
    return cfg


def detect(path: str | os.PathLike, fmt: str = "auto") -> list[Source]:
    """The component(s) found at `path` (a file, a component folder, or a pipeline root)."""
    if fmt not in ("auto", "bfl", "diffusers"):
        raise UserError(f"unknown --format {fmt!r} (auto, bfl, diffusers)")
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        subs = [path / n for n in ("transformer", "vae") if (path / n).is_dir()]
        if subs and not list(path.glob("*.safetensors")):
            return [s for sub in subs for s in detect(sub, fmt)]
        files, index = _folder_files(path)
        config = _read_config(path)
    else:
        files, index, config = [path], None, None
    tensors = TensorSet(files, index)
    found = _component_from_keys(tensors.keys())
    if found is None:
        raise UserError(f"{path}: neither a FLUX transformer nor a FLUX VAE checkpoint (no known keys)")
    component, layout = found
    if config is None and path.is_file() and layout == "diffusers":
        config = _read_config(path.parent)  # a diffusers weights file named directly
    if config is not None:
        cls = config.get("_class_name", "")
        if cls == "AutoencoderKL":
            component = "vae"
        elif cls.startswith("Flux"):
            component = "transformer"
    if fmt != "auto":
        layout = fmt
    return [Source(component, layout, path, tensors, config)]


def detect_all(paths: Sequence[str | os.PathLike], fmt: str = "auto") -> dict[str, Source]:
    """{component: Source} over all paths; at most one transformer and one VAE."""
    out: dict[str, Source] = {}
    for p in paths:
        for s in detect(p, fmt):
            if s.component in out:
                raise UserError(f"two {s.component} sources: {out[s.component].path} and {s.path}")
            out[s.component] = s
    if not out:
        raise UserError("no source given")
    return out


# ----------------------------------------------------------------------------- BFL views


def shape_only(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """A zero-byte array of `shape` (broadcast view) to push shapes through the per-tensor maps."""
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One BFL tensor: its stored part(s) concatenated along axis 0, then an optional fix-up.

    `parts` are read back to back into one buffer (fused q/k/v rows are contiguous), viewed as
    `raw_shape`, and passed through `post` (final-layer half swap, 1x1-conv reshape) if any.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[TensorInfo, ...]
    raw_shape: tuple[int, ...]
    origin: str
    post: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class BflView:
    """A source component seen through BFL key names."""

    def __init__(self, source: Source, entries: dict[str, Entry]):
        self.source = source
        self.entries = entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.entries:
            raise UserError(f"{self.source.path}: missing key {key!r}")
        return self.entries[key].shape

    def read(self, key: str, buffer: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
        """The tensor in BFL layout; `buffer(n)` may supply a reusable uint8 scratch of n bytes.

        With a scratch buffer the result may be a view into it, valid until its next use.
        """
        e = self.entries[key]
        raw = np.empty(e.nbytes, np.uint8) if buffer is None else buffer(e.nbytes)
        offset = 0
        for part in e.parts:
            read_into(part, raw[offset:offset + part.nbytes])
            offset += part.nbytes
        x = raw[:offset].view(e.dtype).reshape(e.raw_shape)
        return e.post(x) if e.post is not None else x


def transformer_view(source: Source) -> BflView:
    ts = source.tensors
    entries: dict[str, Entry] = {}
    if source.layout == "bfl":
        for key, info in ts.tensors.items():
            bfl = flux_map.strip_prefix(key)
            if bfl in entries:
                raise UserError(f"{source.path}: key {bfl!r} appears with and without the model.diffusion_model. prefix")
            entries[bfl] = Entry(info.shape, info.dtype, (info,), info.shape, key)
        return BflView(source, entries)
    try:
        groups = flux_map.diffusers_groups(ts.keys())
    except KeyError as e:
        msg = e.args[0]
        if msg.startswith("unexpected"):
            raise UserError(f"{source.path}: {msg.replace('diffusers transformer key', 'key')}") from None
        raise UserError(f"{source.path}: missing key: {msg}") from None
    for bfl, parts in groups.items():
        infos = tuple(ts.tensors[k] for k in parts)
        if len({i.shape[1:] for i in infos}) != 1 or len({i.dtype for i in infos}) != 1 or not infos[0].shape:
            raise UserError(f"{source.path}: tensors {', '.join(parts)} have incompatible shapes/dtypes "
                            f"{[list(i.shape) for i in infos]} (they are fused into {bfl})")
        shape = (sum(i.shape[0] for i in infos),) + infos[0].shape[1:]
        post = flux_map.swap_halves if flux_map.diffusers_target(parts[0]).swap_halves else None
        entries[bfl] = Entry(shape, infos[0].dtype, infos, shape, " + ".join(parts), post)
    return BflView(source, entries)


def vae_view(source: Source) -> BflView:
    ts = source.tensors
    entries: dict[str, Entry] = {}
    if source.layout == "bfl":
        for key, info in ts.tensors.items():
            entries[key] = Entry(info.shape, info.dtype, (info,), info.shape, key)
        return BflView(source, entries)
    try:
        n = vae_map.num_levels(ts.keys())
    except ValueError as e:
        raise UserError(f"{source.path}: {e}") from None
    for key, info in ts.tensors.items():
        try:
            bfl, dummy = vae_map.diffusers_to_bfl(key, shape_only(info.shape), n)
        except ValueError:
            raise UserError(f"{source.path}: unexpected key {key!r} (not a FLUX VAE parameter)") from None
        entries[bfl] = Entry(tuple(dummy.shape), info.dtype, (info,), info.shape, key,
                             lambda x, key=key: vae_map.diffusers_to_bfl(key, x, n)[1])
    return BflView(source, entries)


def view(source: Source) -> BflView:
    return transformer_view(source) if source.component == "transformer" else vae_view(source)


# ----------------------------------------------------------------------------- configs


def _count(keys: Iterable[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """BFL's (16, 56, 56) for head dim 128, scaled: (d/8, 7d/16, 7d/16) when all are even integers.

    FLUX.1 is the only BFL config; it splits its 128-dim heads as 16 (time/index axis) + 56 + 56
    (rows, cols). The same proportions give (8, 28, 28) for 64 and (4, 14, 14) for 32; for other
    head sizes (not a multiple of 32) there is no BFL answer and the axes must be given.
    """
    if head_dim % 32:
        raise UserError(f"cannot derive the RoPE axes for head dim {head_dim} (BFL proportions need a multiple "
                        "of 32); pass --axes-dim A,B,C (diffusers config.json: axes_dims_rope)")
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def infer_flux_config(v: BflView, *, axes_dim: Sequence[int] | None = None, **extra):
    """FluxConfig from the tensor shapes (and config.json, which must agree with them).

    hidden = img_in rows; in/out channels from img_in / final_layer.linear; context and vector
    widths from txt_in / vector_in; head dim = length of the qk-norm scale (heads = hidden /
    head dim); depths = number of double/single block indices; mlp_ratio = mlp rows / hidden;
    guidance embedding = guidance_in present; qkv_bias = double-block qkv bias present.
    RoPE axes: `axes_dim` argument, else config.json `axes_dims_rope`, else `rope_axes(head_dim)`.
    """
    from fluxir_jax.models.flux import FluxConfig

    keys = v.keys()
    hidden, in_ch = v.shape("img_in.weight")
    depth, single = _count(keys, "double_blocks"), _count(keys, "single_blocks")
    if depth:
        head_dim = v.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = v.shape("double_blocks.0.img_mlp.0.weight")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in v
    elif single:
        head_dim = v.shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = v.shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        qkv_bias = True
    else:
        raise UserError(f"{v.source.path}: no double_blocks or single_blocks tensors")
    if head_dim <= 0 or hidden % head_dim:
        raise UserError(f"{v.source.path}: qk-norm scale length {head_dim} does not divide hidden size {hidden}")
    cfg = dict(
        in_channels=in_ch,
        out_channels=v.shape("final_layer.linear.weight")[0],
        vec_in_dim=v.shape("vector_in.in_layer.weight")[1],
        context_in_dim=v.shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        qkv_bias=qkv_bias,
        guidance_embed=any(k.startswith("guidance_in.") for k in keys),
    )
    dc = v.source.config
    if dc is not None:
        _check_diffusers_transformer_config(v.source.path, dc, cfg, head_dim)
    if axes_dim is None and dc is not None and dc.get("axes_dims_rope"):
        axes_dim = dc["axes_dims_rope"]
    if axes_dim is None:
        try:
            axes_dim = rope_axes(head_dim)
        except UserError as e:
            raise UserError(f"{v.source.path}: {e}") from None
    cfg["axes_dim"] = tuple(int(a) for a in axes_dim)
    try:
        return FluxConfig(**cfg, **extra)
    except ValueError as e:
        raise UserError(f"{v.source.path}: {e}") from None


def _check_diffusers_transformer_config(path, dc: dict, cfg: dict, head_dim: int) -> None:
    want = {
        "num_layers": cfg["depth"], "num_single_layers": cfg["depth_single_blocks"],
        "attention_head_dim": head_dim, "num_attention_heads": cfg["num_heads"],
        "joint_attention_dim": cfg["context_in_dim"], "pooled_projection_dim": cfg["vec_in_dim"],
        "in_channels": cfg["in_channels"], "guidance_embeds": cfg["guidance_embed"], "patch_size": 1,
    }
    for k, w in want.items():
        if k in dc and dc[k] != w:
            raise UserError(f"{path}: config.json says {k}={dc[k]!r} but the weights imply {w!r}")
    if dc.get("out_channels") not in (None, cfg["out_channels"]):
        raise UserError(f"{path}: config.json says out_channels={dc['out_channels']!r} but the weights "
                        f"imply {cfg['out_channels']!r}")


def infer_ae_config(v: BflView, *, norm_groups: int | None = None, **extra):
    """AutoEncoderConfig from the tensor shapes (and config.json, which must agree with them).

    ch / in_channels from encoder.conv_in; ch_mult from each encoder level's first conv;
    num_res_blocks = blocks per encoder level; z_channels from decoder.conv_in; out_ch from
    decoder.conv_out. Not visible in shapes: the GroupNorm group count (`norm_groups`
    argument, else config.json `norm_num_groups`, else BFL's 32) and the latent scale/shift
    (config.json `scaling_factor`/`shift_factor`, else BFL's 0.3611/0.1159).
    """
    from fluxir_jax.models.autoencoder import AutoEncoderConfig

    keys = v.keys()
    ch, in_channels = v.shape("encoder.conv_in.weight")[:2]
    levels = _count(keys, "encoder.down")
    if not levels:
        raise UserError(f"{v.source.path}: no encoder.down.N tensors")
    ch_mult = []
    for i in range(levels):
        out = v.shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out % ch:
            raise UserError(f"{v.source.path}: encoder level {i} has {out} channels, not a multiple of {ch}")
        ch_mult.append(out // ch)
    z = v.shape("decoder.conv_in.weight")[1]
    if v.shape("encoder.conv_out.weight")[0] != 2 * z:
        raise UserError(f"{v.source.path}: encoder.conv_out has {v.shape('encoder.conv_out.weight')[0]} output "
                        f"channels, expected 2 x {z} latent channels")
    cfg = dict(
        in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult), out_ch=v.shape("decoder.conv_out.weight")[0],
        num_res_blocks=_count(keys, "encoder.down.0.block"), z_channels=z,
    )
    dc = v.source.config
    if dc is not None:
        want = {
            "in_channels": cfg["in_channels"], "out_channels": cfg["out_ch"], "latent_channels": z,
            "layers_per_block": cfg["num_res_blocks"], "block_out_channels": [ch * m for m in ch_mult],
        }
        for k, w in want.items():
            if k in dc and (list(dc[k]) if isinstance(dc[k], (list, tuple)) else dc[k]) != w:
                raise UserError(f"{v.source.path}: config.json says {k}={dc[k]!r} but the weights imply {w!r}")
        if dc.get("scaling_factor") is not None:
            cfg["scale_factor"] = float(dc["scaling_factor"])
        if dc.get("shift_factor") is not None:
            cfg["shift_factor"] = float(dc["shift_factor"])
        if norm_groups is None and dc.get("norm_num_groups"):
            norm_groups = int(dc["norm_num_groups"])
    cfg["norm_groups"] = 32 if norm_groups is None else int(norm_groups)
    try:
        return AutoEncoderConfig(**cfg, **extra)
    except ValueError as e:
        hint = " (pass --vae-norm-groups N)" if "norm_groups" in str(e) else ""
        raise UserError(f"{v.source.path}: {e}{hint}") from None


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name
