"""Softmax attention kernels for the FLUX blocks: XLA, Pallas splash (TPU), cuDNN (NVIDIA GPU).

FLUX attention is full (no mask, no causality) over the joint [txt; img] sequence, after RoPE
has rotated q and k (that happens in `layers.attention`, before this module). Inputs are
[B, L, H, D] and so is the output, or [B, H, L, D] with `heads_first=True` (what the FLUX blocks
pass: splash takes that layout as it is; the XLA and cuDNN paths swap the axes around
`jax.nn.dot_product_attention`, which XLA can fold into its einsums; on cuDNN this is unmeasured).

kinds (`FluxConfig.attention`):
  xla     `jax.nn.dot_product_attention` lowered by XLA; runs everywhere.
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) under
          `shard_map` over the current mesh: batch over the (`data`, `fsdp`) axes (a batch they
          do not divide, e.g. 4 val images on 8 chips, is padded with zero examples that are cut
          off again), heads over `tensor`; without a mesh it runs unsharded. Compiled for TPU; on CPU it runs in Pallas
          interpret mode (slow; for tests). The sequence is padded to a multiple of 128 and the
          padding is masked with segment ids (real queries see only real keys); the block sizes
          are the largest multiples of 128 not above the configured ones that divide the
          padded length, so padding never exceeds 127 tokens.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: NVIDIA GPUs, bfloat16/float16.
  auto    splash on TPU, cudnn on GPU (xla when the dtype is float32), xla elsewhere.

The backend is the platform of the mesh set by the caller (`jax.set_mesh(mesh)` or the older
`with mesh:`), else JAX's default backend, so compiling for a TPU topology from a CPU machine
selects the real TPU kernel. A kernel the backend cannot run raises `UserError`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fluxir_jax.errors import UserError

ATTENTION_KINDS = ("xla", "splash", "cudnn", "auto")
LANES = 128  # splash blocks are multiples of the TPU lane width
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which kernel, and the splash tile sizes (forward and backward use the same ones)."""

    kind: str = "xla"
    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention {self.kind!r} is not one of {ATTENTION_KINDS}")
        for name in ("block_q", "block_kv", "block_kv_compute"):
            value = getattr(self, name)
            if value < LANES or value % LANES:
                raise ValueError(f"splash {name} must be a positive multiple of {LANES}, got {value}")
        if self.block_kv % self.block_kv_compute:
            raise ValueError(f"splash block_kv {self.block_kv} must be a multiple of block_kv_compute {self.block_kv_compute}")


# ----------------------------------------------------------------------------- context


def current_mesh():
    """The mesh the caller set (`jax.set_mesh` or `with mesh:`), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh
    try:  # `with mesh:` (deprecated) sets only the physical mesh context
        from jax._src import mesh as mesh_lib

        physical = mesh_lib.thread_resources.env.physical_mesh
    except (ImportError, AttributeError):
        return None
    return None if physical.empty else physical


def mesh_platform(mesh) -> str:
    """'tpu', 'gpu', 'cpu', ... of the mesh's devices (JAX's default backend without a mesh)."""
    if mesh is None:
        return jax.default_backend()
    device = getattr(mesh.abstract_mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_kind(kind: str, platform: str, dtype) -> str:
    """The concrete kernel for `kind` on `platform`; UserError when that backend cannot run it."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if kind == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and half:
            return "cudnn"
        return "xla"
    if kind == "splash" and platform not in ("tpu", "cpu"):
        raise UserError(f"attention=splash is a TPU kernel (interpret mode on CPU); backend {platform!r} cannot run it "
                        "(use attention=xla, cudnn or auto)")
    if kind == "cudnn":
        if platform != "gpu":
            raise UserError(f"attention=cudnn needs an NVIDIA GPU; backend {platform!r} cannot run it (use attention=xla or auto)")
        if not half:
            raise UserError(f"attention=cudnn needs dtype bfloat16 or float16, got {jnp.dtype(dtype).name} (use attention=xla)")
    return kind


# ----------------------------------------------------------------------------- entry point


