"""FLUX.1 building blocks in Flax NNX, with the semantics of the BFL reference.

Module and parameter names mirror the BFL checkpoint keys (`img_attn.qkv`, `img_mlp.0`,
`modulation.lin`, ...), so a checkpoint maps onto these modules by a mechanical walk
(Linear kernel = W.T). Layout conventions:

    B batch, L tokens, H heads, D head dim, C hidden (= H * D)
    activations  [B, L, C]
    q, k, v      [B, H, L, D]   head-major, straight out of the qkv projection (an einsum with the
                 kernel viewed as [C, 3, H, D]) into rope, attention and the output projection
                 (an einsum with the kernel viewed as [H, D, C]), so nothing between them asks
                 for a split, transpose or concatenation (on TPU such layout copies were a quarter
                 of the estimated cycles of a flux-dev block's fwd+bwd: docs/tpu.md)
    rope tables  [B, L, D/2, 2, 2] in float32

Positional and timestep math always runs in float32, whatever the activation dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from fluxir_jax.models.attention import (
    AttentionSpec,
    current_mesh,
    dot_product_attention,
    kernel_and_mesh,
    mesh_batch_axes,
    mesh_platform,
    splash_attention,
    splash_backward,
    splash_forward,
)

Array = jax.Array
NORM_EPS = 1e-6
PAIR_SWAP_SCOPE = "rope_pair_swap"
# named scopes of the blocks' computations (op names in compiled programs and profiles)
BLOCK_SCOPES = {"double": "double_block", "single": "single_block"}


# ----------------------------------------------------------------------------- pure math


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by `time_factor`): [B] -> [B, dim], float32.

    Cosines first, then sines, as in BFL `flux/modules/layers.py`.
    """
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _rope_frequencies(dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """omega_d = theta^(-2d/dim), split as hi + lo in float32.

    `hi` keeps 12 significant bits, so `pos * hi` is exact in float32 for integer positions
    below 2^12; `lo` carries the rest. Rotating by hi and lo separately gives angles accurate
    to float64 level (BFL builds its tables in float64) instead of float32's ~1e-5 at pos 256.
    """
    omega = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    exponent = np.floor(np.log2(omega))
    hi = np.round(omega / 2.0**exponent * 2.0**11) * 2.0 ** (exponent - 11)
    lo = omega - hi
    return hi.astype(np.float32), lo.astype(np.float32)


def rope(pos: Array, dim: int, theta: float) -> Array:
    """Rotary tables for one position axis: pos [..., L] -> [..., L, dim/2, 2, 2] float32.

    Each frequency gets the 2x2 rotation [[cos, -sin], [sin, cos]] (BFL `flux/math.py`).
    """
    if dim % 2:
        raise ValueError(f"rope dim must be even, got {dim}")
    hi, lo = _rope_frequencies(dim, theta)
    pos = jnp.asarray(pos, jnp.float32)[..., None]
    a, b = pos * hi, pos * lo  # angle = a + b; b is tiny, so its rounding error is negligible
    cos = jnp.cos(a) * jnp.cos(b) - jnp.sin(a) * jnp.sin(b)
    sin = jnp.sin(a) * jnp.cos(b) + jnp.cos(a) * jnp.sin(b)
    out = jnp.stack([cos, -sin, sin, cos], axis=-1)
    return out.reshape(*out.shape[:-1], 2, 2)


def embed_nd(ids: Array, axes_dim: tuple[int, ...], theta: float) -> Array:
    """Concatenate per-axis rope tables: ids [B, L, n_axes] -> pe [B, L, sum(axes_dim)/2, 2, 2]."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} axes, config has axes_dim {axes_dim}")
    return jnp.concatenate([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-3)


def _swap_pairs(x: Array) -> Array:
    """x[..., i ^ 1]: swaps adjacent pairs of the last axis, as a matmul with a permutation.

    Exact (each output is one input times 1, plus zeros; precision HIGHEST so float32 is not
    rounded to bfloat16 on TPU) and lane-dense: no tensor with a minor axis of 2, which TPUs
    pad to 128 lanes.
    """
    i = np.arange(x.shape[-1])
    p = np.zeros((x.shape[-1],) * 2, np.float32)
    p[i ^ 1, i] = 1.0
    with jax.named_scope(PAIR_SWAP_SCOPE):  # FLOP counts (aot.py) leave these data moves out
        return jnp.dot(x, jnp.asarray(p, x.dtype), precision=jax.lax.Precision.HIGHEST, preferred_element_type=x.dtype)


def _sum_to(t: Array, shape: tuple[int, ...]) -> Array:
    """Sum a broadcast result back to `shape` (the cotangent of a broadcast)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(axes, keepdims=True)


@jax.custom_vjp
def _rotate_pairs(x: Array, diag: Array, off: Array) -> Array:
    """diag * x + off * swap(x) in float32, cast to x's dtype; diag/off [B or 1, L, 1, D]."""
    return (diag * x.astype(jnp.float32) + off * _swap_pairs(x).astype(jnp.float32)).astype(x.dtype)


def _rotate_pairs_fwd(x, diag, off):
    return _rotate_pairs(x, diag, off), (x, diag, off)


def _rotate_pairs_bwd(res, g):
    # dx[2i+k] = diag[2i+k] g[2i+k] + off[2i+1-k] g[2i+1-k]: both products summed in float32 and
    # rounded once, as autodiff of the paired form does (autodiff of the matmul form would round
    # the swapped term to x's dtype first). swap(g) is exact in g's own dtype.
    x, diag, off = res
    g32, x32 = g.astype(jnp.float32), x.astype(jnp.float32)
    swapped_off = off.reshape(*off.shape[:-1], -1, 2)[..., ::-1].reshape(off.shape)  # a small table
    dx = (diag * g32 + swapped_off * _swap_pairs(g).astype(jnp.float32)).astype(x.dtype)
    ddiag = _sum_to(g32 * x32, diag.shape)
    doff = _sum_to(g32 * _swap_pairs(x).astype(jnp.float32), off.shape)
    return dx, ddiag, doff


_rotate_pairs.defvjp(_rotate_pairs_fwd, _rotate_pairs_bwd)


def apply_rope(xq: Array, xk: Array, pe: Array, heads_first: bool = False) -> tuple[Array, Array]:
    """Rotate adjacent pairs of q and k: [B, L, H, D] (or [B, H, L, D] with `heads_first`) with pe
    [B, L, D/2, 2, 2]; float32 inside.

    out[2i + j] = pe[i, j, 0] * x[2i] + pe[i, j, 1] * x[2i + 1] (BFL `apply_rope`), written
    lane-dense (the paired form's minor axis of 2 cost ~20% of a flux-dev block's fwd+bwd time
    on v5p in libtpu's estimate, in padded copies and transposes):

        out = diag * x + off * swap(x),   diag[2i+j] = pe[i,j,j],  off[2i+j] = pe[i,j,1-j]

    Every output (and every input gradient) is the same two float32 products summed as in the
    paired form, so results are bitwise the same.
    """
    diag, off = _rope_rows(pe, heads_first)
    return _rotate_pairs(xq, diag, off), _rotate_pairs(xk, diag, off)


def _rope_rows(pe: Array, heads_first: bool) -> tuple[Array, Array]:
    """`apply_rope`'s lane-dense tables (diag, off) from pe [B, L, D/2, 2, 2]: [B, L, 1, D] ([B, 1, L, D]
    with `heads_first`), broadcast over heads."""
    diag = jnp.stack([pe[..., 0, 0], pe[..., 1, 1]], axis=-1)  # [B, L, D/2, 2]
    off = jnp.stack([pe[..., 0, 1], pe[..., 1, 0]], axis=-1)
    b, length = diag.shape[:2]
    table = (b, 1, length, -1) if heads_first else (b, length, 1, -1)
    return diag.reshape(table), off.reshape(table)


def attention(q: Array, k: Array, v: Array, pe: Array, spec: AttentionSpec | None = None) -> Array:
    """Rope then softmax attention over the whole sequence (no mask): [B, H, L, D] -> [B, H, L, D].

    `spec` picks the kernel (xla, splash, cudnn, auto; see `models/attention.py`).
    """
    q, k = apply_rope(q, k, pe, heads_first=True)
    return dot_product_attention(q, k, v, spec, heads_first=True)


def normed_attention(prepare: Callable[..., tuple[Array, Array]], qk_args: tuple, v: Array, pe: Array,
                     spec: AttentionSpec | None = None) -> Array:
    """`attention(*prepare(*qk_args), v, pe, spec)`: `prepare` maps the arrays `qk_args` to q and k
    [B, H, L, D] before rope (the blocks' QK RMSNorm of the qkv projection, per stream).

    With splash attention the backward pass keeps `qk_args` (which the norms' backward keeps anyway)
    instead of the normed, roped q and k that splash's own VJP keeps, and computes those again (norm and
    rope, elementwise) before splash's backward kernels: per layer without remat, two [B, H, L, D]
    tensors fewer are stacked for the backward pass (at flux-dev's shapes 2 of the ~11 per layer).
    Forward and gradients are those of the plain composition (the same kernels on the same inputs).
    Splash's output and log-sum-exp are tagged `attn_output` and `attn_lse` (`checkpoint_name`): a
    remat policy that saves them (`save_attention`) runs no splash forward kernel in the backward pass.
    Other kernels run the plain composition."""
    spec = spec or AttentionSpec()
    kind, mesh = kernel_and_mesh(spec, v.dtype)
    if kind != "splash":
        q, k = prepare(*qk_args)
        return checkpoint_name(attention(q, k, v, pe, spec), "attn_output")
    run = dict(spec=spec, mesh=mesh, interpret=mesh_platform(mesh) != "tpu")

    def roped(args, diag, off):
        q, k = prepare(*args)
        return _rotate_pairs(q, diag, off), _rotate_pairs(k, diag, off)

    def fwd(args, v, diag, off):
        q, k = roped(args, diag, off)
        out, lse = splash_forward(q, k, v, **run)
        # named for the remat policies: saving them spares the backward pass splash's forward kernel
        out, lse = checkpoint_name(out, "attn_output"), checkpoint_name(lse, "attn_lse")
        return out, (args, v, diag, off, out, lse)

    def bwd(res, do):
        args, v, diag, off, out, lse = res
        (q, k), vjp = jax.vjp(roped, args, diag, off)
        dq, dk, dv = splash_backward(q, k, v, out, lse, do, **run)
        dargs, ddiag, doff = vjp((dq, dk))
        return dargs, dv, ddiag, doff

    f = jax.custom_vjp(lambda args, v, diag, off: splash_attention(*roped(args, diag, off), v, heads_first=True, **run))
    f.defvjp(fwd, bwd)
    return f(tuple(qk_args), v, *_rope_rows(pe, heads_first=True))


def recomputed_in_backward(fn: Callable[..., Array]) -> Callable[..., Array]:
    """`fn` (array arguments, one array out) whose backward pass keeps only fn's inputs and recomputes
    the rest: its VJP is `jax.vjp(fn)` run on the saved inputs, so gradients are exactly those of fn's
    own autodiff.

    For the norms. Autodiff keeps their intermediates for the backward pass: the float32 upcast and
    centred copy of a LayerNorm input ([B, L, C] float32, twice), the float32 q and k of an RMSNorm
    (GELU-tanh's four [B, L, 4C] terms are not kept either: its VJP keeps its derivative instead).
    Without remat (`remat_policy="none"`) a scanned layer loop stacks them for every layer: at
    flux-dev's training shapes they were most of the per-layer memory. The recompute is elementwise work on data the backward pass reads anyway.
    Forward-mode differentiation (jax.jvp) of such a function is not supported (custom_vjp)."""
    f = jax.custom_vjp(fn)
    f.defvjp(lambda *args: (fn(*args), args), lambda args, g: jax.vjp(fn, *args)[1](g))
    return f


@recomputed_in_backward
def layer_norm(x: Array) -> Array:
    """LayerNorm without affine parameters (eps 1e-6), two-pass statistics in float32, cast back;
    recomputed in the backward pass (`recomputed_in_backward`)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_and_grad(x: Array) -> tuple[Array, Array]:
    """GELU-tanh and its derivative from one tanh, in float32, each cast back to x's dtype (as
    PyTorch computes a bf16 GELU: float32 math, one rounding)."""
    x32 = x.astype(jnp.float32)
    x2 = x32 * x32
    t = jnp.tanh(_GELU_C * x32 * (1.0 + _GELU_A * x2))
    y = 0.5 * x32 * (1.0 + t)
    d = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * (_GELU_C * (1.0 + 3.0 * _GELU_A * x2))
    return y.astype(x.dtype), d.astype(x.dtype)


@jax.custom_vjp
def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))), in float32.

    Its backward pass keeps GELU's derivative, computed in the forward from the same tanh, instead
    of x, and named `gelu_grad`: the same bytes as x ([B, L, 4C] in x's dtype), and the backward
    pass is one product. Under a remat policy that does not keep `gelu_grad` the backward pass
    recomputes it with the block's forward (FluxConfig.keep_gelu_grad chooses the blocks that keep
    it). In bf16 the derivative is rounded to bf16 before the product, as every intermediate of
    autodiff's bf16 GELU is; in float32 the gradient is autodiff's to float rounding."""
    return _gelu_and_grad(x)[0]


