"""Key maps for the FLUX VAE: diffusers `AutoencoderKL` <-> BFL `ae.safetensors` -> NNX params.

Three names for one tensor:

    diffusers  decoder.up_blocks.0.resnets.2.conv_shortcut.weight   [O, I, 1, 1]
    BFL        decoder.up.3.block.2.nin_shortcut.weight              [O, I, 1, 1]
    NNX        ('decoder', 'up', 3, 'block', 2, 'nin_shortcut', 'kernel')  [1, 1, I, O]

diffusers <-> BFL is one rename table (`RENAMES`) plus two explicit facts: decoder levels are
stored in opposite orders (`up_blocks.{i}` <-> `up.{n-1-i}`, n = number of levels, read off
the keys), and the mid-block attention projections are 2-D Linear weights `[O, I]` in
diffusers but 1x1 convs `[O, I, 1, 1]` in BFL. BFL -> NNX is mechanical: the dotted key is
the path (digits become ints), conv weights OIHW -> HWIO `kernel`, norm weights -> `scale`.

Every per-key function works on a single tensor, so a streaming converter can feed tensors
one at a time; nothing here assumes FLUX sizes.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np

# (diffusers module, BFL module). Placeholders: {s} encoder|decoder, {i} {j} level/block
# indices, {r} a decoder level index that is reversed between the two formats, {layer} a
# ResNet sublayer. The parameter name (weight|bias) after the module is passed through.
RENAMES: tuple[tuple[str, str], ...] = (
    ("{s}.conv_in", "{s}.conv_in"),
    ("{s}.conv_out", "{s}.conv_out"),
    ("{s}.conv_norm_out", "{s}.norm_out"),
    ("encoder.down_blocks.{i}.resnets.{j}.{layer}", "encoder.down.{i}.block.{j}.{layer}"),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut", "encoder.down.{i}.block.{j}.nin_shortcut"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{i}.downsample.conv"),
    ("decoder.up_blocks.{r}.resnets.{j}.{layer}", "decoder.up.{r}.block.{j}.{layer}"),
    ("decoder.up_blocks.{r}.resnets.{j}.conv_shortcut", "decoder.up.{r}.block.{j}.nin_shortcut"),
    ("decoder.up_blocks.{r}.upsamplers.0.conv", "decoder.up.{r}.upsample.conv"),
    ("{s}.mid_block.resnets.0.{layer}", "{s}.mid.block_1.{layer}"),
    ("{s}.mid_block.resnets.1.{layer}", "{s}.mid.block_2.{layer}"),
    ("{s}.mid_block.attentions.0.group_norm", "{s}.mid.attn_1.norm"),
    ("{s}.mid_block.attentions.0.to_q", "{s}.mid.attn_1.q"),
    ("{s}.mid_block.attentions.0.to_k", "{s}.mid.attn_1.k"),
    ("{s}.mid_block.attentions.0.to_v", "{s}.mid.attn_1.v"),
    ("{s}.mid_block.attentions.0.to_out.0", "{s}.mid.attn_1.proj_out"),
)
_FIELDS = {"s": "encoder|decoder", "i": r"\d+", "j": r"\d+", "r": r"\d+",
           "layer": "norm1|conv1|norm2|conv2"}
_PARAM = r"\.(?P<param>weight|bias)"
_BFL_ATTN_PROJ = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_NORM_NAMES = {"norm", "norm1", "norm2", "norm_out"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(f"^{regex}{_PARAM}$")


_DIFFUSERS_TO_BFL = tuple((_pattern(d), b) for d, b in RENAMES)
_BFL_TO_DIFFUSERS = tuple((_pattern(b), d) for d, b in RENAMES)


def _rename(key: str, table, num_levels: int) -> str:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            fields = m.groupdict()
            if "r" in fields:
                fields["r"] = str(num_levels - 1 - int(fields["r"]))
            return template.format(**fields) + "." + fields["param"]
    raise ValueError(f"VAE key {key!r} is not a known autoencoder parameter")


def num_levels(keys: Iterable[str]) -> int:
    """Number of resolution levels (len(ch_mult)), read off decoder keys of either format."""
    found = [int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up(?:_blocks)?\.(\d+)\.", k))]
    if not found:
        raise ValueError("VAE state dict has no decoder up-level keys (decoder.up.N / decoder.up_blocks.N)")
    return max(found) + 1


# -- diffusers <-> BFL, one tensor at a time ------------------------------------------------------


def diffusers_to_bfl(key: str, tensor: np.ndarray, num_levels: int) -> tuple[str, np.ndarray]:
    """One diffusers `AutoencoderKL` tensor -> its BFL `ae.safetensors` key and tensor."""
    bfl_key = _rename(key, _DIFFUSERS_TO_BFL, num_levels)
    if _BFL_ATTN_PROJ.match(bfl_key) and tensor.ndim == 2:  # Linear [O, I] -> 1x1 conv [O, I, 1, 1]
        tensor = tensor[:, :, None, None]
    return bfl_key, tensor


def bfl_to_diffusers(key: str, tensor: np.ndarray, num_levels: int) -> tuple[str, np.ndarray]:
    """One BFL `ae.safetensors` tensor -> its diffusers `AutoencoderKL` key and tensor."""
    diffusers_key = _rename(key, _BFL_TO_DIFFUSERS, num_levels)
    if _BFL_ATTN_PROJ.match(key):  # 1x1 conv [O, I, 1, 1] -> Linear [O, I]
        tensor = tensor[:, :, 0, 0]
    return diffusers_key, tensor


def diffusers_to_bfl_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whole diffusers VAE state dict -> BFL keys (no quant convs: FLUX has none)."""
    n = num_levels(state_dict)
    return dict(diffusers_to_bfl(k, np.asarray(v), n) for k, v in state_dict.items())


