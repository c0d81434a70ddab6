"""DISTS (Ding, Ma, Wang, Simoncelli, TPAMI 2020): structure and texture similarity on VGG16.

Architecture facts:
  * inputs in [0, 1]; the backbone sees (x - ImageNet mean) / ImageNet std, mean (.485, .456, .406),
    std (.229, .224, .225);
  * torchvision VGG16 `features` up to relu5_3 with every max-pool replaced by L2 pooling
    (`lpips.l2_pool`); the feature list is [x itself (un-normalised, 3 ch), relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3], 3 + 64 + 128 + 256 + 512 + 512 = 1475 channels;
  * per channel, global spatial statistics: S1 = (2 mx my + c1) / (mx^2 + my^2 + c1),
    S2 = (2 cov_xy + c2) / (var_x + var_y + c2) (biased variances), c1 = c2 = 1e-6;
  * learned alpha, beta (1475 each) divided by their joint sum; DISTS = 1 - sum(alpha S1 + beta S2)
    (lower = more similar), evaluated as sum(alpha (1 - S1) + beta (1 - S2)), the same number
    without the float32 cancellation of 1 - (a sum close to 1).

Parameter names: backbone `features.{i}` is `backbone.conv{i}` as in LPIPS-VGG; `alpha`, `beta`
are flat (1475,) vectors (the published (1, 1475, 1, 1) tensors, reshaped).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from fluxir_jax.iqa.lpips import VGG16Features

CHANNELS = (3, 64, 128, 256, 512, 512)
TOTAL = sum(CHANNELS)   # 1475
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6


class DISTS(nnx.Module):
    """`model(pred, gt)` with NHWC images in [0, 1] -> (N,) DISTS distances."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.backbone = VGG16Features("l2", rngs=rngs)
        self.alpha = nnx.Param(0.1 + 0.01 * jax.random.normal(rngs.params(), (TOTAL,)))
        self.beta = nnx.Param(0.1 + 0.01 * jax.random.normal(rngs.params(), (TOTAL,)))

    def __call__(self, pred: jax.Array, gt: jax.Array) -> jax.Array:
        n = pred.shape[0]
        x = jnp.concatenate([pred, gt], 0)
        h = (x - jnp.asarray(MEAN, x.dtype)) / jnp.asarray(STD, x.dtype)
        feats = [x] + self.backbone(h)
        alpha, beta = self.alpha[...], self.beta[...]
        w_sum = jnp.sum(alpha) + jnp.sum(beta)
        alpha, beta = alpha / w_sum, beta / w_sum
        # 1 - sum(a S1 + b S2) = sum(a (1 - S1) + b (1 - S2)) because the normalised weights sum to
        # 1; the right-hand form has no cancellation for similar images (float32-accurate near 0):
        # 1 - S1 = (mx - my)^2 / (mx^2 + my^2 + c1), 1 - S2 = E[(dx - dy)^2] / (vx + vy + c2).
        total = 0.0
        start = 0
        for c, f in zip(CHANNELS, feats):
            a, b = alpha[start:start + c], beta[start:start + c]
            start += c
            fx, fy = f[:n], f[n:]
            mx, my = jnp.mean(fx, axis=(1, 2)), jnp.mean(fy, axis=(1, 2))
            dx, dy = fx - mx[:, None, None], fy - my[:, None, None]
            vx, vy = jnp.mean(dx * dx, axis=(1, 2)), jnp.mean(dy * dy, axis=(1, 2))
            one_minus_s1 = (mx - my) ** 2 / (mx ** 2 + my ** 2 + C1)
            one_minus_s2 = jnp.mean((dx - dy) ** 2, axis=(1, 2)) / (vx + vy + C2)
            total = total + jnp.sum(a * one_minus_s1 + b * one_minus_s2, axis=-1)
        return total


def abstract_dists() -> DISTS:
    return nnx.eval_shape(lambda: DISTS(rngs=nnx.Rngs(0)))


def dists_from_params(params: dict) -> DISTS:
    """A DISTS module holding `params` (the pure-dict layout of `nnx.split(DISTS(...))[1]`)."""
    graphdef, state = nnx.split(abstract_dists())
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)
