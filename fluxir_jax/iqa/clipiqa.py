"""CLIP-IQA: no-reference quality from CLIP ResNet-50 image features and antonym prompt pairs.

Score of an image = mean over prompt pairs of softmax(logit_scale * cos(image, [pos, neg]))[pos],
in [0, 1], higher is better (Wang, Chan, Loy, "Exploring CLIP for Assessing the Look and Feel
of Images", AAAI 2023). Two prompt sets:

    "ensemble"  ('Good image', 'bad image'), ('Sharp image', 'blurry image'),
                ('sharp edges', 'blurry edges'), ('High resolution image', 'low resolution image'),
                ('Noise-free image', 'noisy image')        (the five-pair ensemble papers report)
    "original"  ('Good photo.', 'Bad photo.')              (the single pair of the CLIP-IQA paper)

The image tower is OpenAI CLIP's modified ResNet (3-conv stem with average pooling, anti-aliased
strided bottlenecks, attention pooling). As in CLIP-IQA, the attention pool runs *without* its
positional embedding, so any input size works and no resize is done; `pos_embedding=True` gives
plain CLIP (input must then be `image_size` square). BatchNorm is in inference mode (eps 1e-5).
Inputs are NHWC in [0, 1], normalised with OpenAI CLIP's mean/std inside the model.

Text features are constants: the converter (`fluxir convert-iqa clipiqa`) runs the CLIP text tower
once in PyTorch and stores the L2-normalised prompt embeddings beside the image tower weights,
so scoring needs only JAX. Parameter names mirror the OpenAI/open_clip state dict
(`visual.layer1.0.conv1.weight` -> `visual.layer1[0].conv1.kernel`, `downsample.0/1`).

Public API:
    CLIPResNetConfig, CLIPIQAConfig, PRESETS, PROMPT_SETS
    CLIPIQA(config, rngs=...)            nnx.Module; model(images) -> scores [N]
    load_clipiqa(weights, prompts="ensemble", pos_embedding=False) -> (graphdef, state)
    make_clipiqa(weights, prompts="ensemble", pos_embedding=False) -> jitted images -> scores
    registry names: "clipiqa" (ensemble), "clipiqa-original"
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError

Array = jax.Array

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BN_EPS = 1e-5

PROMPT_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "ensemble": (
        ("Good image", "bad image"),
        ("Sharp image", "blurry image"),
        ("sharp edges", "blurry edges"),
        ("High resolution image", "low resolution image"),
        ("Noise-free image", "noisy image"),
    ),
    "original": (("Good photo.", "Bad photo."),),
}


@dataclasses.dataclass(frozen=True)
class CLIPResNetConfig:
    """OpenAI CLIP ModifiedResNet sizes (open_clip `ModifiedResNet(layers, output_dim, heads, image_size, width)`)."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32
    output_dim: int = 1024
    image_size: int = 224  # the positional-embedding grid is image_size // 32 (used only with pos_embedding)
    # heads is not stored in a checkpoint: OpenAI CLIP always uses width * 32 // 64

    @property
    def embed_dim(self) -> int:
        return self.width * 32


PRESETS: dict[str, CLIPResNetConfig] = {
    "RN50": CLIPResNetConfig(),
    "RN101": CLIPResNetConfig(layers=(3, 4, 23, 3), output_dim=512),
    "RN50x4": CLIPResNetConfig(layers=(4, 6, 10, 6), width=80, heads=40, output_dim=640, image_size=288),
    # Tests: a few thousand parameters.
    "tiny": CLIPResNetConfig(layers=(1, 2, 1, 1), width=8, heads=4, output_dim=16, image_size=64),
}


@dataclasses.dataclass(frozen=True)
class CLIPIQAConfig:
    visual: CLIPResNetConfig = CLIPResNetConfig()
    prompts: str = "ensemble"          # a key of PROMPT_SETS
    pos_embedding: bool = False        # CLIP-IQA drops it (any input size); True = plain CLIP

    def __post_init__(self):
        if self.prompts not in PROMPT_SETS:
            raise UserError(f"unknown CLIP-IQA prompt set {self.prompts!r} (known: {', '.join(PROMPT_SETS)})")

    @property
    def num_pairs(self) -> int:
        return len(PROMPT_SETS[self.prompts])



class Constant(nnx.Variable):
    """A stored array that is not a trainable parameter (here: the prompt text embeddings)."""