def bfl_to_diffusers_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whole BFL `ae.safetensors` state dict -> diffusers `AutoencoderKL` keys."""
    n = num_levels(state_dict)
    return dict(bfl_to_diffusers(k, np.asarray(v), n) for k, v in state_dict.items())


# -- BFL <-> NNX ------------------------------------------------------------------------------------


def bfl_to_nnx(key: str, tensor: np.ndarray) -> tuple[tuple[str | int, ...], np.ndarray]:
    """One BFL tensor -> NNX param path and array (conv OIHW -> HWIO `kernel`, norm `scale`)."""
    *module, param = key.split(".")
    path = tuple(int(p) if p.isdigit() else p for p in module)
    if param == "weight" and tensor.ndim == 4:
        return path + ("kernel",), np.transpose(tensor, (2, 3, 1, 0))
    if param == "weight" and tensor.ndim == 1 and module[-1] in _NORM_NAMES:
        return path + ("scale",), tensor
    if param == "bias" and tensor.ndim == 1:
        return path + ("bias",), tensor
    raise ValueError(f"VAE key {key!r} with shape {tuple(tensor.shape)} is not a conv, norm or bias tensor")


def nnx_path_to_bfl_key(path: tuple[str | int, ...]) -> str:
    """NNX param path -> BFL key (`kernel`/`scale` -> `weight`)."""
    *module, param = path
    if param not in ("kernel", "scale", "bias"):
        raise ValueError(f"NNX path {path!r} is not an autoencoder parameter")
    return ".".join(str(p) for p in module) + (".bias" if param == "bias" else ".weight")


def nnx_to_bfl(path: tuple[str | int, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of `bfl_to_nnx`: NNX param path and array -> BFL key and tensor (HWIO -> OIHW)."""
    key = nnx_path_to_bfl_key(path)
    return key, (np.transpose(array, (3, 2, 0, 1)) if path[-1] == "kernel" else array)


def nnx_vae_to_bfl(model) -> dict[str, np.ndarray]:
    """The model's params as a BFL-keyed state dict (numpy, param dtype)."""
    from flax import nnx

    return dict(nnx_to_bfl(p, np.asarray(v.get_value()))
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
