"""The FLUX.1 MM-DiT (BFL `flux/model.py` semantics) in Flax NNX, with scanned blocks.

    vec = time_in(emb(t)) [+ guidance_in(emb(g))] + vector_in(y)
    txt = txt_in(txt); img = img_in(img); pe = rope(cat(txt_ids, img_ids))
    (img, txt) <- 19 x DoubleStreamBlock           (+ control residuals after each block)
    x = cat(txt, img) <- 38 x SingleStreamBlock    (+ control residuals after each block)
    out = final_layer(x[:, T:], vec)

The 19 double and 38 single blocks are one `DoubleStreamBlock` / `SingleStreamBlock` module
each whose parameters carry a leading layer axis (`double_blocks/img_attn/qkv/kernel` is
[depth, C, 3C]); the forward pass runs them with `lax.scan`, so compile time does not grow
with depth. `remat_policy` chooses what the backward pass recomputes. Sharded inference
gathers each block's weights inside the scan (`models/weight_gather.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fluxir_jax.models import weight_gather
from fluxir_jax.models.attention import AttentionSpec
from fluxir_jax.models.layers import (
    Array,
    BlockDims,
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    batch_split,
    embed_nd,
    linear,
    mesh_split,
    timestep_embedding,
)
from fluxir_jax.models.weight_gather import gather

REMAT_POLICIES = (
    "none", "full", "save_dots_no_batch", "save_attention", "save_qkv_attention",
    "offload_dots_no_batch", "offload_attention", "offload_qkv_attention",
)
KEEP_GELU_GRAD = ("none", "double", "single", "all")
# checkpoint_name tags inside the blocks (models/layers.py)
_ATTENTION_NAMES = ("attn_output", "attn_lse")
_QKV_ATTENTION_NAMES = (*_ATTENTION_NAMES, "img_qkv_proj", "txt_qkv_proj", "lin1_norm_hidden_states")


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """BFL `FluxParams` field names, plus dtypes and the layer-loop knobs.

    dtype          activation / compute dtype ("bfloat16" on accelerators, "float32" for parity)
    param_dtype    storage dtype of the parameters
    remat_policy   what a backward pass keeps from the forward pass of each scanned block
                   (everything else is recomputed in the backward pass):
                   "none"                  keep every activation (most memory; no matmul or attention
                                           recomputed): only the blocks' views of their weights are
                                           taken again and the norms and GELU recomputed from their
                                           inputs (`layers.recomputed_in_backward`)
                   "full"                  keep nothing: recompute the whole block
                   "save_dots_no_batch"    keep matmul outputs whose operands have no batch
                                           dimension (the Linear layers; jax's
                                           dots_with_no_batch_dims_saveable), recompute
                                           attention, norms and elementwise ops
                   "save_attention"        FLUX-tuned: keep only the attention outputs
                                           (`attn_output`, with splash its log-sum-exp
                                           `attn_lse`: the backward pass runs no attention
                                           forward again; attention is the costliest op to
                                           recompute at FLUX's sequence lengths)
                   "save_qkv_attention"    keep the attention outputs and the qkv / linear1
                                           inputs (`img_qkv_proj`, `txt_qkv_proj`,
                                           `lin1_norm_hidden_states`)
                   "offload_dots_no_batch", "offload_attention", "offload_qkv_attention"
                                           the same tensors, kept in pinned host memory instead
                                           of HBM (copied out in the forward, back in the
                                           backward: trades PCIe/DMA time for HBM)
    keep_gelu_grad
                   which blocks' backward passes keep the MLP GELU's derivative (`gelu_grad`,
                   [B, L, 4C] in `dtype`, computed in the forward from the same tanh) on top of
                   what `remat_policy` keeps: "none", "double", "single" or "all". Without it a
                   remat'ed backward pass recomputes the derivative: float32 vector work over the
                   MLP's hidden tensor that libtpu's v6e-8 model charges 1.6 ms per flux-dev
                   single block and 1.2 ms per double block at 8 examples per chip with
                   save_attention (docs/tpu.md), for 302 MB per block per chip kept. No effect
                   with remat "none", which keeps it anyway (the GELU's VJP keeps the
                   derivative instead of its input); the offload policies keep it in HBM
    scan_layers    True: lax.scan over the stacked blocks; False: an unrolled Python loop
                   over the same stacked parameters (for debugging; compile grows with depth)
    scan_unroll    blocks per iteration of the scanned loops (lax.scan's `unroll`; 1: one
                   block per iteration)
    scan_unroll_single
                   the same for the single-block loop alone (null: scan_unroll)
    scan_group, scan_group_single
                   blocks per loop body written out (1: off): the stacked layers are viewed as
                   [n / group, group] and each iteration runs `group` blocks, each writing its own
                   residuals. lax.scan's unroll writes its unrolled blocks' residuals stacked
                   together, which libtpu charges for (v6e-8, one single block at 8 per chip,
                   save_attention: 13.37 ms read with unroll 2, 12.64 ms with group 2), so
                   `--topology` and `bench/tpu_layer_cost.py` read one block's cost off XLA's
                   estimates (which count a loop body once) as a group of 2 minus a group of 1.
                   Must divide the loop's depth (null for the single blocks: scan_group)
    attention      the attention kernel (`models/attention.py`): "xla" (runs everywhere),
                   "splash" (Pallas splash attention on TPU, sharded over the mesh's batch and
                   heads axes; interpret mode on CPU), "cudnn" (NVIDIA GPU, bf16/fp16) or "auto"
                   (splash on TPU, cudnn on GPU with bf16/fp16, xla otherwise)
    splash_block_q, splash_block_kv, splash_block_kv_compute
                   splash tile sizes (multiples of 128; forward and backward); each is lowered
                   to the largest multiple of 128 dividing the 128-padded sequence length
    splash_fused_bwd, splash_block_kv_bwd
                   splash's backward as one kernel (dq, dk, dv: 5 matmuls against the two
                   kernels' 7) walking the keys in tiles of splash_block_kv_bwd (null:
                   splash_block_kv), lowered like the tiles above; a tile as long as the
                   sequence (4608: up to 1024² images with 512 text tokens) keeps dq in one
                   float32 accumulator, shorter tiles write a partial dq per tile in the
                   inputs' dtype, summed after. v6e-8, one double + one single flux-dev block
                   fwd+bwd at 8 per chip: 28.8 against 29.3 ms (libtpu's estimate)
    """

    in_channels: int = 64  # channels of a packed latent token (16 latent channels x 2 x 2)
    out_channels: int = 64  # channels of the predicted velocity per token
    vec_in_dim: int = 768  # width of the pooled text vector `y` (CLIP-L: 768)
    context_in_dim: int = 4096  # width of the text token embeddings `txt` (T5-XXL: 4096)
    hidden_size: int = 3072  # transformer width
    mlp_ratio: float = 4.0  # MLP hidden width / hidden_size
    num_heads: int = 24  # attention heads (head dim = hidden_size / num_heads)
    depth: int = 19  # double-stream (MM-DiT) blocks
    depth_single_blocks: int = 38  # single-stream blocks
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position axis (index, row, column); sum = head dim
    theta: int = 10_000  # RoPE base frequency
    qkv_bias: bool = True  # bias on the fused qkv projections
    guidance_embed: bool = True  # guidance embedding (flux-dev: true, flux-schnell: false)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    keep_gelu_grad: str = "none"
    scan_layers: bool = True
    scan_unroll: int = 1
    scan_unroll_single: int | None = None
    scan_group: int = 1
    scan_group_single: int | None = None
    attention: str = "xla"
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_fused_bwd: bool = True
    splash_block_kv_bwd: int | None = 4608

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim {head_dim}")
        for name in ("scan_unroll", "scan_unroll_single", "scan_group", "scan_group_single"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, group, n in (("scan_group", self.scan_group, self.depth),
                               ("scan_group_single", self.group_single, self.depth_single_blocks)):
            if n % group:
                raise ValueError(f"{name} {group} does not divide the loop's {n} blocks")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.keep_gelu_grad not in KEEP_GELU_GRAD:
            raise ValueError(f"keep_gelu_grad {self.keep_gelu_grad!r} is not one of {KEEP_GELU_GRAD}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype
        self.attention_spec  # raises ValueError on an unknown kernel or bad block sizes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def unroll_single(self) -> int:
        """lax.scan's `unroll` for the single-block loop."""
        return self.scan_unroll if self.scan_unroll_single is None else self.scan_unroll_single

    @property
    def group_single(self) -> int:
        """Blocks per loop body written out, for the single-block loop."""
        return self.scan_group if self.scan_group_single is None else self.scan_group_single

    @property
    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(self.attention, self.splash_block_q, self.splash_block_kv, self.splash_block_kv_compute,
                             self.splash_fused_bwd, self.splash_block_kv_bwd)

    @property
    def block_dims(self) -> BlockDims:
        return BlockDims(self.hidden_size, self.num_heads, self.mlp_ratio, self.qkv_bias, self.attention_spec)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ControlStream:
    """Residuals added after each block of one kind (double or single), per stream.

    The residual of block k is `img[k] * img_gate[k]` for the image tokens (likewise txt),
    with broadcasting that lets callers pass either form:
      - per-block residuals: `img` [n, B, L, C], gate None;
      - shared features with per-block channel gates (what the FluxIR SE layers produce, and
        n times cheaper in memory): `img` [B, L, C] and `img_gate` [n, B, C].
    A stream left None receives nothing.
    """

    img: Optional[Array] = None
    txt: Optional[Array] = None
    img_gate: Optional[Array] = None
    txt_gate: Optional[Array] = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Control:
    """Control residuals for the double blocks and the single blocks (either may be None)."""

    double: Optional[ControlStream] = None
    single: Optional[ControlStream] = None


def remat_policy(policy: str, keep: tuple[str, ...] = ()):
    """The `jax.checkpoint` policy for a `FluxConfig.remat_policy` name (None for "none"); `keep`:
    further checkpoint names it keeps in HBM (`gelu_grad`)."""
    cp = jax.checkpoint_policies
    offload = dict(offload_src="device", offload_dst="pinned_host")

    def and_keep(base):  # jax's save_from_both_policies takes boolean policies only, not offloading ones
        if not keep:
            return base
        names = cp.save_only_these_names(*keep)
        return lambda prim, *args, **params: True if names(prim, *args, **params) else base(prim, *args, **params)

    table = {
        "none": lambda: None,
        "full": lambda: and_keep(cp.nothing_saveable),
        "save_dots_no_batch": lambda: and_keep(cp.dots_with_no_batch_dims_saveable),
        "save_attention": lambda: cp.save_only_these_names(*_ATTENTION_NAMES, *keep),
        "save_qkv_attention": lambda: cp.save_only_these_names(*_QKV_ATTENTION_NAMES, *keep),
        "offload_dots_no_batch": lambda: and_keep(cp.offload_dot_with_no_batch_dims(**offload)),
        "offload_attention": lambda: cp.save_and_offload_only_these_names(
            names_which_can_be_saved=list(keep), names_which_can_be_offloaded=list(_ATTENTION_NAMES), **offload),
        "offload_qkv_attention": lambda: cp.save_and_offload_only_these_names(
            names_which_can_be_saved=list(keep), names_which_can_be_offloaded=list(_QKV_ATTENTION_NAMES), **offload),
    }
    return table[policy]()


def _remat(fn: Callable, policy: str, scanned: bool = True, keep: tuple[str, ...] = ()) -> Callable:
    """`fn` rematerialised by `policy` (keeping the checkpoint names `keep` too). prevent_cse=False
    is safe only inside a scan: in an unrolled loop XLA would merge the recomputation with the
    original forward and drop the remat.

    "none" is `fn` itself, not a checkpoint that saves everything: jax.checkpoint marks every saved
    residual with a reduce_precision (jax PR 22244), which on TPU splits fusions (a v6e-8 block pair
    fwd+bwd estimated 40% slower that way)."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(policy, keep), prevent_cse=not scanned)


def _split_control(stream: ControlStream | None, n: int):
    """Split a ControlStream into (per-layer xs scanned over, constants shared by all layers)."""
    if stream is None:
        return None, None
    per_layer = {}
    shared = {}
    for name in ("img", "txt"):
        feat, gate = getattr(stream, name), getattr(stream, f"{name}_gate")
        if feat is None:
            continue
        if gate is None:
            per_layer[name] = feat  # [n, B, N, C]
        else:
            shared[name] = feat  # [B, N, C]
            per_layer[f"{name}_gate"] = gate  # [n, B, C]
    return per_layer, shared


def _residual(name: str, layer_ctrl, shared_ctrl) -> Array | None:
    """The residual of one layer for stream `name`, or None."""
    if layer_ctrl is None:
        return None
    if name in layer_ctrl:
        return layer_ctrl[name]
    if f"{name}_gate" in layer_ctrl:  # [B, L, C] x [B, 1, C], kept in the batch split (layers.batch_split)
        return batch_split(shared_ctrl[name] * batch_split(layer_ctrl[f"{name}_gate"][:, None, :]))
    return None


def _modulations(graphdef, params, vec: Array) -> Array | None:
    """Every stacked layer's modulation vectors at once, before the layer loop: [n, ...] (the blocks'
    `modulations`). They depend only on vec, so computing them here takes the modulation kernels
    (a third of a double block's weights, a fifth of a single block's) out of the loop: with
    FSDP-sharded weights the partitioner multiplies the small vec against the kernels where they
    lie instead of all-gathering them per layer, and a remat'ed loop does not gather them again
    in the backward pass. None under weight gathering (sharded inference, `weight_gather`): there
    every contraction must run whole on one device, as in pmap, so the blocks compute their own
    from their gathered weights."""
    if weight_gather.active():
        return None
    # vec split by channel like the kernels' input dimension (fsdp): each chip multiplies its slice of
    # vec by its shard of the kernels, and the partial products are summed into the batch split
    # (a reduce-scatter of [n, B, 6C]: megabytes, where all-gathering the kernels moves gigabytes)
    vec = mesh_split(vec, None, "fsdp")
    mods = jax.vmap(lambda p: nnx.merge(graphdef, p).modulations(vec))(params)
    return mesh_split(mods, *([None] * (mods.ndim - 2)), "batch")


def _add(x: Array, r: Array | None) -> Array:
    return x if r is None else x + r.astype(x.dtype)


class Flux(nnx.Module):
    """FLUX.1 transformer; call as `model(img, img_ids, txt, txt_ids, timesteps, y, guidance, control)`."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        c = config.hidden_size
        self.img_in = linear(config.in_channels, c, rngs=rngs, **kw)
        self.time_in = MLPEmbedder(256, c, rngs=rngs, **kw)
        self.vector_in = MLPEmbedder(config.vec_in_dim, c, rngs=rngs, **kw)
        self.guidance_in = MLPEmbedder(256, c, rngs=rngs, **kw) if config.guidance_embed else None
        self.txt_in = linear(config.context_in_dim, c, rngs=rngs, **kw)
        self.double_blocks = _stacked(DoubleStreamBlock, config.depth, config, rngs)
        self.single_blocks = _stacked(SingleStreamBlock, config.depth_single_blocks, config, rngs)
        self.final_layer = LastLayer(c, config.out_channels, rngs=rngs, **kw)

    # -- conditioning ------------------------------------------------------------------

    def embed_vec(self, timesteps: Array, y: Array, guidance: Array | None) -> Array:
        """vec [B, C] from t in [0, 1], the pooled text vector y and the guidance scale."""
        dt = jnp.dtype(self.config.dtype)
        vec = self.time_in(timestep_embedding(timesteps, 256).astype(dt))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dt))
        return vec + self.vector_in(y.astype(dt))

    def pos_embed(self, txt_ids: Array, img_ids: Array) -> Array:
        """Rope tables for [txt; img]: [B, T+L, head_dim/2, 2, 2] float32."""
        return embed_nd(jnp.concatenate([txt_ids, img_ids], axis=1), self.config.axes_dim, self.config.theta)

    # -- forward -----------------------------------------------------------------------

    def __call__(
        self,
        img: Array,
        img_ids: Array,
        txt: Array,
        txt_ids: Array,
        timesteps: Array,
        y: Array,
        guidance: Array | None = None,
        control: Control | None = None,
        *,
        pe: Array | None = None,
    ) -> Array:
        return self.forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, control, pe=pe)[0]

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None, *, intermediates=False,
                pe=None):
        """`__call__` that can also return every block's output (for numerics comparisons).

        `pe`: precomputed rope tables `pos_embed(txt_ids, img_ids)` ([B or 1, T+L, head_dim/2, 2, 2]),
        so a training loop builds them once per resolution; None computes them here.

        With `intermediates=True` the second value is a dict: `double_img` [depth, B, L, C],
        `double_txt` [depth, B, T, C] and `single` [depth_single, B, T+L, C] (outputs after
        each block, control residuals included); otherwise it is None.
        """
        img_ids, txt_ids = self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance, control)
        dt = jnp.dtype(self.config.dtype)
        vec = self.embed_vec(timesteps, y, guidance)
        if pe is None:
            pe = self.pos_embed(txt_ids, img_ids)
        img = self.img_in(img.astype(dt))
        txt = self.txt_in(txt.astype(dt))
        (img, txt), d_hist = self.run_double_blocks(img, txt, vec, pe, control.double if control else None, intermediates)
        x = jnp.concatenate([txt, img], axis=1)
        x, s_hist = self.run_single_blocks(x, vec, pe, txt.shape[1], control.single if control else None, intermediates)
        out = self.final_layer(x[:, txt.shape[1] :], vec)
        if not intermediates:
            return out, None
        return out, dict(double_img=d_hist[0], double_txt=d_hist[1], single=s_hist)

    def run_double_blocks(self, img, txt, vec, pe, stream: ControlStream | None = None, intermediates: bool = False):
        per_layer, shared = _split_control(stream, self.config.depth)

        def body(carry, layer_params, layer_ctrl, layer_mods):
            img, txt = carry
            img, txt = nnx.merge(graphdef, layer_params)(img, txt, vec, pe, layer_mods)
            img = _add(img, _residual("img", layer_ctrl, shared))
            txt = _add(txt, _residual("txt", layer_ctrl, shared))
            return img, txt

        graphdef, params = nnx.split(self.double_blocks)
        mods = _modulations(graphdef, params, vec)
        return self._loop(body, (img, txt), params, per_layer, self.config.depth, intermediates, mods,
                          self.config.scan_unroll, self.config.scan_group, "double")

    def run_single_blocks(self, x, vec, pe, num_txt: int, stream: ControlStream | None = None, intermediates: bool = False):
        per_layer, shared = _split_control(stream, self.config.depth_single_blocks)

        def body(x, layer_params, layer_ctrl, layer_mods):
            x = nnx.merge(graphdef, layer_params)(x, vec, pe, layer_mods)
            r_txt = _residual("txt", layer_ctrl, shared)
            r_img = _residual("img", layer_ctrl, shared)
            if r_txt is not None or r_img is not None:
                txt, img = x[:, :num_txt], x[:, num_txt:]
                x = jnp.concatenate([_add(txt, r_txt), _add(img, r_img)], axis=1)
            return x

        graphdef, params = nnx.split(self.single_blocks)
        mods = _modulations(graphdef, params, vec)
        return self._loop(body, x, params, per_layer, self.config.depth_single_blocks, intermediates, mods,
                          self.config.unroll_single, self.config.group_single, "single")

    def _loop(self, body, carry, params, per_layer_ctrl, n: int, intermediates: bool = False, mods=None,
              unroll: int = 1, group: int = 1, kind: str = "double"):
        """Run `body` over the n stacked layers; returns (carry, per-layer outputs or None).

        `unroll`: lax.scan's `unroll` (blocks per loop iteration); `group`: blocks per loop body
        written out (`FluxConfig.scan_group`); `kind`: "double" or "single", for
        `FluxConfig.keep_gelu_grad`. `mods`: every layer's modulation
        vectors ([n, ...], from `_modulations`), scanned over with
        the layers' parameters. Under `weight_gather.gathering(mesh)` (sharded inference) each
        layer's parameters are all-gathered inside the loop, just before the layer runs (a no-op
        otherwise).
        """
        step = _remat(lambda c, layer_params, layer_ctrl, layer_mods: body(c, gather(layer_params), layer_ctrl, layer_mods),
                      self.config.remat_policy, self.config.scan_layers,
                      ("gelu_grad",) if self.config.keep_gelu_grad in (kind, "all") else ())
        if self.config.scan_layers:
            xs = (params, per_layer_ctrl, mods)
            if group > 1:  # [n, ...] -> [n / group, group, ...]: a free reshape of the leading axis
                xs = jax.tree.map(lambda a: a.reshape(n // group, group, *a.shape[1:]), xs)

            def scan_body(c, layer_xs):
                history = []
                for j in range(group):
                    c = step(c, *(layer_xs if group == 1 else jax.tree.map(lambda a: a[j], layer_xs)))
                    history.append(c)
                if not intermediates:
                    return c, None
                return c, (c if group == 1 else jax.tree.map(lambda *h: jnp.stack(h), *history))

            carry, ys = jax.lax.scan(scan_body, carry, xs, unroll=unroll)
            if intermediates and group > 1:
                ys = jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), ys)
            return carry, ys
        history = []
        for i in range(n):
            layer = jax.tree.map(lambda a: a[i], (params, per_layer_ctrl, mods))
            carry = step(carry, *layer)
            history.append(carry)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *history) if intermediates else None
        return carry, stacked

    # -- input validation ----------------------------------------------------------------

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, control):
        cfg = self.config
        n_axes = len(cfg.axes_dim)

        def expect(name, arr, shape):
            got = tuple(getattr(arr, "shape", ()))
            ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
            if not ok:
                want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"Flux: `{name}` must have shape {want}, got {list(got)}")

        expect("img", img, (None, None, cfg.in_channels))
        b, l = img.shape[:2]
        expect("txt", txt, (b, None, cfg.context_in_dim))
        t = txt.shape[1]
        if getattr(img_ids, "ndim", 0) == 2:
            img_ids = jnp.broadcast_to(img_ids, (b, *img_ids.shape))
        if getattr(txt_ids, "ndim", 0) == 2:
            txt_ids = jnp.broadcast_to(txt_ids, (b, *txt_ids.shape))
        expect("img_ids", img_ids, (b, l, n_axes))
        expect("txt_ids", txt_ids, (b, t, n_axes))
        expect("timesteps", timesteps, (b,))
        expect("y", y, (b, cfg.vec_in_dim))
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("Flux: `guidance` [B] is required for a guidance-embedded model (flux-dev); got None")
            expect("guidance", guidance, (b,))
        if control is not None:
            self._check_control(control, b, l, t)
        return img_ids, txt_ids

    def _check_control(self, control: Control, b: int, l: int, t: int):
        c = self.config.hidden_size
        for kind, n in (("double", self.config.depth), ("single", self.config.depth_single_blocks)):
            stream = getattr(control, kind)
            if stream is None:
                continue
            for name, tokens in (("img", l), ("txt", t)):
                feat, gate = getattr(stream, name), getattr(stream, f"{name}_gate")
                where = f"control.{kind}.{name}"
                if feat is None:
                    if gate is not None:
                        raise ValueError(f"Flux: `{where}_gate` given without `{where}`")
                    continue
                want = (b, tokens, c) if gate is not None else (n, b, tokens, c)
                if tuple(feat.shape) != want:
                    raise ValueError(f"Flux: `{where}` must have shape {list(want)}, got {list(feat.shape)}")
                if gate is not None and tuple(gate.shape) != (n, b, c):
                    raise ValueError(f"Flux: `{where}_gate` must have shape {[n, b, c]}, got {list(gate.shape)}")


def _stacked(block_cls, n: int, config: FluxConfig, rngs: nnx.Rngs):
    """One block module whose parameters have a leading layer axis of size n."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return block_cls(config.block_dims, rngs=r, dtype=config.dtype, param_dtype=config.param_dtype)

    return make(rngs)
