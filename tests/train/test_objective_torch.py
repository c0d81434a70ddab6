"""`train.fluxir_loss` (the objective the train step runs) against its PyTorch re-statement
`fluxir_convert.torch_fluxir.fluxir_loss_torch` on diffusers modules, every weight random.

Same t, noise and crop offsets on both sides, float32, JAX at "highest" matmul precision.
Bounds (relative): loss and its parts <= 1e-4; the adapter gradients (all tensors, flattened,
under the export names) <= 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxir_convert import torch_fluxir
from fluxir_jax import train
from fluxir_jax.models import adapter_io
from tests.convert.test_torch_fluxir import B, H, T, W, base, pair, vae  # noqa: F401  (fixtures)
from tests.models.flux_reference import rel_err

TOL = 1e-4


@pytest.mark.slow  # value_and_grad through the tiny Flux + VAE: compile-bound on CPU
@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_train_objective_matches_torch(base, vae, tmp_path, pixel_loss):  # noqa: F811
    dm, flax_base = base
    dv, ae = vae
    jax_adapter, _, adapter = pair(base, tmp_path)
    rng = np.random.default_rng(11)
    hq = rng.uniform(0, 1, (B, H, W, 3)).astype(np.float32)
    lq_up = np.clip(hq + 0.2 * rng.standard_normal(hq.shape), 0, 1).astype(np.float32)
    noise = rng.standard_normal((B, H // 8, W // 8, 16)).astype(np.float32)
    txt, y = rng.standard_normal((T, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    t = np.array([0.25, 0.7], np.float32)
    offsets = np.array([(1, 2), (2, 3)], np.int32)
    opts = dict(pixel_crop=16, pixel_weight=0.7, pix_t_min=0.0, pix_t_max=0.8, pixel_loss=pixel_loss)

    ag, a_state = nnx.split(jax_adapter)

    def loss(state):
        return train.fluxir_loss(flax_base, nnx.merge(ag, state), ae, jnp.asarray(hq), jnp.asarray(lq_up),
                                 jnp.asarray(txt), jnp.asarray(y), jnp.asarray(t), jnp.asarray(noise),
                                 jnp.asarray(offsets), guidance=3.5, **opts)

    with jax.default_matmul_precision("highest"):
        (value, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(a_state)
    want_grads = adapter_io.to_named_tensors(nnx.merge(ag, grads))

    t_loss, t_parts = torch_fluxir.fluxir_loss_torch(
        dm, dv, adapter, hq, lq_up, t, noise, offsets, txt, y, 3.5, pixel_crop=16, pixel_weight=0.7, t_min=0.0,
        t_max=0.8, pixel_loss=pixel_loss)
    t_loss.backward()
    assert float(parts["pix"]) > 0
    assert abs(float(t_parts["flow"]) - float(parts["flow"])) <= TOL * abs(float(parts["flow"]))
    assert abs(float(t_parts["pixel"]) - float(parts["pix"])) <= TOL * abs(float(parts["pix"]))
    assert abs(t_loss.item() - float(value)) <= TOL * abs(float(value))
    got = adapter.named_tensors(grads=True)
    assert set(got) == set(want_grads)
    flat = lambda d: np.concatenate([d[k].ravel() for k in sorted(d)])  # noqa: E731
    err = rel_err(flat(got), flat(want_grads))
    print(f"adapter gradient rel err {err:.2e}")
    assert err <= TOL, err
    assert all(p.grad is None for p in dm.parameters()) and all(p.grad is None for p in dv.parameters())
