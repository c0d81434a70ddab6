"""Second-order degradation: image operations against torch/numpy references, the pipeline on
real photos shipped with scikit-image, and the distribution of the sampled choices."""
import collections
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import stats
from skimage import data as skdata

from fluxir_jax import config as config_lib
from fluxir_jax.data import degrade as D
from fluxir_jax.data import kernels as K
from fluxir_jax.errors import UserError


def _photo(name: str) -> np.ndarray:
    return getattr(skdata, name)().astype(np.float32) / 255.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _torch_resize(x: np.ndarray, mode: str, size=None, scale=None) -> np.ndarray:
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    kw = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(t, size=size, scale_factor=scale, mode=mode, **kw)
    return out[0].permute(1, 2, 0).numpy()


# --- image operations -------------------------------------------------------------------------

RESIZE_CASES = [((37, 53), (80, 111)), ((64, 64), (17, 29)), ((50, 40), (50, 13)), ((31, 29), (7, 5)),
                ((64, 48), (16, 12)), ((9, 12), (40, 3)), ((96, 80), (41, 77))]


@pytest.mark.parametrize("mode", D.RESIZE_MODES)
@pytest.mark.parametrize("src_hw,out_hw", RESIZE_CASES)
def test_resize_matches_torch_interpolate_size(mode, src_hw, out_hw):
    x = np.random.default_rng(0).random(src_hw + (3,), dtype=np.float32)
    got = D.resize_torch_like(x, out_hw, mode)
    want = _torch_resize(x, mode, size=out_hw)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("mode", D.RESIZE_MODES)
@pytest.mark.parametrize("src_hw,scale", [((64, 64), 0.37), ((50, 61), 1.23), ((40, 40), 0.15), ((77, 33), 0.5), ((64, 64), 1.4999), ((90, 70), 0.8213)])
def test_resize_matches_torch_interpolate_scale_factor(mode, src_hw, scale):
    x = np.random.default_rng(1).random(src_hw + (3,), dtype=np.float32)
    want = _torch_resize(x, mode, scale=scale)
    got = D.resize_torch_like(x, want.shape[:2], mode, scale_factor=scale)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def test_resize_scale_factor_differs_from_size_semantics():
    """The scale_factor path is not just the size path (torch maps with 1/s, not in/out)."""
    x = np.random.default_rng(2).random((64, 64, 3), dtype=np.float32)
    a = D.resize_torch_like(x, (23, 23), "bicubic", scale_factor=0.37)
    b = D.resize_torch_like(x, (23, 23), "bicubic")
    assert np.abs(a - b).max() > 1e-2


def _direct_correlation(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """float64 correlation on a reflect-101 padded image (numpy 'reflect' = OpenCV reflect-101)."""
    r = kernel.shape[0] // 2
    pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    out = np.zeros(img.shape, dtype=np.float64)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += kernel[i, j] * pad[i : i + h, j : j + w]
    return out


def _kernel_zoo():
    rng = np.random.default_rng(3)
    zoo = {f"random{n}": rng.random((n, n)) / (n * n / 2) for n in (3, 7, 11, 13, 17, 21)}  # asymmetric
    g = rng.random(21)
    zoo["rank1_21"] = np.outer(g, rng.random(21)) / 100
    zoo["rank2_15"] = np.outer(rng.random(15), rng.random(15)) / 50 + np.outer(rng.random(15), rng.random(15)) / 50
    zoo["gaussian_aniso"] = K.bivariate_gaussian(21, 3.0, 0.4, 0.9)
    zoo["gaussian_iso_padded"] = K.pad_kernel(K.bivariate_gaussian(7, 1.1, 1.1, 0.0), 21)
    zoo["generalized_iso"] = K.bivariate_generalized_gaussian(19, 2.0, 2.0, 0.0, 0.7)
    zoo["sinc"] = K.circular_lowpass_kernel(1.0, 21)
    zoo["plateau_aniso"] = K.bivariate_plateau(21, 2.5, 1.0, -1.1, 1.5)
    return zoo


@pytest.mark.parametrize("name,kernel", list(_kernel_zoo().items()))
def test_filter2d_matches_direct_correlation(name, kernel):
    img = np.random.default_rng(4).random((45, 38, 3), dtype=np.float32)
    got = D.filter2d(img, kernel)
    want = _direct_correlation(img, kernel)
    assert got.shape == img.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(kernel).sum())


