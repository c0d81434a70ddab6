"""FluxGen (`fluxir gen CONFIG [key=value ...]`): generate, score, select, degrade, write.

    fluxir gen configs/gen/tiny.yaml base=ckpt/ out=gen/ count=64
    fluxir gen select gen/ select.percentile=10        # new selection + pairs/, no generation

Image i (global index in [0, count)) is sampled from the empty prompt with the noise of seed
`seed + i`, decoded by the VAE in the same device program (`infer.Engine`: pmap | sharded |
auto), quantised to uint8 on device, scored by the configured no-reference metrics in fixed
chunks of `score_batch` images, and stored as PNG in `pool/` (dataset.py format: id = the
9-digit index, seed, scores, no LQ). Each process takes the contiguous slice
`host_range(count, process_index, process_count)` and commits one shard of `pool/` every
`shard_size` images; a rerun after a kill resumes from the last committed shard (ids and bytes
as an uninterrupted run: everything is a function of the image index, and not of the batch
size, the device count or the parallel mode, see `make_program`). A helper thread scores, encodes
and commits shard k while the devices generate shard k + 1, and worker processes degrade each
committed shard (second-order pipeline, `numpy.random.default_rng(seed)`) into `degraded/`. Once the
pool is complete: percentile selection (`fluxgen_select.select`), `pairs/` (the kept images
with LQ, copied from `degraded/`), `contact_sheet.png` and `summary.json`.

Output (`out`): config.yaml, pool/, degraded/, pairs/, summary.json, contact_sheet.png. pool/ and
pairs/ are also TFDS datasets (ArrayRecord, no TensorFlow): `tfds.data_source("fluxir_pool",
split="train", data_dir="OUT/pool/tfds")`, `tfds.builder_from_directory("OUT/pairs/tfds/fluxir_pairs/1.0.0")`
(`fluxir_jax.data.tfds_source`); degraded/ (a cache of pairs/) is not. With
several processes each writes `pool-NNNNN-of-MMMMM/` and `degraded-...`; selection and pairs/
then come from `fluxir gen select OUT` once every process has finished.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import pathlib
import time

import numpy as np

from fluxir_jax import config as config_io
from fluxir_jax import fluxgen_select as fs
from fluxir_jax.errors import UserError
from fluxir_jax.fluxgen_config import (GenConfig, check_inputs, devices_for, host_range, load_config, metric_weights,
                                       part_name, resolve_metrics)

CONFIG_NAME = "config.yaml"


def make_program(graphdefs: dict, flux_cfg, vae_cfg, cfg: GenConfig, per_example: bool = True, shards: int = 1):
    """program(params, {"seed": [b] uint32}) -> {"image": [b, R, R, 3] uint8}: sample, decode, quantise.

    `per_example` runs the images one after another (`lax.map`): XLA's CPU kernels give
    batch-size-dependent roundings, so this is what makes the bytes independent of the batch
    size and the device count. A 1024 px image is 4096 tokens, so batch 1 still fills a chip.
    In sharded mode (`shards` = the devices the batch is split over) the batch is reshaped to
    [shards, b / shards] and the per-device `lax.map` is vmapped over the shards, which the
    partitioner spreads over the devices: every device computes batch-1 images as in pmap mode.

    The sharded engine gathers each weight whole before use (`infer.Engine(gather_weights=True)`,
    `models/weight_gather.py`: a block's weights inside the layer scan), so no contraction is
    split over the FSDP-sharded devices. Measured on the tiny preset, 8 CPU devices (192 px,
    2 steps): the bytes are identical for pmap and sharded, 1 or 8 devices, batch 4, 8 or 16.
    (Without the gathering, about 3.5e-5 of the bytes moved one level against pmap: the
    partitioner summed partial products across devices in another order.)
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fluxir_jax import sampling

    f = vae_cfg.downsample_factor
    lh = lw = cfg.resolution // f
    timesteps = np.asarray(sampling.get_schedule(cfg.steps, (lh // 2) * (lw // 2), shift=flux_cfg.guidance_embed), np.float32)
    velocity = sampling.FluxVelocity(graphdefs["base"])
    guidance = cfg.guidance if flux_cfg.guidance_embed else None

    def images(params, seeds):
        b = seeds.shape[0]
        noise = sampling.pack(sampling.get_noise(seeds, lh, lw, vae_cfg.z_channels))
        cond = sampling.text_conditioning(params["txt"], params["y"], b, lh * f, lw * f, guidance, vae_factor=f)
        z = sampling.unpack(sampling.denoise(velocity, params["base"], noise, cond, timesteps), lh, lw)
        img = nnx.merge(graphdefs["vae"], params["vae"]).decode(z)
        img = jnp.clip((img.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
        return jnp.round(img * 255.0).astype(jnp.uint8)

    def one_by_one(params, seeds):
        return jax.lax.map(lambda s: images(params, s[None])[0], seeds)

    def program(params, batch):
        if per_example and shards > 1:
            seeds = batch["seed"].reshape(shards, -1)
            out = jax.vmap(lambda s: one_by_one(params, s))(seeds)
            return {"image": out.reshape(-1, *out.shape[2:])}
        if per_example:  # one image at a time: the same shapes, hence the same bytes, whatever the batch
            return {"image": one_by_one(params, batch["seed"])}
        return {"image": images(params, batch["seed"])}

    return program


def _processes(cfg: GenConfig) -> tuple[int, int]:
    if cfg.process_count > 0:
        return cfg.process_index, cfg.process_count
    import jax

    return jax.process_index(), jax.process_count()


def _is_complete(path: pathlib.Path) -> bool:
    info = path / "dataset_info.json"
    return info.is_file() and bool(json.loads(info.read_text()).get("complete"))


class _Degrader:
    """Degrades pool examples in worker processes (or inline) and appends them, in order, to degraded/."""

    def __init__(self, writer, cfg: GenConfig, executor):
        self.writer, self.cfg, self.executor = writer, cfg, executor
        self.pending: collections.deque = collections.deque()
        self.wait_s = 0.0
        # images in flight; more waits here (back-pressure: generation never outruns degradation by more)
        self.limit = cfg.shard_size + 4 * max(cfg.workers, 1)

    def submit(self, examples) -> None:
        for ex in examples:
            if ex.id in self.writer:
                continue
            task = (ex, self.cfg.degrade, self.cfg.png_compress_level)
            if self.executor is None:
                t = time.perf_counter()
                self.writer.add(fs.degrade_example(task))
                self.wait_s += time.perf_counter() - t
            else:
                self.pending.append(self.executor.submit(fs.degrade_example, task))
                if len(self.pending) > self.limit:
                    t = time.perf_counter()
                    self.writer.add(self.pending.popleft().result())
                    self.wait_s += time.perf_counter() - t
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        t = time.perf_counter()
        while self.pending and (block or self.pending[0].done()):
            self.writer.add(self.pending.popleft().result())
        self.wait_s += time.perf_counter() - t


def generate(cfg: GenConfig, lower_better: dict, out: pathlib.Path, pi: int, pc: int) -> dict:
    """Fill (or finish) this process's pool/ (and degraded/); returns generation statistics."""
    import jax
    from flax import nnx
    from tqdm import tqdm

    from fluxir_jax import checkpoint as ckpt
    from fluxir_jax.data.dataset import DatasetWriter, PairedSource, PairExample
    from fluxir_jax.data.tfds_source import POOL_NAME
    from fluxir_jax.infer import Engine
    from fluxir_jax.iqa.registry import get_metric

    t_start = time.perf_counter()
    start, stop = host_range(cfg.count, pi, pc)
    n_dev = devices_for(cfg.batch_size, cfg.devices, len(jax.local_devices()))
    pool_w = DatasetWriter(out / part_name(fs.POOL, pi, pc), config={"generation": cfg.generation_key()},
                           shard_size=cfg.shard_size,
                           info={"metrics_lower_better": lower_better, "index_range": [start, stop]},
                           tfds_name=POOL_NAME)
    deg_w = None
    if cfg.degrade_while_generating:
        deg_w = DatasetWriter(out / part_name(fs.DEGRADED, pi, pc), config=fs.degradation_key(cfg), shard_size=cfg.shard_size,
                              tfds_name=None)  # an internal cache of pairs/: no TFDS view
    todo_total = sum(1 for i in range(start, stop) if fs.image_id(i) not in pool_w)

    dtype = {"dtype": cfg.dtype} if cfg.dtype else {}
    base = ckpt.load_flux(cfg.base, **dtype)
    vae = ckpt.load_autoencoder(cfg.base, **dtype)
    text = ckpt.load_text_embeddings(cfg.base)
    if not text["computed"] and not text["random"] and not cfg.allow_zero_text:
        raise UserError(f"{cfg.base}: the empty-prompt embeddings were not computed (zeros); reconvert with --t5 DIR --clip DIR")
    graphdefs, params = {}, {}
    for name, module in (("base", base), ("vae", vae)):
        graphdefs[name], params[name] = nnx.split(module)
    params["txt"] = np.asarray(text["txt"], np.float32)
    params["y"] = np.asarray(text["y"], np.float32)
    engine = Engine(params, parallel=cfg.parallel, devices=n_dev, batch_per_device=cfg.batch_size // n_dev)
    shards = 1 if engine.mode == "pmap" else engine.global_batch // (cfg.batch_size // n_dev)
    program = make_program(graphdefs, base.config, vae.config, cfg, shards=shards)
    metrics = {m: get_metric(m, weights=metric_weights(cfg, m)) for m in cfg.metrics}
    t_load = time.perf_counter() - t_start

    executor = fs.make_executor(cfg.workers) if deg_w is not None else None
    degrader = _Degrader(deg_w, cfg, executor) if deg_w is not None else None
    seconds = collections.Counter(load=t_load)
    bar = tqdm(total=stop - start, initial=stop - start - todo_total, unit="img", desc="fluxir gen",
               disable=not (cfg.progress and pi == 0), dynamic_ncols=True)
    try:
        if degrader is not None and len(pool_w):  # resume: degrade committed pool images not yet in degraded/
            done = PairedSource(pool_w.work_dir)  # committed records: images start, start + 1, ... in order
            missing = (k for k in range(len(done)) if fs.image_id(start + k) not in deg_w)
            degrader.submit(PairExample(id=r["id"], hq_png=r["hq_png"], seed=r["seed"], iqa=r["iqa"], meta=r["meta"])
                            for r in (done[k] for k in missing))

        def finish(idx: list[int], images: np.ndarray) -> None:
            """Score, encode and commit one shard, then hand it to the degradation workers."""
            t = time.perf_counter()
            scores = {m: np.zeros(len(idx)) for m in metrics}
            for k in range(0, len(idx), cfg.score_batch):  # fixed chunks: scores independent of batch_size
                chunk = images[k:k + cfg.score_batch].astype(np.float32) / np.float32(255)
                for m, metric in metrics.items():
                    scores[m][k:k + cfg.score_batch] = metric(chunk)
            seconds["score"] += time.perf_counter() - t
            t = time.perf_counter()
            examples = [PairExample(id=fs.image_id(i), hq_png=fs.encode_png(images[k], cfg.png_compress_level),
                                    seed=cfg.seed + i, iqa={m: float(scores[m][k]) for m in metrics},
                                    meta={"index": i, "resolution": cfg.resolution, "steps": cfg.steps,
                                          "guidance": cfg.guidance})
                        for k, i in enumerate(idx)]
            for ex in examples:
                pool_w.add(ex)
            pool_w.flush()  # the shard is committed: a rerun starts after it
            seconds["encode_write"] += time.perf_counter() - t
            if degrader is not None:
                degrader.submit(examples)

        # shard k is scored, encoded and written by one helper thread while the devices generate shard k + 1
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fluxgen-finish") as finisher:
            previous = None
            for s0 in range(start, stop, cfg.shard_size):
                idx = [i for i in range(s0, min(s0 + cfg.shard_size, stop)) if fs.image_id(i) not in pool_w]
                if not idx:
                    continue
                t = time.perf_counter()
                images = []
                for k in range(0, len(idx), engine.global_batch):
                    seeds = np.array([(cfg.seed + i) & 0xFFFFFFFF for i in idx[k:k + engine.global_batch]], np.uint32)
                    images.append(engine.run(program, {"seed": seeds})["image"])
                    bar.update(len(seeds))
                seconds["generate"] += time.perf_counter() - t
                if previous is not None:
                    previous.result()  # at most one shard waits on the host
                previous = finisher.submit(finish, idx, np.concatenate(images))
            if previous is not None:
                previous.result()
        generated_s = time.perf_counter() - t_start - t_load
        if degrader is not None:
            degrader.drain(block=True)
            seconds["degrade_wait"] = degrader.wait_s
        bar.close()
        stats = {"generated_this_run": todo_total, "devices": n_dev, "mode": engine.mode,
                 "images_per_s": todo_total / generated_s if generated_s > 0 and todo_total else None,
                 "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        pool_w.close(extra_info={"generation_stats": stats})
        if deg_w is not None:
            deg_w.close()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return stats


def run_gen(cfg: GenConfig) -> dict:
    """The whole job for this process; returns the summary (selection summary on a single process)."""
    cfg = resolve_metrics(cfg)
    lower = check_inputs(cfg)
    out = pathlib.Path(cfg.out).absolute()
    pi, pc = _processes(cfg)
    pool_dir = out / part_name(fs.POOL, pi, pc)
    key = json.loads(json.dumps({"generation": cfg.generation_key()}, sort_keys=True))
    for d in (pool_dir, pool_dir.with_name(pool_dir.name + ".partial")):  # a started pool must match
        info = d / "dataset_info.json"
        if info.is_file() and json.loads(info.read_text()).get("config") != key:
            raise UserError(f"{d} was generated with other settings (count, seed, steps ...); "
                            "use another out, or fluxir gen select to change the selection")
    out.mkdir(parents=True, exist_ok=True)
    if pi == 0:
        config_io.dump(cfg, out / CONFIG_NAME)
    if _is_complete(pool_dir):
        stats = json.loads((pool_dir / "dataset_info.json").read_text()).get("generation_stats", {})
    else:
        stats = generate(cfg, lower, out, pi, pc)
    if pc > 1:
        return {"process": pi, "processes": pc, **stats}
    executor = fs.make_executor(cfg.workers)
    try:
        return fs.run_selection(out, cfg, executor, stats)
    finally:
        if executor is not None:
            executor.shutdown()


def run_select(out: str, overrides: list[str]) -> dict:
    """`fluxir gen select OUT`: selection + pairs/ + report from pool/ with new settings, no generation."""
    outp = pathlib.Path(out).absolute()
    if not (outp / CONFIG_NAME).is_file():
        raise UserError(f"{outp}: not a fluxir gen output (no {CONFIG_NAME})")
    cfg = resolve_metrics(load_config(str(outp / CONFIG_NAME), overrides))
    fs.read_pool(outp)  # UserError before anything else when the pool is missing or unfinished
    old = {}
    if (outp / "summary.json").is_file():
        old = json.loads((outp / "summary.json").read_text())
    keep = ("load", "generate", "score", "encode_write", "degrade_wait")
    stats = {k: old[k] for k in ("images_per_s", "devices", "mode") if k in old}
    stats["seconds"] = {k: v for k, v in old.get("seconds", {}).items() if k in keep}
    executor = fs.make_executor(cfg.workers)
    try:
        summary = fs.run_selection(outp, cfg, executor, stats)
    finally:
        if executor is not None:
            executor.shutdown()
    config_io.dump(dataclasses.replace(cfg, out=str(outp)), outp / CONFIG_NAME)
    return summary
