"""Tiny random checkpoints for the restoration tests, written in the `fluxir convert` format.

`write_checkpoint` saves a random tiny Flux + tiny VAE as an Orbax composite checkpoint with
the same layout, `config.json` and `text/empty.npz` that `fluxir convert` writes (read back
by `fluxir_jax.checkpoint`); `write_adapter` saves a FluxIR adapter for it with every weight
randomised, SE gates included (non-zero), so the adapter changes the result.
"""
from __future__ import annotations

import json
import pathlib


import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxir_jax.config import to_dict
from fluxir_jax.models import adapter_io, presets
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder
from fluxir_jax.models.flux import Flux

TEXT_LEN = 4


def _random_state(abstract, seed: int, stacked: tuple[str, ...] = ()) -> object:
    """A concrete module with the structure of `abstract` and random numpy-drawn parameters.

    kernels ~ N(0, 1/fan_in), norm scales ~ 1 + 0.05 N, everything else (biases, gates, text
    embeddings, zero-initialised layers) ~ 0.05 N. Drawn with numpy: no per-op compilation.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape, name = tuple(var.shape), path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[-2]
            x = rng.standard_normal(shape) / np.sqrt(fan_in)
            if path[:2] == ("decoder", "conv_out"):
                x = x * 0.25  # keep the random decoder's images mostly inside [-1, 1] (little clipping)
        elif name == "scale":
            x = 1.0 + 0.05 * rng.standard_normal(shape)
        else:
            x = 0.05 * rng.standard_normal(shape)
        var = var.replace(jnp.asarray(x, var.dtype)) if hasattr(var, "replace") else var
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _tree(module) -> dict:
    tree: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = np.asarray(var.get_value())
    return tree


def models(seed: int = 0, **flux_overrides):
    cfg = presets.get("tiny", **flux_overrides)
    base = _random_state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), seed)
    vae = _random_state(nnx.eval_shape(lambda: AutoEncoder(AE_PRESETS["tiny"], rngs=nnx.Rngs(0))), seed + 1)
    rng = np.random.default_rng(seed + 2)
    t5 = (rng.standard_normal((TEXT_LEN, base.config.context_in_dim)) * 0.5).astype(np.float32)
    clip = (rng.standard_normal((base.config.vec_in_dim,)) * 0.5).astype(np.float32)
    return base, vae, t5, clip


def write_checkpoint(directory: pathlib.Path, seed: int = 0, **flux_overrides) -> pathlib.Path:
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    base, vae, t5, clip = models(seed, **flux_overrides)
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        ckpt.save(directory, ocp.args.Composite(transformer=ocp.args.PyTreeSave(_tree(base)),
                                                vae=ocp.args.PyTreeSave(_tree(vae))))
    finally:
        ckpt.close()
    (directory / "text").mkdir()
    np.savez(directory / "text" / "empty.npz", txt=t5, y=clip, computed=np.array(True))
    config = {"format": "fluxir-checkpoint", "format_version": 1, "items": ["transformer", "vae"],
              "transformer": to_dict(base.config), "vae": to_dict(vae.config),
              "text": {"empty": {"computed": True, "file": "text/empty.npz", "t5_len": TEXT_LEN}}}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_adapter(directory: pathlib.Path, seed: int = 0, gate: float = 0.5, **flux_overrides) -> pathlib.Path:
    base_cfg = presets.get("tiny", **flux_overrides)
    abstract = nnx.eval_shape(lambda: FluxIR(FluxIRConfig(text_len=TEXT_LEN), base_cfg, rngs=nnx.Rngs(0)))
    adapter = _random_state(abstract, seed + 11)
    rng = np.random.default_rng(seed + 12)
    for se in (adapter.se_img, adapter.se_txt):
        se.gamma.set_value(jnp.asarray(rng.standard_normal(se.gamma.shape) * gate, jnp.float32))
    adapter_io.save_adapter(adapter, directory)
    return pathlib.Path(directory)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic uint8 RGB image: low-frequency sinusoids with random phases."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fy, fx, p = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        chans.append(0.5 + 0.35 * np.sin(2 * np.pi * (fy * y / h + fx * x / w) + p))
    return np.clip(np.rint(np.stack(chans, -1) * 255), 0, 255).astype(np.uint8)


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB content with some structure (blurred noise)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (h, w, 3))
    a = (a + np.roll(a, 1, 0) + np.roll(a, 1, 1) + np.roll(a, (1, 1), (0, 1))) / 4
    return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)



