"""Batched inference engine: one per-example program run over every local device.

    engine = Engine(params, parallel="auto", batch_per_device=2)
    out = engine.run(program, {"lq": lq, "seed": seeds})    # numpy in, numpy out, any N

`program(params, batch) -> outputs` is a pure function of the model parameters and a batch
(pytrees of arrays with a leading batch axis). It must treat examples independently (noise
from per-example seeds, `sampling.get_noise`): then a result does not depend on the mode, the
batch size or the device count. Two modes:

    pmap     every device holds a full replica of `params`; `jax.pmap` maps the program over
             a per-device batch [devices, batch_per_device, ...]. Fastest when a replica fits.
    sharded  one `jax.jit` over a mesh (axes data, fsdp, tensor) of the local devices: the
             parameters are sharded by the project's one rules table (`parallel.PARAM_RULES` /
             `LOGICAL_RULES`, as in training: `embed` over fsdp, `mlp` / `heads` over tensor,
             never the scanned layer axis), the batch over (data, fsdp). For models that do not
             fit one device. With `gather_weights` (the default) each weight is all-gathered
             whole before use (`models/weight_gather.py`: the blocks one at a time inside the
             layer scan, the rest at the start of the program), so no contraction is split
             over devices: the bytes are pmap's, for any mesh. Off: the partitioner may split
             contractions over fsdp and sum partial products in another order (last-bit
             differences), with less gathered memory.
    auto     pmap when one replica of `params` takes at most `replica_fraction` of a device's
             memory (devices that report no memory limit, e.g. CPU, count as fitting), else
             sharded.

A batch that does not fill the global batch is padded by repeating its last example, and the
padding is dropped from the outputs. Compiled programs are cached per program and input
shapes, so a caller that keeps one program object per input shape (a "bucket") compiles each
once. Multi-host: the engine uses `jax.local_devices()` only; each host runs its own slice
of the work (see `host_slice`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fluxir_jax import libtpu_env
from fluxir_jax.errors import UserError
from fluxir_jax.models.weight_gather import gather_unscanned, gathering
from fluxir_jax.parallel import rule_from_state, state_shardings

PARALLEL_MODES = ("auto", "pmap", "sharded")
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the (data, fsdp, tensor) mesh of `parallel=sharded`; one -1 takes the remaining devices.

    data           batch-only axis (weights replicated across it)
    fsdp           weights' largest dimension sharded over it; the batch too
    tensor         weights' second-largest dimension sharded over it
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise UserError(f"mesh {dataclasses.asdict(self)}: sizes must be positive, at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise UserError(f"mesh {dataclasses.asdict(self)} does not divide {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise UserError(f"mesh {dataclasses.asdict(self)} needs {math.prod(sizes)} devices, {n_devices} are used")
        return tuple(sizes)


def host_slice(items: list, process_index: int | None = None, process_count: int | None = None) -> list:
    """This host's share of a sorted work list: every process_count-th item from process_index."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    return items[i::n]


