"""Colour fix: align the low frequencies (colour, tone) of a restored image to its LQ input.

    wavelet  out = (out - low(out)) + low(lq): the restored detail on the LQ's colours, with
             low() the residual of a 5-level a-trous wavelet decomposition (a [1, 2, 1]/4
             separable kernel dilated by 1, 2, 4, 8, 16; edge padding), as StableSR does.
    adain    per-channel mean and standard deviation of the output set to the LQ's.
    none     unchanged.

Images are NHWC float in [0, 1]; the LQ is already upsampled to the output size. Results are
clipped to [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

COLOR_FIXES = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5

Array = jax.Array


def _blur_axis(x: Array, axis: int, dilation: int) -> Array:
    """[1, 2, 1]/4 along `axis` with taps `dilation` apart, edge-padded."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (dilation, dilation)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    take = lambda start: jax.lax.slice_in_dim(xp, start, start + n, axis=axis)  # noqa: E731
    return 0.25 * take(0) + 0.5 * take(dilation) + 0.25 * take(2 * dilation)


def wavelet_low(x: Array, levels: int = WAVELET_LEVELS) -> Array:
    """The low-frequency residual of a `levels`-level a-trous wavelet decomposition of NHWC `x`."""
    for i in range(levels):
        d = 2**i
        x = _blur_axis(_blur_axis(x, 1, d), 2, d)
    return x


def adain(out: Array, ref: Array, eps: float = 1e-5) -> Array:
    mu_o, mu_r = out.mean(axis=(1, 2), keepdims=True), ref.mean(axis=(1, 2), keepdims=True)
    sd_o, sd_r = out.std(axis=(1, 2), keepdims=True), ref.std(axis=(1, 2), keepdims=True)
    return (out - mu_o) / (sd_o + eps) * sd_r + mu_r


def color_fix(out: Array, lq: Array, method: str) -> Array:
    """Apply colour fix `method` (see module doc) to `out` [B, H, W, C] with reference `lq`."""
    if method not in COLOR_FIXES:
        raise ValueError(f"color_fix {method!r} is not one of {COLOR_FIXES}")
    out = out.astype(jnp.float32)
    lq = lq.astype(jnp.float32)
    if method == "wavelet":
        out = out - wavelet_low(out) + wavelet_low(lq)
    elif method == "adain":
        out = adain(out, lq)
    return jnp.clip(out, 0.0, 1.0)
