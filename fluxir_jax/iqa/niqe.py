"""NIQE (Mittal, Soundararajan, Bovik 2013), MATLAB-compatible.

The algorithm of the LIVE `niqe_release` / MATLAB `niqe()` as BasicSR reproduces it:

1. luma on the [0, 255] scale, **rounded** (MATLAB works on uint8): `convention="basicsr"` is
   Y of BT.601 YCbCr with the +16 offset, `convention="pyiqa"` is Y of YIQ; optional border crop;
   the image is cropped to whole 96x96 blocks (top-left kept);
2. two scales: the image, then MATLAB `imresize(im, 0.5)` (bicubic a = -0.5 with the antialiasing
   kernel widening, symmetric edge handling) -- implemented exactly as two weight matrices;
3. per scale, MSCN coefficients with the 7x7 Gaussian window of the pristine model and replicate
   padding, (I - mu) / (sigma + 1), sigma = sqrt(|E[I^2] - mu^2|), evaluated as moments of
   differences to the centre pixel so that flat neighbourhoods give exactly 0 (see
   `_local_moments`; this is what makes the score match MATLAB to 1e-6 rather than 4e-4);
4. per block (96x96, then 48x48 at half scale) 18 features: the AGGD fit (alpha, mean of the two
   betas) of the MSCN values, and for the four neighbour products (shifts (0,1), (1,0), (1,1),
   (1,-1), circular within the block as MATLAB circshift) alpha, mean, beta_l, beta_r; alpha comes
   from the moment-ratio lookup over 0.2:0.001:10 (nearest entry, first on ties);
5. score = sqrt((mu_p - mu_d)^T pinv((C_p + C_d) / 2) (mu_p - mu_d)) with mu_d the NaN-ignoring
   block mean and C_d the covariance of the blocks without NaN (NaN when a feature is undefined in
   every block or fewer than two blocks are NaN-free, e.g. a flat image).

Steps 1-4 are a jitted, batched JAX function (same-size images); step 5 (36x36 pseudo-inverse of
a covariance with condition number ~1e5) runs on the host in float64, as MATLAB and BasicSR do.
The pristine model file `niqe_pris_params.npz` (mu_pris_param, cov_pris_param, gaussian_window)
is passed as a path, or found through $FLUXIR_NIQE_PARAMS, or at fluxir_jax/iqa/data/.
"""
from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from scipy.special import gamma as _gamma_fn

from fluxir_jax.errors import UserError
from fluxir_jax.iqa.psnr_ssim import _as_float, _crop, resolve_color_space, rgb_to_luma, round_luma

BLOCK = 96
ENV_VAR = "FLUXIR_NIQE_PARAMS"
PACKAGE_DEFAULT = pathlib.Path(__file__).resolve().parent / "data" / "niqe_pris_params.npz"
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))

# Moment-ratio lookup for the AGGD fit (float64 on the host; strictly increasing in gamma).
_GAM = np.arange(0.2, 10.001, 0.001)
_R_GAM = _gamma_fn(2.0 / _GAM) ** 2 / (_gamma_fn(1.0 / _GAM) * _gamma_fn(3.0 / _GAM))
_BETA_FACTOR = np.sqrt(_gamma_fn(1.0 / _GAM) / _gamma_fn(3.0 / _GAM))   # beta = std * this
_MEAN_FACTOR = _gamma_fn(2.0 / _GAM) / _gamma_fn(1.0 / _GAM)            # mean = (br - bl) * this


