"""The PyTorch FluxIR (convert/torch_fluxir.py) against the JAX FluxIR, on the same random weights.

A tiny diffusers transformer and a tiny FLUX-shaped diffusers VAE with every weight random are
converted into our Flax models; a JAX FluxIR with every parameter random (SE gammas, lq_in and
theta included) is exported with `adapter_io.export_safetensors` and loaded into `TorchFluxIR`.
float32 on both sides, JAX at "highest" matmul precision. Bounds (relative ||a - b|| / ||b||):
  one FluxIR step (velocity and every block's streams):   <= 1e-4
  4-step restoration from the same noise (images):        <= 1e-3
  training loss parts (flow, pixel) / adapter gradients:  <= 1e-4 / <= 1e-3
The export round-trips exactly, and an adapter built for another base is refused.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from fluxir_convert import compare_adapter, torch_fluxir, vae_map
from fluxir_jax import treeutil
from fluxir_jax import sampling
from fluxir_jax.errors import UserError
from fluxir_jax.models import adapter_io
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, fluxir_forward
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder
from tests.models.flux_reference import TINY_DIFFUSERS, config_for, flax_from_diffusers, randomize_torch_, rel_err

TOL_STEP, TOL_RESTORE, TOL_LOSS, TOL_GRAD = 1e-4, 1e-3, 1e-4, 1e-3
B, T = 2, 5
TEXT_LEN = T  # the text residuals are added to the base's text tokens
H, W = 32, 48  # output pixels -> latent 4 x 6 -> 6 tokens; LQ 8 x 12 (x4)
OPTIONS = {
    "all": dict(),
    "double": dict(control_blocks="double"),
    "every_n": dict(control_blocks="every_n", control_every=2),
    "image_only": dict(image_only=True),
    "base_consumes_theta": dict(base_consumes_theta=True, control_scale=0.7),
}


@pytest.fixture(scope="module")
def base():
    from diffusers import FluxTransformer2DModel

    dm = FluxTransformer2DModel(guidance_embeds=True, **TINY_DIFFUSERS).eval()
    randomize_torch_(dm, 0)
    dm.requires_grad_(False)
    return dm, flax_from_diffusers(dm)


@pytest.fixture(scope="module")
def vae():
    """A tiny FLUX-shaped diffusers VAE with random weights, and the same weights in our AutoEncoder
    (converted as `fluxir convert` does); tests/train/test_objective_torch.py uses it too."""
    from diffusers import AutoencoderKL

    dv = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    randomize_torch_(dv, 1)
    dv.requires_grad_(False)
    ae = nnx.eval_shape(lambda: AutoEncoder(AE_PRESETS["tiny"], rngs=nnx.Rngs(0)))
    bfl = vae_map.diffusers_to_bfl_state_dict({k: v.numpy() for k, v in dv.state_dict().items()})
    flat = dict(vae_map.bfl_to_nnx(k, np.asarray(v)) for k, v in bfl.items())
    ae = treeutil.load_into(ae, flat, "VAE state dict", name=vae_map.nnx_path_to_bfl_key)
    return dv, ae


def random_jax_adapter(cfg: FluxIRConfig, base_cfg, seed: int) -> FluxIR:
    """A JAX FluxIR with every parameter random (no zero gates, no zero lq_in, theta random)."""
    adapter = FluxIR(cfg, base_cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(adapter, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape)
        leaf = path[-1]
        if leaf == "kernel":
            x = noise / np.sqrt(var.shape[-2])
        elif leaf == "scale":
            x = 1.0 + 0.1 * noise
        elif leaf in ("gamma", "theta_p", "theta_y"):
            x = 0.5 * noise if leaf == "gamma" else noise
        else:
            x = 0.1 * noise
        var.set_value(jnp.asarray(x, jnp.float32))
    nnx.update(adapter, state)
    return adapter


def pair(base, tmp_path, name="all", seed=3):
    """(JAX adapter, its export path, the TorchFluxIR loaded from that export)."""
    dm, _ = base
    cfg = FluxIRConfig(text_len=TEXT_LEN, **OPTIONS[name])
    jax_adapter = random_jax_adapter(cfg, config_for(dm), seed)
    path = tmp_path / f"{name}.safetensors"
    adapter_io.export_safetensors(jax_adapter, path)
    return jax_adapter, path, torch_fluxir.load_adapter_safetensors(path, dm)


def step_inputs(seed=0, h=4, w=6):
    rng = np.random.default_rng(seed)
    n = h * w // 4
    return dict(
        img=rng.standard_normal((B, n, 64)).astype(np.float32), lq=rng.standard_normal((B, n, 64)).astype(np.float32),
        img_ids=np.array(sampling.img_ids(1, h, w))[0], txt=rng.standard_normal((B, T, 32)).astype(np.float32),
        txt_ids=np.zeros((T, 3), np.float32), t=np.array([0.3, 0.8], np.float32),
        y=rng.standard_normal((B, 32)).astype(np.float32), guidance=np.array([3.5, 2.0], np.float32),
    )


def jax_step(flax_base, adapter, x, intermediates=False):
    ids = lambda a: jnp.broadcast_to(jnp.asarray(a), (B, *a.shape))  # noqa: E731
    args = (jnp.asarray(x["img"]), jnp.asarray(x["lq"]), ids(x["img_ids"]), jnp.asarray(x["txt"]), ids(x["txt_ids"]),
            jnp.asarray(x["t"]), jnp.asarray(x["y"]), jnp.asarray(x["guidance"]))
    with jax.default_matmul_precision("highest"):
        out = fluxir_forward(flax_base, adapter, *args)
        if not intermediates:
            return np.asarray(out), None
        control = adapter(flax_base, args[0], args[1], args[2], args[5], args[7])
        _, inter = flax_base.forward(args[0], args[2], args[3], args[4], args[5], args[6], args[7], control,
                                     intermediates=True)
    return np.asarray(out), {k: np.asarray(v) for k, v in inter.items()}


def torch_step(dm, adapter, x, intermediates=False):
    args = [torch.from_numpy(x[k]) for k in ("img", "lq", "img_ids", "txt", "txt_ids", "t", "y", "guidance")]
    with torch.no_grad():
        out = torch_fluxir.fluxir_velocity_torch(dm, adapter, *args, intermediates=intermediates)
    if not intermediates:
        return out.float().numpy(), None
    return out[0].numpy(), {k: v.numpy() for k, v in out[1].items()}


def test_export_round_trips_into_torch_exactly(base, tmp_path):
    jax_adapter, path, adapter = pair(base, tmp_path)
    with safe_open(str(path), "np") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    mine = adapter.named_tensors()
    assert set(mine) == set(stored) == set(adapter_io.to_named_tensors(jax_adapter))
    for k, v in stored.items():
        np.testing.assert_array_equal(mine[k], v, err_msg=k)
    # the control block is a diffusers FluxTransformerBlock holding the split qkv
    q = adapter.block.attn.to_q.weight.detach().numpy()
    np.testing.assert_array_equal(q, stored["block.img_attn.qkv.weight"][: q.shape[0]])
    assert all(np.abs(v).max() > 0 for v in mine.values())  # nothing left at a zero init
    # load_named_tensors after a state change restores the file's state
    with torch.no_grad():
        adapter.se_img["double_blocks"]["1"].gamma.add_(1.0)
    adapter.load_named_tensors(stored)
    np.testing.assert_array_equal(adapter.named_tensors()["se_img.double_blocks.1.gamma"], stored["se_img.double_blocks.1.gamma"])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_step_matches_jax(base, tmp_path, name):
    dm, flax_base = base
    jax_adapter, _, adapter = pair(base, tmp_path, name)
    x = step_inputs()
    want, want_blocks = jax_step(flax_base, jax_adapter, x, intermediates=not jax_adapter.config.base_consumes_theta)
    got, got_blocks = torch_step(dm, adapter, x, intermediates=want_blocks is not None)
    assert rel_err(got, want) <= TOL_STEP, (name, rel_err(got, want))
    if want_blocks is not None:
        for k, w in want_blocks.items():
            for i in range(w.shape[0]):
                assert rel_err(got_blocks[k][i], w[i]) <= TOL_STEP, (name, k, i, rel_err(got_blocks[k][i], w[i]))
    # the adapter matters: without its residuals the step differs
    plain = torch_fluxir.TorchFluxIR(adapter.config, adapter.base_config)
    assert rel_err(torch_step(dm, plain, x)[0], want) > 1e-2


def test_four_step_restoration_matches_jax(base, vae, tmp_path):
    dm, flax_base = base
    dv, ae = vae
    jax_adapter, _, adapter = pair(base, tmp_path)
    rng = np.random.default_rng(5)
    lq01 = rng.uniform(0, 1, (B, H // 4, W // 4, 3)).astype(np.float32)
    noise = rng.standard_normal((B, H // 8, W // 8, 16)).astype(np.float32)
    txt, y = rng.standard_normal((T, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        want = compare_adapter.restore_jax(flax_base, ae, jax_adapter, lq01, noise, 4, 3.5, txt, y)
    got = torch_fluxir.restore_torch(dm, dv, adapter, lq01, noise, 4, 3.5, txt, y, clip=False).numpy()
    assert got.shape == (B, H, W, 3)
    assert rel_err(got, want) <= TOL_RESTORE, rel_err(got, want)
    clipped = torch_fluxir.restore_torch(dm, dv, adapter, lq01, noise, 4, 3.5, txt, y).numpy()
    np.testing.assert_array_equal(clipped, np.clip(got, 0, 1))
    # control_scale override: 0 is the base alone, and differs from the adapter's result
    base_only = torch_fluxir.restore_torch(dm, dv, adapter, lq01, noise, 4, 3.5, txt, y, clip=False, control_scale=0.0)
    assert rel_err(base_only.numpy(), got) > 1e-2 and adapter.config.control_scale == 1.0


def test_bfloat16_base_with_float32_or_bfloat16_adapter_runs_close(base, tmp_path):
    import copy

    dm, _ = base
    _, _, adapter = pair(base, tmp_path)
    x = step_inputs()
    want = torch_step(dm, adapter, x)[0]
    dm16 = copy.deepcopy(dm).to(torch.bfloat16)
    # yardstick: the bf16 rounding error of the base alone (an adapter with no residuals)
    plain = torch_fluxir.TorchFluxIR(adapter.config, adapter.base_config)
    base_err = rel_err(torch_step(dm16, plain, x)[0], torch_step(dm, plain, x)[0])
    for a in (adapter, copy.deepcopy(adapter).to(torch.bfloat16)):
        got = torch_step(dm16, a, x)[0]
        assert np.isfinite(got).all() and rel_err(got, want) <= 1.5 * base_err, (rel_err(got, want), base_err)


@pytest.mark.slow  # ~30-50 s on the shared 2-core machine (compiles a restoration at new shapes)
def test_compare_rows_cover_every_block_and_the_restoration(base, vae, tmp_path):
    dm, flax_base = base
    dv, ae = vae
    _, path, _ = pair(base, tmp_path, "every_n")
    rows = dict(compare_adapter.adapter_rows(dm, dv, flax_base, ae, path, seed=1, steps=1, lq_size=8))
    n_blocks = len(dm.transformer_blocks) + len(dm.single_transformer_blocks)
    assert len(rows) == 2 * n_blocks + 2
    for name, err in rows.items():
        assert err <= (TOL_RESTORE if "restoration" in name else TOL_STEP), (name, err)
    with pytest.raises(UserError, match="multiple of 16"):
        compare_adapter.adapter_rows(dm, dv, flax_base, ae, path, lq_size=6)


def test_mismatched_base_is_refused(base, tmp_path):
    from diffusers import FluxTransformer2DModel

    _, path, adapter = pair(base, tmp_path)
    other = FluxTransformer2DModel(guidance_embeds=True, **{**TINY_DIFFUSERS, "num_layers": 3}).eval()
    with pytest.raises(UserError, match="adapter was built for base depth=2, the loaded base has depth=3"):
        torch_fluxir.load_adapter_safetensors(path, other)
    x = step_inputs()
    with pytest.raises(UserError, match="depth=2"):
        torch_step(other, adapter, x)
    schnell = FluxTransformer2DModel(guidance_embeds=False, **TINY_DIFFUSERS).eval()
    with pytest.raises(UserError, match="guidance_embed=True"):
        torch_fluxir.load_adapter_safetensors(path, schnell)
    with pytest.raises(UserError, match="adapter file not found"):
        torch_fluxir.load_adapter_safetensors(tmp_path / "missing.safetensors")



def jax_loss_and_grads(flax_base, ae, adapter, hq, lq_up, t, noise, offsets, txt, y, guidance, *, pixel_crop,
                       pixel_weight, t_min, t_max):
    """The same objective composed from the JAX library pieces (L1 pixel loss; the L2 pixel term
    comes back too), with the adapter gradients under the export names."""
    b, h, w, _ = noise.shape
    c = pixel_crop // 8
    ag, a_state = nnx.split(adapter)
    tt = jnp.asarray(t)[:, None, None, None]

    def loss(state):
        z0, zc = ae.encode(jnp.asarray(2 * hq - 1)), ae.encode(jnp.asarray(2 * lq_up - 1))
        z_t = (1 - tt) * z0 + tt * noise
        pred = fluxir_forward(flax_base, nnx.merge(ag, state), sampling.pack(z_t), sampling.pack(zc),
                              sampling.img_ids(b, h, w), jnp.broadcast_to(txt, (b, *txt.shape)), sampling.txt_ids(b, T),
                              jnp.asarray(t), jnp.broadcast_to(y, (b, *y.shape)), jnp.full((b,), guidance, jnp.float32))
        v_hat = sampling.unpack(pred, h, w)
        l_flow = jnp.mean(jnp.square(v_hat - (noise - z0)))
        x0 = z_t - tt * v_hat
        dec = ae.decode(jnp.stack([x0[i, oy:oy + c, ox:ox + c] for i, (oy, ox) in enumerate(offsets)]))
        target = jnp.stack([2 * hq[i, 8 * oy:8 * oy + pixel_crop, 8 * ox:8 * ox + pixel_crop] - 1
                            for i, (oy, ox) in enumerate(offsets)])
        mask = ((jnp.asarray(t) >= t_min) & (jnp.asarray(t) <= t_max)).astype(jnp.float32)
        masked_mean = lambda e: jnp.sum(jnp.mean(e, axis=(1, 2, 3)) * mask) / jnp.maximum(jnp.sum(mask), 1.0)  # noqa: E731
        l1, l2 = masked_mean(jnp.abs(dec - target)), masked_mean(jnp.square(dec - target))
        return l_flow + pixel_weight * l1, (l_flow, l1, l2)

    with jax.default_matmul_precision("highest"):
        (value, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(a_state)
    return float(value), [float(p) for p in parts], adapter_io.to_named_tensors(nnx.merge(ag, grads))


@pytest.mark.slow  # ~30 s warm, more with a cold compilation cache (JAX value_and_grad through Flux + VAE)
def test_training_loss_and_adapter_gradients_match_jax(base, vae, tmp_path):
    dm, flax_base = base
    dv, ae = vae
    jax_adapter, _, adapter = pair(base, tmp_path)
    rng = np.random.default_rng(7)
    hq = rng.uniform(0, 1, (B, H, W, 3)).astype(np.float32)
    lq_up = np.clip(hq + 0.2 * rng.standard_normal(hq.shape), 0, 1).astype(np.float32)
    noise = rng.standard_normal((B, H // 8, W // 8, 16)).astype(np.float32)
    txt, y = rng.standard_normal((T, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)  # with t_max 0.5 only the first example has a pixel loss
    offsets = [(1, 2), (2, 4)]
    opts = dict(pixel_crop=16, pixel_weight=0.5, t_min=0.1, t_max=0.5)
    want, (want_flow, want_l1, want_l2), want_grads = jax_loss_and_grads(flax_base, ae, jax_adapter, hq, lq_up, t,
                                                                         noise, offsets, txt, y, 3.5, **opts)
    args = (dm, dv, adapter, hq, lq_up, t, noise, offsets, txt, y, 3.5)
    loss, parts = torch_fluxir.fluxir_loss_torch(*args, **opts)
    loss.backward()
    assert abs(float(parts["flow"]) - want_flow) <= TOL_LOSS * abs(want_flow)
    assert abs(float(parts["pixel"]) - want_l1) <= TOL_LOSS * abs(want_l1) and want_l1 > 0
    assert abs(loss.item() - want) <= TOL_LOSS * abs(want)
    grads = adapter.named_tensors(grads=True)
    assert set(grads) == set(want_grads)
    flat = lambda d: np.concatenate([d[k].ravel() for k in sorted(d)])  # noqa: E731
    assert rel_err(flat(grads), flat(want_grads)) <= TOL_GRAD, rel_err(flat(grads), flat(want_grads))
    # every adapter tensor receives a gradient, except the text residual after the last block (never read)
    last = f"se_txt.single_blocks.{len(dm.single_transformer_blocks) - 1}."
    assert sorted(k for k, g in grads.items() if not np.abs(g).max() > 0) == [k for k in sorted(grads) if k.startswith(last)]
    assert all(p.grad is None for p in dm.parameters()) and all(p.grad is None for p in dv.parameters())
    # the L2 option, and the t-range mask: an all-masked batch has no pixel term
    with torch.no_grad():
        _, parts2 = torch_fluxir.fluxir_loss_torch(*args, **{**opts, "pixel_loss": "l2"})
        assert abs(float(parts2["pixel"]) - want_l2) <= TOL_LOSS * abs(want_l2)
        loss3, parts3 = torch_fluxir.fluxir_loss_torch(*args, **{**opts, "t_min": 0.9, "t_max": 1.0})
        assert float(parts3["pixel"]) == 0.0 and loss3.item() == float(parts3["flow"])
    with pytest.raises(ValueError, match="outside"):
        torch_fluxir.fluxir_loss_torch(*args, **{**opts, "pixel_crop": 32})
