"""Image operations of the degradation pipeline, with PyTorch/BasicSR semantics, fast on one core.

    filter2d           correlation with reflect-101 borders (separable / strip / DFT paths)
    resize_torch_like  ``F.interpolate`` semantics: align_corners False, no antialias, cubic
                       a = -0.75, 'area' = adaptive average pooling
    jpeg               the real libjpeg codec (OpenCV) on uint8 RGB
    reflect_pad_to, crop_flip   the one padding (reflect-101, bottom/right, as BasicSR) and
                       crop/horizontal-flip used by `degrade`, `degrade_folder` and `pipeline`
    poisson_from_levels, standard_normal, add_noise   noise samplers (table Poisson, Box-Muller)
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Any

import cv2
import numpy as np
from scipy import special

RESIZE_MODES = ("area", "bilinear", "bicubic")


def reflect_pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """HW[C] image reflect-101 padded at the bottom/right (as BasicSR) to at least h x w."""
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw)) + ((0, 0),) * (img.ndim - 2), mode="reflect")
    return img


def crop_flip(img: np.ndarray, top: int, left: int, h: int, w: int, flip: bool = False) -> np.ndarray:
    """The h x w window at (top, left), mirrored left-right if `flip` (a view, not a copy)."""
    out = img[top : top + h, left : left + w]
    return out[:, ::-1] if flip else out

def _as_image(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img, dtype=np.float32)


def _trim_zero_border(kernel: np.ndarray) -> np.ndarray:
    """Drop all-zero outer rings of a square odd kernel (filtering result is unchanged)."""
    k = kernel
    while k.shape[0] > 1 and not (k[0].any() or k[-1].any() or k[:, 0].any() or k[:, -1].any()):
        k = k[1:-1, 1:-1]
    return k


_DIRECT_TAPS = 130  # OpenCV filters kernels with fewer taps directly, larger ones by DFT
_DFT_FROM = 21  # kernel size from which the DFT beats direct strips (measured, 512x512x3, one core)


def _separable_terms(kernel: np.ndarray, tol: float = 1e-7) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """``[(ky, kx), ...]`` with ``sum outer(ky, kx)`` within ``tol`` (sum of abs) of the kernel.

    Returns None when so many terms are needed that direct filtering is cheaper (cost model
    measured with OpenCV on one core: a separable pass ~0.3 + 0.08 n, direct ~0.0225 n^2).
    """
    u, s, vt = np.linalg.svd(kernel)
    tail = np.sqrt(np.cumsum((s**2)[::-1]))[::-1]  # tail[r] = ||s[r:]||, bounds the dropped energy
    n = kernel.shape[0]
    rank = next((r for r in range(1, len(s)) if n * tail[r] <= tol), len(s))
    if rank > max(1, int((0.0225 * n * n + 0.1) / (0.3 + 0.08 * n))):
        return None
    return [(u[:, i] * s[i], vt[i]) for i in range(rank)]


_SCRATCH = threading.local()


def _scratch(slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread reusable float32 array of ``shape``: large fresh temporaries cost a page
    fault per 4 KiB, which on virtual machines can exceed the arithmetic done in them."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    n = math.prod(shape)
    buf = pool.get(slot)
    if buf is None or buf.size < n:
        buf = pool[slot] = np.empty(n, dtype=np.float32)
    return buf[:n].reshape(shape)


def _filter_direct(src: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Correlation by OpenCV: directly below 130 taps; from 13x13 to 19x19 in row strips of
    < 130 taps each (about twice as fast as OpenCV's DFT path there); by DFT from 21x21."""
    n = k.shape[0]
    if n * n < _DIRECT_TAPS or n >= _DFT_FROM:
        return cv2.filter2D(src, -1, k, borderType=cv2.BORDER_REFLECT_101)
    h, w, r = src.shape[0], src.shape[1], n // 2
    shape = (h + 2 * r, w + 2 * r) + src.shape[2:]
    padded = cv2.copyMakeBorder(src, r, r, r, r, cv2.BORDER_REFLECT_101, dst=_scratch(0, shape))
    buf = _scratch(1, padded.shape)
    rows = (_DIRECT_TAPS - 1) // n
    out = None
    for a in range(0, n, rows):  # strip rows [a, a + rows) of the kernel, anchored at its top-left tap
        res = cv2.filter2D(padded, -1, k[a : a + rows], dst=buf, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
        part = res[a : a + h, :w]
        out = part.copy() if out is None else np.add(out, part, out=out)
    return out


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of ``img`` (HW or HWC float) with a 2-D kernel, reflect-101 borders.

    Same as torch ``conv2d`` on a ``reflect``-padded image (BasicSR's ``filter2D``). Zero rings of
    the kernel are dropped first and low-rank kernels run as separable passes; the result is
    that of the full kernel to float32 precision.
    """
    src = _as_image(img)
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        raise ValueError(f"filter2d needs a square odd kernel, got {k.shape}")
    k = _trim_zero_border(k)
    terms = _separable_terms(k)
    if terms is None:
        return _filter_direct(src, k.astype(np.float32)).reshape(src.shape)
    out = cv2.sepFilter2D(src, -1, terms[0][1], terms[0][0], borderType=cv2.BORDER_REFLECT_101)
    buf = np.empty_like(out) if len(terms) > 1 else None
    for ky, kx in terms[1:]:
        out += cv2.sepFilter2D(src, -1, kx, ky, dst=buf, borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(src.shape)


def _adaptive_pool_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of torch's adaptive average pooling along one axis."""
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    width = end - start
    t = np.arange(width.max())
    idx = np.minimum(start[:, None] + t[None, :], n_in - 1)
    w = np.where(t[None, :] < width[:, None], 1.0 / width[:, None], 0.0).astype(np.float32)
    return idx, w


def _apply_taps(x: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``out[i] = sum_t w[i, t] * x[idx[i, t]]`` along axis 0."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = x[idx[:, 0]] * w[:, 0].reshape(shape)
    for t in range(1, idx.shape[1]):
        out += x[idx[:, t]] * w[:, t].reshape(shape)
    return out


def _area_resize(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    (h, w), (oh, ow) = x.shape[:2], out_hw
    if h % oh == 0 and w % ow == 0:  # integer factors: plain box averages, OpenCV's fast path
        return cv2.resize(x, (ow, oh), interpolation=cv2.INTER_AREA)
    y = _apply_taps(x, *_adaptive_pool_taps(h, oh)) if oh != h else x
    if ow != w:
        y = np.ascontiguousarray(_apply_taps(y.swapaxes(0, 1), *_adaptive_pool_taps(w, ow)).swapaxes(0, 1))
    return y


def resize_torch_like(img: np.ndarray, out_hw: tuple[int, int], mode: str, scale_factor: float | None = None) -> np.ndarray:
    """Resize HW or HWC float32 as ``F.interpolate(x, size=out_hw, mode, align_corners=False)``.

    ``mode`` is 'area' (adaptive average pooling), 'bilinear' or 'bicubic' (a = -0.75, indices
    clamped at the border), never antialiased. With ``scale_factor`` the source coordinates use
    ``1/scale_factor`` as torch does for ``F.interpolate(x, scale_factor=s)``; then ``out_hw``
    must be ``floor(in * s)``. Agrees with torch to float32 rounding of the coordinates.
    """
    src = _as_image(img)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"resize to an empty size {out_hw}")
    shape = (oh, ow) + src.shape[2:]
    if mode == "area":
        return _area_resize(src, (oh, ow)).reshape(shape)  # torch's area mode ignores scale_factor
    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}.get(mode)
    if flag is None:
        raise ValueError(f"unknown resize mode {mode!r} (known: {', '.join(RESIZE_MODES)})")
    if scale_factor is None:
        return cv2.resize(src, (ow, oh), interpolation=flag).reshape(shape)
    # OpenCV maps with 1/fx when no size is given; its size is round(), torch's floor(): crop.
    out = cv2.resize(src, (0, 0), fx=scale_factor, fy=scale_factor, interpolation=flag)
    if out.shape[0] < oh or out.shape[1] < ow:
        raise ValueError(f"out_hw {out_hw} does not match scale_factor {scale_factor} for size {src.shape[:2]}")
    return out[:oh, :ow].reshape(shape)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding and clamping."""
    return np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of an RGB (or gray) [0, 1] image at integer ``quality`` (libjpeg, 4:2:0)."""
    u8 = to_uint8(img)
    if not (u8.ndim == 2 or (u8.ndim == 3 and u8.shape[2] in (1, 3))):
        raise ValueError(f"jpeg expects an [H, W], [H, W, 1] or [H, W, 3] image, got shape {u8.shape}")
    color = u8.ndim == 3 and u8.shape[2] == 3
    enc_in = cv2.cvtColor(u8, cv2.COLOR_RGB2BGR) if color else u8
    ok, buf = cv2.imencode(".jpg", enc_in, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    dec = cv2.cvtColor(dec, cv2.COLOR_BGR2RGB) if color else dec.reshape(u8.shape)
    return dec.astype(np.float32) / np.float32(255)

# --- noise ------------------------------------------------------------------------------------

_GUIDE = 512


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
    """CDF tables of Poisson(l*vals/255) for l = 0..255, plus a guide table for inverse search."""
    lam = np.arange(256) * vals / 255.0
    n = int(math.ceil(lam[-1] + 14 * math.sqrt(lam[-1]) + 16))
    k = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = k[None, :] * np.log(lam[:, None]) - lam[:, None] - special.gammaln(k + 1)[None, :]
    logp[0] = np.where(k == 0, 0.0, -np.inf)  # lambda = 0: all mass at 0
    cdf = np.cumsum(np.exp(logp), axis=1)
    cdf /= cdf[:, -1:]  # exactly 1 at the end (the tail beyond 14 sigma is ~1e-40), so u < 1 stops
    grid = np.arange(_GUIDE) / _GUIDE
    guide = np.stack([np.searchsorted(row, grid, side="right") for row in cdf]).astype(np.int32)
    return cdf.ravel(), guide.ravel(), n


def poisson_from_levels(levels: np.ndarray, vals: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``Poisson(levels * vals / 255)`` for uint8 ``levels`` (exact inverse-CDF sampling).

    Equivalent in distribution to ``rng.poisson(levels / 255 * vals)``, several times faster
    because the rates take at most 256 values.
    """
    cdf, guide, n = _poisson_tables(int(vals))
    lv = levels.ravel().astype(np.int32)
    u = rng.random(lv.size)
    pos = lv * n + guide[lv * _GUIDE + (u * _GUIDE).astype(np.int32)]
    base = lv * n
    active = np.flatnonzero(cdf[pos] <= u)
    while active.size:
        pos[active] += 1
        active = active[cdf[pos[active]] <= u[active]]
    return (pos - base).reshape(levels.shape)


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) samples by the Box-Muller transform (exact; ~4x numpy's ziggurat here)."""
    n = math.prod(shape)
    m = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log1p(-rng.random(m))).astype(np.float32)  # 1 - u in (0, 1]
    angle = rng.random(m, dtype=np.float32) * np.float32(2 * np.pi)
    out = np.empty(2 * m, dtype=np.float32)
    np.multiply(radius, np.cos(angle), out=out[:m])
    np.multiply(radius, np.sin(angle), out=out[m:])
    return out[:n].reshape(shape)


def _poisson_noise(img: np.ndarray, rng: np.random.Generator, gray: bool) -> tuple[np.ndarray, int]:
    """Real-ESRGAN Poisson noise field (before scaling) and its ``vals``."""
    if gray:
        img = (img @ np.array([0.2989, 0.587, 0.114], dtype=np.float32))[..., None]
    levels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    unique = int(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))
    vals = 2 ** int(math.ceil(math.log2(unique)))
    counts = poisson_from_levels(levels, vals, rng)
    noise = counts.astype(np.float32) * np.float32(1 / vals) - levels.astype(np.float32) * np.float32(1 / 255)
    return noise, vals


def add_noise(img: np.ndarray, p: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Add the noise described by ``p`` (a `sample_noise_params` dict), clip to [0, 1]."""
    h, w = img.shape[:2]
    c = 1 if p["gray"] else img.shape[2]
    if p["type"] == "gaussian":
        noise = standard_normal(rng, (h, w, c))
        noise *= np.float32(p["sigma"] / 255.0)
    else:
        noise, vals = _poisson_noise(img, rng, p["gray"])
        noise *= np.float32(p["scale"])
        p = {**p, "vals": vals}
    return np.clip(img + noise, 0, 1, dtype=np.float32), p
