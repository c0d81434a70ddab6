"""JAX FluxIR vs the PyTorch FluxIR (`torch_fluxir`): the rows of `fluxir compare --adapter`.

Both sides read the same exported adapter (.safetensors) and run on the same seeded inputs in
float32 (JAX at "highest" matmul precision):

    one FluxIR step   the image and text streams after every double and single block
                      (adapter residuals included) and the velocity
    restoration       `steps` Euler steps from the same noise: LQ bicubic x`scale` -> VAE
                      encode -> sampler with the adapter -> VAE decode (images in [0, 1],
                      unclipped)

Rows are (name, ||jax - torch|| / ||torch||). `restore_jax` is the JAX restoration composed from
the library's pieces (sampling, AutoEncoder, FluxIRVelocity), the reference `restore_torch`
must match.
"""
from __future__ import annotations

import numpy as np

from fluxir_jax import sampling
from fluxir_jax.data.image_ops import resize_torch_like
from fluxir_jax.models import adapter_io

from . import torch_fluxir


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))


def step_jax(flax_base, adapter, img, lq, img_ids, txt, txt_ids, t, y, guidance):
    """`fluxir_forward` that also returns every block's streams (Flax `Flux.forward` layout)."""
    import jax.numpy as jnp

    control = adapter(flax_base, img, lq, img_ids, t, guidance)
    if adapter.config.base_consumes_theta:
        txt, y = adapter.text(img.shape[0])
        txt_ids = jnp.zeros((img.shape[0], adapter.config.text_len, 3), jnp.float32)
    out, inter = flax_base.forward(img, img_ids, txt, txt_ids, t, y, guidance, control, intermediates=True)
    return np.asarray(out), {k: np.asarray(v) for k, v in inter.items()}


def restore_jax(flax_base, ae, adapter, lq01, noise, num_steps: int, guidance, txt, y, shift: bool = True) -> np.ndarray:
    """JAX restoration, images NHWC in [0, 1] (unclipped); the same arguments as `restore_torch`."""
    import jax.numpy as jnp
    from flax import nnx

    from fluxir_jax.models.adapter import FluxIRVelocity

    b, h, w, _ = noise.shape
    lq_up = np.stack([np.clip(resize_torch_like(np.asarray(im, np.float32), (8 * h, 8 * w), "bicubic"), 0, 1)
                      for im in lq01]).astype(np.float32)
    lq = sampling.pack(ae.encode(jnp.asarray(2 * lq_up - 1), tiled=False))
    txt, y = jnp.asarray(txt, jnp.float32), jnp.asarray(y, jnp.float32)
    cond = sampling.Conditioning(
        img_ids=sampling.img_ids(b, h, w), txt=jnp.broadcast_to(txt, (b, *txt.shape[-2:])),
        txt_ids=sampling.txt_ids(b, txt.shape[-2]), y=jnp.broadcast_to(y, (b, y.shape[-1])),
        guidance=None if guidance is None else jnp.full((b,), guidance, jnp.float32), extra={"lq": lq})
    bg, bs = nnx.split(flax_base)
    ag, a_state = nnx.split(adapter)
    timesteps = jnp.asarray(sampling.get_schedule(num_steps, lq.shape[1], shift=shift), jnp.float32)
    z = sampling.denoise(FluxIRVelocity(bg, ag), (bs, a_state), sampling.pack(jnp.asarray(noise, jnp.float32)), cond,
                         timesteps)
    return np.asarray((ae.decode(sampling.unpack(z, h, w), tiled=False) + 1) / 2)


