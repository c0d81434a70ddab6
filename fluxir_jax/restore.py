"""FluxIR restoration: LQ images in, restored images out, on every local device.

    restorer = Restorer("ckpt/", "adapter/", steps=4, tile={"size": 512})
    outs = restorer.restore([lq_uint8_hwc, ...])          # uint8 HWC in and out

Per image: the LQ (float [0, 1]) is upsampled bicubically (torch semantics, as the training
data) by `scale` or to `target_size` (longer side), padded (reflect) to a multiple of 16, VAE-
encoded, restored by the frozen FLUX base + FluxIR adapter from Gaussian noise (per-image
seed) with `steps` Euler steps, decoded, colour-fixed against the upsampled LQ, and cropped
back. Images are bucketed by padded size, one compiled program per bucket; a bucket larger than
`tile.size` on a side uses latent tiling (`latent_tiling`) and tiled VAE encode/decode. The
batched engine (`infer.Engine`) runs each bucket in pmap or sharded mode.

The folder job (`fluxir restore`) is in `restore_folder.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError
from fluxir_jax.infer import MeshShape

OUTPUT_FORMATS = ("png", "jpeg")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    size: int = 1024  # output pixels per tile side; larger images use latent + VAE tiling (multiple of 16)
    overlap: float = 0.25  # minimum overlap of neighbouring tiles, as a fraction of size (in [0, 0.5))
    sigma: float = 0.25  # Gaussian blending weight std, as a fraction of the tile side
    force: bool = False  # tile even when the image fits in one tile (debugging, tests)


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
    """Settings of `fluxir restore` and `Restorer` (configs/restore/default.yaml documents each).

    steps          Euler steps from noise to the restored latent
    guidance       distilled guidance fed to base and adapter (flux-dev); ignored by bases without it
    control_scale  multiplies every adapter residual (0: the plain base model; > 1: stronger control)
    seed           base seed; each image's noise seed derives from (seed, relative path)
                   (`Restorer` API: seed + list index)
    scale          output = LQ size x scale (bicubic upsampling of the LQ, torch semantics as in training)
    target_size    > 0: output longer side in pixels (aspect kept), instead of `scale`
    color_fix      wavelet (low frequencies of the upsampled LQ swapped in) | adain (per-channel
                   mean/std) | none
    tile           latent + VAE tiling of images larger than one tile
    parallel       pmap (replica per device) | sharded (one jit, weights FSDP-sharded) | auto (pmap
                   when a replica fits a device)
    devices        local devices to use (0: all)
    batch_size     images per device per step
    mesh           parallel=sharded: the (data, fsdp, tensor) mesh of the local devices
    dtype          activation dtype override for base and VAE ("" = as converted; float32 | bfloat16)
    allow_zero_text
                   accept a checkpoint whose empty-prompt embeddings were never computed (zeros)
    format         png | jpeg (extension .png / .jpg; relative paths and names kept)
    jpeg_quality   1..100, format=jpeg only
    png_compress_level
                   0..9 zlib level, format=png only
    """

    steps: int = 28
    guidance: float = 3.5
    control_scale: float = 1.0
    seed: int = 0
    scale: float = 4.0
    target_size: int = 0
    color_fix: str = "wavelet"
    tile: TileConfig = TileConfig()
    parallel: str = "auto"
    devices: int = 0
    batch_size: int = 1
    mesh: MeshShape = MeshShape()
    dtype: str = ""
    allow_zero_text: bool = False
    format: str = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 1

    def __post_init__(self):
        from fluxir_jax.color_fix import COLOR_FIXES

        checks = [
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.scale > 0, f"scale={self.scale} must be > 0"),
            (self.target_size >= 0, f"target_size={self.target_size} must be >= 0 (0: use scale)"),
            (self.color_fix in COLOR_FIXES, f"color_fix={self.color_fix!r} is not one of {', '.join(COLOR_FIXES)}"),
            (self.tile.size >= 16 and self.tile.size % 16 == 0, f"tile.size={self.tile.size} must be a positive multiple of 16"),
            (0 <= self.tile.overlap < 0.5, f"tile.overlap={self.tile.overlap} must be in [0, 0.5) (a fraction of tile.size)"),
            (self.tile.sigma > 0, f"tile.sigma={self.tile.sigma} must be > 0"),
            (self.format in OUTPUT_FORMATS, f"format={self.format!r} is not one of {', '.join(OUTPUT_FORMATS)}"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality} must be in 1..100"),
            (0 <= self.png_compress_level <= 9, f"png_compress_level={self.png_compress_level} must be in 0..9"),
            (self.dtype in ("", "float32", "bfloat16"), f"dtype={self.dtype!r} must be '', float32 or bfloat16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"restore config: {msg}")


def load_config(path: str | None = None, overrides: Sequence[str] = (), **options) -> RestoreConfig:
    """RestoreConfig from an optional YAML file, `key.sub=value` overrides, then keyword options."""
    return with_options(config_io.load(RestoreConfig, path, overrides), **options)


def with_options(cfg: RestoreConfig, **options) -> RestoreConfig:
    """`cfg` with keyword options (nested fields as dicts: tile={"size": 512})."""
    if not options:
        return cfg
    data = config_io.to_dict(cfg)
    _deep_update(data, options)
    return config_io.from_dict(RestoreConfig, data)


def _deep_update(data: dict, options: dict, prefix: str = "") -> None:
    for k, v in options.items():
        if k not in data:
            raise UserError(f"unknown restore option {prefix}{k}")
        if isinstance(data[k], dict) and isinstance(v, dict):
            _deep_update(data[k], v, f"{prefix}{k}.")
        elif isinstance(data[k], dict) and dataclasses.is_dataclass(v):
            data[k] = config_io.to_dict(v)
        else:
            data[k] = v


# ----------------------------------------------------------------------------- host-side image preparation


def output_size(h: int, w: int, cfg: RestoreConfig) -> tuple[int, int]:
    """Restored size of an h x w LQ: x `scale`, or the longer side = `target_size` (aspect kept)."""
    if cfg.target_size:
        f = cfg.target_size / max(h, w)
    else:
        f = cfg.scale
    return max(1, round(h * f)), max(1, round(w * f))


def padded(n: int) -> int:
    return -(-n // 16) * 16


def upsample(lq: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [h, w, 3] in [0, 1] -> [H, W, 3], bicubic with torch semantics (as the training LQ), clipped."""
    from fluxir_jax.data.image_ops import resize_torch_like

    if lq.shape[:2] == tuple(size):
        return lq.astype(np.float32)
    return np.clip(np.asarray(resize_torch_like(lq.astype(np.float32), size, "bicubic"), np.float32), 0.0, 1.0)