# ----------------------------------------------------------------------------- layers


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=False, rngs=rngs)


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, use_running_average=True, epsilon=BN_EPS, use_fast_variance=False, rngs=rngs)


def avg_pool(x: Array, k: int) -> Array:
    """torch AvgPool2d(k) (kernel = stride = k, floor mode) on NHWC."""
    if k == 1:
        return x
    n, h, w, c = x.shape
    h2, w2 = h // k, w // k
    x = x[:, : h2 * k, : w2 * k]
    return x.reshape(n, h2, k, w2, k, c).mean(axis=(2, 4))


class Bottleneck(nnx.Module):
    """CLIP bottleneck: 1x1, 3x3, avgpool(stride), 1x1 (x4); downsample = avgpool, 1x1 conv, BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.conv1 = _conv(inplanes, planes, 1, 1, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, rngs)
        self.bn2 = _bn(planes, rngs)
        self.conv3 = _conv(planes, planes * 4, 1, 1, rngs)
        self.bn3 = _bn(planes * 4, rngs)
        if stride > 1 or inplanes != planes * 4:
            # checkpoint names: downsample.0 (conv), downsample.1 (bn); the avgpool has no params
            self.downsample = nnx.List([_conv(inplanes, planes * 4, 1, 1, rngs), _bn(planes * 4, rngs)])
        else:
            self.downsample = None

    def __call__(self, x: Array) -> Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = avg_pool(out, self.stride)
        out = self.bn3(self.conv3(out))
        identity = x
        if self.downsample is not None:
            identity = self.downsample[1](self.downsample[0](avg_pool(x, self.stride)))
        return jax.nn.relu(out + identity)


class AttentionPool2d(nnx.Module):
    """CLIP attention pooling: the mean token attends to [mean, all positions]; returns that token."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (grid * grid + 1, embed_dim)) / embed_dim**0.5)
        self.q_proj = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
        self.k_proj = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
        self.v_proj = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
        self.c_proj = nnx.Linear(embed_dim, output_dim, rngs=rngs)

    def __call__(self, x: Array, use_pos_embedding: bool) -> Array:
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [N, HW+1, C]
        if use_pos_embedding:
            pe = self.positional_embedding[...]
            if pe.shape[0] != h * w + 1:
                side = int(round((pe.shape[0] - 1) ** 0.5))
                raise UserError(f"CLIP with its positional embedding needs a {side * 32}x{side * 32} input, "
                                f"got {h * 32}x{w * 32} features grid")
            x = x + pe[None].astype(x.dtype)
        d = c // self.heads
        q = (self.q_proj(x[:, 0]) * d**-0.5).reshape(n, self.heads, d)          # [N, H, D]
        k = self.k_proj(x).reshape(n, h * w + 1, self.heads, d)                   # [N, L, H, D]
        v = self.v_proj(x).reshape(n, h * w + 1, self.heads, d)
        logits = jnp.einsum("nhd,nlhd->nhl", q, k)
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("nhl,nlhd->nhd", attn, v).reshape(n, c)
        return self.c_proj(out)


