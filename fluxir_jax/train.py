"""FluxIR training: the objective, the train state and the jitted, sharded step.

Objective (`fluxir_loss`, a pure function of explicit t, noise and crop offsets; the PyTorch
re-statement in the converter uses exactly this definition):

    x = 2 img - 1;  z0 = vae.encode(hq);  zc = vae.encode(lq_up)        (scaled latents, mean)
    z_t = (1 - t) z0 + t eps;  v = eps - z0
    v_hat = unpack(fluxir_forward(base, adapter, pack(z_t), pack(zc), img_ids, txt, txt_ids, t, y, g))
    L_flow = mean((v_hat - v)^2)
    x0_hat = z_t - t v_hat;  a latent crop of pixel_crop/8 at (oy, ox) per example, decoded by the
    frozen VAE decoder (gradients flow through it, its weights are not differentiated), against
    the HQ pixel crop at (8 oy, 8 ox): L_pix = mean |dec - hq_crop| (or squared), over the
    examples with t in [pix_t_min, pix_t_max];  L = L_flow + pixel_weight L_pix

The base and the VAE are frozen: they are arguments of the step that are never differentiated
(the gradient is taken w.r.t. the adapter parameters only) and pass through `stop_gradient`.
The adapter keeps fp32 master parameters and AdamW state; a step whose loss or gradient is not
finite leaves them unchanged and is counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fluxir_jax import libtpu_env, parallel, sampling
from fluxir_jax.models.adapter import FluxIR, fluxir_forward
from fluxir_jax.models.layers import embed_nd
from fluxir_jax.train_config import LossConfig, OptimConfig, TrainConfig

Array = jax.Array


# ----------------------------------------------------------------------------- objective


def sample_timesteps(key: Array, batch: int, seq_len: int, cfg: LossConfig) -> Array:
    """t [batch] in (0, 1) from `cfg.timesteps` (see LossConfig); t = 1 is noise."""
    if cfg.timesteps == "logit_normal":
        u = jax.random.normal(key, (batch,), jnp.float32)
        t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * u)
        if cfg.resolution_shift:
            t = shift_timesteps(t, sampling.lin_mu(seq_len))
        return t
    t = jax.random.uniform(key, (batch,), jnp.float32)
    if cfg.timesteps == "high_noise":
        t = shift_timesteps(t, float(np.log(cfg.high_noise_shift)))
    return t


def shift_timesteps(t: Array, mu: float) -> Array:
    """t' = e^mu / (e^mu + 1/t - 1) (the FLUX resolution shift), written to stay finite at t -> 0."""
    e = jnp.float32(np.exp(mu))
    return e * t / (e * t + (1.0 - t))


def crop_latent(x: Array, offsets: Array, size: int) -> Array:
    """Per-example crops: x [B, H, W, C], offsets [B, 2] (y, x) -> [B, size, size, C]."""
    def one(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (size, size, img.shape[-1]))

    return jax.vmap(one)(x, offsets.astype(jnp.int32))


