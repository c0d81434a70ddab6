"""FLUX.1 transformer key maps: diffusers <-> BFL checkpoint names <-> our Flax parameter paths.

BFL names are canonical (our NNX tree mirrors them), so every conversion goes through them:

    diffusers key --(rename table, fuse parts, swap)--> BFL key --(transpose, stack)--> Flax path

One table of renames (`_RULES`) plus four explicit tensor operations:
  * Linear `weight [out, in]` -> `kernel [in, out]` (transpose);
  * q/k/v (+ proj_mlp for single blocks) are concatenated along the output rows into the
    fused `qkv` / `linear1` (parts recorded in the table, sizes taken from the tensors);
  * the final adaLN output is (shift, scale) in BFL and (scale, shift) in diffusers (swap);
  * per-block tensors are stacked on a leading layer axis for the scanned block modules.
Nothing here knows the FLUX sizes: everything is read off the tensors.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np

# (diffusers prefix, BFL prefix, part, number of parts). Prefixes name a module: both its
# `.weight` and `.bias` map, except for entries ending in `.weight`/`.scale` (norm scales).
_TOP = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),  # + (scale, shift) <-> (shift, scale)
]
_DOUBLE = [
    ("norm1.linear", "img_mod.lin", 0, 1),
    ("norm1_context.linear", "txt_mod.lin", 0, 1),
    ("attn.to_q", "img_attn.qkv", 0, 3),
    ("attn.to_k", "img_attn.qkv", 1, 3),
    ("attn.to_v", "img_attn.qkv", 2, 3),
    ("attn.add_q_proj", "txt_attn.qkv", 0, 3),
    ("attn.add_k_proj", "txt_attn.qkv", 1, 3),
    ("attn.add_v_proj", "txt_attn.qkv", 2, 3),
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale", 0, 1),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale", 0, 1),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale", 0, 1),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale", 0, 1),
    ("attn.to_out.0", "img_attn.proj", 0, 1),
    ("attn.to_add_out", "txt_attn.proj", 0, 1),
    ("ff.net.0.proj", "img_mlp.0", 0, 1),
    ("ff.net.2", "img_mlp.2", 0, 1),
    ("ff_context.net.0.proj", "txt_mlp.0", 0, 1),
    ("ff_context.net.2", "txt_mlp.2", 0, 1),
]
_SINGLE = [
    ("attn.to_q", "linear1", 0, 4),
    ("attn.to_k", "linear1", 1, 4),
    ("attn.to_v", "linear1", 2, 4),
    ("proj_mlp", "linear1", 3, 4),
    ("proj_out", "linear2", 0, 1),
    ("norm.linear", "modulation.lin", 0, 1),
    ("attn.norm_q.weight", "norm.query_norm.scale", 0, 1),
    ("attn.norm_k.weight", "norm.key_norm.scale", 0, 1),
]
_SWAPPED = "final_layer.adaLN_modulation.1"
_BLOCK_PREFIXES = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one diffusers tensor goes: rows `part` of `nparts` of BFL tensor `key`."""

    key: str
    part: int = 0
    nparts: int = 1
    swap_halves: bool = False


def _rules() -> list[tuple[re.Pattern, str, int, int]]:
    rules = []

    def add(d_prefix, b_prefix, part, nparts, block=None):
        leaf = d_prefix.endswith(".weight")
        d = re.escape(d_prefix)
        if block:
            d = re.escape(_BLOCK_PREFIXES[block]) + r"\.(\d+)\." + d
            b_prefix = block + ".{0}." + b_prefix
        if leaf:
            rules.append((re.compile(d + "$"), b_prefix, part, nparts))
        else:
            rules.append((re.compile(d + r"\.(weight|bias)$"), b_prefix + ".{%d}" % (1 if block else 0), part, nparts))

    for d, b in _TOP:
        add(d, b, 0, 1)
    for d, b, p, n in _DOUBLE:
        add(d, b, p, n, "double_blocks")
    for d, b, p, n in _SINGLE:
        add(d, b, p, n, "single_blocks")
    return rules


_RULES = _rules()


def diffusers_target(key: str) -> Target:
    """The BFL destination of one diffusers `FluxTransformer2DModel` key; KeyError if unknown."""
    for pattern, fmt, part, nparts in _RULES:
        m = pattern.match(key)
        if m:
            bfl = fmt.format(*m.groups())
            return Target(bfl, part, nparts, bfl.startswith(_SWAPPED))
    raise KeyError(f"unexpected diffusers transformer key {key!r}")


def swap_halves(x: np.ndarray) -> np.ndarray:
    """(a, b) -> (b, a) along rows: BFL (shift, scale) <-> diffusers (scale, shift)."""
    a, b = np.split(x, 2, axis=0)
    return np.concatenate([b, a], axis=0)


def diffusers_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """BFL key -> the diffusers keys that form it, ordered by part (for streaming one group at a time)."""
    groups: dict[str, dict[int, str]] = {}
    for k in keys:
        t = diffusers_target(k)
        groups.setdefault(t.key, {})[t.part] = k
    out = {}
    for bfl, parts in groups.items():
        n = diffusers_target(next(iter(parts.values()))).nparts
        missing = sorted(set(range(n)) - set(parts))
        if missing:
            raise KeyError(f"{bfl} needs {n} diffusers tensors; part {missing[0]} is missing")
        out[bfl] = [parts[i] for i in range(n)]
    return out


