"""MUSIQ against a PyTorch re-statement of the original Flax model with identical random weights.

The reference is written here from the paper and google-research `musiq/` (model/resnet.py,
multiscale_transformer*.py): weight-standardised convs with TF SAME padding, GroupNorm, -inf
padded max pool, bottleneck, hashed spatial + scale embeddings, pre-norm encoder with a key
padding mask, tanh-GELU. The preprocessing reference is a loop-level numpy restatement of the
TF ops it uses (scale_and_translate Gaussian spans, legacy nearest-neighbour resize,
extract_patches SAME). Tolerance: relative error <= 1e-4 (float32, "highest" precision).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxir_convert.iqa import convert_iqa
from fluxir_jax.iqa import weights as iqa_weights
from fluxir_jax import cli
from fluxir_jax.errors import UserError
from fluxir_jax.iqa import musiq

RTOL = 1e-4
TINY = musiq.PRESETS["tiny"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_params(cfg: musiq.MUSIQConfig, seed: int) -> dict[str, np.ndarray]:
    """Random values for every parameter (no zero inits), keyed by original checkpoint names."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (_, shape) in iqa_weights.abstract_shapes(musiq.abstract_model(cfg)).items():
        if key.endswith(".scale") and len(shape) == 1:       # norm scales
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif key.endswith(".bias") or key.endswith("_embedding") or key.endswith(".cls"):
            v = 0.2 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if "out.kernel" not in key else int(np.prod(shape[:2]))
            if "SelfAttention_0" in key and "out.kernel" not in key:
                fan_in = shape[0]
            v = rng.standard_normal(shape) / math.sqrt(fan_in)
        out[key.replace(".", "/")] = v.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- numpy preprocessing reference


def ref_gaussian_resize_1d(n_in: int, n_out: int) -> np.ndarray:
    """TF ComputeSpansCore with GaussianKernelFunc(radius 1.5, sigma 0.5), antialias False, translate 0."""
    scale = np.float32(n_out) / np.float32(n_in)
    inv = np.float32(1.0) / scale
    m = np.zeros((n_out, n_in))
    for x in range(n_out):
        sample_f = (x + 0.5) * inv
        start = max(int(math.ceil(sample_f - 1.5 - 0.5)), 0)
        end = min(int(math.floor(sample_f + 1.5 - 0.5)), n_in - 1) + 1
        ws = []
        for s in range(start, end):
            d = abs(s + 0.5 - sample_f)
            ws.append(math.exp(-d * d / (2 * 0.25)) if d < 1.5 else 0.0)
        tot = sum(ws)
        for s, wv in zip(range(start, end), ws):
            m[x, s] = wv / tot
    return m


