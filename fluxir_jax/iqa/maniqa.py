"""MANIQA: multi-dimension attention network for no-reference IQA (Yang et al., CVPRW 2022).

A 224x224 crop (normalised with mean = std = 0.5) goes through a ViT-B/8 (timm
`vit_base_patch8_224`); the patch tokens (CLS dropped) output by blocks 6, 7, 8 and 9 are
concatenated to 4*768 channels on the 28x28 grid. Two stages follow, each: 2 transposed
attention blocks (TAB: attention between channels, with Linear layers over the 784 spatial
positions, followed by MANIQA's transpose+reshape and a residual), a 1x1 conv (3072 -> 768,
then 768 -> 384), and a Swin stage (2 residual groups x 2 Swin blocks, window 4, shift 2,
4 heads, MLP 768, each group ending in a 3x3 conv + ReLU and scaled by `scale` before its
residual: 0.8 for the KonIQ/KADID checkpoints, 0.13 for PIPAL). Per-position score
(Linear-ReLU-Linear-ReLU) and weight (Linear-ReLU-Linear-Sigmoid) give the crop score
sum(s*w)/sum(w). At evaluation an image scores the mean over `num_crops` (20) 224x224 crops on a
uniform grid (see `crop_positions`); images smaller than 224 are first upscaled (bicubic) so
their shorter side is 224.

Follows IIGROUP/MANIQA (Apache-2.0) `models/maniqa.py` and `models/swin.py`. Parameter names
mirror its state dict (`vit.blocks.0.attn.qkv.weight`, `tablock1.0.c_q.weight`,
`swintransformer1.layers.0.blocks.1.attn.relative_position_bias_table`, `fc_score.0.weight`,
...) apart from `fc_score.fc0/fc3` for the Sequential indices 0/3. Only ViT blocks 0..9 are
kept (10, 11, the final norm and the classifier do not affect the score).

Public API:
    MANIQAConfig, PRESETS, crop_positions(h, w, size, n)
    MANIQA(config, rngs=...)           model.crop_scores(crops [M, S, S, 3]) -> [M]; model(images) -> [N]
    load_maniqa(weights, preset="koniq") -> (graphdef, state)
    make_maniqa(weights, preset="koniq") -> jitted images -> scores
    registry names: "maniqa" (koniq), "maniqa-kadid", "maniqa-pipal"
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MANIQAConfig:
    img_size: int = 224
    patch_size: int = 8
    vit_dim: int = 768
    vit_heads: int = 12
    vit_mlp: int = 3072
    feature_blocks: tuple[int, ...] = (6, 7, 8, 9)
    embed_dim: int = 768
    num_tab: int = 2
    depths: tuple[int, ...] = (2, 2)
    num_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    dim_mlp: int = 768
    scale: float = 0.8
    num_outputs: int = 1
    num_crops: int = 20

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def vit_depth_used(self) -> int:
        return max(self.feature_blocks) + 1



PRESETS: dict[str, MANIQAConfig] = {
    "koniq": MANIQAConfig(),
    "kadid": MANIQAConfig(),
    "pipal": MANIQAConfig(scale=0.13),
    # Tests: 32x32 crops, 4x4 token grid, 3-block ViT.
    "tiny": MANIQAConfig(img_size=32, patch_size=8, vit_dim=32, vit_heads=2, vit_mlp=64, feature_blocks=(1, 2),
                         embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=2, dim_mlp=24, num_crops=4),
}


def crop_positions(h: int, w: int, size: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners of `n` size x size crops on a uniform rows x cols grid covering the image.

    rows * cols = n, with the factor pair whose shape best matches the room for crops on each
    axis; positions are linspace(0, H - size, rows) (and the same for columns), rounded.
    """
    if h < size or w < size:
        raise UserError(f"image {h}x{w} is smaller than the {size}x{size} MANIQA crop")
    room_h, room_w = h - size + 1, w - size + 1
    pairs = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    r, c = min(pairs, key=lambda rc: (abs(np.log(rc[0] / rc[1]) - np.log(room_h / room_w)), rc[0]))
    ys = np.round(np.linspace(0, h - size, r)).astype(int)
    xs = np.round(np.linspace(0, w - size, c)).astype(int)
    return [(int(y), int(x)) for y in ys for x in xs]


# ----------------------------------------------------------------------------- ViT backbone (timm names)


