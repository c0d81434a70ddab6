"""Latent tiling for the sampler: overlapping tiles, Gaussian-blended velocities at every step.

For a latent larger than the tile, every Euler step evaluates the velocity on each tile (a
crop of the noisy latent and of the LQ latent, with the tile's own position ids, as if it
were a whole image of the tile size) and blends the tile velocities with Gaussian weights
centred on each tile:

    v(x) = sum_k w_k(x) v_k(x) / sum_k w_k(x),   w_k = exp(-d^2 / (2 (sigma * tile)^2))

so every position moves with one smooth mixture of the tiles covering it and no tile edge
leaves a seam. Tiles are placed on the 2x2 token grid (even latent offsets), equal in size,
spread evenly with at least `overlap` cells of overlap (`vae_tiling.plan_tiles`). The tiles
run one after another inside a `lax.scan` (one velocity program, memory of one tile).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fluxir_jax import sampling
from fluxir_jax.models.vae_tiling import plan_tiles

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LatentTiles:
    """A tile plan for a latent of `height` x `width` cells: tile `size` (h, w) and its (y, x) starts."""

    height: int
    width: int
    size: tuple[int, int]
    starts: tuple[tuple[int, int], ...]

    def weights(self, sigma: float) -> np.ndarray:
        """The Gaussian blending weight of one tile, [h, w] float32 (peak 1 at the centre)."""
        th, tw = self.size
        y = (np.arange(th) + 0.5 - th / 2) / (sigma * th)
        x = (np.arange(tw) + 0.5 - tw / 2) / (sigma * tw)
        return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)

    def coverage(self, sigma: float) -> np.ndarray:
        """Sum of the placed tile weights over the latent, [height, width] float32."""
        total = np.zeros((self.height, self.width), np.float64)
        w = self.weights(sigma)
        th, tw = self.size
        for y0, x0 in self.starts:
            total[y0:y0 + th, x0:x0 + tw] += w
        return total.astype(np.float32)


def plan_latent_tiles(height: int, width: int, tile: int, overlap: int) -> LatentTiles:
    """Tiles of at most `tile` latent cells per side (even), overlapping by >= `overlap` cells."""
    if height % 2 or width % 2 or tile % 2 or tile < 2:
        raise ValueError(f"plan_latent_tiles: latent {height}x{width} and tile {tile} must be even")
    ty = plan_tiles(height // 2, tile // 2, -(-overlap // 2))
    tx = plan_tiles(width // 2, tile // 2, -(-overlap // 2))
    starts = tuple((2 * y, 2 * x) for y in ty.starts for x in tx.starts)
    return LatentTiles(height, width, (2 * ty.size, 2 * tx.size), starts)


def tile_conditioning(cond: sampling.Conditioning, batch: int, size: tuple[int, int]) -> sampling.Conditioning:
    """`cond` with image ids for one tile of `size` latent cells (each tile is seen as a whole image)."""
    return dataclasses.replace(cond, img_ids=sampling.img_ids(batch, *size))


def tiled_denoise(velocity, params, noise: Array, lq: Array, cond: sampling.Conditioning, timesteps,
                  tiles: LatentTiles, sigma: float) -> Array:
    """Euler-integrate an unpacked latent [B, H, W, C] with per-step Gaussian-blended tile velocities.

    `lq`: the LQ latent [B, H, W, C] (cropped per tile into `cond.extra["lq"]`, packed);
    `cond`: text/guidance conditioning (its img_ids are replaced per tile). Returns [B, H, W, C].
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    b, h, w, c = noise.shape
    th, tw = tiles.size
    weight = jnp.asarray(tiles.weights(sigma))[None, :, :, None]
    inv_cover = jnp.asarray(1.0 / tiles.coverage(sigma))[None, :, :, None]
    starts = jnp.asarray(np.array(tiles.starts, np.int32).reshape(-1, 2))
    base_cond = tile_conditioning(cond, b, (th, tw))

    def tile_velocity(z, t, y0, x0):
        crop = lambda a: jax.lax.dynamic_slice(a, (0, y0, x0, 0), (b, th, tw, c))  # noqa: E731
        extra = dict(base_cond.extra or {}, lq=sampling.pack(crop(lq)))
        v = velocity(params, sampling.pack(crop(z)), t, dataclasses.replace(base_cond, extra=extra))
        return sampling.unpack(v.astype(jnp.float32), th, tw)

    def step(i, z):
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        t = jnp.full((b,), t_cur, jnp.float32)

        def add_tile(acc, start):
            y0, x0 = start[0], start[1]
            v = tile_velocity(z, t, y0, x0) * weight
            here = jax.lax.dynamic_slice(acc, (0, y0, x0, 0), (b, th, tw, c))
            return jax.lax.dynamic_update_slice(acc, here + v, (0, y0, x0, 0)), None

        acc, _ = jax.lax.scan(add_tile, jnp.zeros_like(z), starts)
        return z + (t_next - t_cur) * (acc * inv_cover)

    return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise.astype(jnp.float32))
