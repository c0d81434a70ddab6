"""FLUX sampling: latent packing, position ids, the shifted schedule, and the Euler loop in one jit.

Layouts (BFL `flux/sampling.py`, with our NHWC latents):

    latent  [B, H, W, C]          H, W = image size / 8, C = 16
    packed  [B, (H/2)(W/2), 4C]   "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph = pw = 2
    img_ids [B, (H/2)(W/2), 3]    (0, row, col)
    txt_ids [B, T, 3]             zeros

Flow matching: t = 1 is noise, t = 0 is data, z_t = (1 - t) z_0 + t eps, the model predicts
the velocity eps - z_0, and Euler steps `z += (t_next - t_cur) * v`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------- packing


def pack(latent: Array) -> Array:
    """[B, H, W, C] -> [B, (H/2)(W/2), C*4], channel-major inside each 2x2 patch (BFL order)."""
    b, h, w, c = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack: latent height and width must be even, got {h}x{w}")
    x = latent.reshape(b, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b h w c ph pw
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: Array, height: int, width: int) -> Array:
    """Inverse of `pack` for a latent of `height` x `width` (latent pixels, both even)."""
    b, n, d = packed.shape
    h, w, c = height // 2, width // 2, d // 4
    if n != h * w:
        raise ValueError(f"unpack: {n} tokens do not form a {height}x{width} latent")
    x = packed.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # b h ph w pw c
    return x.reshape(b, height, width, c)


def img_ids(batch: int, height: int, width: int) -> Array:
    """(0, row, col) ids for a latent of height x width (latent pixels): [B, (h/2)(w/2), 3]."""
    h, w = height // 2, width // 2
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return jnp.broadcast_to(jnp.asarray(ids.reshape(h * w, 3)), (batch, h * w, 3))


def txt_ids(batch: int, length: int) -> Array:
    return jnp.zeros((batch, length, 3), jnp.float32)


# ----------------------------------------------------------------------------- schedule


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    """t' = e^mu / (e^mu + (1/t - 1)^sigma); t = 0 stays 0."""
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):
        out = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)
    return np.where(t == 0, 0.0, out)


