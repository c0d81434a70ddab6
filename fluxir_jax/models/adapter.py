"""The FluxIR adapter: one MM-DiT control block and per-block squeeze-and-excitation layers.

For a noisy latent z_t and the LQ latent z_lq (both packed [B, L, 64]):

    vec = base.embed_vec(t, theta_y, g)            frozen time_in / vector_in / guidance_in
    x   = base.img_in(z_t) + lq_in(z_lq)           lq_in = M_i, zero-initialised
    p   = base.txt_in(theta_p)                     theta_p [T, 4096], theta_y [768] learnable
    c_z, c_p = block(x, p, vec, pe)                a trainable copy of base double block 0
    for every controlled base block k:
        s_k = sigmoid(up_k(silu(down_k(mean_tokens(c)))))     (per stream: SE_z on c_z, SE_p on c_p)
        r_k = gamma_k * s_k * c                    gamma_k per channel, zero-initialised

The residuals r_k go to the base as a `Control` in its factored form (features c times
per-block gates gamma_k * s_k), so the 57 residuals never exist as 57 full-size tensors. A fresh
adapter (gamma = 0, lq_in = 0) leaves the base output unchanged.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fluxir_jax.errors import UserError
from fluxir_jax.models import presets
from fluxir_jax.models.flux import Control, ControlStream, Flux, FluxConfig
from fluxir_jax.models.layers import Array, DoubleStreamBlock, linear

CONTROL_BLOCKS = ("all", "double", "every_n")


@dataclasses.dataclass(frozen=True)
class FluxIRConfig:
    """Adapter options; each is one of the paper's ablations or a choice the paper leaves open.

    se_reduction         SE bottleneck = hidden / se_reduction (32 -> 96 at hidden 3072, ~0.41B total)
    control_blocks       "all" (19 double + 38 single), "double" (double blocks only) or
                         "every_n" (every `control_every`-th block, counted over all 57)
    control_every        the n of "every_n"
    image_only           no SE_p: only the image stream receives control
    base_consumes_theta  the frozen base also reads the learnable theta_p / theta_y instead of
                         the fixed empty-prompt embeddings
    control_scale        multiplies every residual (inference knob)
    text_len             length of theta_p (512 for flux-dev, 256 for schnell)
    param_dtype          adapter master weights (float32; compute follows the base dtype)
    """

    se_reduction: int = 32
    control_blocks: str = "all"
    control_every: int = 1
    image_only: bool = False
    base_consumes_theta: bool = False
    control_scale: float = 1.0
    text_len: int = 512
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.control_blocks not in CONTROL_BLOCKS:
            raise ValueError(f"control_blocks {self.control_blocks!r} is not one of {CONTROL_BLOCKS}")
        if self.control_every < 1 or self.se_reduction < 1:
            raise ValueError("control_every and se_reduction must be >= 1")

    def controlled(self, base: FluxConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Indices of the (double, single) base blocks that receive control."""
        if self.control_blocks == "all":
            return tuple(range(base.depth)), tuple(range(base.depth_single_blocks))
        if self.control_blocks == "double":
            return tuple(range(base.depth)), ()
        every = [k for k in range(base.depth + base.depth_single_blocks) if k % self.control_every == 0]
        return tuple(k for k in every if k < base.depth), tuple(k - base.depth for k in every if k >= base.depth)


class StackedLinear(nnx.Module):
    """n independent Linear layers applied to one input each: x [n, B, din] -> [n, B, dout]."""

    def __init__(self, n: int, din: int, dout: int, *, rngs: nnx.Rngs, param_dtype="float32"):
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.kernel = nnx.Param(init(rngs.params(), (n, din, dout), jnp.dtype(param_dtype)))
        bound = 1 / din**0.5
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (n, dout), jnp.dtype(param_dtype), -bound, bound))

    def __call__(self, x: Array) -> Array:
        return jnp.einsum("nbi,nio->nbo", x, self.kernel[...].astype(x.dtype)) + self.bias[...][:, None].astype(x.dtype)