def adapter_rows(transformer, vae, flax_base, ae, adapter_path, *, txt=None, y=None, seed: int = 0, steps: int = 4,
                 guidance: float = 3.5, lq_size: int = 16, scale: int = 4, shift: bool = True) -> list[tuple[str, float]]:
    """Per-block and final errors of one FluxIR step, and the error of a `steps`-step restoration.

    transformer / vae: the diffusers `FluxTransformer2DModel` / `AutoencoderKL` (float32);
    flax_base / ae: the converted Flax `Flux` / `AutoEncoder` (float32); adapter_path: a
    `fluxir export-adapter` file, read by both sides (a mismatched base -> UserError).
    txt [T, ctx] / y [vec]: the base's text conditioning (the checkpoint's empty prompt);
    random when None. The restoration is of a random lq_size^2 LQ image upsampled x`scale`.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from fluxir_jax.errors import UserError

    if lq_size < 1 or (lq_size * scale) % 16:
        raise UserError(f"compare: lq_size x scale = {lq_size * scale} must be a positive multiple of 16")
    jax_adapter = adapter_io.import_safetensors(adapter_path, flax_base.config)
    torch_adapter = torch_fluxir.load_adapter_safetensors(adapter_path, transformer)
    cfg = flax_base.config
    rng = np.random.default_rng(seed)
    n_txt = jax_adapter.config.text_len
    txt = rng.standard_normal((n_txt, cfg.context_in_dim)).astype(np.float32) if txt is None else np.asarray(txt, np.float32)
    y = rng.standard_normal((cfg.vec_in_dim,)).astype(np.float32) if y is None else np.asarray(y, np.float32)
    g = guidance if cfg.guidance_embed else None

    h = w = 8  # one step on an 8x8 latent (16 tokens)
    n = h * w // 4
    img = rng.standard_normal((1, n, cfg.in_channels)).astype(np.float32)
    lq = rng.standard_normal((1, n, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0.1, 1.0, (1,)).astype(np.float32)
    ids = np.array(sampling.img_ids(1, h, w))
    t_ids = np.zeros((1, txt.shape[0], 3), np.float32)
    gv = None if g is None else np.full((1,), g, np.float32)
    with jax.default_matmul_precision("highest"):
        out, inter = step_jax(flax_base, jax_adapter, jnp.asarray(img), jnp.asarray(lq), jnp.asarray(ids),
                              jnp.asarray(txt[None]), jnp.asarray(t_ids), jnp.asarray(t), jnp.asarray(y[None]),
                              None if gv is None else jnp.asarray(gv))
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        out_ref, inter_ref = torch_fluxir.fluxir_velocity_torch(
            transformer, torch_adapter, as_t(img), as_t(lq), as_t(ids), as_t(txt[None]), as_t(t_ids), as_t(t),
            as_t(y[None]), as_t(gv), intermediates=True)
    inter_ref = {k: v.numpy() for k, v in inter_ref.items()}
    n_t = inter["double_txt"].shape[2] if inter["double_txt"].size else txt.shape[0]
    rows = []
    for i in range(inter["double_img"].shape[0]):
        rows.append((f"adapter step double {i} img", rel_err(inter["double_img"][i], inter_ref["double_img"][i])))
        rows.append((f"adapter step double {i} txt", rel_err(inter["double_txt"][i], inter_ref["double_txt"][i])))
    for i in range(inter["single"].shape[0]):
        s, r = inter["single"][i], inter_ref["single"][i]
        rows.append((f"adapter step single {i} img", rel_err(s[:, n_t:], r[:, n_t:])))
        rows.append((f"adapter step single {i} txt", rel_err(s[:, :n_t], r[:, :n_t])))
    rows.append(("adapter step velocity", rel_err(out, out_ref.numpy())))

    lq01 = rng.uniform(0, 1, (1, lq_size, lq_size, 3)).astype(np.float32)
    f = lq_size * scale // 8
    noise = rng.standard_normal((1, f, f, 16)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = restore_jax(flax_base, ae, jax_adapter, lq01, noise, steps, g, txt, y, shift=shift)
    ref = torch_fluxir.restore_torch(transformer, vae, torch_adapter, lq01, noise, steps, g, txt, y, shift=shift,
                                     clip=False).numpy()
    rows.append((f"adapter restoration ({steps} steps)", rel_err(got, ref)))
    return rows