def _gelu_fwd(x: Array) -> tuple[Array, Array]:
    y, d = _gelu_and_grad(x)
    return y, checkpoint_name(d, "gelu_grad")


gelu_tanh.defvjp(_gelu_fwd, lambda d, g: ((g.astype(jnp.float32) * d.astype(jnp.float32)).astype(d.dtype),))


@recomputed_in_backward
def rms_norm(x: Array, scale: Array) -> Array:
    """x * rsqrt(mean(x^2) + 1e-6) in float32, cast back, times `scale`; recomputed in the backward
    pass (`recomputed_in_backward`)."""
    x32 = x.astype(jnp.float32)
    rrms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
    return (x32 * rrms).astype(x.dtype) * scale.astype(x.dtype)


def project(equation: str, x: Array, kernel: Array, bias: Array | None, dtype, f32_out: bool = False,
            view: Callable[[Array], Array] | None = None) -> Array:
    """`einsum(equation, x, view(kernel)) + bias` computed as `nnx.Linear` does (operands in `dtype`).
    `f32_out`: accumulate and return float32 (a sum of several projections rounds once).

    `view`: a reshape or slice of a checkpoint kernel (qkv as [C, 3, H, D], proj as [H, D, C], the
    single block's column and row blocks of linear1 / linear2). The backward pass takes the view of
    the kernel again instead of keeping it, and keeps x only when the kernel is differentiated. With
    frozen weights, autodiff would keep each view: a scanned layer loop without remat stacked a copy
    of every layer's viewed weights (11 GiB per v5p chip for flux-dev with whole weights, measured).
    (A checkpoint around the loop could recompute the views too, but marks every residual it keeps
    with a reduce_precision that splits TPU fusions.)"""
    dtype = jnp.dtype(dtype)
    if view is None:
        return _project(equation, dtype, f32_out, x, kernel, bias)
    return _project_view(equation, view, dtype, f32_out, x, kernel, bias)


