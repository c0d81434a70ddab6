"""PSNR and SSIM in the two conventions that restoration papers report.

Images are NHWC floats in [0, 1] (C = 3 RGB, or C = 1 grey). Both functions return one score per
image, shape (N,). The algorithm is exact in either dtype; pass float64 arrays under
`jax.enable_x64(True)` for bit-level agreement with the float64 reference code (the metric
registry does this by default on CPU/GPU).

`convention="basicsr"` (BasicSR `basicsr/metrics/psnr_ssim.py`, what most SR papers call
"PSNR/SSIM on Y"):
  * crop `crop_border` pixels from every side first, then take the luma;
  * luma = Y of ITU-R BT.601 YCbCr on the [0, 255] scale *with* the +16 offset,
    Y = 65.481 R + 128.553 G + 24.966 B + 16 for R, G, B in [0, 1]; not rounded;
  * PSNR = 10 log10(255^2 / MSE), +inf for identical images;
  * SSIM: 11x11 Gaussian window, sigma 1.5, 'valid' filtering (no padding),
    C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, mean of the SSIM map (per channel, then the mean
    over channels when not on Y).

`convention="pyiqa"` (IQA-PyTorch defaults as papers such as SeeSR / DreamClear use them):
  * luma = Y of YIQ, 0.299 R + 0.587 G + 0.114 B (no offset); `color_space="ycbcr"` selects the
    BT.601 Y above instead;
  * PSNR on the [0, 1] scale without rounding: 10 log10(1 / (MSE + 1e-8)), so identical images
    give 80 dB, not +inf (pyiqa adds that eps);
  * SSIM on luma * 255 **rounded** to integers (as MATLAB sees uint8 images; exact .5 ties round
    half to even, see `round_luma`), same window and
    constants as above, and the contrast-structure term clamped at 0 (relu) before it multiplies
    the luminance term.

With `y_channel=False` both conventions work on all channels (basicsr: [0, 255] scale; pyiqa:
[0, 1] for PSNR, rounded [0, 255] for SSIM).
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from fluxir_jax.errors import UserError

CONVENTIONS = ("basicsr", "pyiqa")
COLOR_SPACES = ("ycbcr", "yiq")
_DEFAULT_COLOR_SPACE = {"basicsr": "ycbcr", "pyiqa": "yiq"}

# Luma rows for RGB in [0, 1] and the factor/offset that bring them to the [0, 255] scale, applied
# in this order: ((R w0 + G w1 + B w2) + offset) * factor. The order matters only for which way
# exact .5 ties round in the pyiqa convention (1 pixel in ~1000 of 8-bit images); it is pyiqa's.
_Y_WEIGHTS = {
    "ycbcr": ((65.481, 128.553, 24.966), 16.0, 1.0),
    "yiq": ((0.299, 0.587, 0.114), 0.0, 255.0),
}
_PYIQA_EPS = 1e-8


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise UserError(f"unknown convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    return convention


def resolve_color_space(convention: str, color_space: str | None) -> str:
    check_convention(convention)
    color_space = color_space or _DEFAULT_COLOR_SPACE[convention]
    if color_space not in COLOR_SPACES:
        raise UserError(f"unknown color space {color_space!r}; use one of {', '.join(COLOR_SPACES)}")
    return color_space


def rgb_to_luma(img: jax.Array, color_space: str = "ycbcr") -> jax.Array:
    """(..., 3) RGB in [0, 1] -> (..., 1) luma on the [0, 255] scale (float, not rounded)."""
    (w0, w1, w2), offset, factor = _Y_WEIGHTS[color_space]
    y = img[..., 0:1] * w0 + img[..., 1:2] * w1 + img[..., 2:3] * w2
    if offset:
        y = y + offset
    if factor != 1.0:
        y = y * factor
    return y


def round_luma(y: jax.Array) -> jax.Array:
    """Round [0, 255] luma to integers, half to even, deterministically.

    Luma of 8-bit images often lands exactly on .5 (Y*255 = (299 R + 587 G + 114 B) / 1000 for YIQ);
    whether the float value comes out a hair above or below depends on the evaluation order the
    compiler picks (fused multiply-adds), so in float64 the value is first snapped to the 1e-6 grid,
    which holds every 8-bit luma exactly, and true ties then round half to even. In float32 the
    grid does not fit the mantissa and the value is rounded as it is.
    """
    if y.dtype == jnp.float64:
        y = jnp.round(y * 1e6) / 1e6
    return jnp.round(y)


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (cv2.getGaussianKernel / MATLAB fspecial, separable), float64."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _check_pair(pred: jax.Array, gt: jax.Array) -> None:
    if pred.shape != gt.shape:
        raise UserError(f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(gt.shape)}")
    if pred.ndim != 4 or pred.shape[-1] not in (1, 3):
        raise UserError(f"expected NHWC images with 1 or 3 channels, got shape {tuple(pred.shape)}")


def _crop(x: jax.Array, crop_border: int) -> jax.Array:
    if crop_border < 0:
        raise UserError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return x
    if 2 * crop_border >= min(x.shape[1], x.shape[2]):
        raise UserError(f"crop_border {crop_border} leaves nothing of a {x.shape[1]}x{x.shape[2]} image")
    return x[:, crop_border:-crop_border, crop_border:-crop_border, :]


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise UserError(f"metrics take float images in [0, 1], got dtype {x.dtype}")
    return x


def _prepare(pred, gt, convention, crop_border, y_channel, color_space, *, scale255: bool, rounded: bool):
    """Crop, take luma (or keep channels) and scale; returns (N, H, W, C) arrays."""
    pred, gt = _as_float(pred), _as_float(gt)
    _check_pair(pred, gt)
    cs = resolve_color_space(convention, color_space)
    pred, gt = _crop(pred, crop_border), _crop(gt, crop_border)
    out = []
    for x in (pred, gt):
        if y_channel and x.shape[-1] == 3:
            x = rgb_to_luma(x, cs)          # [0, 255] scale
            if not scale255:
                x = x / 255.0
        elif scale255:
            x = x * 255.0
        if rounded:
            x = round_luma(x)
        out.append(x)
    return out


def psnr(pred, gt, *, convention: str = "basicsr", crop_border: int = 0, y_channel: bool = True,
         color_space: str | None = None) -> jax.Array:
    """PSNR per image, shape (N,). See the module docstring for the two conventions."""
    check_convention(convention)
    if convention == "basicsr":
        a, b = _prepare(pred, gt, convention, crop_border, y_channel, color_space, scale255=True, rounded=False)
        mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
        return jnp.where(mse == 0, jnp.inf, 10.0 * jnp.log10(255.0 ** 2 / jnp.where(mse == 0, 1.0, mse)))
    a, b = _prepare(pred, gt, convention, crop_border, y_channel, color_space, scale255=False, rounded=False)
    mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / (mse + _PYIQA_EPS))


def _filter_valid(x: jax.Array, g: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation of (B, H, W, 1) with the 1-D window g along H then W."""
    k = jnp.asarray(g, x.dtype)
    n = k.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    hi = lax.Precision.HIGHEST
    x = lax.conv_general_dilated(x, k.reshape(n, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn, precision=hi)
    return lax.conv_general_dilated(x, k.reshape(1, n, 1, 1), (1, 1), "VALID", dimension_numbers=dn, precision=hi)


def ssim_map(a: jax.Array, b: jax.Array, *, data_range: float = 255.0, relu_cs: bool = False,
             window: int = 11, sigma: float = 1.5) -> jax.Array:
    """SSIM map of single-channel images (B, H, W, 1) -> (B, H-window+1, W-window+1, 1)."""
    if a.shape[1] < window or a.shape[2] < window:
        raise UserError(f"SSIM needs images of at least {window}x{window} pixels after cropping, "
                        f"got {a.shape[1]}x{a.shape[2]}")
    g = gaussian_window_1d(window, sigma)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu1, mu2 = _filter_valid(a, g), _filter_valid(b, g)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _filter_valid(a * a, g) - mu1_sq
    s2 = _filter_valid(b * b, g) - mu2_sq
    s12 = _filter_valid(a * b, g) - mu12
    cs = (2.0 * s12 + c2) / (s1 + s2 + c2)
    if relu_cs:
        cs = jnp.maximum(cs, 0.0)
    return (2.0 * mu12 + c1) / (mu1_sq + mu2_sq + c1) * cs


def ssim(pred, gt, *, convention: str = "basicsr", crop_border: int = 0, y_channel: bool = True,
         color_space: str | None = None) -> jax.Array:
    """SSIM per image, shape (N,). See the module docstring for the two conventions."""
    check_convention(convention)
    pyiqa = convention == "pyiqa"
    a, b = _prepare(pred, gt, convention, crop_border, y_channel, color_space, scale255=True, rounded=pyiqa)
    n, h, w, c = a.shape
    # channels -> batch: every channel is filtered on its own (BasicSR loops, pyiqa groups).
    a = jnp.moveaxis(a, -1, 1).reshape(n * c, h, w, 1)
    b = jnp.moveaxis(b, -1, 1).reshape(n * c, h, w, 1)
    m = ssim_map(a, b, data_range=255.0, relu_cs=pyiqa)
    return jnp.mean(m.reshape(n, c, -1), axis=(1, 2))


psnr_jit = jax.jit(psnr, static_argnames=("convention", "crop_border", "y_channel", "color_space"))
ssim_jit = jax.jit(ssim, static_argnames=("convention", "crop_border", "y_channel", "color_space"))
