"""MUSIQ: multi-scale image quality transformer (Ke et al., ICCV 2021), original Flax semantics.

An image becomes one token sequence made of 32x32 patches (stride 32, TF "SAME" zero padding)
from several scales: aspect-preserving resizes to longer side 224 and 384 (TF Gaussian
`scale_and_translate`, radius 1.5, sigma 0.5, no antialiasing; each scale zero-padded to
ceil(L/32)^2 tokens with mask 0) followed by every patch of the native resolution. Each patch
goes through a ResNet stem (weight-standardised 7x7/2 conv, GroupNorm(32), 3x3/2 max pool, one
bottleneck unit) and a dense layer to 384; a hashed spatial embedding (10x10 grid, legacy TF
nearest-neighbour hash of the patch row/column), a scale embedding and a CLS token are added;
14 pre-norm encoder blocks (6 heads, MLP 1152, tanh-GELU, LayerNorm eps 1e-6, padding masked as
keys); the CLS output goes through `head`. KonIQ/SPAQ/PaQ-2-PiQ checkpoints predict the score
directly; AVA predicts a 10-bin distribution whose mean (1..10) is the score.

This follows google-research/google-research `musiq/` (Apache-2.0): `model/preprocessing.py`
(TF), `model/multiscale_transformer.py`, `model/resnet.py`. Parameter names mirror the original
Flax checkpoint tree (`opt/target/Transformer/encoderblock_0/SelfAttention_0/query/kernel`
-> `Transformer.encoderblock_0.SelfAttention_0.query.kernel`), so the `.npz` converts by
renaming only. Inputs: NHWC float in [0, 1] (the original decodes uint8 and maps to [-1, 1]);
every image of a batch has the same size, so all shapes are static and the whole pipeline jits.

Public API:
    MUSIQConfig, PRESETS
    multiscale_tokens(images, cfg) -> (patches [N, L, p*p*3], spatial [N, L], scale [N, L], mask [N, L])
    MUSIQ(config, rngs=...)            model(images) -> scores [N]; model.from_tokens(...) -> raw outputs
    load_musiq(weights, preset="koniq") -> (graphdef, state)
    make_musiq(weights, preset="koniq") -> jitted images -> scores
    registry names: "musiq" (koniq), "musiq-spaq", "musiq-ava"
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError

Array = jax.Array
GAUSSIAN_RADIUS = 1.5
GAUSSIAN_SIGMA = GAUSSIAN_RADIUS / 3.0

# musiq/model/resnet.py get_block_desc: resnet layers -> (blocks per stage, bottleneck)
_BLOCK_DESC = {5: ([1], True), 8: ([1, 1], True), 11: ([1, 1, 1], True), 14: ([1, 1, 1, 1], True),
               9: ([1, 1, 1, 1], False), 18: ([2, 2, 2, 2], False), 26: ([2, 2, 2, 2], True),
               34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True)}


@dataclasses.dataclass(frozen=True)
class MUSIQConfig:
    # preprocessing (run_predict_image.py _PP_CONFIG)
    patch_size: int = 32
    hse_grid_size: int = 10
    longer_side_lengths: tuple[int, ...] = (224, 384)
    use_original_resolution: bool = True       # max_seq_len_from_original_res = -1
    # model (_MODEL_CONFIG)
    hidden_size: int = 384
    resnet_num_layers: int = 5
    resnet_token_dim: int = 64                 # RESNET_TOKEN_DIM
    gn_groups: int = 32                        # flax.nn.GroupNorm default
    num_layers: int = 14
    num_heads: int = 6
    mlp_dim: int = 1152
    num_classes: int = 1                       # 1: MOS regression; 10: AVA distribution

    @property
    def num_scales(self) -> int:
        return len(self.longer_side_lengths) + int(self.use_original_resolution)



PRESETS: dict[str, MUSIQConfig] = {
    "koniq": MUSIQConfig(),
    "spaq": MUSIQConfig(),
    "paq2piq": MUSIQConfig(),
    "ava": MUSIQConfig(num_classes=10),
    # Tests: 16x16 patches, two tiny layers.
    "tiny": MUSIQConfig(patch_size=16, hse_grid_size=4, longer_side_lengths=(32, 64), hidden_size=32,
                        resnet_token_dim=16, gn_groups=8, num_layers=2, num_heads=2, mlp_dim=48),
}


# ----------------------------------------------------------------------------- preprocessing (host math, static shapes)


def resized_size(h: int, w: int, longer_side: int) -> tuple[int, int]:
    """preprocessing.resize_preserve_aspect_ratio: float32 ratio, tf.round (half to even)."""
    ratio = np.float32(longer_side) / np.float32(max(h, w))
    return int(np.round(np.float32(h) * ratio)), int(np.round(np.float32(w) * ratio))


def gaussian_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of TF `scale_and_translate(kernel_type='gaussian', antialias=False)`, scale out/in."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0) / scale
    sample = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale   # input coordinate of each output
    dist = np.abs(np.arange(in_size, dtype=np.float32)[None, :] + np.float32(0.5) - sample[:, None])
    wts = np.where(dist < GAUSSIAN_RADIUS, np.exp(-dist.astype(np.float64) ** 2 / (2 * GAUSSIAN_SIGMA**2)), 0.0)
    total = wts.sum(axis=1, keepdims=True)
    return (wts / np.where(total > 0, total, 1.0)).astype(np.float32)


def hash_positions(count: int, grid: int) -> np.ndarray:
    """Legacy TF resize_nearest_neighbor (align_corners=False, no half-pixel) of range(grid) to `count`."""
    scale = np.float32(grid) / np.float32(count)
    return np.minimum(np.floor(np.arange(count, dtype=np.float32) * scale).astype(np.int64), grid - 1)


def _patches_same(x: Array, p: int) -> tuple[Array, int, int]:
    """tf.image.extract_patches(size=stride=p, padding='SAME') on NHWC -> [N, ch*cw, p*p*C] row-major."""
    n, h, w, c = x.shape
    ch, cw = -(-h // p), -(-w // p)
    ph, pw = ch * p - h, cw * p - w
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    x = x.reshape(n, ch, p, cw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, ch * cw, p * p * c), ch, cw


def multiscale_tokens(images: Array, cfg: MUSIQConfig) -> tuple[Array, Array, Array, Array]:
    """The multi-scale patch sequence of `preprocessing.get_multiscale_patches` for a batch.

    images: NHWC in [0, 1]. Returns patches [N, L, p*p*3] (values in [-1, 1], zero padding),
    spatial hash index [N, L] int32, scale index [N, L] int32 and mask [N, L] bool.
    """
    x = jnp.asarray(images, jnp.float32) * 2.0 - 1.0
    n, h, w, _ = x.shape
    p, grid = cfg.patch_size, cfg.hse_grid_size
    parts = []

    def one_scale(img, scale_id, max_len):
        pt, ch, cw = _patches_same(img, p)
        sp = (hash_positions(ch, grid)[:, None] * grid + hash_positions(cw, grid)[None, :]).reshape(-1)
        k = pt.shape[1]
        sc = np.full((k,), scale_id, np.int64)
        mk = np.ones((k,), bool)
        if max_len >= 0:
            if k >= max_len:
                pt, sp, sc, mk = pt[:, :max_len], sp[:max_len], sc[:max_len], mk[:max_len]
            else:
                pt = jnp.pad(pt, ((0, 0), (0, max_len - k), (0, 0)))
                pad = max_len - k
                sp = np.concatenate([sp, np.zeros(pad, np.int64)])
                sc = np.concatenate([sc, np.zeros(pad, np.int64)])
                mk = np.concatenate([mk, np.zeros(pad, bool)])
        parts.append((pt, sp, sc, mk))

    for scale_id, longer in enumerate(sorted(cfg.longer_side_lengths)):
        rh, rw = resized_size(h, w, longer)
        # tf2 image.resize never skips: at scale 1 the Gaussian still blurs (weights 1, e^-2, ...)
        mh, mw = gaussian_resize_matrix(h, rh), gaussian_resize_matrix(w, rw)
        img = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
        img = jnp.einsum("pw,nowc->nopc", mw, img, precision=jax.lax.Precision.HIGHEST)
        one_scale(img, scale_id, int(math.ceil(longer / p) ** 2))
    if cfg.use_original_resolution:
        one_scale(x, len(cfg.longer_side_lengths), -1)
    patches = jnp.concatenate([q[0] for q in parts], axis=1)
    spatial, scale, mask = (np.concatenate([q[i] for q in parts]) for i in (1, 2, 3))
    bc = lambda a, dt: jnp.broadcast_to(jnp.asarray(a, dt)[None], (n, a.shape[0]))  # noqa: E731
    return patches, bc(spatial, jnp.int32), bc(scale, jnp.int32), bc(mask, jnp.bool_)


# ----------------------------------------------------------------------------- layers


class StdConv(nnx.Module):
    """flax.nn.Conv with the kernel weight-standardised at apply time (mean/std over HWI, eps 1e-5)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (k, k, cin, cout)) * (k * k * cin) ** -0.5)

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...]
        w = w - jnp.mean(w, axis=(0, 1, 2))
        w = w / (jnp.std(w, axis=(0, 1, 2)) + 1e-5)
        return jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _gn(c: int, groups: int, eps: float, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


class ResidualUnit(nnx.Module):
    """musiq/model/resnet.py ResidualUnit (GroupNorm eps 1e-4)."""

    def __init__(self, cin: int, nout: int, stride: int, bottleneck: bool, groups: int, *, rngs: nnx.Rngs):
        self.bottleneck = bottleneck
        out = nout * 4 if bottleneck else nout
        if cin != out or stride != 1:
            self.conv_proj = StdConv(cin, out, 1, stride, rngs=rngs)
            self.gn_proj = _gn(out, groups, 1e-4, rngs)
        else:
            self.conv_proj = self.gn_proj = None
        c2_in = cin
        if bottleneck:
            self.conv1 = StdConv(cin, nout, 1, 1, rngs=rngs)
            self.gn1 = _gn(nout, groups, 1e-4, rngs)
            c2_in = nout
        else:
            self.conv1 = self.gn1 = None
        self.conv2 = StdConv(c2_in, nout, 3, stride, rngs=rngs)
        self.gn2 = _gn(nout, groups, 1e-4, rngs)
        self.conv3 = StdConv(nout, out, 1 if bottleneck else 3, 1, rngs=rngs)
        self.gn3 = _gn(out, groups, 1e-4, rngs)

    def __call__(self, x: Array) -> Array:
        residual = x
        if self.conv_proj is not None:
            residual = self.gn_proj(self.conv_proj(x))
        if self.conv1 is not None:
            x = jax.nn.relu(self.gn1(self.conv1(x)))
        x = jax.nn.relu(self.gn2(self.conv2(x)))
        x = self.gn3(self.conv3(x))
        return jax.nn.relu(residual + x)


class DenseGeneral(nnx.Module):
    """flax.nn.DenseGeneral as used by the attention: kernel [in..., out...] and bias [out...]."""

    def __init__(self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...], fan_in: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), kernel_shape) * fan_in**-0.5)
        self.bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), bias_shape))