def tree_nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_memory(device) -> int | None:
    """Bytes a device can hold, or None when it does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return None if not stats else stats.get("bytes_limit")


class Engine:
    """Holds the parameters placed for one parallel mode and runs programs over batches.

    `params` may be concrete (placed at once) or abstract (`jax.ShapeDtypeStruct` leaves, e.g.
    from `nnx.eval_shape`): then the mode and shardings are decided from shapes alone, loaders
    read each parameter straight to where `load_sharding` says (a host buffer for pmap, its
    shard of the mesh for sharded), and `place` finishes the placement. This keeps a large
    model from ever being staged whole on one device.
    """

    def __init__(self, params, *, parallel: str = "auto", devices: int = 0, batch_per_device: int = 1,
                 mesh: MeshShape = MeshShape(), replica_fraction: float = 0.6, gather_weights: bool = True):
        if parallel not in PARALLEL_MODES:
            raise UserError(f"parallel={parallel!r} is not one of {', '.join(PARALLEL_MODES)}")
        if batch_per_device < 1:
            raise UserError(f"batch_size={batch_per_device} must be >= 1")
        local = jax.local_devices()
        if devices < 0 or devices > len(local):
            raise UserError(f"devices={devices}: this host has {len(local)} local devices (0 = all)")
        self.devices = local[:devices] if devices else local
        self.batch_per_device = batch_per_device
        self.replica_bytes = tree_nbytes(params)
        if parallel == "auto":
            limit = device_memory(self.devices[0])
            parallel = "pmap" if limit is None or self.replica_bytes <= replica_fraction * limit else "sharded"
        self.mode = parallel
        self.gather_weights = gather_weights and parallel == "sharded"
        n = len(self.devices)
        self.params = None
        if self.mode == "pmap":
            self._mesh = Mesh(np.array(self.devices), ("replica",))
            self.global_batch = n * batch_per_device
        else:
            self._sizes = mesh.resolve(n)
            self._mesh = Mesh(np.array(self.devices).reshape(self._sizes), MESH_AXES)
            self._abstract = params  # the parameters' logical axes live in their nnx metadata
            self._param_shardings = state_shardings(params, self._mesh)
            self._batch_sharding = NamedSharding(self._mesh, PartitionSpec(("data", "fsdp")))
            self.global_batch = self._sizes[0] * self._sizes[1] * batch_per_device
        self._compiled: dict[Callable, Callable] = {}
        if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            self.place(params)

    def load_sharding(self, prefix: str) -> Callable[[tuple, tuple], Any]:
        """Where a checkpoint loader should put each parameter of `params[prefix]`: `(path, shape) -> Sharding`.

        pmap: host memory (replicated onto the devices by `place`); sharded: its final shard.
        """
        if self.mode == "pmap":
            host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            return lambda path, shape: host
        return rule_from_state(self._abstract[prefix], self._mesh)

    def place(self, params) -> None:
        """Put concrete `params` (same structure as at construction) where the mode needs them."""
        if self.mode == "pmap":
            self.params = jax.tree.map(self._replicate, params)
        else:
            self.params = jax.device_put(params, self._param_shardings)

    def _replicate(self, x):
        """A [devices, ...] array holding one copy of `x` per device (no host-side stacking)."""
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x[None], d) for d in self.devices]
        return jax.make_array_from_single_device_arrays((len(self.devices), *x.shape),
                                                        NamedSharding(self._mesh, PartitionSpec("replica")), shards)

    def _program(self, program: Callable) -> Callable:
        fn = self._compiled.get(program)
        if fn is None:
            if self.mode == "pmap":
                fn = jax.pmap(program, in_axes=(0, 0), devices=self.devices)
            else:
                run = (lambda params, batch: program(gather_unscanned(params), batch)) if self.gather_weights else program
                fn = jax.jit(run, in_shardings=(self._param_shardings, self._batch_sharding),
                             out_shardings=self._batch_sharding,
                             compiler_options=libtpu_env.mesh_compiler_options(self._mesh))
            self._compiled[program] = fn
        return fn

    def run(self, program: Callable, batch) -> Any:
        if self.params is None:
            raise RuntimeError("Engine.run before Engine.place")
        return self._run(program, batch)

    def _run(self, program: Callable, batch) -> Any:
        """Run `program` over `batch` (numpy pytree, leading axis N >= 1) in global batches; numpy out."""
        leaves = jax.tree.leaves(batch)
        n = leaves[0].shape[0]
        if any(x.shape[0] != n for x in leaves):
            raise ValueError("Engine.run: every batch leaf needs the same leading size")
        outs = []
        for start in range(0, n, self.global_batch):
            chunk = jax.tree.map(lambda x: np.asarray(x[start:start + self.global_batch]), batch)
            outs.append(self._run_global(program, chunk))
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)

    def _run_global(self, program: Callable, chunk) -> Any:
        g = self.global_batch
        k = jax.tree.leaves(chunk)[0].shape[0]
        if k < g:  # pad by repeating the last example; dropped below
            chunk = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], g - k, axis=0)], axis=0), chunk)
        fn = self._program(program)
        if self.mode == "pmap":
            d = len(self.devices)
            chunk = jax.tree.map(lambda x: x.reshape(d, g // d, *x.shape[1:]), chunk)
            out = fn(self.params, chunk)
            out = jax.tree.map(lambda x: np.asarray(x).reshape(g, *x.shape[2:]), out)
        else:
            with gathering(self._mesh if self.gather_weights else None):
                out = fn(self.params, jax.device_put(chunk, self._batch_sharding))
            out = jax.tree.map(np.asarray, out)
        return jax.tree.map(lambda x: x[:k], out)
