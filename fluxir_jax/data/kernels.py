"""Blur kernels of the Real-ESRGAN degradation model, written from their formulas.

Every kernel lives on the integer grid ``x, y in arange(-k//2 + 1, k//2 + 1)`` of an odd size
``k`` and is normalised to sum to 1; random kernels are zero-padded to ``pad_to`` (21).

- bivariate Gaussian             ``exp(-1/2 q)``
- generalized Gaussian           ``exp(-1/2 q^beta)``
- plateau                        ``1 / (q^beta + 1)``
- circular low-pass (sinc)       ``omega J1(omega r) / (2 pi r)``, centre ``omega^2 / (4 pi)``

with ``q = [x, y] Sigma^-1 [x, y]^T`` and ``Sigma = R diag(sx^2, sy^2) R^T`` (R a rotation by
theta). Isotropic variants use ``sx = sy`` and theta = 0.

Sampling (`random_mixed_kernel`) follows Real-ESRGAN: an odd size uniform in the configured
range; with probability ``sinc_prob`` a sinc kernel with cutoff ``omega ~ U(pi/3, pi)`` for sizes
below 13, else ``U(pi/5, pi)``; otherwise a kernel type drawn with ``kernel_prob``, sigmas
``U(sigma_range)``, rotation ``U(rotation_range)``, and beta drawn as ``U(lo, 1)`` or
``U(1, hi)`` with probability 1/2 each. The sampled choices come back as a JSON-friendly dict
from which `kernel_from_params` rebuilds the identical kernel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclasses.dataclass
class KernelConfig:
    """How one blur kernel is drawn (Real-ESRGAN defaults for the first blur).

    kernel_list        kernel types to draw from
    kernel_prob        probability of each entry of `kernel_list`
    kernel_size_range  blur kernel sizes
    sigma_range        Gaussian sigma range in pixels (each axis)
    betag_range        shape exponent range of the generalized Gaussian kernels
    betap_range        shape exponent range of the plateau kernels
    rotation_range     rotation range of the anisotropic kernels (radians)
    sinc_prob          probability of a sinc (ringing) kernel instead of the types above
    sinc_omega_small   sinc cut-off range (radians)
    sinc_omega_large   sinc cut-off range (radians) for sizes >= sinc_size_split
    sinc_size_split    kernel size from which `sinc_omega_large` is used
    pad_to             every kernel is zero-padded to this odd size
    """

    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_size_range: tuple[int, int] = (7, 21)  # odd sizes, uniform, both ends included
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    sinc_prob: float = 0.1
    sinc_omega_small: tuple[float, float] = (math.pi / 3, math.pi)  # sizes < sinc_size_split
    sinc_omega_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_size_split: int = 13
    pad_to: int = 21


# --- closed forms -----------------------------------------------------------------------------


def mesh_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer coordinates ``(x, y)`` of a ``size x size`` kernel centred on its middle tap."""
    ax = np.arange(-size // 2 + 1.0, size // 2 + 1.0)
    return np.meshgrid(ax, ax)  # x varies along columns, y along rows


def sigma_matrix(sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """Covariance ``R diag(sig_x^2, sig_y^2) R^T`` with R the rotation by ``theta``."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([sig_x**2, sig_y**2]) @ rot.T


def _quadratic_form(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """``q = [x, y] Sigma^-1 [x, y]^T`` on the kernel grid."""
    x, y = mesh_grid(size)
    inv = np.linalg.inv(sigma_matrix(sig_x, sig_y, theta))
    return inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y


def _normalised(k: np.ndarray) -> np.ndarray:
    return k / np.sum(k)


def bivariate_gaussian(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """Normalised bivariate Gaussian ``exp(-q/2)``."""
    return _normalised(np.exp(-0.5 * _quadratic_form(size, sig_x, sig_y, theta)))


def bivariate_generalized_gaussian(size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised generalized Gaussian ``exp(-(q^beta)/2)``."""
    return _normalised(np.exp(-0.5 * np.power(_quadratic_form(size, sig_x, sig_y, theta), beta)))


def bivariate_plateau(size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau-shaped kernel ``1 / (q^beta + 1)``."""
    return _normalised(1.0 / (np.power(_quadratic_form(size, sig_x, sig_y, theta), beta) + 1.0))


def circular_lowpass_kernel(omega: float, size: int) -> np.ndarray:
    """Normalised 2-D circular low-pass (sinc) ``omega J1(omega r) / (2 pi r)``.

    ``r`` is the distance to the centre tap; at ``r = 0`` the limit ``omega^2 / (4 pi)`` is used.
    """
    x, y = mesh_grid(size)
    r = np.hypot(x, y)
    safe = np.where(r == 0, 1.0, r)
    k = np.where(r == 0, omega**2 / (4 * np.pi), omega * special.j1(omega * safe) / (2 * np.pi * safe))
    return _normalised(k)


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an odd square kernel symmetrically to ``size x size``."""
    p = (size - kernel.shape[0]) // 2
    if p < 0:
        raise ValueError(f"kernel of size {kernel.shape[0]} does not fit in {size}")
    return np.pad(kernel, ((p, p), (p, p)))


def pulse_kernel(size: int = 21) -> np.ndarray:
    """The identity kernel (a single 1 in the middle)."""
    k = np.zeros((size, size))
    k[size // 2, size // 2] = 1.0
    return k


# --- sampling ---------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _beta(rng: np.random.Generator, lo_hi) -> float:
    """Shape parameter: ``U(lo, 1)`` or ``U(1, hi)`` with probability 1/2 each."""
    if rng.uniform() < 0.5:
        return float(rng.uniform(lo_hi[0], 1.0))
    return float(rng.uniform(1.0, lo_hi[1]))


def odd_sizes(size_range) -> list[int]:
    """The odd kernel sizes in ``[lo, hi]`` (both included)."""
    lo, hi = int(size_range[0]), int(size_range[1])
    return [k for k in range(lo, hi + 1) if k % 2 == 1]


def random_kernel_size(rng: np.random.Generator, size_range) -> int:
    """An odd size drawn uniformly from ``size_range``."""
    sizes = odd_sizes(size_range)
    return int(sizes[rng.integers(len(sizes))])


def sample_sinc_params(rng: np.random.Generator, size: int, omega_range) -> dict[str, Any]:
    """Parameters of a sinc kernel of a given size with ``omega ~ U(omega_range)``."""
    return {"type": "sinc", "size": int(size), "omega": _uniform(rng, omega_range)}


def sample_kernel_params(rng: np.random.Generator, cfg: KernelConfig) -> dict[str, Any]:
    """Draw the choices that define one mixed kernel (type, size, sigmas, rotation, beta/omega)."""
    size = random_kernel_size(rng, cfg.kernel_size_range)
    if rng.uniform() < cfg.sinc_prob:
        omega_range = cfg.sinc_omega_small if size < cfg.sinc_size_split else cfg.sinc_omega_large
        return sample_sinc_params(rng, size, omega_range)
    prob = np.asarray(cfg.kernel_prob, dtype=np.float64)
    kind = str(cfg.kernel_list[rng.choice(len(cfg.kernel_list), p=prob / prob.sum())])
    sig_x = _uniform(rng, cfg.sigma_range)
    if kind.endswith("_iso") or kind == "iso":
        sig_y, theta = sig_x, 0.0
    else:
        sig_y, theta = _uniform(rng, cfg.sigma_range), _uniform(rng, cfg.rotation_range)
    params: dict[str, Any] = {"type": kind, "size": size, "sigma_x": sig_x, "sigma_y": sig_y, "rotation": theta}
    if kind.startswith("generalized"):
        params["beta"] = _beta(rng, cfg.betag_range)
    elif kind.startswith("plateau"):
        params["beta"] = _beta(rng, cfg.betap_range)
    return params


def kernel_from_params(params: dict[str, Any], pad_to: int | None = 21) -> np.ndarray:
    """Rebuild the (float64) kernel that `sample_kernel_params` described, padded to ``pad_to``."""
    kind, size = params["type"], int(params["size"])
    if kind == "sinc":
        k = circular_lowpass_kernel(params["omega"], size)
    elif kind == "identity":
        k = pulse_kernel(size)
    elif kind in ("iso", "aniso"):
        k = bivariate_gaussian(size, params["sigma_x"], params["sigma_y"], params["rotation"])
    elif kind.startswith("generalized"):
        k = bivariate_generalized_gaussian(size, params["sigma_x"], params["sigma_y"], params["rotation"], params["beta"])
    elif kind.startswith("plateau"):
        k = bivariate_plateau(size, params["sigma_x"], params["sigma_y"], params["rotation"], params["beta"])
    else:
        raise ValueError(f"unknown kernel type {kind!r} (known: {', '.join(KERNEL_TYPES + ('sinc', 'identity'))})")
    return pad_kernel(k, pad_to) if pad_to else k


def random_mixed_kernel(rng: np.random.Generator, cfg: KernelConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one Real-ESRGAN blur kernel: ``(kernel [pad_to, pad_to] float64, params)``."""
    cfg = cfg or KernelConfig()
    params = sample_kernel_params(rng, cfg)
    return kernel_from_params(params, cfg.pad_to), params
