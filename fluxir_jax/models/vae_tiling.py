"""Tiled VAE passes: tile plans, blending weights, conv reach, and whole-image GroupNorm statistics.

`fluxir_jax.models.autoencoder` splits encode/decode at the latent resolution and runs the part
above it (`Encoder.pixel_part`, `Decoder.pixel_part`) tile by tile through `run_tiled`: windows
of a tile plus a halo as wide as the convolutions' reach, inside one `lax.scan`, blended with
linear ramps in the overlaps. Every GroupNorm of a tiled pass is applied through a `NormFn`
hook, which lets `run_tiled` gather whole-image statistics in statistics passes before the
output pass (see `run_tiled`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class AutoEncoderShape(Protocol):
    """What the reach computations read of an `autoencoder.AutoEncoderConfig` (this module does
    not import `autoencoder`, which imports it)."""

    ch_mult: Sequence[int]
    num_res_blocks: int
    downsample_factor: int


class GroupNorm(Protocol):
    """What a tiled pass calls on an `autoencoder.GroupNorm`."""

    def moments(self, x: Array, *masks: Array) -> tuple[Array, Array, Array]: ...

    def normalize(self, x: Array, mean: Array, var: Array) -> Array: ...


NormFn = Callable[[Any, Array], Array]  # norm(gn: GroupNorm, x) -> normalised x; how a tiled pass applies each GroupNorm


@dataclasses.dataclass(frozen=True)
class TileAxis:
    """Tiles along one axis, in latent cells: equal `size`, `starts` spread evenly over `length`."""

    length: int
    size: int
    starts: tuple[int, ...]

    def blend_weights(self, unit: int) -> np.ndarray:
        """Per-tile weights `[n, size*unit]` (float32) for `unit` output samples per cell.

        Each tile ramps linearly up/down across its overlap with each neighbour; weights are
        normalised so that, placed at their starts, they sum to one at every position.
        """
        n, size = len(self.starts), self.size * unit
        pos = np.arange(size) + 0.5
        weights = np.ones((n, size))
        for i, s in enumerate(self.starts):
            if i > 0:
                ov = (self.starts[i - 1] + self.size - s) * unit
                weights[i] = np.minimum(weights[i], np.clip(pos / max(ov, 1), 0, 1))
            if i < n - 1:
                ov = (s + self.size - self.starts[i + 1]) * unit
                weights[i] = np.minimum(weights[i], np.clip((size - pos) / max(ov, 1), 0, 1))
        total = np.zeros(self.length * unit)
        for s, w in zip(self.starts, weights):
            total[s * unit:s * unit + size] += w
        return np.stack([w / total[s * unit:s * unit + size] for s, w in zip(self.starts, weights)]
                        ).astype(np.float32)

    def windows(self, halo: int) -> tuple[int, tuple[int, ...]]:
        """Window size and starts: each tile widened by `halo` cells per side, kept inside the axis."""
        size = min(self.size + 2 * halo, self.length)
        return size, tuple(min(max(s - halo, 0), self.length - size) for s in self.starts)

    def cores(self) -> tuple[tuple[int, int], ...]:
        """A partition of the axis into one `[lo, hi)` per tile, cut at the middle of each overlap."""
        n = len(self.starts)
        cuts = [(self.starts[i - 1] + self.size + self.starts[i]) // 2 for i in range(1, n)]
        cuts = [0] + cuts + [self.length]
        return tuple(zip(cuts[:-1], cuts[1:]))


def plan_tiles(length: int, tile: int, overlap: int) -> TileAxis:
    """Cover `[0, length)` with the fewest equal tiles of size <= `tile` overlapping by >= `overlap`."""
    if length <= tile:
        return TileAxis(length, length, (0,))
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)
    starts = tuple(round(i * (length - size) / (n - 1)) for i in range(n))
    return TileAxis(length, size, starts)


def decoder_reach(cfg: AutoEncoderShape) -> int:
    """Latent cells of input on each side that an output pixel of `Decoder.pixel_part` reads.

    Walks the path backwards from conv_out: each 3x3 conv adds one pixel at its resolution, each
    nearest-neighbour x2 halves the reach (rounding up).
    """
    reach = 1  # conv_out, in pixels at the finest resolution
    for _ in range(len(cfg.ch_mult) - 1):  # the levels above the latent resolution, finest first
        reach += 2 * (cfg.num_res_blocks + 1)
        reach = -(-(reach + 1) // 2)  # the upsample conv into this level, then back through the x2
    return reach


def encoder_reach(cfg: AutoEncoderShape) -> int:
    """Image context (latent cells, rounded up) on each side that a cell of `Encoder.pixel_part`
    reads: each 3x3 conv adds one pixel, each stride-2 conv on a right/bottom-padded input maps a
    reach of r pixels to 2r + 1 finer ones."""
    reach = 0
    for _ in range(len(cfg.ch_mult) - 1):  # the levels above the latent resolution, coarsest first
        reach = 2 * reach + 1 + 2 * cfg.num_res_blocks
    reach += 1  # conv_in
    return -(-reach // cfg.downsample_factor)


class _TileNorm:
    """GroupNorm hook for one tile window of a tiled pass with whole-image statistics.

    For the activation `x` of the k-th GroupNorm of the pass, each call records its moments over
    the tile's core (the tile's share of a partition of the image, so that summed over the tiles
    every position counts once) and over the whole window (the window's own statistics), then
    normalises `x` with
      `corrected=False`: the given whole-image statistics, `mean = shift[k]`, `var = scale[k]`;
      `corrected=True`: the window's own statistics corrected by the offset between whole-image
                        and own statistics that this tile showed in the previous pass,
                        `mean = own_mean + shift[k]`, `var + eps = (own_var + eps) * scale[k]`
                        (shift 0 and scale 1 in the first pass: the window's own statistics).
    """

    def __init__(self, cells: tuple[int, int], core_y: tuple[Array, Array], core_x: tuple[Array, Array],
                 shift: list[Array], scale: list[Array], corrected: bool):
        self.cells, self.core_y, self.core_x = cells, core_y, core_x
        self.shift, self.scale, self.corrected = shift, scale, corrected
        self.moments: list[tuple[Array, Array, Array]] = []  # core (count, mean, m2) per GroupNorm
        self.own: list[tuple[Array, Array]] = []  # window (mean, var) per GroupNorm

    def __call__(self, gn: GroupNorm, x: Array) -> Array:
        k = len(self.moments)
        masks = []
        for axis, (lo, hi) in ((1, self.core_y), (2, self.core_x)):
            unit = x.shape[axis] // self.cells[axis - 1]  # samples per latent cell at this resolution
            pos = jnp.arange(x.shape[axis])
            masks.append((pos >= lo * unit) & (pos < hi * unit))
        self.moments.append(gn.moments(x, *masks))
        if not self.corrected:
            return gn.normalize(x, self.shift[k], self.scale[k])
        count, own_mean, own_m2 = gn.moments(x)
        own_var = own_m2 / count
        self.own.append((own_mean, own_var))
        return gn.normalize(x, own_mean + self.shift[k], (own_var + gn.eps) * self.scale[k] - gn.eps)


def _combine(a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    """Merge `(count, mean, m2)` moments of two disjoint sets (Chan et al.); `a` may be empty."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    d = mb - ma
    return n, ma + d * (nb / n), sa + sb + jnp.square(d) * (na * nb / n)


def run_tiled(fn: Callable[[Array, NormFn | None], Array], x: Array, ty: TileAxis, tx: TileAxis,
              in_unit: int, out_unit: int, *, halo: int = 0, stat_passes: int | None = None) -> Array:
    """Apply `fn` tile by tile (`lax.scan` over tiles) and blend the outputs.

    `x`: `b (ly*in_unit) (lx*in_unit) c`, `ly lx` in cells; returns `b (ly*out_unit)
    (lx*out_unit) c'` in float32. `fn(piece, norm)` maps a window `b (wy*in_unit) (wx*in_unit) c`
    to `b (wy*out_unit) (wx*out_unit) c'` and applies each of its GroupNorms `gn` to an
    activation `a` as `norm(gn, a)` (`gn(a)` when `norm` is None).

    Each tile is read as a window with `halo` extra cells of context per side (windows are kept
    inside the input, so edge tiles take their context from the inside) and the window's output
    is cropped back to the tile: with `halo` >= the reach of `fn`, a tile's output equals `fn` on
    the whole input wherever the normalisation agrees.

    `stat_passes=None`: `fn` runs with `norm=None` (GroupNorm over each window, one pass).
    `stat_passes=P`: P statistics passes, then the output pass normalising every GroupNorm with
    the whole-image statistics the last statistics pass gathered over the tile cores. The first
    pass normalises with each window's own statistics; each later one with the window's own
    statistics corrected by the (whole-image - own) offset the tile showed in the pass before
    (see `_TileNorm`). After p passes the first p GroupNorms' statistics are exact; the error of
    the rest shrinks quickly (the offsets vary far less between passes than the statistics do).
    P = 0: the output pass uses each window's own statistics.
    """
    b, c = x.shape[0], x.shape[-1]
    (win_y, wsy), (win_x, wsx) = ty.windows(halo), tx.windows(halo)
    win_in = jax.ShapeDtypeStruct((b, win_y * in_unit, win_x * in_unit, c), x.dtype)
    groups: list[int] = []  # per GroupNorm of a pass, in call order: group count and eps
    eps: list[float] = []

    def counting(gn, a):
        groups.append(gn.groups)
        eps.append(gn.eps)
        return gn(a)

    c_out = jax.eval_shape(lambda p: fn(p, None if stat_passes is None else counting), win_in).shape[-1]
    wy, wx = jnp.asarray(ty.blend_weights(out_unit)), jnp.asarray(tx.blend_weights(out_unit))
    iy, ix = (jnp.asarray(a.ravel()) for a in np.meshgrid(np.arange(len(ty.starts)),
                                                          np.arange(len(tx.starts)), indexing="ij"))
    n_tiles = len(ty.starts) * len(tx.starts)
    sy, sx = jnp.asarray(wsy, jnp.int32), jnp.asarray(wsx, jnp.int32)  # window starts (cells)
    oy = jnp.asarray(np.subtract(ty.starts, wsy), jnp.int32)  # tile start inside its window
    ox = jnp.asarray(np.subtract(tx.starts, wsx), jnp.int32)
    cy = jnp.asarray(np.subtract(ty.cores(), np.asarray(wsy)[:, None]), jnp.int32)  # core inside window
    cx = jnp.asarray(np.subtract(tx.cores(), np.asarray(wsx)[:, None]), jnp.int32)
    tile_out = (b, ty.size * out_unit, tx.size * out_unit, c_out)

    def one_pass(shift, scale, corrected: bool, output: bool):
        def body(carry, xs):
            acc, moments = carry
            i, j, tile_shift, tile_scale = xs
            piece = jax.lax.dynamic_slice(x, (0, sy[i] * in_unit, sx[j] * in_unit, 0), win_in.shape)
            norm = None
            if stat_passes is not None:
                norm = _TileNorm((win_y, win_x), (cy[i, 0], cy[i, 1]), (cx[j, 0], cx[j, 1]),
                                 tile_shift, tile_scale, corrected)
            out = fn(piece, norm)
            if output:
                crop = (0, oy[i] * out_unit, ox[j] * out_unit, 0)
                out = jax.lax.dynamic_slice(out.astype(jnp.float32), crop, tile_out)
                out = out * (wy[i][:, None, None] * wx[j][None, :, None])
                start = (0, (sy[i] + oy[i]) * out_unit, (sx[j] + ox[j]) * out_unit, 0)
                out = out + jax.lax.dynamic_slice(acc, start, out.shape)
                return (jax.lax.dynamic_update_slice(acc, out, start), moments), []
            return (acc, [_combine(m, t) for m, t in zip(moments, norm.moments)]), norm.own

        acc = None
        if output:
            acc = jnp.zeros((b, ty.length * out_unit, tx.length * out_unit, c_out), jnp.float32)
        empty = [] if output else [tuple(jnp.zeros((b, g), jnp.float32) for _ in range(3)) for g in groups]
        (acc, moments), own = jax.lax.scan(body, (acc, empty), (iy, ix, shift, scale))
        return acc, [(m, m2 / n) for n, m, m2 in moments], own

    if stat_passes is None:
        return one_pass([], [], False, True)[0]

    def stats_pass(_, carry):
        shift, scale, _ = carry
        _, whole, own = one_pass(shift, scale, True, False)
        shift = [m[None] - om for (m, _), (om, _) in zip(whole, own)]
        scale = [(v[None] + e) / (ov + e) for (_, v), (_, ov), e in zip(whole, own, eps)]
        return shift, scale, whole

    shift = [jnp.zeros((n_tiles, b, g), jnp.float32) for g in groups]  # first pass: windows' own stats
    scale = [jnp.ones((n_tiles, b, g), jnp.float32) for g in groups]
    if stat_passes == 0:
        return one_pass(shift, scale, True, True)[0]
    whole = [(jnp.zeros((b, g), jnp.float32), jnp.ones((b, g), jnp.float32)) for g in groups]
    whole = jax.lax.fori_loop(0, stat_passes, stats_pass, (shift, scale, whole))[2]
    shift = [jnp.broadcast_to(m, (n_tiles,) + m.shape) for m, _ in whole]
    scale = [jnp.broadcast_to(v, (n_tiles,) + v.shape) for _, v in whole]
    return one_pass(shift, scale, False, True)[0]
