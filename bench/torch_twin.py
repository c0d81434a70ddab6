"""The PyTorch twins of our Flax models for the benchmarks: same weights, diffusers modules.

    dm = diffusers_flux(flax_base)                 # FluxTransformer2DModel, float32, eval, frozen
    dv = diffusers_vae(flax_ae, ae_config)         # AutoencoderKL (FLUX layout: no quant convs)
    ta = torch_adapter(flax_adapter, dm)           # convert/torch_fluxir.py TorchFluxIR via the export file

Not a benchmark itself (bench/run_all.py skips it).
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
from flax import nnx


def _flat_params(module) -> list[tuple[tuple, np.ndarray]]:
    return [(path, np.asarray(var.get_value())) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def set_threads(n: int) -> int:
    """PyTorch intra-op threads (0: one per core); returns the count in use. On an oversubscribed
    machine one thread avoids OpenMP barrier stalls that can make eager PyTorch 100x slower."""
    import torch

    torch.set_num_threads(n or os.cpu_count())
    return torch.get_num_threads()


def diffusers_flux(model):
    """Our Flax `Flux` -> diffusers `FluxTransformer2DModel` with the same weights (float32, frozen)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxir_convert.flux_map import bfl_to_diffusers, flax_to_bfl

    cfg = model.config
    dm = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=tuple(cfg.axes_dim),
    ).eval()
    bfl = {}
    for path, arr in _flat_params(model):
        if path[0] in ("double_blocks", "single_blocks"):  # scanned stacks: one BFL block per layer
            for i in range(arr.shape[0]):
                k, v = flax_to_bfl(path, arr[i], i)
                bfl[k] = v
        else:
            k, v = flax_to_bfl(path, arr)
            bfl[k] = v
    dm.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in bfl_to_diffusers(bfl).items()})
    return dm.requires_grad_(False)


def diffusers_vae(ae, cfg):
    """Our Flax `AutoEncoder` (config `cfg`) -> diffusers `AutoencoderKL` with the same weights (float32, frozen)."""
    import torch
    from diffusers import AutoencoderKL

    from fluxir_convert import vae_map

    n = len(cfg.ch_mult)
    dv = AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
        scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
    ).eval()
    bfl = dict(vae_map.nnx_to_bfl(path, arr) for path, arr in _flat_params(ae))
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in vae_map.bfl_to_diffusers_state_dict(bfl).items()}
    dv.load_state_dict(state)
    return dv.requires_grad_(False)


def torch_adapter(adapter, dm):
    """Our Flax `FluxIR` -> `fluxir_convert.torch_fluxir.TorchFluxIR` (through `adapter_io.export_safetensors`)."""
    from fluxir_convert import torch_fluxir
    from fluxir_jax.models import adapter_io

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "adapter.safetensors"
        adapter_io.export_safetensors(adapter, path)
        return torch_fluxir.load_adapter_safetensors(path, dm)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
