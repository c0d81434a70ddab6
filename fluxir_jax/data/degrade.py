"""Real-ESRGAN second-order degradation on the host (numpy + OpenCV), seeded and explainable.

    lq, lq_up, params = degrade(hq, np.random.default_rng(seed), DegradationConfig())

``hq`` is float32 HWC RGB in [0, 1]. The pipeline (parameters in ``shared/paper.md``):

    [USM sharpen] -> blur1 -> resize1 -> noise1 -> JPEG1
    -> [blur2] -> resize2 (relative to GT/scale) -> noise2
    -> either  resize to GT/scale + sinc -> JPEG2   or   JPEG2 -> resize + sinc
    -> clamp to [0, 1], round to 1/255

Every random choice is drawn first (`sample_degradation`, no pixels touched) into a JSON dict;
`apply_degradation` then runs those choices, drawing only the noise fields from the generator.
Resizes follow ``torch.nn.functional.interpolate`` (align_corners=False, no antialias, cubic
a = -0.75, 'area' = adaptive average pooling; the first resize uses ``scale_factor``
semantics), filtering is correlation with reflect-101 borders, JPEG is the real libjpeg codec
(OpenCV) on uint8 RGB, Poisson noise is Real-ESRGAN's (image rounded to 1/255,
``vals = 2^ceil(log2(#unique))``, ``(poisson(img*vals)/vals - img)*scale``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any

import cv2
import numpy as np
from scipy import special

from fluxir_jax.data import kernels as K
from fluxir_jax.errors import UserError

RESIZE_MODES = ("area", "bilinear", "bicubic")
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")


# --- configuration ----------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(f"degradation config: {msg}")


def _check_probs(name: str, probs, n: int) -> None:
    _check(len(probs) == n, f"{name} needs {n} probabilities, got {len(probs)}")
    _check(all(p >= 0 for p in probs) and sum(probs) > 0, f"{name} must be non-negative and not all zero: {list(probs)}")


def _check_range(name: str, r, lo: float = -math.inf, hi: float = math.inf) -> None:
    _check(len(r) == 2 and lo <= r[0] <= r[1] <= hi, f"{name} must be [low, high] within [{lo}, {hi}], got {list(r)}")


@dataclasses.dataclass
class GTConfig:
    """Ground-truth preparation (`prepare_gt`): random crop (reflect-101 pad if smaller), hflip."""

    crop_size: int = 512
    hflip_prob: float = 0.5


@dataclasses.dataclass
class USMConfig:
    """Unsharp masking of the GT before degradation (Real-ESRGAN's USMSharp); off by default."""

    enabled: bool = False
    radius: int = 50
    weight: float = 0.5
    threshold: float = 10.0  # on the 0..255 scale


@dataclasses.dataclass
class ResizeConfig:
    """One random resize: up/down/keep with ``prob``; up ``U(1, range[1])``, down ``U(range[0], 1)``."""

    prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    range: tuple[float, float] = (0.15, 1.5)
    modes: tuple[str, ...] = RESIZE_MODES
    mode_prob: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)


@dataclasses.dataclass
class NoiseConfig:
    """Gaussian (``sigma`` in 1/255 units) with ``gaussian_prob``, else Poisson; gray with ``gray_prob``."""

    gaussian_prob: float = 0.5
    sigma_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_prob: float = 0.4


@dataclasses.dataclass
class StageConfig:
    """Blur (with ``blur_prob``) -> resize -> noise."""

    blur_prob: float = 1.0
    kernel: K.KernelConfig = dataclasses.field(default_factory=K.KernelConfig)
    resize: ResizeConfig = dataclasses.field(default_factory=ResizeConfig)
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)


def _stage2() -> StageConfig:
    return StageConfig(
        blur_prob=0.8,
        kernel=K.KernelConfig(sigma_range=(0.2, 1.5)),
        resize=ResizeConfig(prob=(0.3, 0.4, 0.3), range=(0.3, 1.2)),
        noise=NoiseConfig(sigma_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5)),
    )


@dataclasses.dataclass
class FinalConfig:
    """Last step: resize to GT/scale + sinc (``sinc_prob``) and JPEG, in random order."""

    resize_first_prob: float = 0.5
    modes: tuple[str, ...] = RESIZE_MODES
    mode_prob: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    sinc_prob: float = 0.8
    sinc_size_range: tuple[int, int] = (7, 21)
    sinc_omega_range: tuple[float, float] = (math.pi / 3, math.pi)
    jpeg_range: tuple[int, int] = (30, 95)