def fuse_diffusers(bfl_key: str, tensors: list[np.ndarray]) -> np.ndarray:
    """Build one BFL tensor from its ordered diffusers parts."""
    x = tensors[0] if len(tensors) == 1 else np.concatenate(tensors, axis=0)
    return swap_halves(x) if bfl_key.startswith(_SWAPPED) else x


def diffusers_to_bfl(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A whole diffusers transformer state dict -> BFL names (numpy arrays)."""
    return {b: fuse_diffusers(b, [np.asarray(sd[k]) for k in ks]) for b, ks in diffusers_groups(sd).items()}


def bfl_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `diffusers_to_bfl` (part sizes read off the tensors)."""
    hidden = sd["img_in.weight"].shape[0]
    out = {}
    for bkey, x in sd.items():
        x = np.asarray(x)
        if bkey.startswith(_SWAPPED):
            x = swap_halves(x)
        d_keys = _bfl_sources(bkey)
        # every fused part is `hidden` rows except the last (single-block proj_mlp is wider)
        sizes = [hidden] * (len(d_keys) - 1)
        for k, piece in zip(d_keys, np.split(x, np.cumsum(sizes).astype(int), axis=0)):
            out[k] = piece
    return out


def diffusers_sources(bkey: str) -> list[str]:
    """Diffusers keys (ordered by part) that form BFL key `bkey`; KeyError if unknown."""
    return _bfl_sources(bkey)


def _bfl_sources(bkey: str) -> list[str]:
    """Diffusers keys (ordered by part) that form BFL key `bkey`."""
    parts = bkey.split(".")
    if parts[0] in _BLOCK_PREFIXES:
        table = _DOUBLE if parts[0] == "double_blocks" else _SINGLE
        rest, dprefix = ".".join(parts[2:]), f"{_BLOCK_PREFIXES[parts[0]]}.{parts[1]}."
    else:
        table, rest, dprefix = [(d, b, 0, 1) for d, b in _TOP], bkey, ""
    found = []
    for d, b, p, _ in table:
        if d.endswith(".weight"):
            if rest == b:
                found.append((p, dprefix + d))
        elif rest.rsplit(".", 1)[0] == b:
            found.append((p, dprefix + d + "." + rest.rsplit(".", 1)[1]))
    if not found:
        raise KeyError(f"unexpected BFL transformer key {bkey!r}")
    return [k for _, k in sorted(found)]


# ----------------------------------------------------------------------------- BFL -> Flax


def strip_prefix(key: str) -> str:
    """Drop the ComfyUI-style `model.diffusion_model.` prefix some single files carry."""
    return key[len("model.diffusion_model.") :] if key.startswith("model.diffusion_model.") else key


def bfl_to_flax(key: str, x: np.ndarray) -> tuple[tuple, int | None, np.ndarray]:
    """One BFL tensor -> (Flax param path, layer index or None, array in Flax layout)."""
    parts = key.split(".")
    layer = None
    if parts[0] in _BLOCK_PREFIXES:
        if len(parts) < 3 or not parts[1].isdigit():
            raise KeyError(f"malformed block key {key!r}")
        layer, parts = int(parts[1]), [parts[0]] + parts[2:]
    leaf = parts[-1]
    if leaf == "weight":
        if x.ndim != 2:
            raise ValueError(f"{key}: expected a 2-D Linear weight, got shape {list(x.shape)}")
        leaf, x = "kernel", np.asarray(x).T
    elif leaf not in ("bias", "scale"):
        raise KeyError(f"unexpected BFL transformer key {key!r}")
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1]) + (leaf,)
    return path, layer, x


def flax_to_bfl(path: tuple, x: np.ndarray, layer: int | None = None) -> tuple[str, np.ndarray]:
    """Inverse of `bfl_to_flax` for one (unstacked) tensor."""
    names = [str(p) for p in path]
    if layer is not None:
        names.insert(1, str(layer))
    if names[-1] == "kernel":
        names[-1], x = "weight", np.asarray(x).T
    return ".".join(names), x


def bfl_to_flax_params(sd: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """A whole BFL state dict -> {Flax path: array}, block tensors stacked on axis 0."""
    flat: dict[tuple, np.ndarray] = {}
    layers: dict[tuple, dict[int, np.ndarray]] = {}
    for key, x in sd.items():
        path, layer, y = bfl_to_flax(strip_prefix(key), np.asarray(x))
        if layer is None:
            flat[path] = y
        else:
            layers.setdefault(path, {})[layer] = y
    for path, per in layers.items():
        n = max(per) + 1
        missing = sorted(set(range(n)) - set(per))
        if missing:
            raise KeyError(f"missing key {_bfl_name(path, missing[0])}")
        flat[path] = np.stack([per[i] for i in range(n)])
    return flat


def _bfl_name(path: tuple, layer: int) -> str:
    return flax_to_bfl(path, np.zeros((1, 1)), layer)[0]