def lin_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, x1: int = 256, x2: int = 4096) -> float:
    """mu linear in the image token count: (x1 -> base_shift), (x2 -> max_shift)."""
    m = (max_shift - base_shift) / (x2 - x1)
    return m * image_seq_len + (base_shift - m * x1)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True) -> np.ndarray:
    """num_steps + 1 times from 1 to 0 (float64 numpy), resolution-shifted when `shift` (dev)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    if shift:
        t = time_shift(lin_mu(image_seq_len, base_shift, max_shift), 1.0, t)
    return t


# ----------------------------------------------------------------------------- noise


def get_noise(seeds: Array, height: int, width: int, channels: int = 16, dtype=jnp.float32) -> Array:
    """Per-image Gaussian latents [B, height, width, channels] from integer seeds [B].

    Each image's noise depends only on its own seed (jax.random.key(seed)), so a result does
    not depend on which batch or device the image landed in.
    """
    seeds = jnp.asarray(seeds, jnp.uint32)
    draw = lambda s: jax.random.normal(jax.random.key(s), (height, width, channels), jnp.float32)  # noqa: E731
    return jax.vmap(draw)(seeds).astype(dtype)


# ----------------------------------------------------------------------------- denoising


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Conditioning:
    """Everything the velocity function sees besides the latent and t.

    txt [B, T, context], y [B, vec]: the text conditioning (stored embeddings; the empty
    prompt by default); guidance [B] (ignored by schnell); extra: anything an adapter needs
    (e.g. the packed LQ latent), passed through untouched.
    """

    img_ids: Array
    txt: Array
    txt_ids: Array
    y: Array
    guidance: Optional[Array] = None
    extra: Optional[dict] = None


def text_conditioning(txt, y, batch: int, height: int, width: int, guidance: float | None = None) -> Conditioning:
    """Conditioning for `batch` latents of height x width (latent pixels) from stored text embeddings.

    txt: T5 embeddings [T, context] (one prompt for every image) or [batch, T, context]; y: CLIP pooled [vec] or
    [batch, vec] (`fluxir encode-prompts` rows, or the checkpoint's empty prompt). `guidance`
    (flux-dev's distilled guidance, e.g. 3.5) is None for schnell-style models.
    """
    txt = jnp.asarray(txt, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if txt.ndim == 2:
        txt = jnp.broadcast_to(txt[None], (batch, *txt.shape))
    if y.ndim == 1:
        y = jnp.broadcast_to(y[None], (batch, y.shape[0]))
    if txt.ndim != 3 or txt.shape[0] != batch or y.shape != (batch, y.shape[-1]):
        raise ValueError(f"text_conditioning: txt {tuple(txt.shape)} / y {tuple(y.shape)} do not fit batch {batch}")
    g = None if guidance is None else jnp.full((batch,), guidance, jnp.float32)
    return Conditioning(img_ids=img_ids(batch, height, width), txt=txt, txt_ids=txt_ids(batch, txt.shape[1]), y=y,
                        guidance=g)


def empty_conditioning(checkpoint_dir, batch: int, height: int, width: int, guidance: float | None = None,
                       allow_zeros: bool = False) -> Conditioning:
    """The default conditioning: the empty prompt's embeddings stored by `fluxir convert --t5 --clip`.

    A checkpoint converted without text encoders stores zeros; sampling from those is refused
    (UserError naming the fix) unless `allow_zeros` (tests, tiny models). A `fluxir init`
    checkpoint's random embeddings are accepted (the loader notes that they are random).
    """
    from fluxir_jax import checkpoint
    from fluxir_jax.errors import UserError

    text = checkpoint.load_text_embeddings(checkpoint_dir)
    if not text["computed"] and not text["random"] and not allow_zeros:
        raise UserError(f"{checkpoint_dir}: the empty-prompt embeddings were not computed (zeros); "
                        "reconvert with --t5 DIR --clip DIR")
    return text_conditioning(text["txt"], text["y"], batch, height, width, guidance)


VelocityFn = Callable[[object, Array, Array, Conditioning], Array]
"""velocity(params, img [B, L, D] float32, t [B] float32, cond) -> prediction [B, L, D]."""


@dataclasses.dataclass(frozen=True)
class FluxVelocity:
    """Velocity of a plain (base) Flux model split into (graphdef, state).

    A frozen dataclass of the (hashable) graphdef, so `denoise` compiles once per model
    structure, not once per call.
    """

    graphdef: object

    def __call__(self, state, img, t, cond: Conditioning):
        from flax import nnx

        model = nnx.merge(self.graphdef, state)
        return model(img, cond.img_ids, cond.txt, cond.txt_ids, t, cond.y, cond.guidance)


@functools.partial(jax.jit, static_argnames=("velocity",))
def denoise(velocity: VelocityFn, params, noise: Array, cond: Conditioning, timesteps: Array) -> Array:
    """Euler-integrate from t = timesteps[0] to timesteps[-1]; the whole loop is one `fori_loop`.

    noise: packed latent [B, L, D] at t = timesteps[0] (pure noise for generation);
    timesteps: [n + 1] decreasing (see `get_schedule`). The latent is carried in float32
    whatever the model's activation dtype. Returns the packed latent at timesteps[-1].
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    b = noise.shape[0]

    def step(i, img):
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        pred = velocity(params, img, jnp.full((b,), t_cur, jnp.float32), cond)
        return img + (t_next - t_cur) * pred.astype(jnp.float32)

    return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise.astype(jnp.float32))


def sample(velocity: VelocityFn, params, seeds: Array, height: int, width: int, cond: Conditioning, num_steps: int,
           shift: bool = True, channels: int = 16) -> Array:
    """Generate latents [B, height, width, channels] (latent pixels) from per-image seeds.

    Noise from `get_noise(seeds)`, the BFL schedule for this resolution (shifted for dev,
    plain for schnell), the jitted Euler loop, and unpacking.
    """
    noise = pack(get_noise(seeds, height, width, channels))
    timesteps = get_schedule(num_steps, noise.shape[1], shift=shift)
    return unpack(denoise(velocity, params, noise, cond, jnp.asarray(timesteps, jnp.float32)), height, width)
