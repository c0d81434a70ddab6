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
          `splash_forward` / `splash_backward` run its forward (with the log-sum-exp) and its backward
          kernels apart, for a VJP that keeps q and k before norm and rope (`layers.normed_attention`).
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
    """Which kernel, and the splash tile sizes.

    Splash's backward as two kernels (dq, then dk/dv; `fused_bwd=False`) recomputes the attention
    probabilities in each: 7 matmuls where the forward has 2. `fused_bwd` (the default) computes dq, dk
    and dv in one kernel (5 matmuls). It walks the keys in tiles of `block_kv_bwd` (None: `block_kv`) and writes one partial
    dq per tile in the inputs' dtype, which are then summed: with a tile as long as the sequence
    there is one partial, accumulated in float32 inside the kernel like the two-kernel backward's."""

    kind: str = "xla"
    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512
    fused_bwd: bool = True
    block_kv_bwd: int | None = 4608

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention {self.kind!r} is not one of {ATTENTION_KINDS}")
        for name in ("block_q", "block_kv", "block_kv_compute", "block_kv_bwd"):
            value = getattr(self, name)
            if value is None:  # block_kv_bwd: block_kv
                continue
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


def kernel_and_mesh(spec: AttentionSpec, dtype):
    """(the concrete kernel `spec` asks for on the current backend, the mesh it runs over or None)."""
    if spec.kind == "xla":
        return "xla", None
    mesh = current_mesh()
    return resolve_kind(spec.kind, mesh_platform(mesh), dtype), mesh


def dot_product_attention(q, k, v, spec: AttentionSpec | None = None, heads_first: bool = False):
    """Full softmax attention, q/k/v [B, L, H, D] -> [B, L, H, D] ([B, H, L, D] -> [B, H, L, D] with
    `heads_first`), with the kernel `spec` names."""
    spec = spec or AttentionSpec()
    kind, mesh = kernel_and_mesh(spec, q.dtype)
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
    shared = dict(block_q=bq, block_kv=bkv, block_kv_compute=bkv_c, block_q_dkv=bq)  # forward tiles, backward query tile
    if not spec.fused_bwd:
        return BlockSizes(**shared, block_kv_dkv=bkv, block_kv_dkv_compute=bkv_c, block_q_dq=bq, block_kv_dq=bkv)
    bkv_bwd = _largest_block(spec.block_kv_bwd or spec.block_kv, padded_len)
    return BlockSizes(**shared, block_kv_dkv=bkv_bwd, block_kv_dkv_compute=_largest_block(min(spec.block_kv_compute, bkv_bwd), bkv_bwd),
                      use_fused_bwd_kernel=True)


