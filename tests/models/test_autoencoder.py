"""FLUX VAE in Flax vs diffusers `AutoencoderKL` (tiny FLUX-shaped config, every weight random).

Tolerances are relative errors ||a - b|| / ||b||:
  encode mean / decode vs diffusers, float32, highest matmul precision: <= 1e-5
  bfloat16 vs float32 (same weights):                                    <= 2e-2
  tiling machinery on a local (pointwise) map, tiled vs direct:          <= 1e-6
  tiled vs untiled, default config (2 statistics passes), random weights:
    decode of a smooth latent, encode of a smooth image:                 <  1e-2
  tiled vs untiled with one statistics pass per tiled GroupNorm (exact): <= 3e-6

Tiled encode/decode run everything at latent resolution (incl. the mid-block attention) on
the whole latent, read each tile with enough context (halo) for its convolutions, and
normalise every tiled GroupNorm with whole-image statistics found by statistics passes over
the tiles, so they converge to the untiled result (see `vae_tiling.run_tiled`).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fluxir_convert import vae_map
from fluxir_jax import treeutil
from fluxir_jax.errors import UserError
from fluxir_jax.models import autoencoder as ae_mod
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder, plan_tiles

SCALE, SHIFT = 0.3611, 0.1159
TOL_F32, TOL_BF16, TOL_BLEND, TOL_TILED, TOL_TILED_EXACT = 1e-5, 2e-2, 1e-6, 1e-2, 3e-6


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def to_nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: conv/linear ~ N(0, 1/fan_in), norm scales 1 + N(0, .3^2), biases N(0, .1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def torch_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=SCALE, shift_factor=SHIFT,
    ).eval()
    randomize_(vae, seed=0)
    return vae


@pytest.fixture(scope="module")
def diffusers_sd(torch_vae):
    return {k: v.detach().numpy().copy() for k, v in torch_vae.state_dict().items()}


def abstract_model(**overrides) -> AutoEncoder:
    """Shapes only (no random init to compile): every param comes from a state dict."""
    cfg = dataclasses.replace(AE_PRESETS["tiny"], **overrides)
    return nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))


def load_bfl(model, sd) -> AutoEncoder:
    """`model` with the params of a BFL-keyed state dict (strict; errors name BFL keys)."""
    flat = dict(vae_map.bfl_to_nnx(k, np.asarray(v)) for k, v in sd.items())
    return treeutil.load_into(model, flat, "VAE state dict", name=vae_map.nnx_path_to_bfl_key)


def make_model(sd, **overrides) -> AutoEncoder:
    return load_bfl(abstract_model(**overrides), vae_map.diffusers_to_bfl_state_dict(sd))


@pytest.fixture(scope="module")
def model(diffusers_sd):
    return make_model(diffusers_sd)


@pytest.fixture(scope="module")
def f32(model):
    """Jitted float32 encode/decode of the shared model (compiled once per input shape)."""
    return {"encode": jitted(model, "encode"), "decode": jitted(model, "decode")}


def jitted(model: AutoEncoder, method: str, **kwargs):
    """`jax.jit` over a pure function of the split state, as training/inference use the model."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, a: getattr(nnx.merge(graphdef, s), method)(a, **kwargs))
    return lambda a: fn(state, a)


def smooth_latent(h: int, w: int, period: float = 4.0, seed: int = 0) -> np.ndarray:
    """One plane wave per channel (random direction and phase, period ~`period` cells): `1 h w 16`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    angle, phase = rng.uniform(0, np.pi, 16), rng.uniform(0, 2 * np.pi, 16)
    k = 2 * np.pi / (period * rng.uniform(0.8, 1.25, 16))
    arg = k[:, None, None] * (np.cos(angle)[:, None, None] * yy + np.sin(angle)[:, None, None] * xx)
    return np.sin(arg + phase[:, None, None]).transpose(1, 2, 0)[None].astype(np.float32)


def smooth_image(h: int, w: int, period: float = 32.0, seed: int = 0) -> np.ndarray:
    """Two plane waves per colour channel (period ~`period` px), values in [-0.8, 0.8]: `1 h w 3`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(2):
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / (period * rng.uniform(0.8, 1.25))
            out[..., c] += 0.4 * np.sin(k * (np.cos(angle) * yy + np.sin(angle) * xx) + phase)
    return out[None].astype(np.float32)


# -- parity with diffusers ------------------------------------------------------------------------