def fluxir_loss(base, adapter: FluxIR, vae, hq: Array, lq_up: Array, txt: Array, y: Array, t: Array, noise: Array,
                crop_offsets: Array, *, pixel_crop: int, pixel_weight: float = 1.0, pixel_loss: str = "l1",
                pix_t_min: float = 0.0, pix_t_max: float = 1.0, guidance: float | None = None,
                pe: Array | None = None, adapter_pe: Array | None = None) -> tuple[Array, dict]:
    """The FluxIR objective for one batch (see the module docstring); returns (L, {flow, pix}).

    hq, lq_up: [B, H, W, 3] in [0, 1]; txt [T, ctx], y [vec]: the base's text conditioning;
    t [B]; noise: like the HQ latent [B, H/8, W/8, 16]; crop_offsets [B, 2] latent (y, x).
    """
    b, hh, ww, _ = hq.shape
    z0 = jax.lax.stop_gradient(vae.encode(2.0 * hq - 1.0, tiled=False))
    zc = jax.lax.stop_gradient(vae.encode(2.0 * lq_up - 1.0, tiled=False))
    lh, lw = z0.shape[1], z0.shape[2]
    t = t.astype(jnp.float32)
    tb = t[:, None, None, None]
    z_t = (1.0 - tb) * z0 + tb * noise
    v = noise - z0
    ids = sampling.img_ids(b, lh, lw)
    txt_b = jnp.broadcast_to(txt[None], (b, *txt.shape))
    y_b = jnp.broadcast_to(y[None], (b, *y.shape))
    g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)
    v_hat = fluxir_forward(base, adapter, sampling.pack(z_t), sampling.pack(zc), ids, txt_b,
                           sampling.txt_ids(b, txt.shape[0]), t, y_b, g, pe=pe, adapter_pe=adapter_pe)
    v_hat = sampling.unpack(v_hat.astype(jnp.float32), lh, lw)
    flow = jnp.mean(jnp.square(v_hat - v))
    pix = jnp.zeros((), jnp.float32)
    if pixel_weight > 0:
        cs = pixel_crop // 8
        x0_hat = z_t - tb * v_hat
        dec = vae.decode(crop_latent(x0_hat, crop_offsets, cs), tiled=False).astype(jnp.float32)
        target = crop_latent(2.0 * hq - 1.0, crop_offsets * 8, pixel_crop)
        diff = dec - target
        per = jnp.mean(jnp.abs(diff) if pixel_loss == "l1" else jnp.square(diff), axis=(1, 2, 3))
        mask = ((t >= pix_t_min) & (t <= pix_t_max)).astype(jnp.float32)
        pix = jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return flow + pixel_weight * pix, {"flow": flow, "pix": pix}