def _splash_kernel(heads: int, padded: int, spec: AttentionSpec, interpret: bool, save_residuals: bool = False):
    """A splash kernel for one example [H, padded, D] (full mask; `save_residuals`: it returns (out, (lse,)))."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.FullMask((padded, padded)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=splash_block_sizes(spec, padded), head_shards=1, q_seq_shards=1,
                                  interpret=interpret, save_residuals=save_residuals)


def _pad_sequence(length: int, *xs):
    """Pad [b, H, L, ...] arrays along L to a multiple of 128; (padded length, segment ids, arrays)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    padded = -(-length // LANES) * LANES
    if padded != length:
        xs = tuple(jnp.pad(x, [(0, 0), (0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 3)) for x in xs)
    segment = jnp.asarray(np.arange(padded) >= length, jnp.int32)  # 0 real, 1 padding
    return padded, splash.SegmentIds(q=segment, kv=segment), xs


def _logit_scale(q):
    return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # the kernel does not scale the logits


def _splash_local(q, k, v, spec: AttentionSpec, interpret: bool, with_lse: bool = False):
    """Splash on local arrays [b, H, L, D] (no mesh axes inside); `with_lse`: (out, logsumexp [b, H, L]),
    what `_splash_local_bwd` needs besides q, k, v."""
    _, heads, length, _ = q.shape
    padded, segment_ids, (q, k, v) = _pad_sequence(length, q, k, v)
    kernel = _splash_kernel(heads, padded, spec, interpret, save_residuals=with_lse)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q * _logit_scale(q), k, v, segment_ids)
    if not with_lse:
        return out[:, :, :length]
    out, (lse,) = out
    return out[:, :, :length], lse[:, :, :length]


def _splash_local_bwd(q, k, v, out, lse, do, spec: AttentionSpec, interpret: bool):
    """The gradients (dq, dk, dv) of `_splash_local` at (q, k, v), from its forward's out and logsumexp:
    splash's own backward kernels (dq, dkv), run without its forward (jax 0.10's
    `splash_attention_kernel._splash_attention_bwd`; its residuals are rebuilt here)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

    _, heads, length, _ = q.shape
    padded, segment_ids, (q, k, v, out, lse, do) = _pad_sequence(length, q, k, v, out, lse, do)
    kernel = _splash_kernel(heads, padded, spec, interpret)
    kw = kernel.kwargs
    for info in (kernel.dq_mask_info, kernel.dkv_mask_info):  # a full mask has no partial blocks to reshape
        assert info is None or info.partial_mask_blocks is None, "splash backward: partial mask blocks"
    scale = _logit_scale(q)

    def one(q, k, v, out, lse, do):
        res = (q, k, v, segment_ids, None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        grads = sak._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                          kw["residual_checkpoint_name"], kw["mask_function"],
                                          kw["attn_logits_soft_cap"], kw["interpret"], res, do)
        return grads[3:6]

    dq, dk, dv = jax.vmap(one)(q * scale, k, v, out, lse, do)
    return (dq * scale)[:, :, :length], dk[:, :, :length], dv[:, :, :length]


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


def _sharded(local, mesh, arrays):
    """local(*arrays) on [b, H, L, ...] arrays, under shard_map over `mesh` (batch over data/fsdp, heads
    over tensor) when given; a batch the mesh does not divide is padded with zero examples (e.g. 4 val
    images on 8 chips), cut off again. Returns what `local` returns (arrays or a tuple of them)."""
    if mesh is None:
        return local(*arrays)
    pspec, n_batch = _mesh_specs(mesh, arrays[0].shape[1])
    batch = arrays[0].shape[0]
    extra = -batch % n_batch
    if extra:
        arrays = tuple(jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)) for x in arrays)
    spec_of = lambda x: P(*pspec[: x.ndim])  # noqa: E731  ([b, H, L] logsumexps: the first three axes)
    out_shapes = jax.eval_shape(local, *arrays)
    out = jax.shard_map(local, mesh=mesh, in_specs=tuple(spec_of(x) for x in arrays),
                        out_specs=jax.tree.map(spec_of, out_shapes), check_vma=False)(*arrays)
    return jax.tree.map(lambda x: x[:batch], out)


def splash_attention(q, k, v, spec: AttentionSpec, *, mesh=None, interpret: bool = False, heads_first: bool = False):
    """Splash attention for q/k/v [B, L, H, D] -> [B, L, H, D] ([B, H, L, D] in and out with
    `heads_first`), sharded over `mesh` when given."""
    if not heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]
    out = _sharded(lambda q, k, v: _splash_local(q, k, v, spec, interpret), mesh, (q, k, v))
    return out if heads_first else jnp.swapaxes(out, 1, 2)


def splash_forward(q, k, v, spec: AttentionSpec, *, mesh=None, interpret: bool = False):
    """Splash attention's forward for q/k/v [B, H, L, D] with what its backward needs besides q, k, v:
    (out [B, H, L, D], logsumexp [B, H, L] float32). For callers with their own VJP that keep
    something else than q and k (`layers.normed_attention`)."""
    return _sharded(lambda q, k, v: _splash_local(q, k, v, spec, interpret, with_lse=True), mesh, (q, k, v))


def splash_backward(q, k, v, out, lse, do, spec: AttentionSpec, *, mesh=None, interpret: bool = False):
    """(dq, dk, dv) of splash attention at q/k/v [B, H, L, D], given `splash_forward`'s (out, lse) and
    the output's cotangent `do`: splash's own backward kernels, without its forward."""
    return _sharded(lambda *a: _splash_local_bwd(*a, spec, interpret), mesh, (q, k, v, out, lse, do))
