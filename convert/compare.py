"""`fluxir compare`: check a converted checkpoint against its PyTorch source, block by block.

The reference is the diffusers model class (`FluxTransformer2DModel`, `AutoencoderKL`), built
from the source: a diffusers folder's tensors are loaded as they are (no key map involved, so
the check is independent of ours); a BFL file is brought to diffusers names with our inverse
map (`flux_map.bfl_to_diffusers`, `vae_map.bfl_to_diffusers_state_dict`), since diffusers'
own converter hard-codes FLUX's 3072 width. Both sides run in float32 (JAX at "highest"
matmul precision) on the same seeded random inputs:

    transformer  1 x 8x8 image tokens, 16 text tokens, random t / guidance / pooled vector;
                 image and text streams after every double and single block, final output
    vae          encode of a random 64x64 image (posterior mean, scaled) and decode of a
                 random latent

Rows are relative errors ||flax - torch|| / ||torch||; the exit code is 1 if any exceeds `tol`.
Settings a source may not record (RoPE axes and VAE GroupNorm groups / latent scale and shift
of BFL files) are taken from the checkpoint's config.json unless given as options, and the
output says so.
If the checkpoint was stored in a narrower dtype than the source (`convert --dtype bf16` of
float32 weights), the reference weights are rounded the same way first, so the check is of
the conversion, not of the rounding.
`layers=N` builds both models with only the first N double and N single blocks (the Flax side
reads only those layers from the checkpoint), so a 12B model can be checked on a machine that
cannot hold two full float32 copies.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from . import flux_map, formats, vae_map
from fluxir_jax import checkpoint
from fluxir_jax.errors import UserError

_STRUCTURAL_SKIP = {"dtype", "param_dtype", "remat_policy", "scan_layers", "tile_size", "tile_overlap", "tile_halo",
                    "tile_stat_passes", "attn_chunk", "resolution",
                    "attention", "splash_block_q", "splash_block_kv", "splash_block_kv_compute",
                    "splash_fused_bwd", "splash_block_kv_bwd"}


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / denom) if denom > 0 else float(num)


def _f32(x: np.ndarray) -> np.ndarray:
    if x.dtype.name == "bfloat16":
        return (np.ascontiguousarray(x).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)
    return np.asarray(x, np.float32)


def _same_structure(a, b, what: str, ckpt) -> None:
    for f in dataclasses.fields(a):
        if f.name in _STRUCTURAL_SKIP:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if (tuple(va) if isinstance(va, (list, tuple)) else va) != (tuple(vb) if isinstance(vb, (list, tuple)) else vb):
            raise UserError(f"{ckpt}: the checkpoint's {what} has {f.name}={vb!r}, the source {va!r}")


def _round_to_stored(state: dict, ckpt, component: str, log: Callable[[str], None]) -> dict:
    """Round the reference weights to the checkpoint's stored dtype (e.g. a --dtype bf16 conversion of
    float32 weights), so the comparison checks the conversion rather than the rounding."""
    import torch

    stored = checkpoint.read_config(ckpt).get("stored_dtypes", {}).get(component, {})
    if len(stored) != 1:
        return state
    name = next(iter(stored))
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
    if target is None:
        return state
    log(f"note: {component} reference weights rounded to the checkpoint's stored {name}")
    return {k: v.to(target).float() for k, v in state.items()}


def _meta_load(cls, config: dict, state: dict):
    import torch

    with torch.device("meta"):
        model = cls(**config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise UserError(f"source has no tensor for {missing[0]!r} of the reference {cls.__name__}")
    extra = sorted(set(state) - expected)
    if extra:
        raise UserError(f"source tensor {extra[0]!r} is not a parameter of the reference {cls.__name__}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


# ----------------------------------------------------------------------------- transformer


def _grid_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def transformer_reference(source: formats.Source, ckpt, *, layers: int | None = None, axes_dim=None,
                          log: Callable[[str], None] = print):
    """(diffusers FluxTransformer2DModel in float32 built from `source`, its FluxConfig, double / single depth)."""
    import torch
    from diffusers import FluxTransformer2DModel

    v = formats.view(source)
    ck_cfg = checkpoint.flux_config(ckpt)
    origins: dict = {}
    src_cfg = formats.infer_flux_config(v, axes_dim=axes_dim, origins=origins) if axes_dim is not None else None
    if axes_dim is None:
        try:
            src_cfg = formats.infer_flux_config(v, origins=origins)
        except UserError:  # no BFL default for this head size: the checkpoint's axes are all there is
            origins["axes_dim"] = "default"
        if origins["axes_dim"].startswith("default"):
            src_cfg = formats.infer_flux_config(v, axes_dim=ck_cfg.axes_dim)
            log(f"note: RoPE axes {tuple(ck_cfg.axes_dim)} from the checkpoint's config.json "
                f"({source.path} does not record them)")
    _same_structure(src_cfg, ck_cfg, "transformer", ckpt)
    if src_cfg.mlp_ratio != 4.0 or not src_cfg.qkv_bias:
        raise UserError("compare: the diffusers reference supports only mlp_ratio 4 with qkv bias")
    nd = src_cfg.depth if layers is None else min(layers, src_cfg.depth)
    ns = src_cfg.depth_single_blocks if layers is None else min(layers, src_cfg.depth_single_blocks)

    def wanted_bfl(key: str) -> bool:
        m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.", key)
        return m is None or int(m.group(2)) < (nd if m.group(1) == "double_blocks" else ns)

    if source.layout == "diffusers":
        def wanted(key: str) -> bool:
            m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", key)
            return m is None or int(m.group(2)) < (nd if m.group(1) == "transformer_blocks" else ns)

        state = {k: torch.from_numpy(_f32(source.tensors.read(k))) for k in source.tensors.keys() if wanted(k)}
    else:
        bfl = {k: _f32(v.read(k)) for k in v.keys() if wanted_bfl(k)}
        state = {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in flux_map.bfl_to_diffusers(bfl).items()}
        del bfl
    state = _round_to_stored(state, ckpt, "transformer", log)
    dcfg = dict(
        patch_size=1, in_channels=src_cfg.in_channels, out_channels=src_cfg.out_channels, num_layers=nd,
        num_single_layers=ns, attention_head_dim=src_cfg.head_dim, num_attention_heads=src_cfg.num_heads,
        joint_attention_dim=src_cfg.context_in_dim, pooled_projection_dim=src_cfg.vec_in_dim,
        guidance_embeds=src_cfg.guidance_embed, axes_dims_rope=tuple(src_cfg.axes_dim),
    )
    return _meta_load(FluxTransformer2DModel, dcfg, state), src_cfg, nd, ns


def transformer_rows(source: formats.Source, ckpt, *, layers: int | None, seed: int, axes_dim=None,
                     log: Callable[[str], None] = print):
    import jax
    import jax.numpy as jnp
    import torch

    ref, src_cfg, nd, ns = transformer_reference(source, ckpt, layers=layers, axes_dim=axes_dim, log=log)
    rng = np.random.default_rng(seed)
    h = w = 8
    t = 16
    x = dict(
        img=rng.standard_normal((1, h * w, src_cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((1, t, src_cfg.context_in_dim)).astype(np.float32),
        y=rng.standard_normal((1, src_cfg.vec_in_dim)).astype(np.float32),
        timesteps=rng.uniform(0.1, 1.0, (1,)).astype(np.float32),
        guidance=rng.uniform(1.0, 5.0, (1,)).astype(np.float32),
        img_ids=_grid_ids(h, w), txt_ids=np.zeros((t, 3), np.float32),
    )

    captured: dict[str, list] = {"double": [], "single": []}
    hooks = [b.register_forward_hook(lambda m, i, o: captured["double"].append([a.detach().numpy() for a in o]))
             for b in ref.transformer_blocks]
    hooks += [b.register_forward_hook(lambda m, i, o: captured["single"].append([a.detach().numpy() for a in o]))
              for b in ref.single_transformer_blocks]
    with torch.no_grad():
        out_ref = ref(
            hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["y"]), timestep=torch.from_numpy(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"]), txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=torch.from_numpy(x["guidance"]) if src_cfg.guidance_embed else None, return_dict=False,
        )[0].numpy()
    for hk in hooks:
        hk.remove()
    del ref

    model = checkpoint.load_flux(ckpt, dtype="float32", param_dtype="float32", depth=nd, depth_single_blocks=ns)
    with jax.default_matmul_precision("highest"):
        ids = lambda a: jnp.asarray(a)[None]  # noqa: E731
        out, inter = model.forward(
            jnp.asarray(x["img"]), ids(x["img_ids"]), jnp.asarray(x["txt"]), ids(x["txt_ids"]),
            jnp.asarray(x["timesteps"]), jnp.asarray(x["y"]),
            jnp.asarray(x["guidance"]) if src_cfg.guidance_embed else None, intermediates=True,
        )
    rows = []
    for i, (txt_ref, img_ref) in enumerate(captured["double"]):
        rows.append((f"double {i} img", rel_err(inter["double_img"][i], img_ref)))
        rows.append((f"double {i} txt", rel_err(inter["double_txt"][i], txt_ref)))
    for i, (txt_ref, img_ref) in enumerate(captured["single"]):
        s = np.asarray(inter["single"][i])
        rows.append((f"single {i} img", rel_err(s[:, t:], img_ref)))
        rows.append((f"single {i} txt", rel_err(s[:, :t], txt_ref)))
    rows.append(("final output", rel_err(out, out_ref)))
    return rows


# ----------------------------------------------------------------------------- vae


def vae_reference(source: formats.Source, ckpt, *, norm_groups: int | None = None, log: Callable[[str], None] = print):
    """(diffusers AutoencoderKL in float32 built from `source`, its AutoEncoderConfig)."""
    import torch
    from diffusers import AutoencoderKL

    ck_cfg = checkpoint.autoencoder_config(ckpt, dtype="float32", param_dtype="float32")
    v = formats.view(source)
    origins: dict = {}
    try:
        src_cfg = formats.infer_ae_config(v, norm_groups=norm_groups, origins=origins)
    except UserError:  # e.g. BFL's default 32 groups do not divide this VAE's channels
        if norm_groups is not None:
            raise
        formats.infer_ae_config(v, norm_groups=ck_cfg.norm_groups, origins=origins)
        origins["norm_groups"] = "default"
    taken = {k: getattr(ck_cfg, k) for k, o in origins.items() if o.startswith("default")}
    if taken:
        src_cfg = dataclasses.replace(formats.infer_ae_config(v, norm_groups=taken.get("norm_groups", norm_groups)),
                                      **taken)
        log(f"note: VAE {', '.join(f'{k}={x}' for k, x in taken.items())} from the checkpoint's config.json "
            f"({source.path} does not record them)")
    _same_structure(src_cfg, ck_cfg, "vae", ckpt)
    if source.layout == "diffusers":
        state = {k: torch.from_numpy(_f32(source.tensors.read(k))) for k in source.tensors.keys()}
    else:
        bfl = {k: _f32(v.read(k)) for k in v.keys()}
        state = {k: torch.from_numpy(np.ascontiguousarray(x))
                 for k, x in vae_map.bfl_to_diffusers_state_dict(bfl).items()}
    state = _round_to_stored(state, ckpt, "vae", log)
    n = len(src_cfg.ch_mult)
    dcfg = dict(
        in_channels=src_cfg.in_channels, out_channels=src_cfg.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(src_cfg.ch * m for m in src_cfg.ch_mult),
        layers_per_block=src_cfg.num_res_blocks, latent_channels=src_cfg.z_channels,
        norm_num_groups=src_cfg.norm_groups, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True, scaling_factor=src_cfg.scale_factor, shift_factor=src_cfg.shift_factor,
    )
    return _meta_load(AutoencoderKL, dcfg, state), src_cfg


def vae_rows(source: formats.Source, ckpt, *, seed: int, norm_groups: int | None = None,
             log: Callable[[str], None] = print):
    import jax
    import jax.numpy as jnp
    import torch

    ref, src_cfg = vae_reference(source, ckpt, norm_groups=norm_groups, log=log)
    n = len(src_cfg.ch_mult)
    rng = np.random.default_rng(seed + 1)
    f = 2 ** (n - 1)
    size = max(64, 2 * f)
    img = rng.uniform(-1, 1, (1, src_cfg.in_channels, size, size)).astype(np.float32)
    lat = rng.standard_normal((1, src_cfg.z_channels, size // f, size // f)).astype(np.float32)
    scale, shift = src_cfg.scale_factor, src_cfg.shift_factor
    with torch.no_grad():
        enc_ref = ((ref.encode(torch.from_numpy(img)).latent_dist.mean - shift) * scale).numpy()
        dec_ref = ref.decode(torch.from_numpy(lat) / scale + shift).sample.numpy()
    del ref
    ae = checkpoint.load_autoencoder(ckpt, dtype="float32", param_dtype="float32")
    with jax.default_matmul_precision("highest"):
        enc = np.asarray(ae.encode(jnp.asarray(img.transpose(0, 2, 3, 1)), tiled=False)).transpose(0, 3, 1, 2)
        dec = np.asarray(ae.decode(jnp.asarray(lat.transpose(0, 2, 3, 1)), tiled=False)).transpose(0, 3, 1, 2)
    return [("vae encode", rel_err(enc, enc_ref)), ("vae decode", rel_err(dec, dec_ref))]


# ----------------------------------------------------------------------------- entry


def compare(sources: Sequence, ckpt, *, tol: float = 1e-4, layers: int | None = None, seed: int = 0,
            fmt: str = "auto", axes_dim=None, vae_norm_groups: int | None = None, adapter=None,
            adapter_steps: int = 4, restore_tol: float = 1e-3, out: Callable[[str], None] = print) -> int:
    """Print the per-block relative-error table; 0 if every row is within its tolerance, else 1.

    With `adapter` (an exported .safetensors file or an Orbax adapter folder), also the rows of
    one FluxIR step and of an `adapter_steps`-step restoration, JAX vs the PyTorch twin
    (`compare_adapter.adapter_rows`); the restoration row is held to `restore_tol`.
    """
    if not sources:
        raise UserError("compare needs SOURCE... CKPT (at least one source and the checkpoint)")
    if layers is not None and layers < 1:
        raise UserError(f"--layers must be at least 1, got {layers}")
    found = formats.detect_all(sources, fmt)
    stored = checkpoint.read_config(ckpt)
    rows = []
    for component in ("transformer", "vae"):
        if component in found and stored.get(component) is None:
            raise UserError(f"{ckpt}: the checkpoint holds no {component} to compare with {found[component].path}")
    if "transformer" in found:
        rows += transformer_rows(found["transformer"], ckpt, layers=layers, seed=seed, axes_dim=axes_dim, log=out)
    if "vae" in found:
        rows += vae_rows(found["vae"], ckpt, seed=seed, norm_groups=vae_norm_groups, log=out)
    if adapter is not None:
        rows += _adapter_rows(found, ckpt, adapter, seed=seed, steps=adapter_steps, layers=layers, axes_dim=axes_dim,
                              norm_groups=vae_norm_groups, log=out)
    width = max(len(name) for name, _ in rows)
    out(f"{'block':<{width}}  {'rel. error':>11}")
    bad = 0
    for name, err in rows:
        ok = np.isfinite(err) and err <= (restore_tol if name.startswith("adapter restoration") else tol)
        bad += not ok
        out(f"{name:<{width}}  {err:11.3e}{'' if ok else '  > tol'}")
    worst = max(err for _, err in rows)
    verdict = "ok" if not bad else f"FAILED: {bad} row(s) above tol"
    out(f"max {worst:.3e} (tol {tol:g}{f', restoration {restore_tol:g}' if adapter is not None else ''}): {verdict}")
    return 0 if not bad else 1


def _adapter_rows(found: dict, ckpt, adapter, *, seed: int, steps: int, layers, axes_dim, norm_groups, log):
    """JAX FluxIR vs the PyTorch twin on the source base and VAE (see `compare_adapter`)."""
    import pathlib
    import tempfile

    from fluxir_jax.models import adapter_io

    from . import compare_adapter

    if layers is not None:
        raise UserError("compare --adapter needs the whole base (the adapter controls every block): drop --layers")
    if "transformer" not in found or "vae" not in found:
        raise UserError("compare --adapter needs both the transformer and the VAE source (the restoration runs both)")
    if steps < 1:
        raise UserError(f"--adapter-steps must be at least 1, got {steps}")
    path = pathlib.Path(adapter)
    base_cfg = checkpoint.flux_config(ckpt, dtype="float32", param_dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_dir():  # an Orbax adapter checkpoint: export it for both sides
            exported = pathlib.Path(tmp) / "adapter.safetensors"
            adapter_io.export_safetensors(adapter_io.load_adapter(path, base_config=base_cfg), exported)
            path = exported
        elif not path.is_file():
            raise UserError(f"--adapter {adapter}: no such file or folder")
        transformer, *_ = transformer_reference(found["transformer"], ckpt, axes_dim=axes_dim, log=log)
        vae, _ = vae_reference(found["vae"], ckpt, norm_groups=norm_groups, log=log)
        flax_base = checkpoint.load_flux(ckpt, dtype="float32", param_dtype="float32")
        ae = checkpoint.load_autoencoder(ckpt, dtype="float32", param_dtype="float32")
        text = checkpoint.load_text_embeddings(ckpt)
        txt, y = (text["txt"], text["y"]) if text["computed"] else (None, None)
        return compare_adapter.adapter_rows(transformer, vae, flax_base, ae, path, txt=txt, y=y, seed=seed, steps=steps,
                                            shift=base_cfg.guidance_embed)

