"""Packing, ids, schedule and the Euler loop against BFL formulas and diffusers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fluxir_jax import sampling
from tests.models.flux_reference import flax_from_diffusers, rel_err, tiny_diffusers


def np_pack(z):  # NCHW numpy, "b c (h ph) (w pw) -> b (h w) (c ph pw)"
    b, c, H, W = z.shape
    return z.reshape(b, c, H // 2, 2, W // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (H // 2) * (W // 2), c * 4)


def np_schedule(n, seq, base=0.5, mx=1.15):
    t = np.linspace(1, 0, n + 1)
    m = (mx - base) / (4096 - 256)
    mu = m * seq + base - m * 256
    out = np.zeros_like(t)
    nz = t > 0
    out[nz] = np.exp(mu) / (np.exp(mu) + (1 / t[nz] - 1))
    return out


def test_pack_matches_bfl_layout_and_unpack_inverts():
    z = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)  # NCHW
    packed = sampling.pack(jnp.asarray(z.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(packed), np_pack(z))
    back = sampling.unpack(packed, 6, 10)
    np.testing.assert_array_equal(np.asarray(back), z.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="even"):
        sampling.pack(jnp.zeros((1, 5, 4, 16)))


def test_ids():
    ids = np.asarray(sampling.img_ids(2, 6, 10))
    assert ids.shape == (2, 15, 3)
    np.testing.assert_array_equal(ids[0, 7], [0, 1, 2])  # row 1, col 2 of a 3x5 token grid
    assert not np.asarray(sampling.txt_ids(2, 4)).any()


@pytest.mark.parametrize("n,seq", [(28, 4096), (50, 1024), (4, 256), (7, 9000)])
def test_schedule_matches_numpy_and_diffusers(n, seq):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = sampling.get_schedule(n, seq)
    np.testing.assert_allclose(ours, np_schedule(n, seq), rtol=0, atol=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    mu = sampling.lin_mu(seq)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert np.abs(sched.sigmas.numpy().astype(np.float64) - ours).max() <= 1e-6


def test_schnell_schedule_is_unshifted():
    np.testing.assert_allclose(sampling.get_schedule(4, 4096, shift=False), [1, 0.75, 0.5, 0.25, 0])


def test_noise_depends_only_on_the_seed():
    a = sampling.get_noise(jnp.array([3, 7, 11]), 4, 6)
    b = sampling.get_noise(jnp.array([11, 3]), 4, 6)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert a.shape == (3, 4, 6, 16)


def test_denoise_matches_torch_euler_loop():
    """4 Euler steps of the tiny model: one-jit fori_loop vs a step-by-step diffusers loop."""
    dm = tiny_diffusers(True, seed=11)
    model = flax_from_diffusers(dm)
    b, H, W, T = 2, 6, 8, 5
    rng = np.random.default_rng(11)
    noise = np.asarray(sampling.pack(sampling.get_noise(jnp.array([1, 2]), H, W)))
    txt = rng.standard_normal((b, T, 32)).astype(np.float32)
    y = rng.standard_normal((b, 32)).astype(np.float32)
    ids = np.asarray(sampling.img_ids(1, H, W))[0]
    ts = sampling.get_schedule(4, noise.shape[1])
    guidance = np.full((b,), 3.5, np.float32)

    x = torch.from_numpy(noise.copy())
    with torch.no_grad():
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            pred = dm(hidden_states=x, encoder_hidden_states=torch.from_numpy(txt), pooled_projections=torch.from_numpy(y),
                      timestep=torch.full((b,), float(np.float32(t_cur))), img_ids=torch.from_numpy(ids),
                      txt_ids=torch.zeros(T, 3), guidance=torch.from_numpy(guidance), return_dict=False)[0]
            x = x + float(np.float32(t_next) - np.float32(t_cur)) * pred
    ref = x.numpy()

    graphdef, state = nnx.split(model)
    cond = sampling.Conditioning(img_ids=sampling.img_ids(b, H, W), txt=jnp.asarray(txt), txt_ids=sampling.txt_ids(b, T),
                                 y=jnp.asarray(y), guidance=jnp.asarray(guidance))
    with jax.default_matmul_precision("highest"):
        out = sampling.denoise(sampling.FluxVelocity(graphdef), state, jnp.asarray(noise), cond, jnp.asarray(ts))
    err = rel_err(out, ref)
    print(f"denoise 4 steps vs torch: rel err {err:.2e}")
    assert err <= 1e-4
    assert rel_err(out, noise) > 0.1  # it moved


def test_sample_is_batch_independent():
    """An image's latent depends on its seed only, not on its batch neighbours."""
    from fluxir_jax.models import presets
    from fluxir_jax.models.flux import Flux

    model = Flux(presets.get("tiny"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    v = sampling.FluxVelocity(graphdef)
    rng = np.random.default_rng(0)
    txt = jnp.asarray(rng.standard_normal((1, 3, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 32)), jnp.float32)

    def cond(b):
        return sampling.Conditioning(img_ids=sampling.img_ids(b, 4, 4), txt=jnp.repeat(txt, b, 0), txt_ids=sampling.txt_ids(b, 3),
                                     y=jnp.repeat(y, b, 0), guidance=jnp.full((b,), 3.5))

    two = sampling.sample(v, state, jnp.array([5, 9]), 4, 4, cond(2), num_steps=3)
    one = sampling.sample(v, state, jnp.array([9]), 4, 4, cond(1), num_steps=3)
    assert two.shape == (2, 4, 4, 16)
    assert rel_err(one[0], two[1]) <= 1e-6