def _project(equation, dtype, f32_out, x, kernel, bias):
    out = jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype),
                     preferred_element_type=jnp.float32 if f32_out else None)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _project_view(equation, view, dtype, f32_out, x, kernel, bias):
    return _project(equation, dtype, f32_out, x, view(kernel), bias)


def _project_view_fwd(equation, view, dtype, f32_out, x, kernel, bias):
    # symbolic_zeros: the array arguments come as CustomVJPPrimal (value, perturbed). x is kept only when
    # the kernel is differentiated, the bias never (the VJP does not read it); what is not kept is
    # replaced by a zero-size array whose trailing dimensions are its shape
    keep_x = kernel.perturbed
    x, kernel, bias = x.value, kernel.value, None if bias is None else bias.value
    out = _project(equation, dtype, f32_out, x, view(kernel), bias)
    return out, (x if keep_x else _shape_only(x), kernel, None if bias is None else _shape_only(bias))


def _shape_only(a: Array) -> Array:
    return jnp.zeros((0, *a.shape), a.dtype)


def _project_view_bwd(equation, view, dtype, f32_out, res, g):
    # each cotangent by transposing the linear map it belongs to, so no forward product is computed
    # again (XLA would drop it as dead code, but aot.py's jaxpr FLOP counts would count it)
    x, kernel, bias = res
    kernel_grad = x.size > 0  # else x is a stand-in: the projection is linear in x, dx does not read x
    x_shape = x if kernel_grad else jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    (dx,) = jax.linear_transpose(lambda x: _project(equation, dtype, f32_out, x, view(kernel), None), x_shape)(g)
    dkernel = None
    if kernel_grad:
        (dkernel,) = jax.linear_transpose(lambda k: _project(equation, dtype, f32_out, x, view(k), None), kernel)(g)
    dbias = None
    if bias is not None:  # out + bias.astype(out.dtype), broadcast from the right
        bias_shape = jax.ShapeDtypeStruct(bias.shape[1:], bias.dtype)
        (dbias,) = jax.linear_transpose(lambda b: jnp.broadcast_to(b.astype(g.dtype), g.shape), bias_shape)(g)
    return dx, dkernel, dbias