@dataclasses.dataclass
class DegradationConfig:
    """Every parameter of the FluxGen degradation (paper.md, "FluxGen, degradation")."""

    scale: int = 4
    gt: GTConfig = dataclasses.field(default_factory=GTConfig)
    usm: USMConfig = dataclasses.field(default_factory=USMConfig)
    stage1: StageConfig = dataclasses.field(default_factory=StageConfig)
    jpeg1_range: tuple[int, int] = (30, 95)
    stage2: StageConfig = dataclasses.field(default_factory=_stage2)
    final: FinalConfig = dataclasses.field(default_factory=FinalConfig)

    def __post_init__(self):
        validate_config(self)


def _validate_kernel(name: str, c: K.KernelConfig) -> None:
    bad = sorted(set(c.kernel_list) - set(K.KERNEL_TYPES))
    _check(not bad, f"{name}.kernel_list has unknown type {bad[:1]} (known: {', '.join(K.KERNEL_TYPES)})")
    _check_probs(f"{name}.kernel_prob", c.kernel_prob, len(c.kernel_list))
    _check_range(f"{name}.kernel_size_range", c.kernel_size_range, 1, c.pad_to)
    _check(bool(K.odd_sizes(c.kernel_size_range)), f"{name}.kernel_size_range holds no odd size")
    _check_range(f"{name}.sigma_range", c.sigma_range, 1e-6)
    _check_range(f"{name}.betag_range", c.betag_range, 1e-6)
    _check_range(f"{name}.betap_range", c.betap_range, 1e-6)
    _check_range(f"{name}.rotation_range", c.rotation_range)
    _check(0 <= c.sinc_prob <= 1, f"{name}.sinc_prob must be in [0, 1]")
    _check_range(f"{name}.sinc_omega_small", c.sinc_omega_small, 1e-6)
    _check_range(f"{name}.sinc_omega_large", c.sinc_omega_large, 1e-6)
    _check(c.pad_to % 2 == 1, f"{name}.pad_to must be odd")


def validate_config(cfg: DegradationConfig) -> None:
    """Raise `UserError` naming the first field that cannot work."""
    _check(isinstance(cfg.scale, int) and cfg.scale >= 1, "scale must be a positive integer")
    _check(cfg.gt.crop_size >= 1 and 0 <= cfg.gt.hflip_prob <= 1, "gt.crop_size >= 1 and gt.hflip_prob in [0, 1]")
    for name, st in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
        _check(0 <= st.blur_prob <= 1, f"{name}.blur_prob must be in [0, 1]")
        _validate_kernel(f"{name}.kernel", st.kernel)
        _check_probs(f"{name}.resize.prob", st.resize.prob, 3)
        _check_range(f"{name}.resize.range", st.resize.range, 1e-6)
        _check(st.resize.range[0] <= 1 <= st.resize.range[1], f"{name}.resize.range must contain 1")
        _check(set(st.resize.modes) <= set(RESIZE_MODES), f"{name}.resize.modes must be among {RESIZE_MODES}")
        _check_probs(f"{name}.resize.mode_prob", st.resize.mode_prob, len(st.resize.modes))
        _check(0 <= st.noise.gaussian_prob <= 1 and 0 <= st.noise.gray_prob <= 1, f"{name}.noise probabilities must be in [0, 1]")
        _check_range(f"{name}.noise.sigma_range", st.noise.sigma_range, 0)
        _check_range(f"{name}.noise.poisson_scale_range", st.noise.poisson_scale_range, 0)
    _check_range("jpeg1_range", cfg.jpeg1_range, 1, 100)
    f = cfg.final
    _check(0 <= f.resize_first_prob <= 1 and 0 <= f.sinc_prob <= 1, "final probabilities must be in [0, 1]")
    _check(set(f.modes) <= set(RESIZE_MODES), f"final.modes must be among {RESIZE_MODES}")
    _check_probs("final.mode_prob", f.mode_prob, len(f.modes))
    _check_range("final.sinc_size_range", f.sinc_size_range, 1, 21)
    _check(bool(K.odd_sizes(f.sinc_size_range)), "final.sinc_size_range holds no odd size")
    _check_range("final.sinc_omega_range", f.sinc_omega_range, 1e-6)
    _check_range("final.jpeg_range", f.jpeg_range, 1, 100)


# --- image operations -------------------------------------------------------------------------


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


