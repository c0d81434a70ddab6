"""Validation during training: restore the fixed `data.val` LQ images with the sampler.

Every `val.every` steps the first `data.val_count` val examples (fixed crops, no flip) are
restored from Gaussian noise (seeds `val.seed + i`) in `val.steps` Euler steps with the current
adapter, saved as `run_dir/samples/step_NNNNNN.png` (one row per example: LQ upsampled | restored
| HQ), and scored with PSNR / SSIM (`fluxir_jax.iqa.registry`) against the HQ crops, and with
LPIPS when `val.lpips_weights` names LPIPS weights (`val.lpips_net`: alex or vgg).
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fluxir_jax import parallel, sampling


@dataclasses.dataclass(frozen=True)
class _Velocity:
    """FluxIR velocity for `sampling.denoise` over pure-dict params (base, adapter)."""

    spec: object

    def __call__(self, params, img, t, cond):
        from fluxir_jax.models.adapter import fluxir_forward
        from fluxir_jax.train import merge_pure

        base_p, adapter_p = params
        s = self.spec
        base = merge_pure(s.base_graphdef, s.base_state, base_p)
        adapter = merge_pure(s.adapter_graphdef, s.adapter_state, adapter_p)
        return fluxir_forward(base, adapter, img, cond.extra["lq"], cond.img_ids, cond.txt, cond.txt_ids, t, cond.y,
                              cond.guidance)

    def __hash__(self):
        return id(self.spec)

    def __eq__(self, other):
        return isinstance(other, _Velocity) and other.spec is self.spec


def _val_batch(cfg) -> dict[str, np.ndarray]:
    from fluxir_jax.data.pipeline import PipelineConfig, make_iterator
    from fluxir_jax.data.sources import open_source

    src = open_source(cfg.data.val, cfg.data.data_dir)
    n = min(cfg.data.val_count, len(src))
    pc = PipelineConfig(batch_size=n, crop_size=cfg.crop_size, scale=cfg.scale, seed=cfg.val.seed, shuffle=False,
                        flip=False, on_the_fly=cfg.data.on_the_fly, lq_up=True, read_threads=1)
    return next(make_iterator(src, pc, process_index=0, process_count=1))


def metrics(val_cfg) -> dict:
    """{record key: registry Metric}: PSNR and SSIM, and LPIPS when `val.lpips_weights` is given."""
    from fluxir_jax.iqa.registry import get_metric

    out = {"val_psnr": get_metric("psnr"), "val_ssim": get_metric("ssim")}
    if val_cfg.lpips_weights:
        name = "lpips" if val_cfg.lpips_net == "alex" else f"lpips-{val_cfg.lpips_net}"
        out["val_lpips"] = get_metric(name, weights=val_cfg.lpips_weights)
    return out


def scores(metrics_: dict, restored: np.ndarray, hq: np.ndarray) -> dict:
    """The mean of each metric over the val images."""
    return {k: float(np.mean(np.asarray(m(restored, hq), np.float64))) for k, m in metrics_.items()}


class Validator:
    def __init__(self, cfg, trainer, run_dir: pathlib.Path):
        self.cfg, self.trainer = cfg, trainer
        self.out = run_dir / "samples"
        rep = parallel.replicated(trainer.mesh)
        batch = _val_batch(cfg)
        self.hq = np.asarray(batch["hq"], np.float32)
        self.lq_up = np.asarray(batch["lq_up"], np.float32)
        self.n = self.hq.shape[0]
        spec, m = trainer.spec, trainer.models
        lat = cfg.crop_size // 8
        guidance = cfg.loss.guidance if m.base_config.guidance_embed else None
        velocity = _Velocity(spec)
        timesteps = jnp.asarray(sampling.get_schedule(cfg.val.steps, (lat // 2) ** 2, shift=guidance is not None),
                                jnp.float32)
        seeds = jnp.arange(self.n, dtype=jnp.uint32) + cfg.val.seed

        def restore(base_p, vae_p, adapter_p, txt, y, lq_up):
            from fluxir_jax.train import merge_pure

            vae = merge_pure(spec.vae_graphdef, spec.vae_state, vae_p)
            zc = sampling.pack(vae.encode(2.0 * lq_up - 1.0, tiled=False))
            cond = sampling.text_conditioning(txt, y, self.n, cfg.crop_size, cfg.crop_size, guidance)
            cond.extra = {"lq": zc}
            noise = sampling.pack(sampling.get_noise(seeds, lat, lat, m.vae_config.z_channels))
            z = sampling.denoise(velocity, (base_p, adapter_p), noise, cond, timesteps)
            img = vae.decode(sampling.unpack(z, lat, lat), tiled=False)
            return jnp.clip((img + 1.0) / 2.0, 0.0, 1.0)

        self._restore = jax.jit(restore, out_shardings=rep)
        self.metrics = metrics(cfg.val)

    def images(self, adapter_params) -> np.ndarray:
        """The restored val images with `adapter_params`: [n, crop, crop, 3] float32 in [0, 1]."""
        tr = self.trainer
        return np.asarray(jax.device_get(self._restore(tr.frozen.base, tr.frozen.vae, adapter_params, tr.frozen.txt,
                                                       tr.frozen.y, self.lq_up)))

    def run(self, adapter_params, step: int) -> dict:
        out = self.images(adapter_params)
        if jax.process_index() == 0:
            self._save_grid(out, step)
        return scores(self.metrics, out, self.hq)

    def _save_grid(self, restored: np.ndarray, step: int) -> None:
        from PIL import Image

        rows = [np.concatenate([lq, r, hq], axis=1) for lq, r, hq in zip(self.lq_up, restored, self.hq)]
        grid = np.clip(np.round(np.concatenate(rows, axis=0) * 255.0), 0, 255).astype(np.uint8)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"step_{step:06d}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        Image.fromarray(grid).save(tmp)
        tmp.replace(path)
