"""Blur kernels: normalisation, symmetry, covariance, closed forms, sampling."""
import math

import numpy as np
import pytest
from scipy import special, stats

from fluxir_jax.data import kernels as K

GAUSSIAN_FAMILY = K.KERNEL_TYPES


def _only(kind: str, **kw) -> K.KernelConfig:
    return K.KernelConfig(kernel_list=(kind,), kernel_prob=(1.0,), sinc_prob=0.0, **kw)


def _draws(cfg: K.KernelConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [K.random_mixed_kernel(rng, cfg) for _ in range(n)]


def _reference_kernel(params: dict) -> np.ndarray:
    """The formulas evaluated point by point, independently of the vectorised code."""
    n = params["size"]
    c, s = math.cos(params["rotation"]), math.sin(params["rotation"])
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([params["sigma_x"] ** 2, params["sigma_y"] ** 2]) @ rot.T)
    out = np.zeros((n, n))
    for row in range(n):
        for col in range(n):
            v = np.array([col - n // 2, row - n // 2], dtype=np.float64)  # x along columns
            q = v @ inv @ v
            kind = params["type"]
            if kind in ("iso", "aniso"):
                out[row, col] = math.exp(-0.5 * q)
            elif kind.startswith("generalized"):
                out[row, col] = math.exp(-0.5 * q ** params["beta"])
            else:
                out[row, col] = 1.0 / (q ** params["beta"] + 1.0)
    return out / out.sum()


@pytest.mark.parametrize("kind", GAUSSIAN_FAMILY)
def test_kernel_sums_to_one_padded_and_nonnegative(kind):
    for k, p in _draws(_only(kind), 40):
        assert k.shape == (21, 21)
        assert abs(k.sum() - 1.0) < 1e-12
        assert (k >= 0).all()
        pad = (21 - p["size"]) // 2
        if pad:
            assert not k[:pad].any() and not k[-pad:].any() and not k[:, :pad].any() and not k[:, -pad:].any()
        assert p["size"] % 2 == 1 and 7 <= p["size"] <= 21


@pytest.mark.parametrize("kind", GAUSSIAN_FAMILY)
def test_kernel_matches_formula(kind):
    for k, p in _draws(_only(kind), 6, seed=1):
        ref = _reference_kernel(p)
        np.testing.assert_allclose(K.pad_kernel(ref, 21), k, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["iso", "generalized_iso", "plateau_iso"])
def test_isotropic_kernels_have_all_symmetries(kind):
    for k, p in _draws(_only(kind), 20, seed=2):
        assert p["sigma_x"] == p["sigma_y"] and p["rotation"] == 0.0
        for t in (k.T, k[::-1], k[:, ::-1]):
            np.testing.assert_allclose(t, k, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["aniso", "generalized_aniso", "plateau_aniso"])
def test_anisotropic_kernels_are_point_symmetric_only(kind):
    mirrored = 0
    for k, p in _draws(_only(kind), 20, seed=3):
        np.testing.assert_allclose(k[::-1, ::-1], k, rtol=0, atol=1e-15)
        mirrored += np.allclose(k[::-1], k, atol=1e-9)
    assert mirrored <= 2  # random rotation and two sigmas: almost never mirror-symmetric


@pytest.mark.parametrize("kind", ["iso", "aniso"])
def test_gaussian_covariance_matches_sigma(kind):
    x, y = K.mesh_grid(21)
    cfg = _only(kind, sigma_range=(1.0, 2.5), kernel_size_range=(21, 21))
    for k, p in _draws(cfg, 30, seed=4):
        emp = np.array([[np.sum(k * x * x), np.sum(k * x * y)], [np.sum(k * x * y), np.sum(k * y * y)]])
        assert abs(np.sum(k * x)) < 1e-12 and abs(np.sum(k * y)) < 1e-12
        want = K.sigma_matrix(p["sigma_x"], p["sigma_y"], p["rotation"])
        assert np.linalg.norm(emp - want) / np.linalg.norm(want) < 0.02, (p, emp, want)


def test_rotation_turns_the_long_axis():
    k = K.bivariate_gaussian(21, 3.0, 0.5, math.pi / 4)
    # long axis along x = y (row index grows with y): the main diagonal carries more mass
    assert np.trace(k) > 5 * np.trace(k[:, ::-1])


def test_generalized_with_beta_one_is_gaussian():
    g = K.bivariate_gaussian(15, 2.0, 1.2, 0.7)
    np.testing.assert_allclose(K.bivariate_generalized_gaussian(15, 2.0, 1.2, 0.7, 1.0), g, rtol=1e-12)


@pytest.mark.parametrize("size", [7, 11, 13, 21])
def test_sinc_matches_closed_form(size):
    rng = np.random.default_rng(size)
    for omega in rng.uniform(math.pi / 5, math.pi, 5):
        ref = np.zeros((size, size))
        c = size // 2
        for row in range(size):
            for col in range(size):
                r = math.hypot(col - c, row - c)
                ref[row, col] = omega**2 / (4 * math.pi) if r == 0 else omega * special.j1(omega * r) / (2 * math.pi * r)
        ref /= ref.sum()
        k = K.circular_lowpass_kernel(float(omega), size)
        np.testing.assert_allclose(k, ref, rtol=0, atol=1e-14)
        assert abs(k.sum() - 1) < 1e-12
        for t in (k.T, k[::-1], k[:, ::-1]):
            np.testing.assert_allclose(t, k, atol=1e-15)


def test_sinc_is_a_low_pass():
    k = K.pad_kernel(K.circular_lowpass_kernel(math.pi / 3, 21), 63)
    spectrum = np.abs(np.fft.fft2(np.fft.ifftshift(k)))
    f = np.fft.fftfreq(63) * 2 * math.pi
    radius = np.hypot(*np.meshgrid(f, f))
    assert spectrum[radius < math.pi / 6].min() > 0.8  # pass band well inside the cutoff
    assert spectrum[radius > 2 * math.pi / 3].max() < 0.2  # stop band well outside


def test_mixed_sampling_sinc_branch_and_omega_ranges():
    cfg = K.KernelConfig(sinc_prob=1.0)
    for _, p in _draws(cfg, 200, seed=5):
        assert p["type"] == "sinc"
        lo = math.pi / 3 if p["size"] < 13 else math.pi / 5
        assert lo <= p["omega"] <= math.pi


def test_beta_ranges_and_split():
    rng = np.random.default_rng(6)
    gen = np.array([K.sample_kernel_params(rng, _only("generalized_iso"))["beta"] for _ in range(3000)])
    assert gen.min() >= 0.5 and gen.max() <= 4.0
    # U(0.5, 1) or U(1, 4) with p = 1/2 each
    observed = np.histogram(gen, bins=[0.5, 0.75, 1.0, 2.0, 3.0, 4.0])[0]
    expected = np.array([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6]) * gen.size
    assert stats.chisquare(observed, expected).pvalue > 1e-3, observed
    plat = [p["beta"] for _, p in _draws(_only("plateau_aniso"), 200, seed=7)]
    assert min(plat) >= 1.0 and max(plat) <= 2.0


def test_params_rebuild_the_same_kernel_and_seed_determinism():
    a = _draws(K.KernelConfig(), 30, seed=8)
    b = _draws(K.KernelConfig(), 30, seed=8)
    for (ka, pa), (kb, pb) in zip(a, b):
        assert pa == pb and np.array_equal(ka, kb)
        assert np.array_equal(K.kernel_from_params(pa, 21), ka)
    assert len({p["type"] for _, p in a}) > 2


def test_unknown_kernel_type_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel type"):
        K.kernel_from_params({"type": "box", "size": 7})