_project_view.defvjp(_project_view_fwd, _project_view_bwd, symbolic_zeros=True)


def batch_split(x: Array) -> Array:
    """`x` constrained to the batch split of the current mesh: leading axis over its (data, fsdp)
    axes, the rest whole. For the per-example modulation vectors ([B, 1, C]): left to itself, the
    partitioner splits them by channel, as it splits the modulation kernel, and then moves the
    [B, L, C] activations they scale into that split and back (all-to-alls of activations in the
    backward pass; a v6e-8 block pair fwd+bwd at 8 per chip estimated 45% slower with FSDP-sharded
    weights than with replicated ones, docs/tpu.md). A no-op without a mesh, under manual axes
    (shard_map, pmap) or when the batch does not split."""
    return mesh_split(x, "batch")


def mesh_split(x: Array, *dims: str | None) -> Array:
    """`x` constrained to a split over the current mesh, per leading dimension: "batch" (the mesh's
    data and fsdp axes), "fsdp" (the fsdp axis) or None (whole); dimensions not named are whole, and
    so is a dimension its axes do not divide. A no-op without a mesh or under manual axes (shard_map,
    pmap)."""
    mesh = current_mesh()
    if mesh is None or getattr(getattr(mesh, "abstract_mesh", mesh), "manual_axes", ()):
        return x
    fsdp = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("fsdp", 1)
    split = {"batch": mesh_batch_axes(mesh), "fsdp": (("fsdp",), fsdp) if fsdp > 1 else ((), 1), None: ((), 1)}
    spec = [axes if axes and size % shards == 0 else None
            for size, (axes, shards) in zip(x.shape, (split[d] for d in dims))]
    if not any(spec):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec, *([None] * (x.ndim - len(spec)))))


