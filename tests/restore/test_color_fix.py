"""Colour fix: the output's low frequencies follow the upsampled LQ."""
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import gaussian_filter

from fluxir_jax.color_fix import color_fix, wavelet_low
from fluxir_jax.restore import Restorer, upsample
from tests.restore import fixtures


def ramp_image(h: int, w: int) -> np.ndarray:
    """uint8 RGB with only very low frequencies (linear colour ramps), the band a colour fix transfers."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([0.2 + 0.6 * x / (w - 1), 0.3 + 0.4 * y / (h - 1), 0.5 + 0.2 * (x + y) / (h + w - 2)], -1)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def low_pass(img: np.ndarray, sigma: float = 16) -> np.ndarray:
    """Per-channel Gaussian low-pass (edge mode nearest)."""
    return np.stack([gaussian_filter(img[..., c], sigma, mode="nearest") for c in range(img.shape[-1])], -1)


def test_adain_matches_channel_statistics_and_wavelet_swaps_low_frequencies():
    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.uniform(0.2, 0.6, (2, 32, 32, 3)), jnp.float32)
    ref = jnp.asarray(rng.uniform(0.3, 0.9, (2, 32, 32, 3)), jnp.float32)
    a = np.asarray(color_fix(out, ref, "adain"))
    np.testing.assert_allclose(a.mean((1, 2)), np.asarray(ref).mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(a.std((1, 2)), np.asarray(ref).std((1, 2)), rtol=1e-3)
    w = color_fix(out, ref, "wavelet")
    # what the fix removed from the output is its low band; what it added is the reference's
    np.testing.assert_allclose(np.asarray(w - out), np.clip(np.asarray(out - wavelet_low(out) + wavelet_low(ref)), 0, 1) - np.asarray(out), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(color_fix(out, ref, "none")), np.asarray(out))


def test_restored_low_frequencies_match_the_lq(tiny_models):
    ckpt, adapter = tiny_models
    lq = ramp_image(16, 16)
    lq_up = upsample(lq.astype(np.float32) / 255, (64, 64))
    err, mean_err = {}, {}
    for fix in ("wavelet", "none"):
        out = Restorer(ckpt, adapter, steps=2, parallel="pmap", devices=1, color_fix=fix).restore([lq], [7])[0]
        out = out.astype(np.float32) / 255
        err[fix] = float(np.abs(low_pass(out) - low_pass(lq_up)).max())
        mean_err[fix] = float(np.abs(out.mean((0, 1)) - lq_up.mean((0, 1))).max())
    print("low-pass error", err, "channel-mean error", mean_err)
    # the random model alone does not keep the colours; the wavelet fix puts them back
    assert mean_err["wavelet"] <= 0.01 and mean_err["none"] >= 3 * mean_err["wavelet"]
    assert err["wavelet"] <= 0.06 and err["wavelet"] <= 0.25 * err["none"]
