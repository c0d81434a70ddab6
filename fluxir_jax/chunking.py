"""On-disk chunk shapes of checkpoint parameters, from the sharding rules of `fluxir_jax.parallel`.

A host restoring a parameter into an FSDP / tensor-parallel sharding reads the zarr chunks that
overlap its devices' shards. With one chunk per layer (the old layout) every host read every
layer whole. Here the dimensions the rules shard are split too:

* the leading `layers` axis of a stacked (scanned) block parameter: one chunk per layer
  (the rules never shard it; restoring the first N blocks reads only those);
* a dimension whose logical axis `LOGICAL_RULES` maps to a mesh axis (`embed` -> fsdp,
  `mlp` / `heads` -> tensor): split into the largest power of two <= `MAX_SPLIT[mesh axis]`
  (16 for fsdp, 8 for tensor) that divides it, each mesh axis on the first such dimension only
  (as `parallel.spec_for` uses it);
* every other dimension whole.

So a mesh whose fsdp (tensor) size is a power of two up to the split count of a dimension
(16 and 8 for every FLUX.1 weight: hidden 3072, MLP widths 9216..21504) gives each device
whole chunks, and a host reads exactly its shards. Larger axes read at most a chunk, i.e.
a few shards, more. Leaves under `MIN_SPLIT_BYTES` per layer (biases, norms, tiny models)
stay one chunk per layer: reading them whole costs nothing, and splitting them would only
multiply small OCDBT values.

Writing cost (bench/convert_memory.py's machinery on the 1.3 GB mid-size config of
tests/convert/test_memory.py, 2-core shared VM, two rounds): peak RSS above baseline 313 / 292 MiB
with this layout vs 342 / 297 MiB with one chunk per layer; CPU time 8.6 / 9.6 s vs 7.6 / 8.3 s.

TensorStore reads any chunking, so checkpoints written with the old one-chunk-per-layer
layout still load (`layer_chunks` gives that layout).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from fluxir_jax.parallel import LOGICAL_RULES, logical_axes

MAX_SPLIT: dict[str, int] = {"fsdp": 16, "tensor": 8}
MIN_SPLIT_BYTES = 2**20


def layer_chunks(shape: Sequence[int], stacked: bool) -> tuple[int, ...]:
    """The old layout: one chunk per layer of a stacked parameter, else the whole array."""
    shape = tuple(int(s) for s in shape)
    return ((1,) + shape[1:]) if stacked and shape else shape


def _largest_pow2_divisor(n: int, limit: int) -> int:
    p = 1
    while p * 2 <= limit and n % (p * 2) == 0:
        p *= 2
    return p


def split_counts(shape: Sequence[int], axes: Sequence[Any] | None,
                 max_split: Mapping[str, int] = MAX_SPLIT) -> tuple[int, ...]:
    """How many chunks each dimension is split into (before the layer axis and size rules)."""
    counts = [1] * len(shape)
    if not axes or len(axes) != len(shape):
        return tuple(counts)
    used: set[str] = set()
    for d, (dim, ax) in enumerate(zip(shape, axes)):
        target = LOGICAL_RULES.get(ax) if ax is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = [n for n in names if n in max_split and n not in used]
        if not names:
            continue
        p = _largest_pow2_divisor(int(dim), math.prod(max_split[n] for n in names))
        if p > 1:
            counts[d] = p
            used.update(names)
    return tuple(counts)


def chunk_shape(shape: Sequence[int], itemsize: int, axes: Sequence[Any] | None, stacked: bool, *,
                max_split: Mapping[str, int] = MAX_SPLIT, min_bytes: int | None = None) -> tuple[int, ...]:
    """The zarr chunk shape of a parameter of `shape` with logical `axes` (see the module docstring).

    `min_bytes`: leaves smaller than this per layer stay whole (default `MIN_SPLIT_BYTES`).
    """
    base = layer_chunks(shape, stacked)
    if math.prod(base) * itemsize < (MIN_SPLIT_BYTES if min_bytes is None else min_bytes):
        return base
    counts = split_counts(shape, axes, max_split)
    if stacked and counts:
        counts = (1,) + counts[1:]
    return tuple(b // c for b, c in zip(base, counts))


def model_axes(model) -> dict[tuple[str, ...], tuple]:
    """{Param path (strings): logical axes} of an (abstract) NNX model, from `parallel.PARAM_RULES`."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        meta = var.get_metadata() if isinstance(var, nnx.Variable) else None
        out[tuple(str(p) for p in path)] = logical_axes(path, tuple(var.shape), meta)
    return out


def aligned(index: Sequence[slice], shape: Sequence[int], chunks: Sequence[int]) -> bool:
    """Whether the region `index` (slices, e.g. a device's shard) is made of whole chunks."""
    for sl, dim, c in zip(index, shape, chunks):
        start, stop, _ = sl.indices(int(dim))
        if start % c or (stop % c and stop != dim):
            return False
    return True