def _param(lin: nnx.Linear, name: str) -> Array | None:
    value = getattr(lin, name, None)
    return None if value is None else value[...]


# ----------------------------------------------------------------------------- modules


def _dtype(name) -> jnp.dtype:
    return jnp.dtype(name)


def linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype, param_dtype, use_bias: bool = True,
           axes: tuple[str, str] = ("embed", "mlp")) -> nnx.Linear:
    """nnx.Linear with torch-like init (kernel [din, dout]; checkpoint W is [dout, din]).

    `axes` are the logical axis names of the kernel's (in, out) dimensions, stored as the
    `logical_axes` metadata of the kernel (and of the bias, for `out`); `fluxir_jax.parallel`
    maps them to mesh axes. Stacked (scanned) blocks add a leading `layers` axis there.
    """
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=_dtype(dtype),
        param_dtype=_dtype(param_dtype),
        kernel_init=nnx.with_metadata(nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                      logical_axes=tuple(axes)),
        bias_init=nnx.with_metadata(nnx.initializers.zeros_init(), logical_axes=(axes[1],)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + 1e-6) in float32, cast back, times `scale`."""

    def __init__(self, dim: int, *, param_dtype="float32"):
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...])


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype="float32"):
        self.query_norm = RMSNorm(dim, param_dtype=param_dtype)
        self.key_norm = RMSNorm(dim, param_dtype=param_dtype)

    def __call__(self, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
        q, k = qk_norm_streams(q, k, *self.scales())
        return q.astype(v.dtype), k.astype(v.dtype)

    def scales(self) -> tuple[Array, Array]:
        return self.query_norm.scale[...], self.key_norm.scale[...]


def qk_norm_streams(*streams: Array) -> tuple[Array, Array]:
    """`QKNorm` of each stream, the streams concatenated along L: streams = (q, k, q_scale, k_scale) per
    stream, q and k [B, H, L_i, D] -> (q, k) [B, H, sum L_i, D]. Pure, for `normed_attention`."""
    qs, ks = [], []
    for i in range(0, len(streams), 4):
        q, k, q_scale, k_scale = streams[i : i + 4]
        qs.append(rms_norm(q, q_scale))
        ks.append(rms_norm(k, k_scale))
    if len(qs) == 1:
        return qs[0], ks[0]
    return jnp.concatenate(qs, axis=2), jnp.concatenate(ks, axis=2)


class MLPEmbedder(nnx.Module):
    """in_layer -> SiLU -> out_layer."""

    def __init__(self, in_dim: int, hidden_dim: int, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        self.in_layer = linear(in_dim, hidden_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.out_layer = linear(hidden_dim, hidden_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class ModulationOut(NamedTuple):
    shift: Array  # [B, 1, C]
    scale: Array
    gate: Array


class Modulation(nnx.Module):
    """lin(SiLU(vec)) chunked into (shift, scale, gate) once, or twice when `double`."""

    def __init__(self, dim: int, double: bool, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = linear(dim, self.multiplier * dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, vec: Array) -> tuple[ModulationOut, ModulationOut | None]:
        return self.split(self.raw(vec))

    def raw(self, vec: Array) -> Array:
        """lin(SiLU(vec)): [B, C] -> [B, multiplier * C], before chunking; accumulated (bias
        included) in float32 and rounded once, so partial products summed across chips (flux.py
        computes every layer's modulation where its FSDP-sharded kernel lies) add in float32."""
        out = project("bc,cm->bm", jax.nn.silu(vec), _param(self.lin, "kernel"), _param(self.lin, "bias"),
                      self.lin.dtype, f32_out=True)
        return out.astype(self.lin.dtype)

    def split(self, raw: Array) -> tuple[ModulationOut, ModulationOut | None]:
        """`raw` [B, multiplier * C] chunked into ModulationOuts of [B, 1, C] each (batch-split)."""
        out = batch_split(raw[:, None, :])
        chunks = jnp.split(out, self.multiplier, axis=-1)
        first = ModulationOut(*chunks[:3])
        return first, (ModulationOut(*chunks[3:]) if self.is_double else None)


def modulate(x: Array, mod: ModulationOut) -> Array:
    return batch_split((1 + mod.scale) * x + mod.shift)


class SelfAttention(nnx.Module):
    """Fused qkv projection, q/k RMSNorm, output projection (attention itself is joint, outside)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = QKNorm(head_dim, param_dtype=param_dtype)
        self.proj = linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, axes=("mlp", "embed"))

    def qkv_heads(self, x: Array) -> Array:
        """The fused qkv projection, head-major: x [B, L, C] -> [3, B, H, L, D] ("B L (K H D)" of
        the checkpoint's layout, with K and H moved in front of L by the einsum)."""
        return qkv_heads(x, _param(self.qkv, "kernel"), _param(self.qkv, "bias"), self.num_heads, self.qkv.dtype)

    def project_out(self, attn: Array) -> Array:
        """The output projection from head-major attention: [B, H, L, D] -> [B, L, C]."""
        kernel = _param(self.proj, "kernel")
        h, d = attn.shape[1], attn.shape[-1]
        return project("bhld,hdc->blc", attn, kernel, _param(self.proj, "bias"), self.proj.dtype,
                       view=lambda k: k.reshape(h, d, -1))


def qkv_heads(x: Array, kernel: Array, bias: Array | None, num_heads: int, dtype, cols: slice = slice(None)) -> Array:
    """x [B, L, C] times a fused qkv kernel [C, 3*H*D] (+ bias [3*H*D]) -> [3, B, H, L, D]; `cols`: the
    kernel's (and bias's) columns that hold qkv (the single block's linear1 holds the MLP input too)."""
    c = kernel.shape[0]
    bias = None if bias is None else bias[cols].reshape(3, 1, num_heads, 1, -1)
    return project("blc,ckhd->kbhld", x, kernel, bias, dtype, view=lambda k: k[:, cols].reshape(c, 3, num_heads, -1))


def _mlp(dim: int, hidden: int, *, rngs, dtype, param_dtype) -> nnx.List:
    """Sequential(Linear, GELU-tanh, Linear) with checkpoint keys `.0` and `.2`."""
    return nnx.List(
        [
            linear(dim, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
            None,
            linear(hidden, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, axes=("mlp", "embed")),
        ]
    )


def _run_mlp(mlp: nnx.List, x: Array) -> Array:
    return mlp[2](gelu_tanh(mlp[0](x)))


@dataclasses.dataclass(frozen=True)
class BlockDims:
    hidden_size: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool = True
    attention: AttentionSpec = AttentionSpec()

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


class DoubleStreamBlock(nnx.Module):
    """Separate weights for the image and text streams, joint attention over [txt; img]."""

    def __init__(self, dims: BlockDims, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = dims.hidden_size
        self.num_heads = dims.num_heads
        self.attention_spec = dims.attention
        self.img_mod = Modulation(c, True, **kw)
        self.img_attn = SelfAttention(c, dims.num_heads, dims.qkv_bias, **kw)
        self.img_mlp = _mlp(c, dims.mlp_hidden, **kw)
        self.txt_mod = Modulation(c, True, **kw)
        self.txt_attn = SelfAttention(c, dims.num_heads, dims.qkv_bias, **kw)
        self.txt_mlp = _mlp(c, dims.mlp_hidden, **kw)

    def modulations(self, vec: Array) -> Array:
        """Both streams' modulation vectors before chunking: vec [B, C] -> [2 (img, txt), B, 6C]. They
        depend on vec alone, so a caller may compute them for every layer at once (flux.py does)."""
        return jnp.stack([self.img_mod.raw(vec), self.txt_mod.raw(vec)])

    def __call__(self, img: Array, txt: Array, vec: Array, pe: Array, mods: Array | None = None
                 ) -> tuple[Array, Array]:
        """`mods`: `self.modulations(vec)` computed beforehand (then `vec` is not read)."""
        with jax.named_scope(BLOCK_SCOPES["double"]):
            return self._forward(img, txt, vec, pe, mods)

    def _forward(self, img: Array, txt: Array, vec: Array, pe: Array, mods: Array | None) -> tuple[Array, Array]:
        mods = self.modulations(vec) if mods is None else mods
        img_mod1, img_mod2 = self.img_mod.split(mods[0])
        txt_mod1, txt_mod2 = self.txt_mod.split(mods[1])

        img_qkv = checkpoint_name(self.img_attn.qkv_heads(modulate(layer_norm(img), img_mod1)), "img_qkv_proj")
        txt_qkv = checkpoint_name(self.txt_attn.qkv_heads(modulate(layer_norm(txt), txt_mod1)), "txt_qkv_proj")
        t = txt.shape[1]
        v = jnp.concatenate([txt_qkv[2], img_qkv[2]], axis=2)  # [B, H, T+L, D]
        qk = (txt_qkv[0], txt_qkv[1], *self.txt_attn.norm.scales(), img_qkv[0], img_qkv[1], *self.img_attn.norm.scales())
        attn = normed_attention(qk_norm_streams, qk, v, pe, self.attention_spec)  # named attn_output
        txt_attn, img_attn = attn[:, :, :t], attn[:, :, t:]

        img = img + img_mod1.gate * self.img_attn.project_out(img_attn)
        img = img + img_mod2.gate * _run_mlp(self.img_mlp, modulate(layer_norm(img), img_mod2))
        txt = txt + txt_mod1.gate * self.txt_attn.project_out(txt_attn)
        txt = txt + txt_mod2.gate * _run_mlp(self.txt_mlp, modulate(layer_norm(txt), txt_mod2))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP on the concatenated stream: linear1 -> (qkv, mlp_in) fused.

    linear1 and linear2 keep the checkpoint's fused kernels, but each runs as two projections on
    column (row) slices of its kernel: qkv head-major and the MLP input apart, and linear2 as
    attention part + MLP part summed in float32, so neither the split of linear1's output nor the
    concatenation of linear2's input is materialised.
    """

    def __init__(self, dims: BlockDims, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = dims.hidden_size
        self.num_heads = dims.num_heads
        self.attention_spec = dims.attention
        self.hidden_size = c
        self.mlp_hidden = dims.mlp_hidden
        self.linear1 = linear(c, 3 * c + self.mlp_hidden, **kw)
        self.linear2 = linear(c + self.mlp_hidden, c, axes=("mlp", "embed"), **kw)
        self.norm = QKNorm(c // dims.num_heads, param_dtype=param_dtype)
        self.modulation = Modulation(c, False, **kw)

    def modulations(self, vec: Array) -> Array:
        """The modulation vector before chunking: vec [B, C] -> [B, 3C] (see DoubleStreamBlock)."""
        return self.modulation.raw(vec)

    def __call__(self, x: Array, vec: Array, pe: Array, mods: Array | None = None) -> Array:
        """`mods`: `self.modulations(vec)` computed beforehand (then `vec` is not read)."""
        with jax.named_scope(BLOCK_SCOPES["single"]):
            return self._forward(x, vec, pe, mods)

    def _forward(self, x: Array, vec: Array, pe: Array, mods: Array | None) -> Array:
        mod, _ = self.modulation.split(self.modulations(vec) if mods is None else mods)
        x_mod = checkpoint_name(modulate(layer_norm(x), mod), "lin1_norm_hidden_states")
        c, dt = self.hidden_size, self.linear1.dtype
        w1, b1 = _param(self.linear1, "kernel"), _param(self.linear1, "bias")
        qkv = qkv_heads(x_mod, w1, b1, self.num_heads, dt, cols=slice(0, 3 * c))
        mlp = project("blc,cm->blm", x_mod, w1, None if b1 is None else b1[3 * c :], dt, view=lambda k: k[:, 3 * c :])
        qk = (qkv[0], qkv[1], *self.norm.scales())
        attn = normed_attention(qk_norm_streams, qk, qkv[2], pe, self.attention_spec)  # [B, H, L, D], named attn_output
        w2, b2 = _param(self.linear2, "kernel"), _param(self.linear2, "bias")
        h, d = attn.shape[1], attn.shape[-1]
        out = project("bhld,hdc->blc", attn, w2, None, self.linear2.dtype, f32_out=True,
                      view=lambda k: k[:c].reshape(h, d, c))
        out = project("blm,mc->blc", gelu_tanh(mlp), w2, b2, self.linear2.dtype, f32_out=True, view=lambda k: k[c:]) + out
        return x + mod.gate * out.astype(x.dtype)


class LastLayer(nnx.Module):
    """adaLN (shift, scale) from vec, LayerNorm, linear to output channels."""

    def __init__(self, hidden_size: int, out_channels: int, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear = linear(hidden_size, out_channels, **kw)
        self.adaLN_modulation = nnx.List([None, linear(hidden_size, 2 * hidden_size, **kw)])

    def __call__(self, x: Array, vec: Array) -> Array:
        shift, scale = jnp.split(batch_split(self.adaLN_modulation[1](jax.nn.silu(vec))), 2, axis=-1)
        x = batch_split((1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :])
        return self.linear(x)