def _ln(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)


class _Mlp(nnx.Module):
    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # nn.GELU (erf)


class _ViTAttention(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * (d // self.heads) ** -0.5, k), axis=-1)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d))


class _ViTBlock(nnx.Module):
    def __init__(self, cfg: MANIQAConfig, *, rngs: nnx.Rngs):
        self.norm1 = _ln(cfg.vit_dim, 1e-6, rngs)
        self.attn = _ViTAttention(cfg.vit_dim, cfg.vit_heads, rngs=rngs)
        self.norm2 = _ln(cfg.vit_dim, 1e-6, rngs)
        self.mlp = _Mlp(cfg.vit_dim, cfg.vit_mlp, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nnx.Module):
    def __init__(self, cfg: MANIQAConfig, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(3, cfg.vit_dim, (p, p), strides=p, padding="VALID", rngs=rngs)


class ViTFeatures(nnx.Module):
    """timm VisionTransformer up to the last block MANIQA reads; returns the listed blocks' outputs."""

    def __init__(self, cfg: MANIQAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n = cfg.grid**2 + 1
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, cfg.vit_dim)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n, cfg.vit_dim)))
        self.patch_embed = _PatchEmbed(cfg, rngs=rngs)
        self.blocks = nnx.List([_ViTBlock(cfg, rngs=rngs) for _ in range(cfg.vit_depth_used)])

    def __call__(self, x: Array) -> list[Array]:
        x = self.patch_embed.proj(x)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])), x], axis=1)
        x = x + self.pos_embed[...]
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.cfg.feature_blocks:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------- MANIQA head


class TABlock(nnx.Module):
    """Transposed attention over channels: x [B, C, N] with Linear layers over N (the positions)."""

    def __init__(self, n: int, *, rngs: nnx.Rngs):
        self.c_q = nnx.Linear(n, n, rngs=rngs)
        self.c_k = nnx.Linear(n, n, rngs=rngs)
        self.c_v = nnx.Linear(n, n, rngs=rngs)
        self.norm_fact = n**-0.5

    def __call__(self, x: Array) -> Array:
        b, c, n = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        attn = jax.nn.softmax(jnp.einsum("bcn,bdn->bcd", q, k) * self.norm_fact, axis=-1)
        y = jnp.einsum("bcd,bdn->bcn", attn, v)
        y = jnp.swapaxes(y, 1, 2).reshape(b, c, n)  # MANIQA: (attn @ v).transpose(1, 2).reshape(B, C, N)
        return y + x


def _relative_position_index(ws: int) -> np.ndarray:
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _shift_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """[nW, ws*ws, ws*ws] additive mask (0 / -100) of the shifted-window attention."""
    img = np.zeros((h, w))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    win = img.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class WindowAttention(nnx.Module):
    def __init__(self, dim: int, ws: int, heads: int, *, rngs: nnx.Rngs):
        self.ws, self.heads = ws, heads
        self.relative_position_bias_table = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), ((2 * ws - 1) ** 2, heads)))
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: Array, mask: np.ndarray | None) -> Array:
        bw, n, c = x.shape
        hd = c // self.heads
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0] * hd**-0.5, qkv[:, :, 1], qkv[:, :, 2]
        attn = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        idx = _relative_position_index(self.ws).reshape(-1)
        bias = self.relative_position_bias_table[...][idx].reshape(n, n, self.heads).transpose(2, 0, 1)
        attn = attn + bias[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bw // nw, nw, self.heads, n, n) + jnp.asarray(mask)[None, :, None]
            attn = attn.reshape(bw, self.heads, n, n)
        attn = jax.nn.softmax(attn, axis=-1)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(bw, n, c))