def test_encode_matches_diffusers(torch_vae, f32):
    x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        mean = torch_vae.encode(to_nchw(x)).latent_dist.mean
    want = SCALE * (to_nhwc(mean) - SHIFT)  # BFL scale/shift, applied explicitly
    with jax.default_matmul_precision("highest"):
        got = f32["encode"](jnp.asarray(x))
    assert got.shape == (2, 8, 12, 16) and got.dtype == jnp.float32
    err = rel_err(got, want)
    print(f"encode rel err {err:.2e}")
    assert err <= TOL_F32


def test_decode_matches_diffusers(torch_vae, f32):
    z = np.random.default_rng(2).standard_normal((2, 8, 12, 16)).astype(np.float32)
    with torch.no_grad():
        want = to_nhwc(torch_vae.decode(to_nchw(z / SCALE + SHIFT)).sample)  # BFL inverse scale/shift
    with jax.default_matmul_precision("highest"):
        got = f32["decode"](jnp.asarray(z))
    assert got.shape == (2, 64, 96, 3)
    err = rel_err(got, want)
    print(f"decode rel err {err:.2e}")
    assert err <= TOL_F32


def test_scale_shift_and_sampling_as_bfl(model):
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 16, 24, 3)), jnp.float32)
    z = jnp.asarray(np.random.default_rng(4).standard_normal((1, 2, 3, 16)), jnp.float32)
    key = jax.random.key(0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        mean, logvar = m.moments(x)
        return (m.encode(x), mean, logvar, m.encode(x, sample=True, rng=key),
                m.decode(z), m.decoder(z / SCALE + SHIFT))

    enc, mean, logvar, sampled, dec, dec_ref = run(state)
    np.testing.assert_allclose(enc, SCALE * (mean - SHIFT), rtol=1e-6, atol=1e-7)
    draw = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(sampled, SCALE * (draw - SHIFT), rtol=1e-6, atol=1e-6)
    assert not np.allclose(sampled, enc)
    np.testing.assert_allclose(dec, dec_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        model.encode(x, sample=True)


def test_bfloat16_close_to_float32(diffusers_sd, f32):
    bf16 = make_model(diffusers_sd, dtype="bfloat16", param_dtype="bfloat16")
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 64, 96, 3)), jnp.float32)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 12, 16)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        enc_err = rel_err(jitted(bf16, "encode")(x), f32["encode"](x))
        dec_err = rel_err(jitted(bf16, "decode")(z), f32["decode"](z))
    print(f"bf16 rel err encode {enc_err:.2e} decode {dec_err:.2e}")
    assert enc_err <= TOL_BF16 and dec_err <= TOL_BF16


# -- tiling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,tile,overlap", [(256, 128, 16), (24, 16, 2), (33, 8, 3), (10, 16, 2)])
def test_tile_plan_covers_and_blends_to_one(length, tile, overlap):
    axis = plan_tiles(length, tile, overlap)
    assert axis.size <= tile and axis.starts[0] == 0 and axis.starts[-1] + axis.size == length
    assert all(a + axis.size - b >= overlap for a, b in zip(axis.starts, axis.starts[1:]))
    total = np.zeros(length * 8)
    for s, w in zip(axis.starts, axis.blend_weights(8)):
        total[s * 8:(s + axis.size) * 8] += w
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