def draw_inputs(key: Array, batch: int, latent_hw: tuple[int, int], channels: int, cfg: LossConfig):
    """(t, noise, crop_offsets) for one (micro-)batch from one key."""
    kt, kn, kc = jax.random.split(key, 3)
    lh, lw = latent_hw
    t = sample_timesteps(kt, batch, (lh // 2) * (lw // 2), cfg)
    noise = jax.random.normal(kn, (batch, lh, lw, channels), jnp.float32)
    cs = cfg.pixel_crop // 8
    oy = jax.random.randint(kc, (batch,), 0, lh - cs + 1)
    ox = jax.random.randint(jax.random.fold_in(kc, 1), (batch,), 0, lw - cs + 1)
    return t, noise, jnp.stack([oy, ox], axis=-1)


# ----------------------------------------------------------------------------- state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training (and goes into checkpoints)."""

    params: Any  # adapter parameters, pure dict, fp32
    opt_state: Any
    step: Array  # int32: optimizer steps taken, skipped ones included
    rng: Array  # uint32 key data; step keys are fold_in(rng, step)
    skipped: Array  # int32: non-finite steps skipped so far
    bad_run: Array  # int32: consecutive non-finite steps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Frozen:
    """The frozen inputs of every step: base and VAE states, the base's text conditioning, rope tables."""

    base: Any
    vae: Any
    txt: Array  # [T, ctx]
    y: Array  # [vec]
    pe: Array  # rope tables for [txt; img]: [1, T+L, head_dim/2, 2, 2]
    adapter_pe: Array  # rope tables for [theta_p; img]


def merge_pure(graphdef, abstract_state, pure):
    """The module `graphdef` with the parameters of the pure dict `pure` (abstract_state gives the structure)."""
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy; replace_by_pure_dict works in place
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_ratio)
    else:
        after = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def rope_tables(base_config, text_len: int, latent_hw: tuple[int, int]) -> Array:
    """Rope tables for [T text tokens; image tokens] at one resolution: [1, T+L, head_dim/2, 2, 2]."""
    lh, lw = latent_hw
    ids = jnp.concatenate([sampling.txt_ids(1, text_len), sampling.img_ids(1, lh, lw)], axis=1)
    return embed_nd(ids, base_config.axes_dim, base_config.theta)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static parts of the step (hashable: graphdefs and configs)."""

    base_graphdef: Any
    adapter_graphdef: Any
    vae_graphdef: Any
    base_state: Any  # abstract nnx.States: the structure for rebuilding modules from pure dicts
    vae_state: Any
    adapter_state: Any
    cfg: TrainConfig
    latent_channels: int
    guidance: bool

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def make_step_fn(spec: StepSpec, tx: optax.GradientTransformation, mesh):
    """step(state, frozen, batch) -> (state, metrics); batch = {hq, lq_up} [B, H, W, 3] in [0, 1]."""
    cfg = spec.cfg
    lc = cfg.loss
    accum = cfg.optim.accum_steps
    schedule = lr_schedule(cfg.optim, cfg.steps)

    def loss_of(params, frozen: Frozen, micro, key):
        base = merge_pure(spec.base_graphdef, spec.base_state, jax.lax.stop_gradient(frozen.base))
        vae = merge_pure(spec.vae_graphdef, spec.vae_state, jax.lax.stop_gradient(frozen.vae))
        adapter = merge_pure(spec.adapter_graphdef, spec.adapter_state, params)
        hq = micro["hq"]
        b = hq.shape[0]
        lat = (hq.shape[1] // 8, hq.shape[2] // 8)
        t, noise, offsets = draw_inputs(key, b, lat, spec.latent_channels, lc)
        return fluxir_loss(base, adapter, vae, hq, micro["lq_up"], frozen.txt, frozen.y, t, noise, offsets,
                           pixel_crop=lc.pixel_crop, pixel_weight=lc.pixel_weight, pixel_loss=lc.pixel_loss,
                           pix_t_min=lc.pix_t_min, pix_t_max=lc.pix_t_max,
                           guidance=lc.guidance if spec.guidance else None, pe=frozen.pe, adapter_pe=frozen.adapter_pe)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    micro_sharding = parallel.batch_sharding(mesh, 4)

    def step(state: TrainState, frozen: Frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, frozen, batch, jax.random.fold_in(key, 0))
        else:
            def split(x):  # micro-batch a = examples j * accum + a: every device keeps its own examples
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return x

            micros = jax.tree.map(split, batch)

            def body(carry, xs):
                a, micro = xs
                micro = jax.tree.map(lambda m: jax.lax.with_sharding_constraint(m, micro_sharding), micro)
                (l, aux), g = grad_fn(state.params, frozen, micro, jax.random.fold_in(key, a))
                acc_g, acc_l, acc_aux = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_aux, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_aux = {"flow": jnp.zeros((), jnp.float32), "pix": jnp.zeros((), jnp.float32)}
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), zero_aux),
                                                 (jnp.arange(accum), micros))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, aux = loss / accum, jax.tree.map(lambda v: v / accum, aux)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        applied = state.step - state.skipped
        new_state = TrainState(
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            bad_run=jnp.where(finite, 0, state.bad_run + 1).astype(jnp.int32),
        )
        metrics = {"loss": loss, "loss_flow": aux["flow"], "loss_pix": aux["pix"], "grad_norm": gnorm,
                   "lr": schedule(applied), "finite": finite}
        return new_state, metrics

    return step


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32),
                      bad_run=jnp.zeros((), jnp.int32))


def state_shardings(abstract_params_shardings, tx, abstract_params, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments like their parameters, scalars replicated."""
    rep = parallel.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, abstract_params_shardings,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(params=abstract_params_shardings, opt_state=opt_sh, step=rep, rng=rep, skipped=rep, bad_run=rep)


def jit_step(step_fn, state_sh: TrainState, frozen_sh: Frozen, mesh):
    """The step as one jax.jit with explicit shardings and the chips' compiler options
    (`libtpu_env.compiler_options`); the state is donated."""
    batch_sh = {"hq": parallel.batch_sharding(mesh, 4), "lq_up": parallel.batch_sharding(mesh, 4)}
    rep = parallel.replicated(mesh)
    metrics_sh = {k: rep for k in ("loss", "loss_flow", "loss_pix", "grad_norm", "lr", "finite")}
    return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,), compiler_options=libtpu_env.mesh_compiler_options(mesh))