class ModifiedResNet(nnx.Module):
    """OpenAI CLIP image tower (open_clip `ModifiedResNet`), NHWC."""

    def __init__(self, cfg: CLIPResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.width
        self.conv1 = _conv(3, w // 2, 3, 2, rngs)
        self.bn1 = _bn(w // 2, rngs)
        self.conv2 = _conv(w // 2, w // 2, 3, 1, rngs)
        self.bn2 = _bn(w // 2, rngs)
        self.conv3 = _conv(w // 2, w, 3, 1, rngs)
        self.bn3 = _bn(w, rngs)
        inplanes = w
        for i, (blocks, mult) in enumerate(zip(cfg.layers, (1, 2, 4, 8))):
            planes = w * mult
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(inplanes, planes, 2 if (i > 0 and b == 0) else 1, rngs=rngs))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nnx.List(layer))
        self.attnpool = AttentionPool2d(cfg.image_size // 32, cfg.embed_dim, cfg.heads, cfg.output_dim, rngs=rngs)

    def features(self, x: Array) -> Array:
        """Normalised NHWC input -> layer4 feature map [N, H/32, W/32, 32*width]."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        x = avg_pool(x, 2)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        return x

    def __call__(self, x: Array, use_pos_embedding: bool = True) -> Array:
        """Normalised NHWC input -> image embedding [N, output_dim] (not L2-normalised)."""
        return self.attnpool(self.features(x), use_pos_embedding)


class CLIPIQA(nnx.Module):
    """CLIP-IQA scorer: images NHWC in [0, 1] -> scores [N] in [0, 1]."""

    def __init__(self, cfg: CLIPIQAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = ModifiedResNet(cfg.visual, rngs=rngs)
        tf = jax.random.normal(rngs.params(), (cfg.num_pairs, 2, cfg.visual.output_dim))
        self.text_features = Constant(tf / jnp.linalg.norm(tf, axis=-1, keepdims=True))  # L2-normalised
        self.logit_scale = Constant(jnp.asarray(100.0, jnp.float32))  # exp of the checkpoint's logit_scale

    def image_features(self, images: Array) -> Array:
        mean = jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)
        std = jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
        x = (jnp.asarray(images, jnp.float32) - mean) / std
        return self.visual(x, use_pos_embedding=self.cfg.pos_embedding)

    def __call__(self, images: Array) -> Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"CLIP-IQA takes NHWC RGB images, got shape {tuple(images.shape)}")
        f = self.image_features(images)
        f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        t = self.text_features[...]
        logits = self.logit_scale[...] * jnp.einsum("nc,pkc->npk", f, t)   # [N, pairs, 2]
        return jax.nn.softmax(logits, axis=-1)[..., 0].mean(axis=-1)


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: CLIPIQAConfig) -> CLIPIQA:
    return nnx.eval_shape(lambda: CLIPIQA(cfg, rngs=nnx.Rngs(0)))


def load_clipiqa(weights: str, prompts: str = "ensemble", pos_embedding: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) from a CLIP-IQA file made by `fluxir convert-iqa clipiqa` (which runs the
    CLIP text tower once, in PyTorch, to embed the prompts); a published CLIP file is refused
    with that command."""
    from fluxir_jax.iqa import weights as weights_io

    if prompts not in PROMPT_SETS:
        raise UserError(f"unknown CLIP-IQA prompt set {prompts!r} (known: {', '.join(PROMPT_SETS)})")

    def published(sd, source):
        raise UserError(f"{source}: not a converted CLIP-IQA file; {weights_io.convert_hint('clipiqa')}")

    cfg_dict, flat = weights_io.load_flat("clipiqa", weights, published)
    cfg = config_io.from_dict(CLIPIQAConfig, {**cfg_dict, "prompts": prompts, "pos_embedding": pos_embedding})
    flat = dict(flat)
    key = f"text_features.{prompts}"
    if key not in flat:
        raise UserError(f"{weights}: no text features for prompt set {prompts!r} (missing key {key!r})")
    flat["text_features"] = flat[key]
    flat = {k: v for k, v in flat.items() if not k.startswith("text_features.")}
    return weights_io.build_state(abstract_model(cfg), flat, source=str(weights))


def make_clipiqa(weights: str, prompts: str = "ensemble", pos_embedding: bool = False) -> Callable[[Array], Array]:
    """A jitted batched scorer: NHWC [0, 1] images -> CLIP-IQA scores [N]."""
    graphdef, state = load_clipiqa(weights, prompts=prompts, pos_embedding=pos_embedding)
    from fluxir_jax.iqa.registry import model_scorer

    return functools.partial(model_scorer, graphdef, state)


def _registry_factory(prompts: str) -> Callable[..., Callable[[Array], Array]]:
    def factory(weights):
        from fluxir_jax.iqa.registry import as_rgb, single_path

        scorer = make_clipiqa(str(single_path("CLIP-IQA", weights)), prompts=prompts)
        return lambda pred: scorer(as_rgb(pred))
    return factory


def _register() -> None:
    from fluxir_jax.iqa.registry import register_metric

    register_metric("clipiqa", _registry_factory("ensemble"), kind="nr", needs_weights=True, lower_better=False,
                    description="CLIP-IQA, RN50, 5 antonym prompt pairs, 0-1; weights = `fluxir convert-iqa clipiqa` "
                                "output")
    register_metric("clipiqa-original", _registry_factory("original"), kind="nr", needs_weights=True,
                    lower_better=False, description="CLIP-IQA with the single 'Good photo.'/'Bad photo.' pair, 0-1")


_register()