class SelfAttention(nnx.Module):
    """flax.nn.SelfAttention: query/key/value kernels [D, H, hd], out kernel [H, hd, D]; padding mask."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        hd = dim // heads
        self.query = DenseGeneral((dim, heads, hd), (heads, hd), dim, rngs=rngs)
        self.key = DenseGeneral((dim, heads, hd), (heads, hd), dim, rngs=rngs)
        self.value = DenseGeneral((dim, heads, hd), (heads, hd), dim, rngs=rngs)
        self.out = DenseGeneral((heads, hd, dim), (dim,), dim, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        proj = lambda m: jnp.einsum("nld,dhk->nlhk", x, m.kernel[...]) + m.bias[...]  # noqa: E731
        q, k, v = proj(self.query), proj(self.key), proj(self.value)
        q = q / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits = jnp.einsum("nqhk,nlhk->nhql", q, k)
        valid = mask[:, None, :, None] & mask[:, None, None, :]   # flax.nn make_padding_mask(q, k)
        logits = jnp.where(valid, logits, -1e10)
        attn = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("nhql,nlhk->nqhk", attn, v)
        return jnp.einsum("nqhk,hkd->nqd", o, self.out.kernel[...]) + self.out.bias[...]


class MlpBlock(nnx.Module):
    def __init__(self, dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.Dense_0 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.Dense_1 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=True))  # flax.nn.gelu = tanh GELU


class Encoder1DBlock(nnx.Module):
    def __init__(self, cfg: MUSIQConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.LayerNorm_0 = nnx.LayerNorm(d, epsilon=1e-6, use_fast_variance=False, rngs=rngs)
        self.SelfAttention_0 = SelfAttention(d, cfg.num_heads, rngs=rngs)
        self.LayerNorm_1 = nnx.LayerNorm(d, epsilon=1e-6, use_fast_variance=False, rngs=rngs)
        self.MlpBlock_0 = MlpBlock(d, cfg.mlp_dim, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        x = x + self.SelfAttention_0(self.LayerNorm_0(x), mask)
        return x + self.MlpBlock_0(self.LayerNorm_1(x))


class _Embedding(nnx.Module):
    def __init__(self, name: str, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        setattr(self, name, nnx.Param(0.02 * jax.random.normal(rngs.params(), shape)))


class Encoder(nnx.Module):
    """musiq multiscale_transformer_utils.Encoder (hashed spatial + scale embeddings, CLS, blocks, norm)."""

    def __init__(self, cfg: MUSIQConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_layers = cfg.num_layers
        self.posembed_input = _Embedding("pos_embedding", (1, cfg.hse_grid_size**2, d), rngs=rngs)
        self.scaleembed_input = _Embedding("scale_embedding", (1, cfg.num_scales, d), rngs=rngs)
        self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d)))
        for i in range(cfg.num_layers):
            setattr(self, f"encoderblock_{i}", Encoder1DBlock(cfg, rngs=rngs))
        self.encoder_norm = nnx.LayerNorm(d, epsilon=1e-6, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: Array, spatial: Array, scale: Array, mask: Array) -> Array:
        x = x + jnp.take(self.posembed_input.pos_embedding[...][0], spatial, axis=0)
        x = x + jnp.take(self.scaleembed_input.scale_embedding[...][0], scale, axis=0)
        n = x.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, x.shape[-1])), x], axis=1)
        mask = jnp.concatenate([jnp.ones((n, 1), bool), mask], axis=1)
        for i in range(self.num_layers):
            x = getattr(self, f"encoderblock_{i}")(x, mask)
        return self.encoder_norm(x)


class MUSIQ(nnx.Module):
    """MUSIQ scorer: images NHWC in [0, 1] -> scores [N] (MOS; AVA: mean of the 1..10 distribution)."""

    def __init__(self, cfg: MUSIQConfig, *, rngs: nnx.Rngs):
        if cfg.resnet_num_layers not in _BLOCK_DESC:
            raise UserError(f"unsupported MUSIQ resnet_num_layers {cfg.resnet_num_layers}")
        self.cfg = cfg
        t = cfg.resnet_token_dim
        self.conv_root = StdConv(3, t, 7, 2, rngs=rngs)
        self.gn_root = _gn(t, cfg.gn_groups, 1e-6, rngs)
        blocks, bottleneck = _BLOCK_DESC[cfg.resnet_num_layers]
        cin = t
        self.num_stages = len(blocks)
        for i, size in enumerate(blocks):
            stage = nnx.Module()
            nout = t * 2**i
            for u in range(size):
                setattr(stage, f"unit{u + 1}", ResidualUnit(cin, nout, 2 if (i > 0 and u == 0) else 1, bottleneck,
                                                            cfg.gn_groups, rngs=rngs))
                cin = nout * 4 if bottleneck else nout
            setattr(self, f"block{i + 1}", stage)
        self.stage_sizes = tuple(blocks)
        side = -(-cfg.patch_size // 4)              # conv /2 then max pool /2, SAME
        for _ in blocks[1:]:
            side = -(-side // 2)
        self.embedding = nnx.Linear(side * side * cin, cfg.hidden_size, rngs=rngs)
        self.Transformer = Encoder(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden_size, cfg.num_classes, rngs=rngs)

    def embed_patches(self, patches: Array) -> Array:
        """[N, L, p*p*3] -> [N, L, hidden] through the ResNet stem and `embedding`."""
        n, l, _ = patches.shape
        p = self.cfg.patch_size
        x = patches.reshape(n * l, p, p, 3)
        x = jax.nn.relu(self.gn_root(self.conv_root(x)))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
        for i, size in enumerate(self.stage_sizes):
            stage = getattr(self, f"block{i + 1}")
            for u in range(size):
                x = getattr(stage, f"unit{u + 1}")(x)
        return self.embedding(x.reshape(n, l, -1))

    def from_tokens(self, patches: Array, spatial: Array, scale: Array, mask: Array) -> Array:
        """Raw head outputs [N, num_classes] from a token sequence (see `multiscale_tokens`)."""
        x = self.Transformer(self.embed_patches(patches), spatial, scale, mask)
        return self.head(x[:, 0])

    def __call__(self, images: Array) -> Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"MUSIQ takes NHWC RGB images, got shape {tuple(images.shape)}")
        logits = self.from_tokens(*multiscale_tokens(images, self.cfg))
        if self.cfg.num_classes == 1:
            return logits[:, 0]
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.sum(probs * jnp.arange(1, self.cfg.num_classes + 1, dtype=probs.dtype), axis=-1)


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: MUSIQConfig) -> MUSIQ:
    return nnx.eval_shape(lambda: MUSIQ(cfg, rngs=nnx.Rngs(0)))


def params_from_published(tensors: Mapping[str, np.ndarray], source: str = "weights",
                          preset: str = "koniq") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Original MUSIQ Flax checkpoint (`opt/target/...` npz keys) -> (config, {our key: array}).

    Optimizer state (`opt/state/...`) and an empty/unused `pre_logits` are ignored.
    """
    from fluxir_jax.iqa import weights as weights_io

    if preset not in PRESETS:
        raise UserError(f"unknown MUSIQ preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in tensors) else ""
    ours = weights_io.abstract_shapes(abstract_model(cfg))
    wanted = {prefix + key.replace(".", "/"): (key, shape) for key, (_, shape) in ours.items()}
    out = {}
    for k, v in tensors.items():
        if k not in wanted:
            rest = k[len(prefix):] if k.startswith(prefix) else k
            if (prefix and not k.startswith(prefix)) or rest.startswith("pre_logits/"):
                continue
            raise UserError(f"{source}: unexpected key {k!r} (not a MUSIQ {preset} checkpoint?)")
        key, shape = wanted[k]
        a = np.asarray(v, np.float32)
        if tuple(a.shape) != tuple(shape):
            raise UserError(f"{source}: key {k!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                            f"(not a MUSIQ {preset} checkpoint?)")
        out[key] = a
    for k, (key, _) in wanted.items():
        if key not in out:
            raise UserError(f"{source}: missing key {k!r} (not a MUSIQ {preset} checkpoint?)")
    return config_io.to_dict(cfg), {k: out[k] for k in ours}


def load_musiq(weights: str, preset: str = "koniq") -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) from a converted MUSIQ file or an original Flax checkpoint `.npz`."""
    from fluxir_jax.iqa import weights as weights_io

    cfg_dict, flat = weights_io.load_flat("musiq", weights, lambda t, src: params_from_published(t, src, preset))
    return weights_io.build_state(abstract_model(config_io.from_dict(MUSIQConfig, cfg_dict)), flat, source=str(weights))


def make_musiq(weights: str, preset: str = "koniq") -> Callable[[Array], Array]:
    """A jitted batched scorer: NHWC [0, 1] images (one size per batch) -> MUSIQ scores [N]."""
    graphdef, state = load_musiq(weights, preset=preset)
    from fluxir_jax.iqa.registry import model_scorer

    return functools.partial(model_scorer, graphdef, state)


def _registry_factory(preset: str) -> Callable[..., Callable[[Array], Array]]:
    def factory(weights):
        from fluxir_jax.iqa.registry import as_rgb, single_path

        scorer = make_musiq(str(single_path("MUSIQ", weights)), preset=preset)
        return lambda pred: scorer(as_rgb(pred))
    return factory


def _register() -> None:
    from fluxir_jax.iqa.registry import register_metric

    register_metric("musiq", _registry_factory("koniq"), kind="nr", needs_weights=True, lower_better=False,
                    description="MUSIQ (KonIQ-10k checkpoint koniq_ckpt.npz or converted), ~0-100")
    register_metric("musiq-spaq", _registry_factory("spaq"), kind="nr", needs_weights=True, lower_better=False,
                    description="MUSIQ (SPAQ checkpoint spaq_ckpt.npz), ~0-100")
    register_metric("musiq-ava", _registry_factory("ava"), kind="nr", needs_weights=True, lower_better=False,
                    description="MUSIQ (AVA checkpoint ava_ckpt.npz), mean of the 1-10 distribution")


_register()