@pytest.mark.parametrize("shape", [(33, 40), (33, 40, 1), (8, 9, 3)])
def test_filter2d_and_resize_keep_gray_and_tiny_shapes(shape):
    img = np.random.default_rng(5).random(shape, dtype=np.float32)
    img3 = img.reshape(shape[:2] + (-1,))
    for kernel in (_kernel_zoo()["random21"], _kernel_zoo()["rank1_21"], _kernel_zoo()["random7"]):
        got = D.filter2d(img, kernel)
        assert got.shape == img.shape
        assert np.abs(got.reshape(img3.shape) - _direct_correlation(img3, kernel)).max() <= 1e-5
    for mode in D.RESIZE_MODES:
        got = D.resize_torch_like(img, (15, 21), mode)
        assert got.shape == (15, 21) + shape[2:]
        assert np.abs(got.reshape(15, 21, -1) - _torch_resize(img3, mode, size=(15, 21))).max() <= 1e-5


def test_filter2d_equals_torch_conv2d_on_reflect_padding():
    """BasicSR's filter2D: F.pad(reflect) then a grouped conv2d (correlation)."""
    img = np.random.default_rng(5).random((40, 52, 3), dtype=np.float32)
    kernel = np.random.default_rng(6).random((21, 21)) / 220
    t = F.pad(torch.from_numpy(img).permute(2, 0, 1)[None], (10, 10, 10, 10), mode="reflect")
    w = torch.from_numpy(kernel.astype(np.float32))[None, None].repeat(3, 1, 1, 1)
    want = F.conv2d(t, w, groups=3)[0].permute(1, 2, 0).numpy()
    assert np.abs(D.filter2d(img, kernel) - want).max() <= 1e-5


def test_jpeg_round_trip_matches_pillow():
    for name in ("astronaut", "coffee"):
        img = _photo(name)
        u8 = D.to_uint8(img)
        for q in (30, 50, 75, 95):
            ours = D.jpeg(img, q)
            buf = io.BytesIO()
            Image.fromarray(u8).save(buf, format="JPEG", quality=q)
            pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            assert ours.shape == img.shape and ours.dtype == np.float32
            # OpenCV and Pillow both encode and decode with libjpeg-turbo (4:2:0, the same quality
            # tables, islow DCT, fancy upsampling): the decoded pixels are identical, not just close
            np.testing.assert_array_equal(D.to_uint8(ours), pil, err_msg=f"{name} q={q}")
            assert np.array_equal(ours * 255, np.round(ours * 255))   # exactly k/255 values
            assert _psnr(ours, u8.astype(np.float32) / 255) < 45  # it really compressed
    gray = _photo("astronaut")[..., 1]
    for shape in (gray.shape, gray.shape + (1,)):
        g = D.jpeg(gray.reshape(shape), 50)
        assert g.shape == shape and 25 < _psnr(g.reshape(gray.shape), gray) < 45
    with pytest.raises(ValueError, match="jpeg expects"):
        D.jpeg(np.zeros((8, 8, 4), np.float32), 50)
    a, b = D.jpeg(_photo("astronaut"), 30), D.jpeg(_photo("astronaut"), 90)
    assert _psnr(a, _photo("astronaut")) < _psnr(b, _photo("astronaut")) - 3


# --- noise ------------------------------------------------------------------------------------


def test_standard_normal_is_standard_normal():
    z = D.standard_normal(np.random.default_rng(7), (301, 333))
    assert z.shape == (301, 333) and z.dtype == np.float32
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z.ravel()[:20000], "norm").pvalue > 1e-3


@pytest.mark.parametrize("vals", [256, 8, 1])
def test_poisson_sampler_matches_the_poisson_law(vals):
    levels = np.repeat(np.arange(256, dtype=np.uint8), 1500)
    counts = D.poisson_from_levels(levels, vals, np.random.default_rng(vals)).reshape(256, 1500)
    lam = np.arange(256) * vals / 255
    se = np.sqrt(np.maximum(lam, 1e-3) / 1500)
    assert np.all(np.abs(counts.mean(1) - lam) < 5 * se + 1e-9)
    for level in (3, 77, 200, 255):
        c, l = counts[level], lam[level]
        if l < 1e-9:
            continue
        lo, hi = int(stats.poisson.ppf(0.001, l)), int(stats.poisson.ppf(0.999, l))
        edges = np.unique(np.linspace(lo, hi + 1, 12).astype(int))
        observed = np.array([np.sum((c >= a) & (c < b)) for a, b in zip(edges[:-1], edges[1:])] + [np.sum((c < lo) | (c > hi))])
        p = np.diff(stats.poisson.cdf(edges - 1, l))
        expected = np.append(p, 1 - p.sum()) * c.size
        keep = expected > 5
        chi = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
        assert stats.chi2.sf(chi, keep.sum() - 1) > 1e-3, (level, observed, expected)
    assert np.all(counts[0] == 0)