class SqueezeExcite(nnx.Module):
    """Per-block SE gates for one stream: features c [B, N, D] -> gates gamma_k * s_k [n, B, D]."""

    def __init__(self, n: int, dim: int, reduction: int, *, rngs: nnx.Rngs, param_dtype="float32"):
        hidden = max(1, dim // reduction)
        self.down = StackedLinear(n, dim, hidden, rngs=rngs, param_dtype=param_dtype)
        self.up = StackedLinear(n, hidden, dim, rngs=rngs, param_dtype=param_dtype)
        self.gamma = nnx.Param(jnp.zeros((n, dim), jnp.dtype(param_dtype)))

    def __call__(self, c: Array) -> Array:
        squeezed = jnp.mean(c.astype(jnp.float32), axis=1)  # [B, D]
        n = self.gamma.shape[0]
        s = jax.nn.sigmoid(self.up(jax.nn.silu(self.down(jnp.broadcast_to(squeezed, (n, *squeezed.shape))))))
        return self.gamma[...][:, None, :].astype(jnp.float32) * s


class FluxIR(nnx.Module):
    """The adapter; `adapter(base, img, lq, img_ids, t, guidance)` returns the base's `Control`."""

    def __init__(self, config: FluxIRConfig, base_config: FluxConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.base_config = base_config
        c = base_config.hidden_size
        pd = config.param_dtype
        self.lq_in = linear(base_config.in_channels, c, rngs=rngs, dtype=base_config.dtype, param_dtype=pd)
        self.lq_in.kernel.set_value(jnp.zeros_like(self.lq_in.kernel[...]))
        self.lq_in.bias.set_value(jnp.zeros_like(self.lq_in.bias[...]))
        self.block = DoubleStreamBlock(base_config.block_dims, rngs=rngs, dtype=base_config.dtype, param_dtype=pd)
        self.theta_p = nnx.Param(jnp.zeros((config.text_len, base_config.context_in_dim), jnp.dtype(pd)))
        self.theta_y = nnx.Param(jnp.zeros((base_config.vec_in_dim,), jnp.dtype(pd)))
        d_idx, s_idx = config.controlled(base_config)
        n = len(d_idx) + len(s_idx)
        self.se_img = SqueezeExcite(n, c, config.se_reduction, rngs=rngs, param_dtype=pd)
        self.se_txt = None if config.image_only else SqueezeExcite(n, c, config.se_reduction, rngs=rngs, param_dtype=pd)

    # -- initialisation from the base ----------------------------------------------------

    def init_from_base(self, base: Flux, txt: Array, y: Array) -> None:
        """Copy base double block 0 into the control block; theta_p <- `txt`, theta_y <- `y`, the empty
        prompt's T5 embeddings [text_len, context] and CLIP pooled vector [vec]."""
        check_compatible(self, base.config)
        if tuple(txt.shape) != tuple(self.theta_p.shape) or tuple(y.shape) != tuple(self.theta_y.shape):
            raise UserError(
                f"empty-prompt embeddings have shapes {list(txt.shape)} / {list(y.shape)}, "
                f"the adapter expects {list(self.theta_p.shape)} / {list(self.theta_y.shape)}"
            )
        src = nnx.state(base.double_blocks, nnx.Param)
        dst = nnx.state(self.block, nnx.Param)
        first = jax.tree.map(lambda a, b: a[0].astype(b.dtype), src, dst)
        nnx.update(self.block, first)
        self.theta_p.set_value(jnp.asarray(txt, self.theta_p.dtype))
        self.theta_y.set_value(jnp.asarray(y, self.theta_y.dtype))

    # -- forward ---------------------------------------------------------------------------

    def text(self, batch: int) -> tuple[Array, Array]:
        """theta_p [B, T, ctx] and theta_y [B, vec], broadcast over the batch."""
        return (jnp.broadcast_to(self.theta_p[...], (batch, *self.theta_p.shape)),
                jnp.broadcast_to(self.theta_y[...], (batch, *self.theta_y.shape)))

    def __call__(self, base: Flux, img: Array, lq: Array, img_ids: Array, t: Array, guidance: Array | None,
                 pe: Array | None = None) -> Control:
        """`pe`: precomputed rope tables for [theta_p tokens; img] (None: computed here)."""
        if lq.shape != img.shape:
            raise ValueError(f"FluxIR: `lq` must have the shape of `img` {list(img.shape)}, got {list(lq.shape)}")
        b = img.shape[0]
        dt = jnp.dtype(base.config.dtype)
        theta_p, theta_y = self.text(b)
        txt_ids = jnp.zeros((b, self.config.text_len, 3), jnp.float32)
        vec = base.embed_vec(t, theta_y, guidance)
        if pe is None:
            pe = base.pos_embed(txt_ids, img_ids)
        x = base.img_in(img.astype(dt)) + self.lq_in(lq.astype(dt))
        p = base.txt_in(theta_p.astype(dt))
        c_img, c_txt = self.block(x, p, vec, pe)
        return self._control(c_img, c_txt)

    def _control(self, c_img: Array, c_txt: Array) -> Control:
        cfg, base = self.config, self.base_config
        d_idx, s_idx = cfg.controlled(base)
        scale = cfg.control_scale

        def gates(se):
            """SE gates of the controlled blocks scattered into (double [depth], single [depth_single])."""
            g = se(c_img if se is self.se_img else c_txt)  # [n_controlled, B, D]
            full = lambda n, idx, rows: (rows if len(idx) == n else  # noqa: E731
                                         jnp.zeros((n, *g.shape[1:]), g.dtype).at[jnp.asarray(idx, jnp.int32)].set(rows))
            return full(base.depth, d_idx, g[: len(d_idx)]), (full(base.depth_single_blocks, s_idx, g[len(d_idx):]) if s_idx else None)

        gi_d, gi_s = gates(self.se_img)
        gt_d, gt_s = gates(self.se_txt) if self.se_txt is not None else (None, None)
        feat_i, feat_t = c_img * scale, (c_txt * scale if self.se_txt is not None else None)
        double = ControlStream(img=feat_i, txt=feat_t, img_gate=gi_d, txt_gate=gt_d)
        single = ControlStream(img=feat_i, txt=feat_t, img_gate=gi_s, txt_gate=gt_s) if s_idx else None
        return Control(double=double, single=single)


def check_compatible(adapter: FluxIR, base: FluxConfig, text_len: int | None = None) -> None:
    """Refuse a base (and its stored text length) that differs from the adapter's, in one line."""
    mine = adapter.base_config
    for field in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "in_channels", "context_in_dim", "vec_in_dim", "guidance_embed"):
        a, b = getattr(mine, field), getattr(base, field)
        if a != b:
            raise UserError(f"adapter was built for base {field}={a}, the loaded base has {field}={b}")
    if text_len is not None and text_len != adapter.config.text_len:
        raise UserError(f"adapter was built for text length {adapter.config.text_len}, the base's text embeddings have length {text_len}")


def fluxir_forward(base: Flux, adapter: FluxIR, img, lq, img_ids, txt, txt_ids, t, y, guidance=None, *,
                   pe=None, adapter_pe=None) -> Array:
    """One denoising step of base + adapter: the velocity prediction [B, L, out_channels].

    `txt`/`y` are the base's text conditioning (the fixed empty-prompt embeddings), replaced
    by the adapter's theta when `base_consumes_theta`. `pe` / `adapter_pe`: precomputed rope
    tables for the base's [txt; img] and the adapter's [theta_p; img] tokens (None: computed).
    """
    control = adapter(base, img, lq, img_ids, t, guidance, pe=adapter_pe)
    if adapter.config.base_consumes_theta:
        txt, y = adapter.text(img.shape[0])
        txt_ids = jnp.zeros((img.shape[0], adapter.config.text_len, 3), jnp.float32)
        pe = adapter_pe if pe is None else pe
    return base(img, img_ids, txt, txt_ids, t, y, guidance, control, pe=pe)


@dataclasses.dataclass(frozen=True)
class FluxIRVelocity:
    """Velocity function for `sampling.denoise` with params = (base_state, adapter_state).

    The base state passes through `stop_gradient`: whatever differentiates this function, the
    frozen base receives no gradient. The LQ latent travels in `cond.extra["lq"]`.
    """

    base_graphdef: object
    adapter_graphdef: object

    def __call__(self, params, img, t, cond):
        base_state, adapter_state = params
        base = nnx.merge(self.base_graphdef, jax.lax.stop_gradient(base_state))
        adapter = nnx.merge(self.adapter_graphdef, adapter_state)
        return fluxir_forward(base, adapter, img, cond.extra["lq"], cond.img_ids, cond.txt, cond.txt_ids, t, cond.y, cond.guidance)


def count_params(config: FluxIRConfig = FluxIRConfig(), base: str | FluxConfig = "flux-dev") -> int:
    """Trainable adapter parameters, from abstract shapes only (nothing is allocated)."""
    base_cfg = presets.get(base) if isinstance(base, str) else base
    abstract = nnx.eval_shape(lambda: FluxIR(config, base_cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
