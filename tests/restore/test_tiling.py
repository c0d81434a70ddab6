"""Latent tiling: no seams on a large image, and close agreement with untiled where both apply."""
import numpy as np
import pytest

import jax.numpy as jnp

from fluxir_jax import latent_tiling, sampling
from fluxir_jax.restore import Restorer
from tests.restore import fixtures


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def border_energy_ratio(img: np.ndarray, borders, band: int = 2, period: int = 16) -> float:
    """Mean squared gradient within `band` px of the tile borders over the same near the other
    token boundaries (multiples of `period` px that are not tile borders).

    Phase-matched: a FLUX latent token covers 16 x 16 px, and even an untiled restoration by a
    random model has more gradient energy on token boundaries than inside tokens.
    """
    gx = (np.diff(img, axis=1) ** 2).mean(0)  # gx[c - 1]: between columns c - 1 and c
    gy = (np.diff(img, axis=0) ** 2).mean(1)
    others = [c for c in range(period, img.shape[0], period) if c not in borders]
    assert others

    def near(cs):
        return np.concatenate([np.concatenate([gx[c - 1 - band:c + band], gy[c - 1 - band:c + band]]) for c in cs])

    return float(near(borders).mean() / near(others).mean())


def pointwise_velocity(params, img, t, cond):
    """A velocity without context (each token on its own): tiling must not change the result."""
    return img * params - cond.extra["lq"] * (1.0 - t[:, None, None])


def tile_mean_velocity(params, img, t, cond):
    """A velocity that depends on the whole tile it sees (its mean LQ): tiles disagree near borders."""
    return img - jnp.mean(cond.extra["lq"], axis=1, keepdims=True)


def _cond(b, h, w, lq):
    return sampling.Conditioning(img_ids=sampling.img_ids(b, h, w), txt=jnp.zeros((b, 1, 4)), txt_ids=sampling.txt_ids(b, 1),
                                 y=jnp.zeros((b, 4)), extra={"lq": sampling.pack(lq)})


def test_tiling_a_pointwise_velocity_equals_the_untiled_loop():
    rng = np.random.default_rng(0)
    b, h, w = 2, 20, 28
    noise = jnp.asarray(rng.standard_normal((b, h, w, 16)), jnp.float32)
    lq = jnp.asarray(rng.standard_normal((b, h, w, 16)), jnp.float32)
    ts = sampling.get_schedule(3, 70)
    whole = sampling.unpack(sampling.denoise(pointwise_velocity, 0.7, sampling.pack(noise), _cond(b, h, w, lq), ts), h, w)
    tiles = latent_tiling.plan_latent_tiles(h, w, 8, 2)
    assert len(tiles.starts) > 4
    tiled = latent_tiling.tiled_denoise(pointwise_velocity, 0.7, noise, lq, _cond(b, h, w, lq), ts, tiles, 0.25)
    assert rel(np.asarray(tiled), np.asarray(whole)) <= 1e-6


def test_gaussian_blending_removes_the_jumps_of_hard_tile_edges():
    h, w = 8, 48
    ramp = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32)[None, :, None], (h, w, 16))
    lq = jnp.asarray(ramp[None])
    noise = jnp.zeros_like(lq)
    ts = np.array([1.0, 0.0])

    def run(overlap, sigma):
        tiles = latent_tiling.plan_latent_tiles(h, w, 8, overlap)
        z = latent_tiling.tiled_denoise(tile_mean_velocity, None, noise, lq, _cond(1, h, w, lq), ts, tiles, sigma)
        return np.abs(np.diff(np.asarray(z)[0, 0, :, 0])).max()

    hard, smooth = run(0, 1e3), run(4, 0.25)
    print("largest column step: hard", hard, "gaussian", smooth)
    assert smooth <= 0.3 * hard


def test_plan_covers_the_latent_with_even_equal_tiles():
    t = latent_tiling.plan_latent_tiles(24, 36, 8, 2)
    assert t.size == (8, 8) and all(y % 2 == 0 and x % 2 == 0 for y, x in t.starts)
    cover = t.coverage(0.25)
    assert cover.shape == (24, 36) and cover.min() > 0


@pytest.mark.slow
def test_tiled_restoration_of_an_image_three_tiles_wide_has_no_seams(tiny_models):
    ckpt, adapter = tiny_models
    tile = 64
    lq = fixtures.smooth_image(3 * tile // 4, 3 * tile // 4, seed=3)  # x4 -> 192 px = 3 tiles
    r = Restorer(ckpt, adapter, steps=2, parallel="pmap", devices=1, tile={"size": tile, "overlap": 0.25})
    assert r.tiled((192, 192))
    out = r.restore_float([lq.astype(np.float32) / 255], [5])[0]
    plan = latent_tiling.plan_latent_tiles(24, 24, tile // 8, 2)
    edges = sorted({e * 8 for y, _ in plan.starts for e in (y, y + plan.size[0])} - {0, 192})
    ratio = border_energy_ratio(out.mean(-1), edges)
    print("seam ratio", ratio, edges)
    assert abs(ratio - 1) <= 0.10, ratio


@pytest.mark.slow
def test_forced_tiling_agrees_with_untiled(tiny_models):
    ckpt, adapter = tiny_models
    lq = [fixtures.smooth_image(16, 16, seed=4).astype(np.float32) / 255]
    whole = Restorer(ckpt, adapter, steps=2, parallel="pmap", devices=1, color_fix="none").restore_float(lq, [7])[0]
    one = Restorer(ckpt, adapter, steps=2, parallel="pmap", devices=1, color_fix="none",
                   tile={"size": 64, "overlap": 0.25, "force": True}).restore_float(lq, [7])[0]
    four = Restorer(ckpt, adapter, steps=2, parallel="pmap", devices=1, color_fix="none",
                    tile={"size": 48, "overlap": 0.25, "force": True}).restore_float(lq, [7])[0]
    print("one tile", rel(one, whole), "tiles", rel(four, whole))
    assert rel(one, whole) <= 1e-5
    assert rel(four, whole) <= 0.03  # measured 0.0098 (tiny random model, 2x2 tiles of 48 px)
