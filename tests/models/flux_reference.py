"""Test helpers: tiny diffusers FLUX models with every weight randomized, and shared inputs.

The PyTorch side is always the reference; these helpers only build it and move weights across.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from fluxir_convert import flux_map
from fluxir_jax import treeutil
from fluxir_jax.models.flux import Flux, FluxConfig

TINY_DIFFUSERS = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomize_torch_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def tiny_diffusers(guidance: bool, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(guidance_embeds=guidance, **TINY_DIFFUSERS).eval()
    randomize_torch_(model, seed)
    return model


def config_for(dm, **kw) -> FluxConfig:
    c = dm.config
    return FluxConfig(
        in_channels=c.in_channels, out_channels=c.out_channels or c.in_channels,
        vec_in_dim=c.pooled_projection_dim, context_in_dim=c.joint_attention_dim,
        hidden_size=c.num_attention_heads * c.attention_head_dim, num_heads=c.num_attention_heads,
        depth=c.num_layers, depth_single_blocks=c.num_single_layers, axes_dim=tuple(c.axes_dims_rope),
        guidance_embed=c.guidance_embeds, **kw,
    )


def flax_from_diffusers(dm, **kw) -> Flux:
    """A Flax Flux holding exactly the weights of diffusers model `dm` (through the BFL names)."""
    sd = {k: v.detach().float().numpy() for k, v in dm.state_dict().items()}
    model = Flux(config_for(dm, **kw), rngs=nnx.Rngs(0))
    return treeutil.load_into(model, flux_map.bfl_to_flax_params(flux_map.diffusers_to_bfl(sd)), "diffusers model")


def grid_ids(h: int, w: int, offset: float = 0.0) -> np.ndarray:
    """img ids (0, row, col) for an h x w token grid: [h*w, 3]."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None] + offset
    ids[..., 2] = np.arange(w)[None, :] + offset
    return ids.reshape(h * w, 3)


def inputs(batch=2, h=3, w=5, t=7, in_ch=64, ctx=32, vec=32, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        img=rng.standard_normal((batch, h * w, in_ch)).astype(np.float32),
        img_ids=grid_ids(h, w),
        txt=rng.standard_normal((batch, t, ctx)).astype(np.float32),
        txt_ids=np.zeros((t, 3), np.float32),
        timesteps=rng.uniform(0.05, 1.0, batch).astype(np.float32),
        y=rng.standard_normal((batch, vec)).astype(np.float32),
        guidance=rng.uniform(1.0, 5.0, batch).astype(np.float32),
    )


def run_diffusers(dm, x, guidance=True, **extra):
    with torch.no_grad():
        out = dm(
            hidden_states=torch.from_numpy(x["img"]),
            encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["y"]),
            timestep=torch.from_numpy(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"]),
            txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=torch.from_numpy(x["guidance"]) if guidance else None,
            return_dict=False,
            **extra,
        )[0]
    return out.numpy()


def run_flax(model, x, guidance=True, control=None):
    b = x["img"].shape[0]
    ids = lambda a: jnp.broadcast_to(jnp.asarray(a), (b, *a.shape))  # noqa: E731
    return model(
        jnp.asarray(x["img"]), ids(x["img_ids"]), jnp.asarray(x["txt"]), ids(x["txt_ids"]),
        jnp.asarray(x["timesteps"]), jnp.asarray(x["y"]),
        jnp.asarray(x["guidance"]) if guidance else None, control,
    )