class SwinBlock(nnx.Module):
    def __init__(self, dim: int, res: int, heads: int, ws: int, shift: int, dim_mlp: int, *, rngs: nnx.Rngs):
        if res <= ws:  # swin.py: no partition when the window covers the input
            shift, ws = 0, res
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = _ln(dim, 1e-5, rngs)
        self.attn = WindowAttention(dim, ws, heads, rngs=rngs)
        self.norm2 = _ln(dim, 1e-5, rngs)
        self.mlp = _Mlp(dim, dim_mlp, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, l, c = x.shape
        h = w = self.res
        ws, s = self.ws, self.shift
        y = self.norm1(x).reshape(b, h, w, c)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        y = y.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y, _shift_mask(h, w, ws, s) if s else None)
        y = y.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + y.reshape(b, l, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nnx.Module):
    def __init__(self, dim: int, res: int, depth: int, heads: int, ws: int, dim_mlp: int, *, rngs: nnx.Rngs):
        self.res = res
        self.blocks = nnx.List([SwinBlock(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2, dim_mlp, rngs=rngs)
                                for i in range(depth)])
        self.conv = nnx.Conv(dim, dim, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        for blk in self.blocks:
            x = blk(x)
        b, l, c = x.shape
        y = jax.nn.relu(self.conv(x.reshape(b, self.res, self.res, c)))
        return y.reshape(b, l, c)


class SwinTransformer(nnx.Module):
    """MANIQA's Swin stage: residual groups x = scale * layer(x) + x, no patch merging."""

    def __init__(self, cfg: MANIQAConfig, dim: int, *, rngs: nnx.Rngs):
        self.scale = cfg.scale
        self.layers = nnx.List([BasicLayer(dim, cfg.grid, d, h, cfg.window_size, cfg.dim_mlp, rngs=rngs)
                                for d, h in zip(cfg.depths, cfg.num_heads)])

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x


class _Head(nnx.Module):
    def __init__(self, dim: int, out: int, final: Callable[[Array], Array], *, rngs: nnx.Rngs):
        self.fc0 = nnx.Linear(dim, dim, rngs=rngs)
        self.fc3 = nnx.Linear(dim, out, rngs=rngs)
        self.final = final

    def __call__(self, x: Array) -> Array:
        return self.final(self.fc3(jax.nn.relu(self.fc0(x))))


class MANIQA(nnx.Module):
    """MANIQA scorer. `crop_scores` scores img_size crops; `__call__` averages uniform crops per image."""

    def __init__(self, cfg: MANIQAConfig, *, rngs: nnx.Rngs):
        if len(cfg.depths) != len(cfg.num_heads):
            raise UserError("MANIQA config: depths and num_heads differ in length")
        self.cfg = cfg
        n, e = cfg.grid**2, cfg.embed_dim
        self.vit = ViTFeatures(cfg, rngs=rngs)
        self.tablock1 = nnx.List([TABlock(n, rngs=rngs) for _ in range(cfg.num_tab)])
        self.conv1 = nnx.Conv(cfg.vit_dim * len(cfg.feature_blocks), e, (1, 1), rngs=rngs)
        self.swintransformer1 = SwinTransformer(cfg, e, rngs=rngs)
        self.tablock2 = nnx.List([TABlock(n, rngs=rngs) for _ in range(cfg.num_tab)])
        self.conv2 = nnx.Conv(e, e // 2, (1, 1), rngs=rngs)
        self.swintransformer2 = SwinTransformer(cfg, e // 2, rngs=rngs)
        self.fc_score = _Head(e // 2, cfg.num_outputs, jax.nn.relu, rngs=rngs)
        self.fc_weight = _Head(e // 2, cfg.num_outputs, jax.nn.sigmoid, rngs=rngs)

    def crop_scores(self, crops: Array) -> Array:
        """[M, S, S, 3] in [0, 1] (S = img_size) -> [M] crop scores."""
        cfg = self.cfg
        g = cfg.grid
        x = (jnp.asarray(crops, jnp.float32) - 0.5) / 0.5
        feats = self.vit(x)
        x = jnp.concatenate([f[:, 1:] for f in feats], axis=-1)        # [M, N, 4*D] (CLS dropped)
        m = x.shape[0]
        x = jnp.swapaxes(x, 1, 2)                                       # b (h w) c -> b c (h w)
        for tab in self.tablock1:
            x = tab(x)
        x = self.conv1(jnp.swapaxes(x, 1, 2).reshape(m, g, g, -1))      # NHWC 1x1 conv
        x = self.swintransformer1(x.reshape(m, g * g, -1))
        x = jnp.swapaxes(x, 1, 2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.conv2(jnp.swapaxes(x, 1, 2).reshape(m, g, g, -1))
        x = self.swintransformer2(x.reshape(m, g * g, -1))
        f, w = self.fc_score(x), self.fc_weight(x)                       # [M, N, outputs]
        return jnp.sum(f * w, axis=(1, 2)) / jnp.sum(w, axis=(1, 2))

    def __call__(self, images: Array) -> Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"MANIQA takes NHWC RGB images, got shape {tuple(images.shape)}")
        s, k = self.cfg.img_size, self.cfg.num_crops
        n, h, w, _ = images.shape
        x = jnp.asarray(images, jnp.float32)
        if min(h, w) < s:
            f = s / min(h, w)
            h, w = max(s, int(round(h * f))), max(s, int(round(w * f)))
            x = jax.image.resize(x, (n, h, w, 3), "bicubic")
        crops = jnp.stack([x[:, y:y + s, xx:xx + s] for y, xx in crop_positions(h, w, s, k)], axis=1)
        scores = self.crop_scores(crops.reshape(n * k, s, s, 3))
        return scores.reshape(n, k).mean(axis=1)


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: MANIQAConfig) -> MANIQA:
    return nnx.eval_shape(lambda: MANIQA(cfg, rngs=nnx.Rngs(0)))


def params_from_published(sd: Mapping[str, np.ndarray], source: str = "weights",
                              preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """IIGROUP/MANIQA state dict -> (config, {our key: array}).

    Ignored: ViT blocks after the last feature block, `vit.norm`, `vit.fc_norm`, `vit.head`,
    the unused `swintransformer*.downsample` conv, and the `relative_position_index` /
    `attn_mask` buffers (recomputed).
    """
    import re

    from fluxir_jax.iqa import weights as weights_io

    if preset not in PRESETS:
        raise UserError(f"unknown MANIQA preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    used = cfg.vit_depth_used

    def ignore(k: str) -> bool:
        m = re.match(r"vit\.blocks\.(\d+)\.", k)
        if m:
            return int(m.group(1)) >= used
        return (k.startswith(("vit.norm.", "vit.fc_norm.", "vit.head.", "swintransformer1.downsample.",
                              "swintransformer2.downsample."))
                or k.endswith((".relative_position_index", ".attn_mask")))

    def rename(k: str) -> str:
        return re.sub(r"^(fc_score|fc_weight)\.fc(\d+)\.", r"\1.\2.", k)

    ours = weights_io.abstract_shapes(abstract_model(cfg))
    return config_io.to_dict(cfg), weights_io.torch_to_ours(sd, ours, source, rename=rename, ignore=ignore)


def load_maniqa(weights: str, preset: str = "koniq") -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) from a converted MANIQA file or an IIGROUP/MANIQA state dict saved as
    `.safetensors` (a PyTorch `.pt` is refused with the convert-iqa command that converts it)."""
    from fluxir_jax.iqa import weights as weights_io

    cfg_dict, flat = weights_io.load_flat("maniqa", weights, lambda sd, src: params_from_published(sd, src, preset))
    return weights_io.build_state(abstract_model(config_io.from_dict(MANIQAConfig, cfg_dict)), flat, source=str(weights))


def make_maniqa(weights: str, preset: str = "koniq") -> Callable[[Array], Array]:
    """A jitted batched scorer: NHWC [0, 1] images (one size per batch) -> MANIQA scores [N]."""
    graphdef, state = load_maniqa(weights, preset=preset)
    from fluxir_jax.iqa.registry import model_scorer

    return functools.partial(model_scorer, graphdef, state)


def _registry_factory(preset: str) -> Callable[..., Callable[[Array], Array]]:
    def factory(weights):
        from fluxir_jax.iqa.registry import as_rgb, single_path

        scorer = make_maniqa(str(single_path("MANIQA", weights)), preset=preset)
        return lambda pred: scorer(as_rgb(pred))
    return factory


def _register() -> None:
    from fluxir_jax.iqa.registry import register_metric

    register_metric("maniqa", _registry_factory("koniq"), kind="nr", needs_weights=True, lower_better=False,
                    description="MANIQA (KonIQ-10k state dict ckpt_koniq10k.pt or converted), 20 crops, ~0-1")
    register_metric("maniqa-kadid", _registry_factory("kadid"), kind="nr", needs_weights=True, lower_better=False,
                    description="MANIQA (KADID-10k state dict), 20 crops")
    register_metric("maniqa-pipal", _registry_factory("pipal"), kind="nr", needs_weights=True, lower_better=False,
                    description="MANIQA (PIPAL state dict, residual scale 0.13), 20 crops")


_register()
