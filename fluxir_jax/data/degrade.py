"""Real-ESRGAN second-order degradation on the host (numpy + OpenCV), seeded and explainable.

    lq, lq_up, params = degrade(hq, np.random.default_rng(seed), DegradationConfig())

``hq`` is float32 HWC RGB in [0, 1]. The pipeline (Real-ESRGAN's, with the parameters of `DegradationConfig`):

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
import math
from typing import Any

import cv2
import numpy as np

from fluxir_jax.data import kernels as K
from fluxir_jax.data.image_ops import (  # noqa: F401  (public re-exports: the single degradations' building blocks)
    RESIZE_MODES,
    _as_image,
    add_noise,
    crop_flip,
    filter2d,
    jpeg,
    poisson_from_levels,
    reflect_pad_to,
    resize_torch_like,
    standard_normal,
    to_uint8,
)
from fluxir_jax.errors import UserError

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
    """Every parameter of the FluxGen degradation (the paper's Real-ESRGAN-style settings)."""

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



# --- image operations live in image_ops.py; USM sharpening needs USMConfig ------------------

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
    x, p["noise1"] = add_noise(x, p["noise1"], rng)
    x = jpeg(x, p["jpeg1"]["quality"])
    # second order
    if p["blur2"] is not None:
        x = filter2d(x, K.kernel_from_params(p["blur2"], None))
    x = resize_torch_like(x, p["resize2"]["out_hw"], p["resize2"]["mode"])
    x, p["noise2"] = add_noise(x, p["noise2"], rng)
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
    x = reflect_pad_to(x, c, c)
    top = int(rng.integers(x.shape[0] - c + 1))
    left = int(rng.integers(x.shape[1] - c + 1))
    flip = bool(rng.uniform() < cfg.hflip_prob)
    x = crop_flip(x, top, left, c, c, flip)
    return np.ascontiguousarray(x), {"pad": [ph, pw], "top": top, "left": left, "hflip": flip}


def blur(img: np.ndarray, rng: np.random.Generator, cfg: K.KernelConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One random Real-ESRGAN blur: ``(blurred, kernel params)``."""
    params = K.sample_kernel_params(rng, cfg or K.KernelConfig())
    return filter2d(img, K.kernel_from_params(params, None)), params


def noise(img: np.ndarray, rng: np.random.Generator, cfg: NoiseConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Random Gaussian or Poisson noise (colour or gray), clipped to [0, 1]: ``(noisy, params)``."""
    params = sample_noise_params(rng, cfg or NoiseConfig())
    return add_noise(_as_image(img), params, rng)


def downsample(img: np.ndarray, scale: float = 4, mode: str = "bicubic") -> np.ndarray:
    """Resize by ``1/scale`` (output ``floor(size/scale)``) with torch ``interpolate`` semantics."""
    h, w = img.shape[:2]
    return resize_torch_like(img, (max(1, int(h // scale)), max(1, int(w // scale))), mode)
