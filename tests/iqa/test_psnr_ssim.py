"""PSNR / SSIM against independent float64 numpy statements of each convention, and skimage."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fluxir_jax.errors import UserError
from fluxir_jax.iqa import psnr_ssim
from fluxir_jax.iqa.registry import get_metric


# ---------------------------------------------------------------- numpy float64 references
def _y_basicsr(img01):        # BT.601 Y with +16, [0, 255] scale, not rounded
    return img01[..., 0] * 65.481 + img01[..., 1] * 128.553 + img01[..., 2] * 24.966 + 16.0


def _y_yiq(img01):            # Y of YIQ, [0, 1] scale
    return img01[..., 0] * 0.299 + img01[..., 1] * 0.587 + img01[..., 2] * 0.114


def _y255_rounded(img01):
    """pyiqa: YIQ luma * 255 rounded, computed exactly in integers for 8-bit images (exact .5 ties,
    about 1 pixel in 1000, round half to even)."""
    k = np.round(img01 * 255.0).astype(np.int64)
    assert np.array_equal(k / 255.0, img01), "test images must hold 8-bit values"
    n = k[..., 0] * 299 + k[..., 1] * 587 + k[..., 2] * 114      # = 1000 * luma * 255
    q, r = np.divmod(n, 1000)
    return (q + ((r > 500) | ((r == 500) & (q % 2 == 1)))).astype(np.float64)


def _ssim_2d(a, b, relu_cs=False):
    """Single-channel SSIM: full 11x11 Gaussian (sigma 1.5) correlation, 'valid' part, 255 range."""
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    win = np.outer(g, g)

    def f(z):
        return ndimage.correlate(z, win, mode="constant")[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = f(a), f(b)
    s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    if relu_cs:
        cs = np.maximum(cs, 0)
    return float(np.mean((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1) * cs))


def _crop(img, c):
    return img[c:-c, c:-c] if c else img


def ref_psnr(pred, gt, convention, crop=0, y=True):
    pred, gt = _crop(pred, crop), _crop(gt, crop)
    if convention == "basicsr":
        a, b = (_y_basicsr(pred), _y_basicsr(gt)) if y else (pred * 255.0, gt * 255.0)
        mse = np.mean((a - b) ** 2)
        return np.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    a, b = (_y_yiq(pred), _y_yiq(gt)) if y else (pred, gt)
    return 10 * np.log10(1.0 / (np.mean((a - b) ** 2) + 1e-8))


def ref_ssim(pred, gt, convention, crop=0, y=True):
    pred, gt = _crop(pred, crop), _crop(gt, crop)
    if convention == "basicsr":
        if y:
            return _ssim_2d(_y_basicsr(pred), _y_basicsr(gt))
        return float(np.mean([_ssim_2d(pred[..., c] * 255, gt[..., c] * 255) for c in range(3)]))
    if y:
        return _ssim_2d(_y255_rounded(pred), _y255_rounded(gt), relu_cs=True)
    # all channels: 8-bit values times 255 are integers already
    return float(np.mean([_ssim_2d(np.round(pred[..., c] * 255), np.round(gt[..., c] * 255), relu_cs=True)
                          for c in range(3)]))


# ---------------------------------------------------------------- test images
@pytest.fixture(scope="module")
def pair():
    """Two 8-bit-valued images: a real photo crop and a noisy, slightly blurred copy (batch of 2)."""
    rng = np.random.default_rng(7)
    gts, preds = [], []
    for img in (data.astronaut()[100:196, 150:246], data.coffee()[50:146, 300:396]):
        gt = img.astype(np.float64) / 255.0
        deg = ndimage.gaussian_filter(gt, (0.8, 0.8, 0)) + rng.normal(0, 0.03, gt.shape)
        preds.append(np.round(np.clip(deg, 0, 1) * 255) / 255.0)
        gts.append(gt)
    return np.stack(preds), np.stack(gts)


CASES = [("basicsr", 0, True), ("basicsr", 4, True), ("basicsr", 0, False),
         ("pyiqa", 0, True), ("pyiqa", 3, True), ("pyiqa", 0, False)]


@pytest.mark.parametrize("convention,crop,y", CASES)
def test_float64_matches_numpy_reference(pair, convention, crop, y):
    pred, gt = pair
    kw = dict(convention=convention, crop_border=crop, y_channel=y)
    with jax.enable_x64(True):
        p = np.asarray(psnr_ssim.psnr_jit(jnp.asarray(pred), jnp.asarray(gt), **kw))
        s = np.asarray(psnr_ssim.ssim_jit(jnp.asarray(pred), jnp.asarray(gt), **kw))
    assert p.dtype == np.float64
    for i in range(2):
        assert p[i] == pytest.approx(ref_psnr(pred[i], gt[i], convention, crop, y), abs=1e-9)
        assert s[i] == pytest.approx(ref_ssim(pred[i], gt[i], convention, crop, y), abs=1e-10)


@pytest.mark.parametrize("convention", ["basicsr", "pyiqa"])
def test_registry_default_and_float32(pair, convention):
    """The registry computes in float64 on CPU (exact); the float32 path stays within 1e-4 dB and
    2e-6 SSIM (5e-5 for pyiqa, where float32 decides which way a few exact .5 luma ties round)."""
    pred, gt = pair
    for name, ref, tol32 in (("psnr", ref_psnr, 1e-4), ("ssim", ref_ssim, 2e-6 if convention == "basicsr" else 5e-5)):
        refs = [ref(pred[i], gt[i], convention) for i in range(2)]
        exact = get_metric(name, convention=convention)(pred, gt)
        np.testing.assert_allclose(exact, refs, rtol=0, atol=1e-9)
        f32 = get_metric(name, convention=convention, dtype="float32")(pred.astype(np.float32), gt.astype(np.float32))
        np.testing.assert_allclose(f32, refs, rtol=0, atol=tol32)


def test_conventions_differ(pair):
    """The two conventions give different numbers on the same pair (luma, scale and rounding)."""
    pred, gt = pair
    b = get_metric("ssim", convention="basicsr")(pred, gt)
    p = get_metric("ssim", convention="pyiqa")(pred, gt)
    assert np.all(np.abs(b - p) > 1e-4)
    # PSNR: YIQ luma spans 255 levels, BT.601 Y 219, so pyiqa is lower by 20 log10(255/219) dB.
    pb = get_metric("psnr", convention="basicsr")(pred, gt)
    pp = get_metric("psnr", convention="pyiqa")(pred, gt)
    assert np.all(pb - pp > 1.0)


def test_skimage_where_conventions_coincide(pair):
    """BasicSR's PSNR/SSIM on Y = skimage's on the same Y (Gaussian weights, population covariance);
    pyiqa's SSIM = skimage's on the rounded YIQ luma where the contrast term is non-negative."""
    pred, gt = pair
    psnr_b = get_metric("psnr", convention="basicsr")(pred, gt)
    ssim_b = get_metric("ssim", convention="basicsr")(pred, gt)
    ssim_p = get_metric("ssim", convention="pyiqa")(pred, gt)
    sk = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    for i in range(2):
        yp, yg = _y_basicsr(pred[i]), _y_basicsr(gt[i])
        assert psnr_b[i] == pytest.approx(peak_signal_noise_ratio(yg, yp, data_range=255), abs=1e-9)
        assert ssim_b[i] == pytest.approx(structural_similarity(yg, yp, **sk), abs=1e-9)
        rp, rg = _y255_rounded(pred[i]), _y255_rounded(gt[i])
        assert ssim_p[i] == pytest.approx(structural_similarity(rg, rp, **sk), abs=1e-9)


def test_identical_images():
    img = data.chelsea()[:64, :64][None].astype(np.float64) / 255.0
    assert np.all(np.isinf(get_metric("psnr")(img, img)))
    assert get_metric("psnr", convention="pyiqa")(img, img)[0] == pytest.approx(80.0)   # pyiqa's +1e-8
    for conv in ("basicsr", "pyiqa"):
        assert get_metric("ssim", convention=conv)(img, img)[0] == pytest.approx(1.0, abs=1e-12)


def test_bad_input_raises_user_error(pair):
    pred, gt = pair
    with pytest.raises(UserError, match="differs"):
        get_metric("psnr")(pred, gt[:, :-1])
    with pytest.raises(UserError, match="convention"):
        get_metric("ssim", convention="matlab")
    with pytest.raises(UserError, match="float"):
        get_metric("ssim")((pred * 255).astype(np.uint8), (gt * 255).astype(np.uint8))
    with pytest.raises(UserError, match="crop_border"):
        get_metric("psnr", crop_border=48)(pred, gt)
    with pytest.raises(UserError, match="no option"):
        get_metric("psnr", net="alex")