def usm_sharpen(img: np.ndarray, cfg: USMConfig | None = None) -> np.ndarray:
    """Unsharp masking: ``img + weight*(img - blur)`` blended in by a soft threshold mask."""
    cfg = cfg or USMConfig()
    src = _as_image(img)
    size = cfg.radius + 1 if cfg.radius % 2 == 0 else cfg.radius
    g = cv2.getGaussianKernel(size, 0)
    blurred = cv2.sepFilter2D(src, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
    residual = src - blurred
    mask = (np.abs(residual) * 255 > cfg.threshold).astype(np.float32)
    soft = cv2.sepFilter2D(mask, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
    sharp = np.clip(src + cfg.weight * residual, 0, 1)
    return soft * sharp + (1 - soft) * src


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


def _add_noise(img: np.ndarray, p: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
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


# --- sampling the choices ---------------------------------------------------------------------


def _choice(rng: np.random.Generator, options, probs) -> str:
    p = np.asarray(probs, dtype=np.float64)
    return str(options[rng.choice(len(options), p=p / p.sum())])


def sample_noise_params(rng: np.random.Generator, cfg: NoiseConfig) -> dict[str, Any]:
    """Noise type, level (sigma in 1/255 units, or Poisson scale) and gray flag."""
    if rng.uniform() < cfg.gaussian_prob:
        p: dict[str, Any] = {"type": "gaussian", "sigma": float(rng.uniform(*cfg.sigma_range))}
    else:
        p = {"type": "poisson", "scale": float(rng.uniform(*cfg.poisson_scale_range))}
    p["gray"] = bool(rng.uniform() < cfg.gray_prob)
    return p


def _sample_resize(rng: np.random.Generator, cfg: ResizeConfig) -> dict[str, Any]:
    direction = _choice(rng, ("up", "down", "keep"), cfg.prob)
    lo, hi = cfg.range
    scale = float(rng.uniform(1, hi)) if direction == "up" else float(rng.uniform(lo, 1)) if direction == "down" else 1.0
    return {"direction": direction, "scale": scale, "mode": _choice(rng, cfg.modes, cfg.mode_prob)}


def sample_degradation(rng: np.random.Generator, config: DegradationConfig, hw: tuple[int, int]) -> dict[str, Any]:
    """Draw every choice of the pipeline for a GT of size ``hw``; returns a JSON-ready dict."""
    h, w = int(hw[0]), int(hw[1])
    s = config.scale
    p: dict[str, Any] = {"gt_hw": [h, w], "scale": s, "usm": bool(config.usm.enabled)}
    st1, st2, fin = config.stage1, config.stage2, config.final
    p["blur1"] = K.sample_kernel_params(rng, st1.kernel) if rng.uniform() < st1.blur_prob else None
    r1 = _sample_resize(rng, st1.resize)
    r1["out_hw"] = [max(1, math.floor(h * r1["scale"])), max(1, math.floor(w * r1["scale"]))]
    p["resize1"] = r1
    p["noise1"] = sample_noise_params(rng, st1.noise)
    p["jpeg1"] = {"quality": int(rng.integers(config.jpeg1_range[0], config.jpeg1_range[1] + 1))}
    p["blur2"] = K.sample_kernel_params(rng, st2.kernel) if rng.uniform() < st2.blur_prob else None
    r2 = _sample_resize(rng, st2.resize)
    r2["out_hw"] = [max(1, int(h / s * r2["scale"])), max(1, int(w / s * r2["scale"]))]
    p["resize2"] = r2
    p["noise2"] = sample_noise_params(rng, st2.noise)
    p["final_order"] = FINAL_ORDERS[0] if rng.uniform() < fin.resize_first_prob else FINAL_ORDERS[1]
    p["final_resize"] = {"mode": _choice(rng, fin.modes, fin.mode_prob), "out_hw": [max(1, h // s), max(1, w // s)]}
    if rng.uniform() < fin.sinc_prob:
        p["final_sinc"] = K.sample_sinc_params(rng, K.random_kernel_size(rng, fin.sinc_size_range), fin.sinc_omega_range)
    else:
        p["final_sinc"] = None
    p["jpeg2"] = {"quality": int(rng.integers(fin.jpeg_range[0], fin.jpeg_range[1] + 1))}
    return p


# --- running the choices ----------------------------------------------------------------------


def _resize_sinc(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    x = resize_torch_like(x, p["final_resize"]["out_hw"], p["final_resize"]["mode"])
    if p["final_sinc"] is not None:
        x = filter2d(x, K.kernel_from_params(p["final_sinc"], None))
    return x


def apply_degradation(
    hq: np.ndarray, params: dict[str, Any], rng: np.random.Generator, usm: USMConfig | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the choices in ``params`` on ``hq``; noise fields come from ``rng``.

    Returns ``(lq, params)`` where the returned copy of ``params`` also records what the pixels
    decided (``vals`` of Poisson noise).
    """
    p = dict(params)  # nested entries are replaced, never mutated
    x = _as_image(hq)
    if p["usm"]:
        x = usm_sharpen(x, usm)
    # first order
    if p["blur1"] is not None:
        x = filter2d(x, K.kernel_from_params(p["blur1"], None))
    r1 = p["resize1"]
    if r1["direction"] != "keep":
        x = resize_torch_like(x, r1["out_hw"], r1["mode"], scale_factor=r1["scale"])
    x, p["noise1"] = _add_noise(x, p["noise1"], rng)
    x = jpeg(x, p["jpeg1"]["quality"])
    # second order
    if p["blur2"] is not None:
        x = filter2d(x, K.kernel_from_params(p["blur2"], None))
    x = resize_torch_like(x, p["resize2"]["out_hw"], p["resize2"]["mode"])
    x, p["noise2"] = _add_noise(x, p["noise2"], rng)
    if p["final_order"] == FINAL_ORDERS[0]:
        x = jpeg(_resize_sinc(x, p), p["jpeg2"]["quality"])
    else:
        x = _resize_sinc(jpeg(x, p["jpeg2"]["quality"]), p)
    lq = to_uint8(x).astype(np.float32) / np.float32(255)  # equals a PNG round trip of the LQ
    return lq, p


def degrade(hq: np.ndarray, rng: np.random.Generator, config: DegradationConfig | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Second-order degradation of one GT image.

    Args:
      hq: float32 [H, W, 3] RGB in [0, 1].
      rng: the example's generator (``np.random.default_rng(seed)``); same seed, same bytes.
      config: parameters; defaults are the paper's (Real-ESRGAN / SeeSR).
    Returns:
      ``lq`` float32 [H//scale, W//scale, 3] in [0, 1] on the 1/255 grid, ``lq_up`` the LQ
      bicubic-upsampled (torch semantics) to [H, W, 3] and clipped to [0, 1], and ``params``,
      a JSON-serialisable dict of every sampled choice.
    """
    config = config or DegradationConfig()
    hq = _as_image(hq)
    if hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"degrade expects an [H, W, 3] RGB image, got shape {hq.shape}")
    params = sample_degradation(rng, config, hq.shape[:2])
    lq, params = apply_degradation(hq, params, rng, config.usm)
    lq_up = np.clip(resize_torch_like(lq, hq.shape[:2], "bicubic"), 0, 1)
    return lq, lq_up, params


# --- single degradations ----------------------------------------------------------------------


def prepare_gt(img: np.ndarray, rng: np.random.Generator, cfg: GTConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Random ``crop_size`` crop (reflect-101 padded at the bottom/right when smaller) and hflip."""
    cfg = cfg or GTConfig()
    x = _as_image(img)
    c = cfg.crop_size
    ph, pw = max(0, c - x.shape[0]), max(0, c - x.shape[1])
    if ph or pw:
        x = cv2.copyMakeBorder(x, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
    top = int(rng.integers(x.shape[0] - c + 1))
    left = int(rng.integers(x.shape[1] - c + 1))
    flip = bool(rng.uniform() < cfg.hflip_prob)
    x = x[top : top + c, left : left + c]
    if flip:
        x = x[:, ::-1]
    return np.ascontiguousarray(x), {"pad": [ph, pw], "top": top, "left": left, "hflip": flip}


def blur(img: np.ndarray, rng: np.random.Generator, cfg: K.KernelConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One random Real-ESRGAN blur: ``(blurred, kernel params)``."""
    params = K.sample_kernel_params(rng, cfg or K.KernelConfig())
    return filter2d(img, K.kernel_from_params(params, None)), params


def noise(img: np.ndarray, rng: np.random.Generator, cfg: NoiseConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Random Gaussian or Poisson noise (colour or gray), clipped to [0, 1]: ``(noisy, params)``."""
    params = sample_noise_params(rng, cfg or NoiseConfig())
    return _add_noise(_as_image(img), params, rng)


def downsample(img: np.ndarray, scale: float = 4, mode: str = "bicubic") -> np.ndarray:
    """Resize by ``1/scale`` (output ``floor(size/scale)``) with torch ``interpolate`` semantics."""
    h, w = img.shape[:2]
    return resize_torch_like(img, (max(1, int(h // scale)), max(1, int(w // scale))), mode)
