"""The device mesh, the one sharding-rules table, and global batches.

Mesh axes (always all three, sizes from `MeshConfig`; one size may be -1 to fill):

    data     pure data parallelism (times `dcn_data`, the slices of a multi-slice TPU job)
    fsdp     data parallelism whose replicas also shard the weights (ZeRO-3 / FSDP)
    tensor   tensor parallelism (splits the MLP / attention-head dimension)

Parameters get *logical* axis names (`embed`, `mlp`, `layers`, ...), which `LOGICAL_RULES`
maps to mesh axes. The names come from `PARAM_RULES` (regex on the parameter path, first match
wins, as big_vision does); a rule whose axes are `META` takes the `logical_axes` metadata the
parameter was created with (`models.layers.linear` attaches it), with a leading `layers` axis
for stacked (scanned) blocks. FSDP shards a weight dimension (`embed`), never the scanned
`layers` axis: a scan over a layer-sharded stack would all-gather the whole stack.

A mesh axis is dropped from a dimension it does not divide (the dimension is then replicated
over it), so tiny test models and odd widths still work on any mesh.

Activations and batches: the batch dimension is split over (`data`, `fsdp`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from fluxir_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
META = "meta"

# parameter path regex -> logical axes (one name or None per dimension), or META
PARAM_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)se_(img|txt)/(down|up)/kernel$", ("layers", "embed", "mlp")),
    (r"(^|/)se_(img|txt)/(down|up)/bias$", ("layers", "mlp")),
    (r"(^|/)se_(img|txt)/gamma$", ("layers", "embed")),
    (r"(^|/)theta_p$", (None, "embed")),
    (r"(^|/)theta_y$", ("embed",)),
    (r"(^|/)(query_norm|key_norm)/scale$", ()),  # small: replicated
    (r".*", META),
)

# logical axis -> mesh axis (or a tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "layers": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "batch": BATCH_AXES,
}

# frozen weights kept whole on every chip of the fsdp axis (`model.frozen_sharding: replicated`): a
# frozen model has no gradients or optimizer state to shard, so FSDP only saves its bytes, and pays
# an all-gather of every weight in the forward and again in the backward pass of each micro-batch
REPLICATED_OVER_FSDP: dict[str, Any] = {**LOGICAL_RULES, "embed": None}
FROZEN_SHARDINGS: dict[str, dict[str, Any]] = {"fsdp": LOGICAL_RULES, "replicated": REPLICATED_OVER_FSDP}


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; their product (times dcn_data) must equal the device count.

    data, fsdp, tensor   sizes of the mesh axes within a slice; one may be -1 (fill)
    dcn_data             data parallelism across slices (multi-slice TPU); the mesh's `data`
                         axis then has size dcn_data * data
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1


def resolve_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Per-axis sizes within a slice with any -1 filled; UserError naming the field if they do not fit."""
    if cfg.dcn_data < 1 or n_devices % cfg.dcn_data:
        raise UserError(f"mesh.dcn_data={cfg.dcn_data} does not divide the {n_devices} devices")
    per_slice = n_devices // cfg.dcn_data
    sizes = {a: getattr(cfg, a) for a in AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    for a, s in sizes.items():
        if s != -1 and s < 1:
            raise UserError(f"mesh.{a}={s}: sizes must be >= 1 or -1 (fill)")
    if len(fill) > 1:
        raise UserError(f"mesh.{fill[1]}=-1: only one mesh axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if per_slice % known:
            raise UserError(f"mesh.{fill[0]}=-1 cannot fill: the other axes ({known}) do not divide {per_slice} devices")
        sizes[fill[0]] = per_slice // known
    elif known != per_slice:
        desc = " x ".join(f"{a}={sizes[a]}" for a in AXES)
        raise UserError(f"mesh sizes {desc} (x dcn_data={cfg.dcn_data}) = {known * cfg.dcn_data} do not match "
                        f"the {n_devices} devices (mesh.data/fsdp/tensor)")
    return sizes


def num_slices(devices: Sequence[Any]) -> int:
    """How many TPU slices `devices` span (distinct `slice_index`; 1 where devices have none)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def dcn_size(cfg: MeshConfig, devices: Sequence[Any]) -> int:
    """The data-parallel size across slices: `mesh.dcn_data`, or the slice count when it is left at 1."""
    slices = num_slices(devices)
    if slices > 1 and cfg.dcn_data not in (1, slices):
        raise UserError(f"mesh.dcn_data={cfg.dcn_data} does not match the {slices} slices of this job")
    return slices if slices > 1 else cfg.dcn_data


def device_grid(cfg: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as the (`data`, `fsdp`, `tensor`) mesh array.

    With several slices (or `dcn_data > 1`), `data` is split as (dcn, data): the outer factor
    runs across slices (or, without slice indices, across processes) over the data-center
    network, and fsdp / tensor stay inside a slice, where the ICI links are.
    """
    import jax
    from jax.experimental import mesh_utils

    dcn = dcn_size(cfg, devices)
    sizes = resolve_sizes(dataclasses.replace(cfg, dcn_data=dcn), len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if dcn == 1:
        return jax.make_mesh(shape, AXES, devices=devices).devices
    by_process = num_slices(devices) == 1  # no slice indices (GPU, CPU): a process is a granule
    granules = len({d.process_index for d in devices}) if by_process else num_slices(devices)
    if granules != dcn:
        what = "processes" if by_process else "slices"
        raise UserError(f"mesh.dcn_data={dcn} needs one granule per slice, but the devices span {granules} {what}")
    return mesh_utils.create_hybrid_device_mesh(shape, (dcn, 1, 1), devices, process_is_granule=by_process)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None):
    """The (`data`, `fsdp`, `tensor`) mesh over `devices` (default: all devices), Auto axis types.

    A multi-slice job puts the slice axis on the outer part of `data` (see `device_grid`).
    """
    import jax
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(cfg, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_divisor(mesh) -> int:
    """How many shards the batch dimension is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------- parameter rules


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def logical_axes(path: Sequence[Any], shape: Sequence[int], metadata: Mapping[str, Any] | None = None,
                 rules: Sequence[tuple[str, Any]] = PARAM_RULES) -> tuple:
    """Logical axis names (one per dimension, None = unnamed) of the parameter at `path`."""
    name = path_str(path)
    for pattern, axes in rules:
        if re.search(pattern, name):
            break
    else:
        axes = ()
    if axes == META:
        axes = tuple((metadata or {}).get("logical_axes") or ())
        if axes and len(shape) == len(axes) + 1:
            axes = ("layers",) + axes  # a stacked (scanned) block parameter
    axes = tuple(axes)
    if len(axes) != len(shape):
        return (None,) * len(shape)
    return axes


def spec_for(shape: Sequence[int], axes: Sequence[Any], mesh, logical_rules: Mapping[str, Any] = LOGICAL_RULES):
    """PartitionSpec for `shape` with logical `axes`; a mesh axis that does not divide its dim is dropped."""
    from jax.sharding import PartitionSpec

    used: set[str] = set()
    out = []
    for dim, ax in zip(shape, axes):
        target = logical_rules.get(ax) if ax is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        size = math.prod(mesh.shape[n] for n in names) if names else 1
        if not names or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def state_shardings(state, mesh, rules: Sequence[tuple[str, Any]] = PARAM_RULES,
                    logical_rules: Mapping[str, Any] = LOGICAL_RULES):
    """NamedShardings for every leaf of an NNX state (abstract or concrete), from the rules."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    def one(path, var):
        meta = var.get_metadata() if isinstance(var, nnx.Variable) else None
        shape = tuple(var.shape)
        return NamedSharding(mesh, spec_for(shape, logical_axes(path, shape, meta, rules), mesh, logical_rules))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, ndim: int = 1):
    """Batch on the leading axis split over (data, fsdp); other dims replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def rule_from_state(abstract_state, mesh, logical_rules: Mapping[str, Any] = LOGICAL_RULES):
    """A `(path, shape) -> Sharding` rule for `checkpoint.load_flux(..., sharding=)` from an abstract state.

    Checkpoint paths carry no metadata, so the logical names come from the abstract model's
    parameters; the stored model is then restored straight into its FSDP shardings.
    """
    from flax import nnx

    table = {tuple(str(p) for p in path): s for path, s in
             nnx.to_flat_state(state_shardings(abstract_state, mesh, logical_rules=logical_rules))}

    def rule(path, shape):
        del shape
        return table.get(tuple(str(p) for p in path))

    return rule


# ----------------------------------------------------------------------------- state creation


def create_sharded(init_fn, mesh, rules: Sequence[tuple[str, Any]] = PARAM_RULES):
    """Build an NNX module already sharded: abstract init -> shardings -> jit(out_shardings).

    `init_fn()` returns a module; returns (graphdef, state) with every parameter created on its
    shards (nothing is whole on one device first).
    """
    import jax
    from flax import nnx

    abstract = nnx.eval_shape(init_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def make():
        return nnx.split(init_fn())[1]

    state = jax.jit(make, out_shardings=shardings)()
    return graphdef, state


def host_rows(mesh, global_batch: int) -> list[int]:
    """The rows of a global batch (split over `data`, `fsdp`) held by this process's devices, sorted.

    `jax.make_array_from_process_local_data` fills exactly these rows from a process's local
    batch, in this order, so a process that loads the examples of these rows builds a global
    batch whose content does not depend on the number of processes.
    """
    sh = batch_sharding(mesh, 1)
    rows: set[int] = set()
    for idx in sh.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*idx[0].indices(global_batch)))
    return sorted(rows)


def put_global(local: Mapping[str, np.ndarray], mesh) -> dict:
    """Per-process local batch (leading batch axis) -> global jax.Arrays split over (data, fsdp)."""
    import jax

    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}