def dot_product_attention(q, k, v, spec: AttentionSpec | None = None, heads_first: bool = False):
    """Full softmax attention, q/k/v [B, L, H, D] -> [B, L, H, D] ([B, H, L, D] -> [B, H, L, D] with
    `heads_first`), with the kernel `spec` names."""
    spec = spec or AttentionSpec()
    kind = spec.kind
    mesh = None
    if kind != "xla":
        mesh = current_mesh()
        kind = resolve_kind(kind, mesh_platform(mesh), q.dtype)
    if kind == "splash":
        return splash_attention(q, k, v, spec, mesh=mesh, interpret=mesh_platform(mesh) != "tpu", heads_first=heads_first)
    swap = (lambda x: jnp.swapaxes(x, 1, 2)) if heads_first else (lambda x: x)
    implementation = "cudnn" if kind == "cudnn" else None
    return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), implementation=implementation))


# ----------------------------------------------------------------------------- splash


def _largest_block(limit: int, length: int) -> int:
    """The largest multiple of LANES <= limit that divides `length` (itself a multiple of LANES)."""
    for block in range(min(limit, length), 0, -LANES):
        if length % block == 0:
            return block
    return LANES


def splash_block_sizes(spec: AttentionSpec, padded_len: int):
    """Splash `BlockSizes` for a padded sequence length (a multiple of 128)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import BlockSizes

    bq = _largest_block(spec.block_q, padded_len)
    bkv = _largest_block(spec.block_kv, padded_len)
    bkv_c = _largest_block(min(spec.block_kv_compute, bkv), bkv)
    return BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv_c,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv_c,
        block_q_dq=bq, block_kv_dq=bkv,
    )


def _splash_local(q, k, v, spec: AttentionSpec, interpret: bool):
    """Splash on local arrays [b, H, L, D] (no mesh axes inside)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, heads, length, head_dim = q.shape
    padded = -(-length // LANES) * LANES
    if padded != length:
        pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    segment = jnp.asarray(np.arange(padded) >= length, jnp.int32)  # 0 real, 1 padding
    segment_ids = splash.SegmentIds(q=segment, kv=segment)
    mask = splash.MultiHeadMask([splash.FullMask((padded, padded)) for _ in range(heads)])
    kernel = splash.make_splash_mha(
        mask, block_sizes=splash_block_sizes(spec, padded), head_shards=1, q_seq_shards=1, interpret=interpret
    )
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale the logits
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)
    return out[:, :, :length]


def mesh_batch_axes(mesh) -> tuple[tuple[str, ...], int]:
    """(the mesh's batch axes of size > 1, how many shards they split the batch into)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    return axes, math.prod(sizes[a] for a in axes)


def _mesh_specs(mesh, heads: int):
    """(PartitionSpec for [B, H, L, D], how many shards the batch is split into): batch over
    data/fsdp, heads over tensor."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes, shards = mesh_batch_axes(mesh)
    head_axis = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 else None
    if head_axis and heads % sizes[head_axis]:
        raise UserError(f"attention=splash: {heads} heads are not divisible by the mesh's tensor size {sizes[head_axis]}")
    return P(batch_axes or None, head_axis, None, None), shards


def splash_attention(q, k, v, spec: AttentionSpec, *, mesh=None, interpret: bool = False, heads_first: bool = False):
    """Splash attention for q/k/v [B, L, H, D] -> [B, L, H, D] ([B, H, L, D] in and out with
    `heads_first`), sharded over `mesh` when given."""
    if not heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]

    def local(q, k, v):
        return _splash_local(q, k, v, spec, interpret)

    if mesh is None:
        out = local(q, k, v)
    else:
        pspec, n_batch = _mesh_specs(mesh, q.shape[1])
        batch = q.shape[0]
        extra = -batch % n_batch  # e.g. 4 val images on 8 chips: zero examples fill the shards, then are cut off
        if extra:
            q, k, v = (jnp.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0))) for x in (q, k, v))
        out = jax.shard_map(local, mesh=mesh, in_specs=(pspec, pspec, pspec), out_specs=pspec, check_vma=False)(q, k, v)
        out = out[:batch]
    return out if heads_first else jnp.swapaxes(out, 1, 2)