def ref_tokens(img: np.ndarray, cfg: musiq.MUSIQConfig):
    """preprocessing.get_multiscale_patches for one HWC image in [0, 1]."""
    x = img.astype(np.float64) * 2 - 1
    h, w, _ = x.shape
    p, g = cfg.patch_size, cfg.hse_grid_size
    toks = []

    def legacy_nearest(count):
        return [min(int(math.floor(j * (np.float32(g) / np.float32(count)))), g - 1) for j in range(count)]

    def extract(im, scale_id, max_len):
        hh, ww, _ = im.shape
        ch, cw = -(-hh // p), -(-ww // p)
        pad_h, pad_w = ch * p - hh, cw * p - ww
        padded = np.zeros((ch * p, cw * p, 3))
        padded[pad_h // 2: pad_h // 2 + hh, pad_w // 2: pad_w // 2 + ww] = im
        hy, hx = legacy_nearest(ch), legacy_nearest(cw)
        rows = []
        for i in range(ch):
            for j in range(cw):
                rows.append((padded[i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1), hy[i] * g + hx[j], scale_id, 1))
        if max_len >= 0:
            rows = rows[:max_len] + [(np.zeros(p * p * 3), 0, 0, 0)] * max(0, max_len - len(rows))
        toks.extend(rows)

    for sid, longer in enumerate(sorted(cfg.longer_side_lengths)):
        ratio = np.float32(longer) / np.float32(max(h, w))
        rh, rw = int(np.round(np.float32(h) * ratio)), int(np.round(np.float32(w) * ratio))
        im = np.einsum("oh,hwc->owc", ref_gaussian_resize_1d(h, rh), x)
        im = np.einsum("pw,owc->opc", ref_gaussian_resize_1d(w, rw), im)
        extract(im, sid, int(math.ceil(longer / p) ** 2))
    extract(x, len(cfg.longer_side_lengths), -1)
    return (np.stack([t[0] for t in toks]), np.array([t[1] for t in toks]), np.array([t[2] for t in toks]),
            np.array([t[3] for t in toks], bool))


# ----------------------------------------------------------------------------- torch model reference


def _same_pad(x, k, s, value=0.0):
    h, w = x.shape[2:]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


def ref_std_conv(x, k, stride):
    w = torch.from_numpy(k).permute(3, 2, 0, 1)  # HWIO -> OIHW
    w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    return F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride)


def ref_musiq(P: dict[str, np.ndarray], cfg: musiq.MUSIQConfig, patches, spatial, scale, mask) -> np.ndarray:
    t = lambda k: torch.from_numpy(P[k])  # noqa: E731
    n, l, _ = patches.shape
    p = cfg.patch_size
    x = torch.from_numpy(np.array(patches)).float().reshape(n * l, p, p, 3).permute(0, 3, 1, 2)
    gn = lambda v, name, eps: F.group_norm(v, cfg.gn_groups, t(name + "/scale"), t(name + "/bias"), eps)  # noqa: E731
    x = F.relu(gn(ref_std_conv(x, P["conv_root/kernel"], 2), "gn_root", 1e-6))
    x = F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
    u = "block1/unit1/"
    res = gn(ref_std_conv(x, P[u + "conv_proj/kernel"], 1), u + "gn_proj", 1e-4)
    y = F.relu(gn(ref_std_conv(x, P[u + "conv1/kernel"], 1), u + "gn1", 1e-4))
    y = F.relu(gn(ref_std_conv(y, P[u + "conv2/kernel"], 1), u + "gn2", 1e-4))
    y = gn(ref_std_conv(y, P[u + "conv3/kernel"], 1), u + "gn3", 1e-4)
    x = F.relu(res + y).permute(0, 2, 3, 1).reshape(n, l, -1)
    x = x @ t("embedding/kernel") + t("embedding/bias")
    x = x + t("Transformer/posembed_input/pos_embedding")[0][torch.from_numpy(np.array(spatial)).long()]
    x = x + t("Transformer/scaleembed_input/scale_embedding")[0][torch.from_numpy(np.array(scale)).long()]
    x = torch.cat([t("Transformer/cls").expand(n, 1, -1), x], dim=1)
    keep = torch.cat([torch.ones(n, 1, dtype=torch.bool), torch.from_numpy(np.array(mask))], dim=1)
    d, hds = cfg.hidden_size, cfg.num_heads
    ln = lambda v, name: F.layer_norm(v, (d,), t(name + "/scale"), t(name + "/bias"), 1e-6)  # noqa: E731
    for i in range(cfg.num_layers):
        b = f"Transformer/encoderblock_{i}/"
        h = ln(x, b + "LayerNorm_0")
        a = b + "SelfAttention_0/"
        qkv = [(h @ t(a + f"{m}/kernel").reshape(d, d) + t(a + f"{m}/bias").reshape(d)).view(n, -1, hds, d // hds)
               .transpose(1, 2) for m in ("query", "key", "value")]
        o = F.scaled_dot_product_attention(*qkv, attn_mask=keep[:, None, None, :])
        o = o.transpose(1, 2).reshape(n, -1, d) @ t(a + "out/kernel").reshape(d, d) + t(a + "out/bias")
        x = x + o
        h = ln(x, b + "LayerNorm_1")
        m = b + "MlpBlock_0/"
        h = F.gelu(h @ t(m + "Dense_0/kernel") + t(m + "Dense_0/bias"), approximate="tanh")
        x = x + h @ t(m + "Dense_1/kernel") + t(m + "Dense_1/bias")
    x = ln(x, "Transformer/encoder_norm")
    return (x[:, 0] @ t("head/kernel") + t("head/bias")).numpy()


def photos(h: int, w: int) -> np.ndarray:
    from skimage import data

    a = data.astronaut().astype(np.float32) / 255.0
    c = data.chelsea().astype(np.float32) / 255.0
    return np.stack([a[60:60 + h, 120:120 + w], c[80:80 + h, 100:100 + w]])


def test_preprocessing_matches_tf_semantics():
    # tiny config: 40x56 -> 23x32 (4 tokens) and 46x64 (12 of 16, padded); 48x64 -> same size, still blurred
    for h, w in ((40, 56), (48, 64)):
        x = photos(h, w)
        got = [np.asarray(v) for v in musiq.multiscale_tokens(jnp.asarray(x), TINY)]
        for i in range(2):
            ref = ref_tokens(x[i], TINY)
            np.testing.assert_allclose(got[0][i], ref[0], atol=2e-6)
            for g, r in zip(got[1:], ref[1:]):
                np.testing.assert_array_equal(g[i], r)
    assert got[0].shape[1] == 4 + 16 + 3 * 4
    # real config on a 375x500 image: 7x7 + 12x12 grid positions plus 12x16 native patches
    x = np.random.default_rng(0).random((1, 375, 500, 3), dtype=np.float32)
    got = [np.asarray(v) for v in musiq.multiscale_tokens(jnp.asarray(x), musiq.PRESETS["koniq"])]
    ref = ref_tokens(x[0], musiq.PRESETS["koniq"])
    assert got[0].shape == (1, 49 + 144 + 192, 32 * 32 * 3)
    np.testing.assert_allclose(got[0][0], ref[0], atol=2e-6)
    for g, r in zip(got[1:], ref[1:]):
        np.testing.assert_array_equal(g[0], r)
    assert musiq.hash_positions(7, 10).tolist() == [0, 1, 2, 4, 5, 7, 8]  # legacy (not half-pixel) nearest


# Produced once with TensorFlow 2.21 running the ops of google-research musiq/model/preprocessing.py
# (tf2.image.resize GAUSSIAN, tf.compat.v1.image.resize NEAREST_NEIGHBOR, tf.image.extract_patches
# SAME) on seeded random images; per-token sums and projections on a seeded random vector.
TF_TINY_SUM = [7.01699, 16.37796, -13.6737, -18.7821, 14.80708, 8.15605, 28.20837, 12.62694, 11.22748, -34.46377,
               -13.46719, -9.20432, -25.17102, 2.07182, -17.62492, -9.86535, 0.0, 0.0, 0.0, 0.0, 18.32523, 7.15995,
               26.47796, -0.22598, -0.77115, -24.09413, -9.8277, -8.60068, -9.01636, -8.9846, -12.08618, -3.43766]
TF_TINY_DOT = [7.27964, -2.18401, 4.93716, -11.64284, -10.74368, -0.51433, -19.16765, -2.16035, 0.43795, 2.0021,
               2.04169, 2.31724, -4.34122, -0.93929, -1.93215, -8.87234, 0.0, 0.0, 0.0, 0.0, -13.89634, 17.68457,
               -18.48771, -9.93455, 14.62376, -1.28867, 0.19877, -17.2274, -7.96806, -2.08282, -24.29597, -10.26547]
TF_TINY_SPATIAL = [0, 2, 8, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
TF_TINY_SCALE = [0] * 4 + [1] * 12 + [0] * 4 + [2] * 12
TF_TINY_MASK = [1] * 16 + [0] * 4 + [1] * 12
TF_KONIQ_BLOCK_DOTS = [-35.105, -98.419, 95.5796]   # 100x75 image: scale 224 (49), 384 (144), native (12)
TF_KONIQ_ABS_DOT = 2541.9069


def test_preprocessing_matches_tensorflow_golden():
    img = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
    p, sp, sc, mk = (np.asarray(v)[0] for v in musiq.multiscale_tokens(jnp.asarray(img[None]), TINY))
    r = np.random.default_rng(2).standard_normal(16 * 16 * 3)
    np.testing.assert_allclose(p.sum(-1), TF_TINY_SUM, atol=2e-4)
    np.testing.assert_allclose(p @ r, TF_TINY_DOT, atol=2e-4)
    assert sp.tolist() == TF_TINY_SPATIAL and sc.tolist() == TF_TINY_SCALE and mk.astype(int).tolist() == TF_TINY_MASK
    img = np.random.default_rng(1).random((100, 75, 3), dtype=np.float32)
    p = np.asarray(musiq.multiscale_tokens(jnp.asarray(img[None]), musiq.PRESETS["koniq"])[0])[0]
    d = p @ np.random.default_rng(2).standard_normal(32 * 32 * 3)
    assert p.shape[0] == 49 + 144 + 12
    np.testing.assert_allclose([d[:49].sum(), d[49:193].sum(), d[193:].sum()], TF_KONIQ_BLOCK_DOTS, atol=2e-3)
    np.testing.assert_allclose(np.abs(d).sum(), TF_KONIQ_ABS_DOT, rtol=1e-6)


@pytest.mark.parametrize("num_classes", [1, 10])
def test_musiq_matches_torch_reference(tmp_path, num_classes):
    cfg = dataclasses.replace(TINY, num_classes=num_classes)
    P = random_params(cfg, seed=num_classes)
    x = photos(40, 56)
    toks = [np.asarray(v) for v in musiq.multiscale_tokens(jnp.asarray(x), cfg)]
    with torch.no_grad():
        ref_logits = ref_musiq(P, cfg, *toks)
    if num_classes == 1:
        ref = ref_logits[:, 0]
    else:
        ref = (torch.from_numpy(ref_logits).softmax(-1) * torch.arange(1, 11)).sum(-1).numpy()
    graphdef, state = iqa_weights.build_state(musiq.abstract_model(cfg), {k.replace("/", "."): v for k, v in P.items()})
    from fluxir_jax.iqa.registry import model_scorer

    with jax.default_matmul_precision("highest"):
        got = np.asarray(model_scorer(graphdef, state, jnp.asarray(x)))  # the jitted scorer the registry uses
    assert got.shape == (2,)
    assert abs(ref[0] - ref[1]) > 1e-3 * abs(ref).max()  # the two images score differently
    assert rel_err(got, ref) <= RTOL


def _save_npz(path, P, extra=True):
    arrays = {f"opt/target/{k}": v for k, v in P.items()}
    if extra:
        arrays["opt/state/step"] = np.array(1000, np.int64)
        arrays["opt/state/param_states/head/kernel/momentum"] = np.zeros_like(P["head/kernel"])
    np.savez(path, **arrays)


def test_converter_round_trip_npz(tmp_path):
    P = random_params(TINY, seed=3)
    src = tmp_path / "tiny_ckpt.npz"
    _save_npz(src, P)
    dst = tmp_path / "musiq_tiny.safetensors"
    convert_iqa("musiq", [src], dst, preset="tiny")
    assert iqa_weights.read_converted(dst)[0] == "musiq"
    a = musiq.load_musiq(str(src), preset="tiny")
    b = musiq.load_musiq(str(dst))  # the converted file carries its own config
    assert a[0] == b[0]
    for u, v in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    flat = {k.replace("/", "."): v for k, v in P.items()}
    for path, var in __import__("flax").nnx.to_flat_state(a[1]):
        np.testing.assert_array_equal(np.asarray(var.get_value()), flat[".".join(map(str, path))])
    assert cli.main(["convert-iqa", "musiq", str(src), "-o", str(tmp_path / "cli2.safetensors"), "--preset", "tiny"]) == 0
    assert iqa_weights.read_converted(tmp_path / "cli2.safetensors")[0] == "musiq"
    # registry: a scorer from the converted file
    from fluxir_jax.iqa.registry import get_metric

    x = photos(40, 56)
    with jax.default_matmul_precision("highest"):
        s = get_metric("musiq", weights=str(dst))(x)
        direct = np.asarray(musiq.make_musiq(str(src), preset="tiny")(jnp.asarray(x)))
    np.testing.assert_allclose(s, direct, rtol=1e-6)


def test_wrong_architecture_names_first_bad_key(tmp_path):
    P = random_params(TINY, seed=4)
    src = tmp_path / "tiny_ckpt.npz"
    _save_npz(src, P)
    with pytest.raises(UserError, match=r"'opt/target/Transformer/cls' has shape \(1, 1, 32\), expected \(1, 1, 384\)"):
        musiq.load_musiq(str(src), preset="koniq")
    del P["Transformer/encoderblock_1/LayerNorm_1/bias"]
    _save_npz(src, P, extra=False)
    with pytest.raises(UserError, match=r"missing key 'opt/target/Transformer/encoderblock_1/LayerNorm_1/bias'"):
        musiq.load_musiq(str(src), preset="tiny")
    P2 = random_params(TINY, seed=4)
    P2["Transformer/encoderblock_2/LayerNorm_0/scale"] = P2["Transformer/encoderblock_1/LayerNorm_0/scale"]
    _save_npz(src, P2)
    with pytest.raises(UserError, match=r"unexpected key 'opt/target/Transformer/encoderblock_2/LayerNorm_0/scale'"):
        musiq.load_musiq(str(src), preset="tiny")
    with pytest.raises(UserError, match="unknown MUSIQ preset"):
        musiq.load_musiq(str(src), preset="bogus")
    assert cli.main(["convert-iqa", "musiq", str(src), "-o", str(tmp_path / "o2.safetensors"), "--preset", "koniq"]) == 2
    assert not (tmp_path / "o2.safetensors").exists()


def test_koniq_preset_layout():
    shapes = iqa_weights.abstract_shapes(musiq.abstract_model(musiq.PRESETS["koniq"]))
    assert shapes["embedding.kernel"][1] == (64 * 4 * 8 * 8, 384)
    assert shapes["conv_root.kernel"][1] == (7, 7, 3, 64)
    assert shapes["block1.unit1.conv_proj.kernel"][1] == (1, 1, 64, 256)
    assert shapes["Transformer.posembed_input.pos_embedding"][1] == (1, 100, 384)
    assert shapes["Transformer.scaleembed_input.scale_embedding"][1] == (1, 3, 384)
    assert shapes["Transformer.encoderblock_13.SelfAttention_0.query.kernel"][1] == (384, 6, 64)
    assert shapes["Transformer.encoderblock_13.SelfAttention_0.out.kernel"][1] == (6, 64, 384)
    assert shapes["Transformer.encoderblock_13.MlpBlock_0.Dense_0.kernel"][1] == (384, 1152)
    assert shapes["head.kernel"][1] == (384, 1)
    n = sum(int(np.prod(s)) for _, s in shapes.values())
    assert 27.0e6 < n < 27.3e6  # "27M parameters" (MUSIQ paper)