def test_gaussian_noise_level_and_gray():
    img = np.full((200, 200, 3), 0.5, dtype=np.float32)
    cfg = D.NoiseConfig(gaussian_prob=1.0, sigma_range=(20.0, 20.0), gray_prob=0.0)
    out, p = D.noise(img, np.random.default_rng(8), cfg)
    assert p == {"type": "gaussian", "sigma": 20.0, "gray": False}
    resid = out - img
    assert abs(resid.std() / (20 / 255) - 1) < 0.02 and abs(resid.mean()) < 1e-3
    assert np.abs(resid[..., 0] - resid[..., 1]).max() > 0.01
    gray, pg = D.noise(img, np.random.default_rng(8), D.NoiseConfig(gaussian_prob=1.0, gray_prob=1.0))
    assert pg["gray"] and np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_poisson_noise_follows_realesrgan():
    img = (np.rint(_photo("coffee")[:128, :128] * 40) / 40 * 0.9 + 0.05).astype(np.float32)  # <= 41 levels -> vals 64
    cfg = D.NoiseConfig(gaussian_prob=0.0, poisson_scale_range=(1.0, 1.0), gray_prob=0.0)
    out, p = D.noise(img, np.random.default_rng(9), cfg)
    levels = np.rint(img * 255).astype(int)
    assert p["type"] == "poisson" and p["vals"] == 2 ** math.ceil(math.log2(len(np.unique(levels)))) == 64
    # at scale 1 and no clipping, out * vals is an integer count (the Poisson draw)
    inside = (out > 0) & (out < 1)
    counts = (out - img + levels / 255.0) * p["vals"]
    assert np.abs(counts[inside] - np.rint(counts[inside])).max() < 2e-3
    # variance of the noise is lambda / vals^2 = img / vals
    var = np.var((out - img)[inside])
    assert abs(var / np.mean(img[inside] / p["vals"]) - 1) < 0.1
    g, pg = D.noise(img, np.random.default_rng(9), D.NoiseConfig(gaussian_prob=0.0, poisson_scale_range=(1.0, 1.0), gray_prob=1.0))
    d = g - img
    ok = (g > 0).all(-1) & (g < 1).all(-1)
    assert pg["gray"] and np.abs(d[..., 0] - d[..., 1])[ok].max() < 1e-6
    # gray Poisson runs on torchvision's luma (0.2989 R + 0.587 G + 0.114 B), rounded to 1/255
    luma = np.rint((img @ np.array([0.2989, 0.587, 0.114], dtype=np.float32)) * 255)
    gcounts = (d[..., 0] + luma / 255.0) * pg["vals"]
    assert np.abs(gcounts[ok] - np.rint(gcounts[ok])).max() < 2e-3


