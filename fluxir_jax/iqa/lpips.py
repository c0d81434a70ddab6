"""LPIPS v0.1 (Zhang et al., CVPR 2018) with AlexNet or VGG16 features, and the two backbones.

Architecture facts:
  * inputs in [0, 1] -> 2x - 1 -> (x - shift) / scale with shift (-.030, -.088, -.188) and
    scale (.458, .448, .450);
  * AlexNet: torchvision `alexnet().features`, ReLU outputs after its 5 convolutions
    (channels 64, 192, 384, 256, 256); VGG16: torchvision `vgg16().features`, relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3 (64, 128, 256, 512, 512); max-pools are floor-mode, unpadded;
  * per layer: unit-normalise along channels (x / (||x|| + 1e-10)), squared difference, the v0.1
    linear head (a 1x1 convolution to one channel, no bias; dropout is inert at evaluation),
    spatial mean; the score is the sum over the 5 layers (lower = more similar).

Parameter names mirror torchvision: backbone convolution `features.{i}` is `backbone.conv{i}`
(kernel HWIO = weight OIHW transposed), head `lin{k}.model.1.weight` is `lin{k}.kernel`.
Weights are never downloaded: `classic_weights.load_lpips` reads the published or converted files.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from fluxir_jax.errors import UserError

# torchvision feature index -> (in, out, kernel, stride, padding)
ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1),
              8: (384, 256, 3, 1, 1), 10: (256, 256, 3, 1, 1)}
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
               14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
               26: (512, 512), 28: (512, 512)}
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))   # a pool precedes stages 2-5
VGG16_POOLS = (4, 9, 16, 23)
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
NETS = tuple(CHANNELS)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def max_pool(x: jax.Array, size: int, stride: int) -> jax.Array:
    """torch MaxPool2d(size, stride) on NHWC: floor mode, no padding."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, size, size, 1), (1, stride, stride, 1), "VALID")


def l2_pool(x: jax.Array) -> jax.Array:
    """DISTS L2 pooling: sqrt(hanning-blur(x^2) + 1e-12), 3x3 filter outer([.5, 1, .5]) / 4,
    stride 2, padding 1, each channel on its own."""
    c = x.shape[-1]
    g = jnp.asarray([0.5, 1.0, 0.5], x.dtype)
    k = jnp.outer(g, g) / 4.0
    k = jnp.broadcast_to(k[:, :, None, None], (3, 3, 1, c))
    y = lax.conv_general_dilated(x * x, k, (2, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return jnp.sqrt(y + 1e-12)


class AlexNetFeatures(nnx.Module):
    """torchvision AlexNet `features`; returns the 5 ReLU outputs."""

    def __init__(self, *, rngs: nnx.Rngs):
        for i, (cin, cout, k, s, p) in ALEX_CONVS.items():
            setattr(self, f"conv{i}", nnx.Conv(cin, cout, (k, k), strides=(s, s), padding=((p, p), (p, p)), rngs=rngs))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for i in ALEX_CONVS:
            if i in (3, 6):
                x = max_pool(x, 3, 2)
            x = jax.nn.relu(getattr(self, f"conv{i}")(x))
            outs.append(x)
        return outs


class VGG16Features(nnx.Module):
    """torchvision VGG16 `features` up to relu5_3; returns relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3. `pool="max"` is torchvision's 2x2 max-pool (LPIPS), `pool="l2"` DISTS' L2 pooling."""

    def __init__(self, pool: str = "max", *, rngs: nnx.Rngs):
        if pool not in ("max", "l2"):
            raise ValueError(f"pool must be 'max' or 'l2', got {pool!r}")
        self.pool = pool
        for i, (cin, cout) in VGG16_CONVS.items():
            setattr(self, f"conv{i}", nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for s, stage in enumerate(VGG16_STAGES):
            if s > 0:
                x = max_pool(x, 2, 2) if self.pool == "max" else l2_pool(x)
            for i in stage:
                x = jax.nn.relu(getattr(self, f"conv{i}")(x))
            outs.append(x)
        return outs


class LPIPS(nnx.Module):
    """LPIPS v0.1: `model(pred, gt)` with NHWC images in [0, 1] -> (N,) distances."""

    def __init__(self, net: str = "alex", *, rngs: nnx.Rngs):
        if net not in NETS:
            raise UserError(f"unknown LPIPS network {net!r}; use one of {', '.join(NETS)}")
        self.net = net
        self.backbone = AlexNetFeatures(rngs=rngs) if net == "alex" else VGG16Features("max", rngs=rngs)
        for k, c in enumerate(CHANNELS[net]):
            setattr(self, f"lin{k}", nnx.Conv(c, 1, (1, 1), use_bias=False, rngs=rngs))

    def __call__(self, pred: jax.Array, gt: jax.Array) -> jax.Array:
        n = pred.shape[0]
        x = jnp.concatenate([pred, gt], 0) * 2.0 - 1.0
        x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
        total = 0.0
        for k, f in enumerate(self.backbone(x)):
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)
            d = (f[:n] - f[n:]) ** 2
            total = total + jnp.mean(getattr(self, f"lin{k}")(d), axis=(1, 2, 3))
        return total


def abstract_lpips(net: str = "alex") -> LPIPS:
    return nnx.eval_shape(lambda: LPIPS(net, rngs=nnx.Rngs(0)))


def lpips_from_params(params: dict, net: str = "alex") -> LPIPS:
    """An LPIPS module holding `params` (the pure-dict layout of `nnx.split(LPIPS(net))[1]`)."""
    graphdef, state = nnx.split(abstract_lpips(net))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def _apply(graphdef, state, pred, gt):
    return nnx.merge(graphdef, state)(pred, gt)


def make_scorer(model: nnx.Module):
    """`fn(pred, gt) -> (N,)`, jitted over the model's state (a pure function of (graphdef, state))."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(functools.partial(_apply, graphdef))
    return lambda pred, gt: fn(state, pred, gt)