# ------------------------------------------------------------------ pristine model
def find_params_path(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The pristine-model file: `path`, else $FLUXIR_NIQE_PARAMS, else the package default."""
    if path is None:
        path = os.environ.get(ENV_VAR) or (PACKAGE_DEFAULT if PACKAGE_DEFAULT.exists() else None)
    if path is None:
        raise UserError(f"NIQE needs the pristine model niqe_pris_params.npz: pass its path "
                        f"(fluxir eval --weights niqe=PATH) or set ${ENV_VAR}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"NIQE pristine model not found: {path}")
    return path


@functools.lru_cache(maxsize=4)
def _load_params_cached(path: str):
    try:
        with np.load(path) as d:
            mu = np.asarray(d["mu_pris_param"], np.float64).reshape(-1)
            cov = np.asarray(d["cov_pris_param"], np.float64)
            window = np.asarray(d["gaussian_window"], np.float64)
    except KeyError as e:
        raise UserError(f"{path}: not a NIQE pristine model (missing {e.args[0]!r})") from None
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's to fix
        raise UserError(f"{path}: cannot read NIQE pristine model ({type(e).__name__}: {e})") from None
    if mu.shape != (36,) or cov.shape != (36, 36) or window.ndim != 2 or window.shape[0] != window.shape[1]:
        raise UserError(f"{path}: NIQE pristine model has wrong shapes "
                        f"(mu {mu.shape}, cov {cov.shape}, window {window.shape})")
    return mu, cov, window


def load_params(path: str | os.PathLike | None = None):
    """(mu_pris (36,), cov_pris (36, 36), gaussian_window (k, k)) as float64 numpy arrays."""
    return _load_params_cached(str(find_params_path(path)))


# ------------------------------------------------------------------ MATLAB imresize
def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def matlab_resize_matrix(in_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """(out_len, in_len) float64 matrix M with resized = M @ signal, as MATLAB imresize 'bicubic'."""
    out_len = int(np.ceil(in_len * scale))
    width = 4.0
    aa = antialias and scale < 1
    if aa:
        width /= scale
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]            # 1-based source positions
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if aa else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])   # symmetric edges
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_len), taps), src.reshape(-1)), w.reshape(-1))
    return m


# ------------------------------------------------------------------ features (JAX)
def _local_moments(x: jax.Array, window: jax.Array):
    """Windowed moments of the differences to the centre pixel, replicate padding.

    Returns m1 = sum_j w_j (I_j - I) and m2 = sum_j w_j (I_j - I)^2 for every pixel of (N, H, W).
    MATLAB's mu = imfilter(I, w) is I + m1 and its sigma^2 = imfilter(I^2, w) - mu^2 is m2 - m1^2
    (the window sums to 1). Written this way a flat neighbourhood gives exactly m1 = 0, hence an
    MSCN value of exactly 0 that the AGGD fit leaves out of both tails, as in exact arithmetic;
    the textbook form leaves +-1e-14 round-off there whose sign decides which tail the pixel joins
    (0.0004 on NIQE(baboon)). It also avoids the E[I^2] - mu^2 cancellation in float32.
    """
    k = window.shape[0]
    p = k // 2
    n, h, w = x.shape
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p)), mode="edge")
    flat_w = window.reshape(-1)

    def body(j, carry):                       # one window tap per step, summed in raster order
        m1, m2 = carry
        d = lax.dynamic_slice(xp, (0, j // k, j % k), (n, h, w)) - x
        wd = flat_w[j] * d
        return m1 + wd, m2 + wd * d

    zero = jnp.zeros_like(x)
    return lax.fori_loop(0, k * k, body, (zero, zero))


def _aggd(x: jax.Array):
    """AGGD fit over the last axis -> (index into the gamma table, left std, right std)."""
    dt = x.dtype
    neg, pos = x < 0, x > 0
    left_std = jnp.sqrt(jnp.sum(jnp.where(neg, x * x, 0), -1) / jnp.sum(neg, -1).astype(dt))
    right_std = jnp.sqrt(jnp.sum(jnp.where(pos, x * x, 0), -1) / jnp.sum(pos, -1).astype(dt))
    g = left_std / right_std
    rhat = jnp.mean(jnp.abs(x), -1) ** 2 / jnp.mean(x * x, -1)
    rnorm = rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    # argmin over the table of (r - rnorm)^2; the table is increasing, so the minimum is at one of
    # the two entries around rnorm's insertion point (lower index on ties, as argmin).
    table = jnp.asarray(_R_GAM, dt)
    hi = jnp.clip(jnp.searchsorted(table, rnorm, side="left"), 0, table.shape[0] - 1)
    lo = jnp.maximum(hi - 1, 0)
    d_lo, d_hi = (table[lo] - rnorm) ** 2, (table[hi] - rnorm) ** 2
    idx = jnp.where(d_lo <= d_hi, lo, hi)
    idx = jnp.where(jnp.isnan(rnorm), 0, idx)   # argmin of an all-NaN vector is its first entry
    return idx, left_std, right_std


def _block_features(mscn: jax.Array, bs: int) -> jax.Array:
    """(N, H, W) MSCN -> (N, blocks, 18)."""
    n, h, w = mscn.shape
    blocks = mscn.reshape(n, h // bs, bs, w // bs, bs).transpose(0, 1, 3, 2, 4).reshape(n, -1, bs, bs)
    dt = mscn.dtype
    gam = jnp.asarray(_GAM, dt)
    beta_f = jnp.asarray(_BETA_FACTOR, dt)
    mean_f = jnp.asarray(_MEAN_FACTOR, dt)
    idx, ls, rs = _aggd(blocks.reshape(n, blocks.shape[1], -1))
    feats = [gam[idx], (ls * beta_f[idx] + rs * beta_f[idx]) / 2]
    for shift in _SHIFTS:
        prod = blocks * jnp.roll(blocks, shift, axis=(2, 3))
        idx, ls, rs = _aggd(prod.reshape(n, blocks.shape[1], -1))
        bl, br = ls * beta_f[idx], rs * beta_f[idx]
        feats += [gam[idx], (br - bl) * mean_f[idx], bl, br]
    return jnp.stack(feats, -1)


def _scale_features(img: jax.Array, window: jax.Array, bs: int) -> jax.Array:
    m1, m2 = _local_moments(img, window)
    mscn = -m1 / (jnp.sqrt(jnp.abs(m2 - m1 * m1)) + 1.0)     # (I - mu) / (sigma + 1)
    return _block_features(mscn, bs)


def _features(y: jax.Array, window: jax.Array, rh: jax.Array, rw: jax.Array) -> jax.Array:
    """(N, H, W) rounded luma, H and W whole blocks -> (N, blocks, 36)."""
    f1 = _scale_features(y, window, BLOCK)
    hi = lax.Precision.HIGHEST
    y2 = jnp.einsum("ph,nhw,qw->npq", rh, y, rw, precision=hi)
    f2 = _scale_features(y2, window, BLOCK // 2)
    return jnp.concatenate([f1, f2], -1)


_features_jit = jax.jit(_features)


def luma_for_niqe(images, *, convention: str = "basicsr", crop_border: int = 0) -> jax.Array:
    """NHWC [0, 1] images -> (N, H', W') rounded luma cropped to whole 96x96 blocks."""
    x = _as_float(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"NIQE expects NHWC images with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = _crop(x, crop_border)
    y = rgb_to_luma(x, resolve_color_space(convention, None)) if x.shape[-1] == 3 else x * 255.0
    y = round_luma(y[..., 0])
    h, w = (y.shape[1] // BLOCK) * BLOCK, (y.shape[2] // BLOCK) * BLOCK
    if (h // BLOCK) * (w // BLOCK) < 2:
        raise UserError(f"NIQE needs at least two {BLOCK}x{BLOCK} blocks, got a {x.shape[1]}x{x.shape[2]} image")
    return y[:, :h, :w]


def niqe_features(images, window: np.ndarray, *, convention: str = "basicsr", crop_border: int = 0) -> jax.Array:
    """NHWC [0, 1] images (same size) -> (N, blocks, 36) NIQE block features, computed in the
    input's float dtype (float64 inputs under jax.enable_x64 reproduce MATLAB to ~1e-8)."""
    y = luma_for_niqe(images, convention=convention, crop_border=crop_border)
    dt = y.dtype
    rh = jnp.asarray(matlab_resize_matrix(y.shape[1], 0.5), dt)
    rw = jnp.asarray(matlab_resize_matrix(y.shape[2], 0.5), dt)
    return _features_jit(y, jnp.asarray(window, dt), rh, rw)


def niqe_from_features(feats, mu_pris: np.ndarray, cov_pris: np.ndarray) -> np.ndarray:
    """(N, blocks, 36) features -> (N,) NIQE scores, float64 on the host."""
    feats = np.asarray(feats, np.float64)
    out = np.empty(feats.shape[0], np.float64)
    for i, f in enumerate(feats):
        if np.isnan(f).all(axis=0).any():      # e.g. a flat image: a feature undefined in every block
            out[i] = np.nan
            continue
        mu_d = np.nanmean(f, axis=0)
        ok = f[~np.isnan(f).any(axis=1)]
        if ok.shape[0] < 2:
            out[i] = np.nan
            continue
        cov_d = np.cov(ok, rowvar=False)
        d = mu_pris - mu_d
        out[i] = np.sqrt(d @ np.linalg.pinv((cov_pris + cov_d) / 2.0) @ d)
    return out


def niqe(images, *, params: str | os.PathLike | None = None, convention: str = "basicsr",
         crop_border: int = 0) -> np.ndarray:
    """NIQE per image (lower is better), shape (N,), float64 numpy.

    `images`: NHWC floats in [0, 1], all the same size. Computed in the images' dtype: pass float64
    under `jax.enable_x64(True)` for MATLAB-exact features (the registry does so on CPU/GPU). Images
    are scored one at a time, so the features compile once per image size, not per batch size.
    """
    mu, cov, window = load_params(params)
    feats = [niqe_features(images[i:i + 1], window, convention=convention, crop_border=crop_border)
             for i in range(images.shape[0])]
    return niqe_from_features(np.concatenate([np.asarray(f) for f in feats]), mu, cov)