# --- the pipeline -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_degrade_shapes_range_and_grid(name):
    hq = _photo(name)
    lq, lq_up, params = D.degrade(hq, np.random.default_rng(10), D.DegradationConfig())
    h, w = hq.shape[:2]
    assert lq.shape == (h // 4, w // 4, 3) and lq.dtype == np.float32
    assert lq_up.shape == hq.shape and lq_up.dtype == np.float32
    assert lq.min() >= 0 and lq.max() <= 1 and lq_up.min() >= 0 and lq_up.max() <= 1
    assert np.array_equal(D.to_uint8(lq).astype(np.float32) / np.float32(255), lq)  # = its uint8 PNG
    np.testing.assert_allclose(lq_up, np.clip(D.resize_torch_like(lq, (h, w), "bicubic"), 0, 1))
    assert params["final_resize"]["out_hw"] == [h // 4, w // 4]
    assert json.loads(json.dumps(params)) == params


def test_degrade_is_deterministic_per_seed():
    hq = _photo("chelsea")
    a = D.degrade(hq, np.random.default_rng(123), D.DegradationConfig())
    b = D.degrade(hq, np.random.default_rng(123), D.DegradationConfig())
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    others = [D.degrade(hq, np.random.default_rng(s), D.DegradationConfig()) for s in (124, 125)]
    for o in others:
        assert o[2] != a[2] and o[0].tobytes() != a[0].tobytes()


def test_apply_degradation_replays_sampled_params():
    hq = _photo("astronaut")[:256, :256]
    lq, _, params = D.degrade(hq, np.random.default_rng(11), D.DegradationConfig())
    rng = np.random.default_rng(11)
    sampled = D.sample_degradation(rng, D.DegradationConfig(), (256, 256))
    before = json.dumps(sampled)
    replay, p2 = D.apply_degradation(hq, sampled, rng)
    assert np.array_equal(replay, lq) and p2 == params
    assert json.dumps(sampled) == before  # the caller's dict is left as it was


def _gaussian(x, p, rng):
    n = D.standard_normal(rng, x.shape[:2] + (1 if p["gray"] else 3,))
    n *= np.float32(p["sigma"] / 255.0)
    return np.clip(x + n, 0, 1, dtype=np.float32)


@pytest.mark.parametrize("resize_first", [1, 0])
def test_pipeline_runs_the_paper_order(resize_first):
    """apply_degradation == the table's steps composed by hand from the public operations."""
    cfg = config_lib.apply_overrides(D.DegradationConfig(), [
        "stage1.noise.gaussian_prob=1", "stage2.noise.gaussian_prob=1", "stage1.resize.prob=[0, 1, 0]",
        "stage2.blur_prob=1", "final.sinc_prob=1", f"final.resize_first_prob={resize_first}"])
    hq = _photo("rocket")[:200, :248]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        p = D.sample_degradation(rng, cfg, hq.shape[:2])
        ref_rng = copy.deepcopy(rng)
        lq, _ = D.apply_degradation(hq, p, rng)
        r1, r2, rf = p["resize1"], p["resize2"], p["final_resize"]
        assert r1["out_hw"] == list(_torch_resize(hq[:, :, :1], "area", scale=r1["scale"]).shape[:2])
        x = D.filter2d(hq, K.kernel_from_params(p["blur1"]))
        x = D.resize_torch_like(x, r1["out_hw"], r1["mode"], scale_factor=r1["scale"])
        x = D.jpeg(_gaussian(x, p["noise1"], ref_rng), p["jpeg1"]["quality"])
        x = D.filter2d(x, K.kernel_from_params(p["blur2"]))
        x = _gaussian(D.resize_torch_like(x, r2["out_hw"], r2["mode"]), p["noise2"], ref_rng)
        sinc = K.kernel_from_params(p["final_sinc"])
        if resize_first:
            x = D.jpeg(D.filter2d(D.resize_torch_like(x, rf["out_hw"], rf["mode"]), sinc), p["jpeg2"]["quality"])
        else:
            x = D.filter2d(D.resize_torch_like(D.jpeg(x, p["jpeg2"]["quality"]), rf["out_hw"], rf["mode"]), sinc)
        assert p["final_order"] == D.FINAL_ORDERS[1 - resize_first]
        assert np.array_equal(lq, D.to_uint8(x).astype(np.float32) / np.float32(255))


def test_degrade_psnr_in_a_plausible_band():
    for name in ("astronaut", "coffee", "rocket"):
        hq = _photo(name)[:256, :320]
        ps = [_psnr(D.degrade(hq, np.random.default_rng(s), D.DegradationConfig())[1], hq) for s in range(6)]
        assert 18 <= np.median(ps) <= 30, (name, ps)
        assert min(ps) > 12 and max(ps) < 36, (name, ps)


def test_lighter_degradation_gives_higher_psnr():
    hq = _photo("coffee")[:256, :256]
    light = D.DegradationConfig(
        stage1=D.StageConfig(blur_prob=0.0, resize=D.ResizeConfig(prob=(0, 0, 1)), noise=D.NoiseConfig(sigma_range=(1, 1), poisson_scale_range=(0.05, 0.05))),
        jpeg1_range=(95, 95),
        stage2=D.StageConfig(blur_prob=0.0, resize=D.ResizeConfig(prob=(0, 0, 1), range=(0.3, 1.2)), noise=D.NoiseConfig(sigma_range=(1, 1), poisson_scale_range=(0.05, 0.05))),
        final=D.FinalConfig(sinc_prob=0.0, jpeg_range=(95, 95)),
    )
    heavy = [_psnr(D.degrade(hq, np.random.default_rng(s))[1], hq) for s in range(4)]
    soft = [_psnr(D.degrade(hq, np.random.default_rng(s), light)[1], hq) for s in range(4)]
    assert min(soft) > max(heavy)


def test_usm_option_sharpens_before_degrading():
    hq = _photo("astronaut")[:128, :128]
    sharp = D.usm_sharpen(hq)
    assert sharp.min() >= 0 and sharp.max() <= 1
    lap = lambda x: np.abs(np.diff(x, axis=0)).mean()  # noqa: E731
    assert lap(sharp) > 1.05 * lap(hq)
    flat = np.full((64, 64, 3), 0.3, dtype=np.float32)
    np.testing.assert_allclose(D.usm_sharpen(flat), flat, atol=1e-6)
    cfg = D.DegradationConfig(usm=D.USMConfig(enabled=True))
    a = D.degrade(hq, np.random.default_rng(12), cfg)
    b = D.degrade(hq, np.random.default_rng(12))
    assert a[2]["usm"] and not b[2]["usm"] and not np.array_equal(a[0], b[0])


def _chi_square_ok(counts: collections.Counter, probs: dict) -> bool:
    n = sum(counts.values())
    keys = list(probs)
    assert set(counts) <= set(keys), (counts, keys)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    expected = np.array([probs[k] for k in keys]) * n
    return stats.chisquare(observed, expected).pvalue > 1e-3


def test_sampled_choices_follow_the_configured_probabilities():
    cfg = D.DegradationConfig()
    rng = np.random.default_rng(2024)
    draws = [D.sample_degradation(rng, cfg, (512, 512)) for _ in range(2000)]
    kprob = dict(zip(K.KERNEL_TYPES, cfg.stage1.kernel.kernel_prob))

    def blur_probs(sinc):
        return {"sinc": sinc, **{k: (1 - sinc) * v for k, v in kprob.items()}}

    c = collections.Counter
    assert _chi_square_ok(c(d["blur1"]["type"] for d in draws), blur_probs(0.1))
    assert _chi_square_ok(c(d["blur2"] is not None for d in draws), {True: 0.8, False: 0.2})
    assert _chi_square_ok(c(d["blur2"]["type"] for d in draws if d["blur2"]), blur_probs(0.1))
    sizes = {k: 1 / 8 for k in range(7, 22, 2)}
    assert _chi_square_ok(c(d["blur1"]["size"] for d in draws), sizes)
    assert _chi_square_ok(c(d["resize1"]["direction"] for d in draws), {"up": 0.2, "down": 0.7, "keep": 0.1})
    assert _chi_square_ok(c(d["resize2"]["direction"] for d in draws), {"up": 0.3, "down": 0.4, "keep": 0.3})
    for key in ("resize1", "resize2", "final_resize"):
        assert _chi_square_ok(c(d[key]["mode"] for d in draws), {m: 1 / 3 for m in D.RESIZE_MODES})
    for key in ("noise1", "noise2"):
        assert _chi_square_ok(c(d[key]["type"] for d in draws), {"gaussian": 0.5, "poisson": 0.5})
        assert _chi_square_ok(c(d[key]["gray"] for d in draws), {True: 0.4, False: 0.6})
    assert _chi_square_ok(c(d["final_order"] for d in draws), {o: 0.5 for o in D.FINAL_ORDERS})
    assert _chi_square_ok(c(d["final_sinc"] is not None for d in draws), {True: 0.8, False: 0.2})
    assert _chi_square_ok(c((d["jpeg1"]["quality"] - 30) // 11 for d in draws), {i: 1 / 6 for i in range(6)})

    def within(values, lo, hi, fill=0.9):
        v = np.array(list(values))
        return v.min() >= lo and v.max() <= hi and (v.max() - v.min()) > fill * (hi - lo)

    assert within((d["blur1"]["sigma_x"] for d in draws if "sigma_x" in d["blur1"]), 0.2, 3.0)
    assert within((d["blur2"]["sigma_y"] for d in draws if d["blur2"] and "sigma_y" in d["blur2"]), 0.2, 1.5)
    assert within((d["resize1"]["scale"] for d in draws if d["resize1"]["direction"] == "down"), 0.15, 1.0)
    assert within((d["resize1"]["scale"] for d in draws if d["resize1"]["direction"] == "up"), 1.0, 1.5)
    assert within((d["resize2"]["scale"] for d in draws if d["resize2"]["direction"] == "down"), 0.3, 1.0)
    assert within((d["noise1"]["sigma"] for d in draws if d["noise1"]["type"] == "gaussian"), 1, 30)
    assert within((d["noise2"]["sigma"] for d in draws if d["noise2"]["type"] == "gaussian"), 1, 25)
    assert within((d["noise1"]["scale"] for d in draws if d["noise1"]["type"] == "poisson"), 0.05, 3.0)
    assert within((d["noise2"]["scale"] for d in draws if d["noise2"]["type"] == "poisson"), 0.05, 2.5)
    assert within((d["final_sinc"]["omega"] for d in draws if d["final_sinc"]), math.pi / 3, math.pi)
    for key in ("jpeg1", "jpeg2"):
        q = [d[key]["quality"] for d in draws]
        assert min(q) == 30 and max(q) == 95
    for d in draws[:50]:
        r1 = d["resize1"]
        assert r1["out_hw"] == [math.floor(512 * r1["scale"])] * 2
        assert d["resize2"]["out_hw"] == [int(512 / 4 * d["resize2"]["scale"])] * 2


# --- configuration and the small helpers --------------------------------------------------------


def test_config_yaml_round_trip_and_overrides():
    cfg = D.DegradationConfig()
    text = yaml.safe_dump(config_lib.to_dict(cfg))
    back = config_lib.from_dict(D.DegradationConfig, yaml.safe_load(text))
    assert back == cfg
    over = config_lib.apply_overrides(cfg, ["stage2.kernel.kernel_size_range=[11, 11]", "final.jpeg_range=[60, 70]"])
    assert over.stage2.kernel.kernel_size_range == (11, 11) and over.final.jpeg_range == (60, 70)
    p = D.sample_degradation(np.random.default_rng(0), over, (64, 64))
    assert p["jpeg2"]["quality"] in range(60, 71)


@pytest.mark.parametrize("override,field", [
    ("stage1.resize.prob=[0.2, 0.7]", "stage1.resize.prob"),
    ("stage1.kernel.kernel_list=[box]", "stage1.kernel.kernel_list"),
    ("jpeg1_range=[30, 120]", "jpeg1_range"),
    ("stage2.noise.sigma_range=[5, 1]", "stage2.noise.sigma_range"),
    ("final.modes=[nearest]", "final.modes"),
])
def test_bad_config_is_a_user_error(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        config_lib.apply_overrides(D.DegradationConfig(), [override])


def test_single_degradations():
    img = _photo("chelsea")
    rng = np.random.default_rng(13)
    blurred, kp = D.blur(img, rng)
    assert blurred.shape == img.shape and kp["type"] in K.KERNEL_TYPES + ("sinc",)
    assert _psnr(blurred, img) < 60
    noisy, npar = D.noise(img, rng)
    assert noisy.shape == img.shape and npar["type"] in ("gaussian", "poisson")
    assert D.jpeg(img, 40).shape == img.shape
    small = D.downsample(img, 4, "area")
    assert small.shape == (75, 112, 3)
    np.testing.assert_allclose(small, _torch_resize(img, "area", size=(75, 112)), atol=1e-5)


def test_prepare_gt_crops_pads_and_flips():
    img = _photo("chelsea")  # 300 x 451, smaller than the 512 crop
    rng = np.random.default_rng(14)
    flips = 0
    for _ in range(20):
        gt, p = D.prepare_gt(img, rng, D.GTConfig(crop_size=512))
        assert gt.shape == (512, 512, 3) and p["pad"] == [212, 61]
        flips += p["hflip"]
        src = gt[:, ::-1] if p["hflip"] else gt
        np.testing.assert_array_equal(src[:300, :451], img)
        np.testing.assert_array_equal(src[300:302, :451], img[298:296:-1])  # reflect-101 border
    assert 3 <= flips <= 17
    gt, p = D.prepare_gt(_photo("astronaut"), rng, D.GTConfig(crop_size=256, hflip_prob=0.0))
    np.testing.assert_array_equal(gt, _photo("astronaut")[p["top"] : p["top"] + 256, p["left"] : p["left"] + 256])
