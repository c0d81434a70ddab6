"""Model presets as data: `get("flux-dev")`, `get("tiny")`, ... and the VAE presets.

The same presets exist as YAML under `configs/models/` (a test keeps the two identical); load a
YAML file, possibly edited, with `fluxir_jax.config.load(FluxConfig, path, overrides)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fluxir_jax.errors import UserError
from fluxir_jax.models.flux import FluxConfig

_FLUX_REAL = dict(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True,
    dtype="bfloat16", param_dtype="bfloat16", remat_policy="none",
)

FLUX_PRESETS: dict[str, dict[str, Any]] = {
    # BFL `flux/util.py` configs["flux-dev"] / ["flux-schnell"] (schnell: no guidance embedding).
    "flux-dev": dict(_FLUX_REAL, guidance_embed=True),
    "flux-schnell": dict(_FLUX_REAL, guidance_embed=False),
    # A few hundred thousand parameters: unit tests, milliseconds per call on CPU.
    "tiny": dict(
        in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
        num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6), theta=10_000, qkv_bias=True,
        guidance_embed=True, dtype="float32", param_dtype="float32", remat_policy="none",
    ),
    # About 80M parameters with the real embedding widths: CPU benchmarks.
    "small": dict(
        in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=768, mlp_ratio=4.0,
        num_heads=12, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28), theta=10_000, qkv_bias=True,
        guidance_embed=True, dtype="float32", param_dtype="float32", remat_policy="none",
    ),
}


def names() -> list[str]:
    return sorted(FLUX_PRESETS)


def get(name: str, **overrides: Any) -> FluxConfig:
    """The FluxConfig preset `name`, with optional field overrides (e.g. dtype="float32")."""
    if name not in FLUX_PRESETS:
        raise UserError(f"unknown model preset {name!r} (known: {', '.join(names())})")
    fields = {f.name for f in dataclasses.fields(FluxConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown FluxConfig field {bad[0]!r}")
    return FluxConfig(**{**FLUX_PRESETS[name], **overrides})