def pad_to(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad [H, W, C] at the bottom/right to `size` by reflection (edge copies where a side is 1 pixel)."""
    ph, pw = size[0] - x.shape[0], size[1] - x.shape[1]
    if not ph and not pw:
        return x
    mode_h = "reflect" if x.shape[0] > 1 else "edge"
    x = np.pad(x, ((0, ph), (0, 0), (0, 0)), mode=mode_h)
    mode_w = "reflect" if x.shape[1] > 1 else "edge"
    return np.pad(x, ((0, 0), (0, pw), (0, 0)), mode=mode_w)


def as_rgb_float(img: np.ndarray) -> np.ndarray:
    """A uint8 (or float in [0, 1]) HW / HWC image with 1, 3 or 4 channels -> float32 [H, W, 3]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise UserError(f"image of shape {list(a.shape)} is not HW or HWC with 1, 3 or 4 channels")
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float32), 0.0, 1.0)
    if a.shape[2] == 4:  # alpha composited on white
        a = a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the restorer


class Restorer:
    """Frozen base + FluxIR adapter + VAE placed on the local devices; restores image batches."""

    def __init__(self, checkpoint: str, adapter: str, config: RestoreConfig | None = None, **options):
        import dataclasses as dc

        import jax
        import jax.numpy as jnp
        from flax import nnx

        from fluxir_jax import checkpoint as ckpt
        from fluxir_jax.infer import Engine
        from fluxir_jax.models import adapter_io
        from fluxir_jax.models.adapter import check_compatible
        from fluxir_jax.models.autoencoder import AutoEncoder
        from fluxir_jax.models.flux import Flux

        cfg = with_options(config if config is not None else RestoreConfig(), **options)
        self.config = cfg
        dtype = {"dtype": cfg.dtype} if cfg.dtype else {}
        vae_opts = dict(tile_size=cfg.tile.size, tile_overlap=cfg.tile.overlap, **dtype)
        base_cfg = ckpt.flux_config(checkpoint, **dtype)
        vae_cfg = ckpt.autoencoder_config(checkpoint, **vae_opts)
        text = ckpt.load_text_embeddings(checkpoint)
        if not text["computed"] and not cfg.allow_zero_text:
            raise UserError(f"{checkpoint}: the empty-prompt embeddings were not computed (zeros); "
                            "reconvert with --t5 DIR --clip DIR")
        fluxir = adapter_io.load_adapter(adapter, base_config=base_cfg)
        check_compatible(fluxir, base_cfg, int(text["txt"].shape[0]))
        fluxir.config = dc.replace(fluxir.config, control_scale=cfg.control_scale)
        self.base_config, self.vae_config = base_cfg, vae_cfg
        # decide the parallel mode and shardings from shapes, then read each model straight into place
        self._graphdefs = {}
        abstract = {}
        for name, make in (("base", lambda: Flux(base_cfg, rngs=nnx.Rngs(0))),
                           ("vae", lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0)))):
            self._graphdefs[name], abstract[name] = nnx.split(nnx.eval_shape(make))
        self._graphdefs["adapter"], adapter_state = nnx.split(fluxir)
        abstract["adapter"] = adapter_state
        params = {"txt": jnp.asarray(text["txt"], jnp.float32), "y": jnp.asarray(text["y"], jnp.float32)}
        self.engine = Engine({**abstract, **jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)},
                             parallel=cfg.parallel, devices=cfg.devices, batch_per_device=cfg.batch_size, mesh=cfg.mesh)
        params["base"] = nnx.split(ckpt.load_flux(checkpoint, sharding=self.engine.load_sharding("base"), **dtype))[1]
        params["vae"] = nnx.split(ckpt.load_autoencoder(checkpoint, sharding=self.engine.load_sharding("vae"), **vae_opts))[1]
        params["adapter"] = adapter_state
        self.engine.place(params)
        self._programs: dict[tuple, Any] = {}

    @property
    def global_batch(self) -> int:
        return self.engine.global_batch

    # -- buckets ---------------------------------------------------------------------------

    def bucket(self, lq_hw: tuple[int, int]) -> tuple[int, int]:
        """The padded output size (the bucket key) for an LQ of `lq_hw`."""
        h, w = output_size(*lq_hw, self.config)
        return padded(h), padded(w)

    def tiled(self, bucket: tuple[int, int]) -> bool:
        return self.config.tile.force or max(bucket) > self.config.tile.size

    def program(self, bucket: tuple[int, int]):
        """The per-bucket program (cached, so the engine compiles it once)."""
        if bucket not in self._programs:
            self._programs[bucket] = _make_program(self, bucket, self.tiled(bucket))
        return self._programs[bucket]

    # -- restoring -------------------------------------------------------------------------

    def restore_float(self, images: Sequence[np.ndarray], seeds: Sequence[int]) -> list[np.ndarray]:
        """float32 [h, w, 3] LQ images in [0, 1] with per-image seeds -> restored float32 images in [0, 1]."""
        outs: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        sizes = []
        for i, img in enumerate(images):
            size = output_size(*img.shape[:2], self.config)
            sizes.append(size)
            groups.setdefault((padded(size[0]), padded(size[1])), []).append(i)
        for bucket, idx in sorted(groups.items()):
            for start in range(0, len(idx), self.global_batch):
                chunk = idx[start:start + self.global_batch]
                lq = np.stack([pad_to(upsample(images[i], sizes[i]), bucket) for i in chunk])
                seed = np.array([int(seeds[i]) & 0xFFFFFFFF for i in chunk], np.uint32)
                result = self.engine.run(self.program(bucket), {"lq": lq, "seed": seed})["image"]
                for k, i in enumerate(chunk):
                    outs[i] = result[k, :sizes[i][0], :sizes[i][1]]
        return outs  # type: ignore[return-value]

    def restore(self, images: Sequence[np.ndarray], seeds: Sequence[int] | None = None) -> list[np.ndarray]:
        """uint8 HWC (or HW) LQ images -> restored uint8 HWC RGB images; seeds default to seed + index."""
        if seeds is None:
            seeds = [self.config.seed + i for i in range(len(images))]
        return [to_uint8(x) for x in self.restore_float([as_rgb_float(im) for im in images], seeds)]