def test_tiling_reproduces_a_local_map():
    """Tile extraction, placement and blending add no error of their own."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 24, 33, 4)), jnp.float32)
    fn = lambda a, norm: jnp.repeat(jnp.repeat(jnp.tanh(a) * 2.0, 8, axis=1), 8, axis=2)  # no spatial context
    for halo in (0, 2):
        got = ae_mod.run_tiled(fn, x, plan_tiles(24, 10, 3), plan_tiles(33, 10, 3), 1, 8, halo=halo)
        assert rel_err(got, fn(x, None)) <= TOL_BLEND


@pytest.mark.parametrize("length,tile,overlap,halo", [(256, 96, 16, 5), (24, 16, 2, 3), (33, 8, 3, 40)])
def test_tile_windows_and_cores(length, tile, overlap, halo):
    axis = plan_tiles(length, tile, overlap)
    size, starts = axis.windows(halo)
    assert size == min(axis.size + 2 * halo, length)
    for s, w in zip(axis.starts, starts):  # each tile sits in its window with `halo` of context or the edge
        assert 0 <= w and w + size <= length and w <= s and s + axis.size <= w + size
        assert s - w >= min(halo, s) and (w + size) - (s + axis.size) >= min(halo, length - s - axis.size)
    cores = axis.cores()  # a partition of the axis, each core inside its tile
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    assert all(s <= lo < hi <= s + axis.size for s, (lo, hi) in zip(axis.starts, cores))


@pytest.mark.slow   # 103 s in the full run on the shared 2-core machine
def test_tiled_path_reach_is_exact(diffusers_sd):
    """Halo = `decoder_reach`/`encoder_reach` and as many statistics passes as tiled GroupNorms:
    tiled equals untiled to float precision (measured 4.9e-7 decode, 9.8e-7 encode). A reach,
    core or statistics bug shows here: a decoder halo of 3 cells instead of 5 gave 9.9e-6, an
    encoder halo of 2 instead of 3 gave 1.6e-3, one statistics pass too few (encode) 3.5e-6."""
    cfg = AE_PRESETS["tiny"]
    n_dec = (len(cfg.ch_mult) - 1) * 2 * (cfg.num_res_blocks + 1) + 1  # GroupNorms above latent res
    n_enc = (len(cfg.ch_mult) - 1) * 2 * cfg.num_res_blocks
    dec = make_model(diffusers_sd, tile_size=128, tile_stat_passes=n_dec)  # 16 cells, overlap 2
    enc = make_model(diffusers_sd, tile_size=128, tile_stat_passes=n_enc)
    z = jnp.asarray(np.concatenate([smooth_latent(32, 40, 8.0, seed=s) for s in (0, 1)]))  # batch 2, 3 x 3 tiles
    x = jnp.asarray(np.concatenate([smooth_image(256, 320, 24.0, seed=s) for s in (0, 1)]))
    with jax.default_matmul_precision("highest"):
        dec_err = rel_err(jitted(dec, "decode", tiled=True)(z), jitted(dec, "decode", tiled=False)(z))
        enc_err = rel_err(jitted(enc, "encode", tiled=True)(x), jitted(enc, "encode", tiled=False)(x))
    print(f"exact tiling rel err decode {dec_err:.2e} encode {enc_err:.2e}")
    assert dec_err <= TOL_TILED_EXACT and enc_err <= TOL_TILED_EXACT


@pytest.fixture(scope="module")
def small_tiles(diffusers_sd):
    """A model with 256 px tiles (32 latent cells, overlap 4 cells): a 48 x 64 latent is 2 x 3 tiles."""
    return make_model(diffusers_sd, tile_size=256)


@pytest.fixture(scope="module")
def small_tiles_decoded(small_tiles):
    """(latent, forced tiled decode) of a smooth 48 x 64 latent, shared by the tests below."""
    z = jnp.asarray(smooth_latent(48, 64))  # 2 x 3 tiles
    with jax.default_matmul_precision("highest"):
        return z, jitted(small_tiles, "decode", tiled=True)(z)


def test_tiled_decode_close_to_untiled(small_tiles, small_tiles_decoded):
    """Default tiling config (2 statistics passes): measured 1.7e-4 (per-tile GroupNorm
    statistics, `tile_stat_passes=0`: 4.2e-2; the old independent tiles: 0.12)."""
    z, tiled = small_tiles_decoded
    with jax.default_matmul_precision("highest"):
        full = jitted(small_tiles, "decode", tiled=False)(z)
    assert tiled.shape == full.shape == (1, 384, 512, 3)
    err = rel_err(tiled, full)
    print(f"tiled vs untiled decode rel err {err:.2e}")
    assert err < TOL_TILED


def test_tiled_encode_close_to_untiled(diffusers_sd):
    """Default tiling config (2 statistics passes): measured 1.7e-4 (per-tile statistics: 3.3e-2)."""
    small_tiles = make_model(diffusers_sd, tile_size=256)
    x = jnp.asarray(smooth_image(384, 512, 32.0))  # 2 x 3 tiles
    with jax.default_matmul_precision("highest"):
        tiled = jitted(small_tiles, "encode", tiled=True)(x)
        full = jitted(small_tiles, "encode", tiled=False)(x)
    assert tiled.shape == full.shape == (1, 48, 64, 16)
    err = rel_err(tiled, full)
    print(f"tiled vs untiled encode rel err {err:.2e}")
    assert err < TOL_TILED


def test_one_tile_is_the_untiled_path(f32, model):
    z = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 12, 16)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(jitted(model, "decode", tiled=True)(z), f32["decode"](z), rtol=1e-6, atol=1e-6)


def test_large_latent_decodes_tile_by_tile(small_tiles, small_tiles_decoded, monkeypatch):
    """An image larger than `tile_size` is tiled automatically: the default path runs tile by tile
    and equals the forced tiled path exactly (a 384 x 512 image, 256 px tiles)."""
    grids = []

    def spy(fn, x, ty, tx, in_unit, out_unit, **kwargs):
        grids.append((len(ty.starts), len(tx.starts), ty.size, tx.size))
        return run_tiled(fn, x, ty, tx, in_unit, out_unit, **kwargs)

    run_tiled = ae_mod.run_tiled
    monkeypatch.setattr(ae_mod, "run_tiled", spy)
    z, tiled = small_tiles_decoded
    with jax.default_matmul_precision("highest"):
        img = jitted(small_tiles, "decode")(z)  # 384 x 512 px > tile_size 256 px: tiled automatically
    assert img.shape == (1, 384, 512, 3)
    assert bool(jnp.isfinite(img).all())
    ny, nx, sy, sx = grids[0]
    assert ny * nx > 1 and sy * 8 <= small_tiles.config.tile_size and sx * 8 <= small_tiles.config.tile_size
    np.testing.assert_array_equal(np.asarray(img), np.asarray(tiled))


# -- sizes and bad input ----------------------------------------------------------------------------


def test_non_multiple_of_8_is_reflect_padded_and_cropped(model):
    x = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (2, 60, 90, 3)), jnp.float32)
    padded = jnp.pad(x, ((0, 0), (0, 4), (0, 6), (0, 0)), mode="reflect")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        z = m.encode(x)
        return z, m.encode(padded), m.decode(z, size=(60, 90)), m(x)

    z, z_padded, cropped, round_trip = run(state)
    assert z.shape == (2, 8, 12, 16)
    np.testing.assert_allclose(z, z_padded, rtol=1e-6, atol=1e-6)
    assert cropped.shape == round_trip.shape == (2, 60, 90, 3)


@pytest.mark.parametrize("method,shape,expected", [
    ("encode", (1, 16, 16, 4), r"\[B, H, W, 3\]"),
    ("encode", (16, 16, 3), r"\[B, H, W, 3\]"),
    ("decode", (1, 2, 2, 4), r"\[B, H/8, W/8, 16\]"),
])
def test_wrong_shape_raises(model, method, shape, expected):
    with pytest.raises(ValueError, match=expected):
        getattr(model, method)(jnp.zeros(shape))

# -- key mapping ---------------------------------------------------------------------------------------


def test_mapping_round_trip_is_exact(diffusers_sd):
    bfl = vae_map.diffusers_to_bfl_state_dict(diffusers_sd)
    assert bfl["decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert bfl["decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)  # up.0 = highest res
    assert "decoder.up.0.upsample.conv.weight" not in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    back = vae_map.bfl_to_diffusers_state_dict(bfl)
    assert back.keys() == diffusers_sd.keys()
    for k, v in diffusers_sd.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_model_params_round_trip_to_bfl(diffusers_sd, model):
    bfl = vae_map.diffusers_to_bfl_state_dict(diffusers_sd)
    out = dict(vae_map.nnx_to_bfl(p, np.asarray(v.get_value()))
               for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert out.keys() == bfl.keys()
    for k, v in bfl.items():
        assert np.array_equal(out[k], v), k


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("encoder.mid.attn_1.k.bias"), "missing key 'encoder.mid.attn_1.k.bias'"),
    (lambda sd: sd.update({"encoder.down.0.block.0.extra.weight": np.zeros((8, 8, 3, 3), np.float32)}),
     "unexpected key 'encoder.down.0.block.0.extra.weight'"),
    (lambda sd: sd.update({"decoder.conv_out.weight": np.zeros((3, 8, 1, 1), np.float32)}),
     "key 'decoder.conv_out.weight' has shape .* expected"),
])
def test_loading_is_strict(diffusers_sd, edit, match):
    sd = vae_map.diffusers_to_bfl_state_dict(diffusers_sd)
    edit(sd)
    target = abstract_model()
    with pytest.raises(UserError, match=match):
        load_bfl(target, sd)


def test_unknown_diffusers_key_raises():
    with pytest.raises(ValueError, match="quant_conv.weight"):
        vae_map.diffusers_to_bfl("quant_conv.weight", np.zeros((32, 32, 1, 1)), num_levels=4)
