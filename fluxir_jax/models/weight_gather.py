"""Weight gathering for sharded inference: parameters stored FSDP-sharded, used whole (ZeRO-3).

With the parameters sharded over the mesh's `fsdp` axis, the partitioner would otherwise split
each matmul's contraction over the devices and add the partial products across them: a
different summation order from a device holding the whole weight, so sharded inference would
differ from `pmap` (and from another fsdp size) in the last bit, and images by one level here
and there. Under `gathering(mesh)` instead

    - `infer.Engine` all-gathers every parameter outside the scanned stacks at the start of
      the program (embedders, final layer, the adapter, the VAE: together less than one block);
    - `Flux` all-gathers each scanned block's slice of `double_blocks` / `single_blocks` inside
      the layer scan, just before the block runs (`gather`),

so every contraction runs whole on each device (the per-device program is pmap's: identical
bytes) while a device holds its shard of the stored parameters plus one block's full weights
at a time. The setting is a `jax.jit` cache key (`jax.make_user_context`): a program traced
with and without it compiles twice, never mixes. Training does not set it (its gradients are
reduce-scattered over the same axis either way).
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

WEIGHT_GATHER = jax.make_user_context(None)  # the Mesh to gather over, or None (off)
SCANNED = ("double_blocks", "single_blocks")  # Flux's stacked blocks, gathered layer by layer in the scan


def gathering(mesh):
    """Context manager: trace (and run) programs with weights gathered over `mesh` (None: off)."""
    return WEIGHT_GATHER(mesh)


def active() -> bool:
    """Whether programs are being traced with weights gathered (`gathering(mesh)` with a mesh)."""
    return WEIGHT_GATHER.value is not None


def gather(tree):
    """`tree` constrained to be replicated over the gathering mesh (an all-gather); unchanged when off."""
    mesh = WEIGHT_GATHER.value
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def gather_unscanned(params):
    """`gather` on every leaf of `params` outside the scanned stacks (`SCANNED`), which stay sharded."""
    if WEIGHT_GATHER.value is None:
        return params

    def one(path, x):
        names = {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
        return x if names & set(SCANNED) else gather(x)

    return jax.tree_util.tree_map_with_path(one, params)