def _make_program(restorer: Restorer, bucket: tuple[int, int], tiled: bool):
    """program(params, {"lq": [b, H, W, 3] in [0, 1], "seed": [b]}) -> {"image": [b, H, W, 3] in [0, 1]}."""
    import jax.numpy as jnp
    from flax import nnx

    from fluxir_jax import latent_tiling, sampling
    from fluxir_jax.color_fix import color_fix
    from fluxir_jax.models.adapter import FluxIRVelocity

    cfg, gd = restorer.config, restorer._graphdefs
    base_cfg, vae_cfg = restorer.base_config, restorer.vae_config
    f = vae_cfg.downsample_factor
    lh, lw = bucket[0] // f, bucket[1] // f
    velocity = FluxIRVelocity(gd["base"], gd["adapter"])
    shift = base_cfg.guidance_embed  # dev: resolution-shifted schedule; schnell: plain
    if tiled:
        tile = max(2, cfg.tile.size // f // 2 * 2)
        tiles = latent_tiling.plan_latent_tiles(lh, lw, tile, round(cfg.tile.overlap * tile))
        seq = (tiles.size[0] // 2) * (tiles.size[1] // 2)
    else:
        tiles, seq = None, (lh // 2) * (lw // 2)
    timesteps = np.asarray(sampling.get_schedule(cfg.steps, seq, shift=shift), np.float32)

    def program(params, batch):
        vae = nnx.merge(gd["vae"], params["vae"])
        lq = batch["lq"]
        b = lq.shape[0]
        z_lq = vae.encode(lq * 2.0 - 1.0, tiled=tiled)
        noise = sampling.get_noise(batch["seed"], lh, lw, vae_cfg.z_channels)
        txt = jnp.broadcast_to(params["txt"], (b, *params["txt"].shape))
        y = jnp.broadcast_to(params["y"], (b, *params["y"].shape))
        g = jnp.full((b,), cfg.guidance, jnp.float32) if base_cfg.guidance_embed else None
        cond = sampling.Conditioning(img_ids=sampling.img_ids(b, lh, lw), txt=txt, txt_ids=sampling.txt_ids(b, txt.shape[1]),
                                     y=y, guidance=g, extra={"lq": sampling.pack(z_lq)})
        models = (params["base"], params["adapter"])
        if tiled:
            z = latent_tiling.tiled_denoise(velocity, models, noise, z_lq, cond, timesteps, tiles, cfg.tile.sigma)
        else:
            z = sampling.unpack(sampling.denoise(velocity, models, sampling.pack(noise), cond, timesteps), lh, lw)
        img = vae.decode(z, tiled=tiled)
        img = jnp.clip((img + 1.0) * 0.5, 0.0, 1.0)
        return {"image": color_fix(img, lq, cfg.color_fix)}

    return program
