"""Grain input pipeline over a paired dataset, per TPU host.

    source (PairedSource) -> shuffle(seed) -> repeat(num_epochs) -> attach global position
      -> this process's rows of every global batch (from `start_batch` on)
      -> decode PNGs with PIL -> [on-the-fly degradation] -> random paired crop + flip
      -> (read threads) -> batch(per-host size) -> [mp_prefetch worker processes]

Every random choice of an example (crop position, flip, the degradation) comes from
`numpy.random.default_rng([seed, position])`, where `position` is the example's place in the
global shuffled-and-repeated stream, so the data do not depend on the number of processes,
workers or restarts. Batches are dicts of numpy arrays:

    hq     float32 [B, crop, crop, 3] in [0, 1]
    lq     float32 [B, crop/scale, crop/scale, 3] in [0, 1]
    lq_up  float32 [B, crop, crop, 3] (LQ bicubic-upsampled to the HQ size; only if cfg.lq_up)
    index  int64 [B]  position of the example in the source (for checks and debugging)

`PipelineConfig.batch_size` is the *global* batch B: global batch k holds the stream positions
[k*B, (k+1)*B), row r being position k*B + r. Each process loads only its `rows` of every global
batch (default: the contiguous block `process_index * B/process_count ...`; training passes
`parallel.host_rows(mesh, B)`, the rows its devices hold) and `make_global_batch` assembles
the global `jax.Array`s with `jax.make_array_from_process_local_data`. So the global batch is
the same, bit for bit, whatever the number of processes.

Resuming: the stream is a pure function of the position, so `start_batch=k` starts at global
batch k exactly (training derives it from the restored step, which works for any process
count). The Grain iterator state can also go into Orbax checkpoints with `iterator_save_arg` /
`iterator_restore_arg` (Grain's Orbax handler, one file per process).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from fluxir_jax.data.image_ops import crop_flip, reflect_pad_to
from fluxir_jax.errors import UserError
from fluxir_jax.fileio import decode_image


@dataclasses.dataclass
class PipelineConfig:
    """Input pipeline settings.

    The degradation settings live in `DegradationConfig`; with `on_the_fly` its `scale` must
    equal `scale` here, and the crop and flip are this config's (`gt.crop_size` and
    `gt.hflip_prob` of `DegradationConfig` are not used by the pipeline).
    """

    batch_size: int = 16  # global batch size, over all processes
    crop_size: int = 512  # HQ crop; the LQ crop is crop_size / scale
    scale: int = 4  # HQ side / LQ side (must equal the dataset's / the degradation's scale)
    seed: int = 0  # seed of the shuffle, crops, flips and on-the-fly degradations
    shuffle: bool = True  # shuffle the examples (order seeded by `seed`)
    num_epochs: int | None = None  # None: repeat forever
    flip: bool = True  # random horizontal flip (p = 0.5), same for HQ and LQ
    on_the_fly: bool = False  # degrade HQ crops at load time (ignores stored LQ)
    lq_up: bool = False  # also emit LQ bicubic-upsampled to the crop size
    workers: int = 0  # mp_prefetch worker processes; 0 = in the training process
    worker_buffer_size: int = 2  # batches buffered per worker
    read_threads: int = 4  # threads decoding examples (per process / worker)
    read_buffer_size: int = 16  # examples buffered by the read threads
    drop_remainder: bool = True  # drop a last incomplete batch (finite epochs only)


class _HostRows:
    """Local stream index j -> the element at global batch start + j // n, row rows[j % n].

    n = len(rows); batches of n local examples then line up with the global batches. Picklable
    (Grain sends it to worker processes).
    """

    def __init__(self, parent, rows: Sequence[int], batch_size: int, start_batch: int, drop_remainder: bool):
        self.parent, self.rows, self.b, self.start = parent, tuple(rows), batch_size, start_batch
        full, rest = divmod(len(parent), batch_size)
        self.full = max(full - start_batch, 0)
        self.tail = () if drop_remainder or full < start_batch else tuple(r for r in rows if r < rest)

    def __len__(self) -> int:
        return self.full * len(self.rows) + len(self.tail)

    def __call__(self, index: int):
        k, j = divmod(int(index), len(self.rows))
        row = self.rows[j] if k < self.full else self.tail[j]
        return self.parent[(self.start + k) * self.b + row]


def _validated_host_batch_size(cfg: PipelineConfig, process_count: int) -> int:
    """`cfg.batch_size / process_count`, after checking every setting (UserError naming the bad one)."""
    if cfg.crop_size < 1 or cfg.scale < 1 or cfg.crop_size % cfg.scale:
        raise UserError(f"crop_size ({cfg.crop_size}) must be a positive multiple of scale ({cfg.scale})")
    if cfg.batch_size < 1 or cfg.batch_size % process_count:
        raise UserError(f"batch_size ({cfg.batch_size}) must be a positive multiple of the process count ({process_count})")
    if cfg.num_epochs is not None and cfg.num_epochs < 1:
        raise UserError(f"num_epochs must be at least 1 or null, got {cfg.num_epochs}")
    if cfg.workers < 0 or cfg.read_threads < 1:
        raise UserError("workers must be >= 0 and read_threads >= 1")
    return cfg.batch_size // process_count


def per_host_batch_size(cfg: PipelineConfig, process_count: int | None = None) -> int:
    """`cfg.batch_size / process_count` (the number of examples each process loads per step)."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    return _validated_host_batch_size(cfg, process_count)


def bicubic_upsample(img: np.ndarray, scale: int) -> np.ndarray:
    """float32 HWC upsampled by `scale`, bicubic with torch semantics, clipped to [0, 1] (as `degrade`)."""
    from fluxir_jax.data.degrade import resize_torch_like

    h, w = img.shape[:2]
    return np.clip(np.asarray(resize_torch_like(img, (h * scale, w * scale), "bicubic"), np.float32), 0.0, 1.0)


def _with_position(position: int, element: Any) -> tuple[int, Any]:
    return position, element


class PairTransform:
    """Decode, (degrade), crop and flip one example; picklable for Grain worker processes."""

    def __init__(self, cfg: PipelineConfig, degradation: Any = None):
        self.cfg = cfg
        self.degradation = degradation

    def __call__(self, item: tuple[int, Mapping[str, Any]]) -> dict[str, np.ndarray]:
        position, rec = item
        cfg, s = self.cfg, self.cfg.scale
        c, lc = cfg.crop_size, cfg.crop_size // cfg.scale
        rng = np.random.default_rng([cfg.seed, int(position)])
        hq = decode_image(rec["hq_png"], what=f"example {rec.get('id')} HQ")
        out: dict[str, np.ndarray] = {}
        if cfg.on_the_fly:
            from fluxir_jax.data.degrade import degrade

            hq = reflect_pad_to(hq, c, c)
            y = int(rng.integers(0, hq.shape[0] - c + 1))
            x = int(rng.integers(0, hq.shape[1] - c + 1))
            hq = crop_flip(hq, y, x, c, c, cfg.flip and rng.random() < 0.5)
            hq_f = np.ascontiguousarray(hq, np.float32) / 255.0
            lq, lq_up, _ = degrade(hq_f, rng, self.degradation)
            out["hq"], out["lq"] = hq_f, np.asarray(lq, np.float32)
            if cfg.lq_up:
                out["lq_up"] = np.asarray(lq_up, np.float32)
        else:
            if rec.get("lq_png") is None:
                raise UserError("this dataset stores no LQ images; set on_the_fly=true to degrade at load time")
            lq = decode_image(rec["lq_png"], what=f"example {rec.get('id')} LQ")
            lh, lw = lq.shape[:2]
            if hq.shape[0] < lh * s or hq.shape[1] < lw * s:
                raise ValueError(f"example {rec.get('id')}: HQ {hq.shape[:2]} is smaller than LQ {lq.shape[:2]} x {s}")
            hq = hq[: lh * s, : lw * s]  # the region the LQ was made from
            lq = reflect_pad_to(lq, lc, lc)
            hq = reflect_pad_to(hq, c, c)
            ly = int(rng.integers(0, lq.shape[0] - lc + 1))
            lx = int(rng.integers(0, lq.shape[1] - lc + 1))
            flip = cfg.flip and rng.random() < 0.5
            lq = crop_flip(lq, ly, lx, lc, lc, flip)
            hq = crop_flip(hq, ly * s, lx * s, c, c, flip)
            out["hq"] = np.ascontiguousarray(hq, np.float32) / 255.0
            out["lq"] = np.ascontiguousarray(lq, np.float32) / 255.0
            if cfg.lq_up:
                out["lq_up"] = bicubic_upsample(out["lq"], s)
        out["index"] = np.int64(rec["index"])
        return out


def _ensure_absl_flags() -> None:
    """Grain reads absl flags; they must be parsed (defaults) in every process that runs it."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])


def _init_worker(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    _ensure_absl_flags()


def build_dataset(
    source: Any,
    cfg: PipelineConfig,
    *,
    degradation: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: Sequence[int] | None = None,
    start_batch: int = 0,
):
    """The per-process `grain.IterDataset` of batches (see the module docstring).

    `source` is a `PairedSource` (or any random-access sequence of its records). `degradation`
    is the `DegradationConfig` used when `cfg.on_the_fly`. `process_index`/`process_count`
    default to `jax.process_index()`/`jax.process_count()` (override them to emulate hosts).
    `rows` are the global-batch rows this process loads (default: its contiguous block);
    `start_batch` is the first global batch to yield.
    """
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    local_bs = _validated_host_batch_size(cfg, process_count)
    if rows is None:
        rows = range(process_index * local_bs, (process_index + 1) * local_bs)
    rows = [int(r) for r in rows]
    if not rows or len(set(rows)) != len(rows) or not all(0 <= r < cfg.batch_size for r in rows):
        raise UserError(f"rows must be distinct rows of the global batch [0, {cfg.batch_size}), got {rows}")
    if start_batch < 0:
        raise UserError(f"start_batch must be >= 0, got {start_batch}")
    if len(source) == 0:
        raise UserError("the dataset is empty")
    info = getattr(source, "info", None)
    if not cfg.on_the_fly and isinstance(info, Mapping) and not info.get("has_lq", True):
        raise UserError("this dataset stores no LQ images; set on_the_fly=true to degrade at load time")
    if cfg.on_the_fly and degradation is None:
        from fluxir_jax.data.degrade import DegradationConfig

        degradation = DegradationConfig()
    if cfg.on_the_fly and getattr(degradation, "scale", cfg.scale) != cfg.scale:
        raise UserError(f"pipeline scale={cfg.scale} differs from the degradation's scale={degradation.scale}")

    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map_with_index(_with_position)
    host = _HostRows(ds, rows, cfg.batch_size, start_batch, cfg.drop_remainder)
    ds = grain.MapDataset.range(len(host)).map(host)
    ds = ds.map(PairTransform(cfg, degradation))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
    it_ds = it_ds.batch(len(rows), drop_remainder=cfg.drop_remainder)
    if cfg.workers > 0:
        _ensure_absl_flags()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer_size),
            worker_init_fn=_init_worker,
        )
    return it_ds


def make_iterator(source: Any, cfg: PipelineConfig, **kwargs):
    """`iter(build_dataset(...))`: a checkpointable `grain.DatasetIterator` of local batches."""
    return iter(build_dataset(source, cfg, **kwargs))


def iterator_save_arg(iterator):
    """Orbax arg that saves a Grain iterator's state (`ocp.args.Composite(..., data=this)`)."""
    import grain

    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_arg(iterator):
    """Orbax arg that restores a Grain iterator's state in place (same pipeline and process count)."""
    import grain

    return grain.checkpoint.CheckpointRestore(iterator)


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any) -> dict:
    """Assemble global `jax.Array`s from every process's local batch.

    `sharding` is one `jax.sharding.Sharding` for all entries (e.g. `NamedSharding(mesh,
    P(("data", "fsdp")))`, batch on the leading axis) or a mapping from entry name to sharding.
    The global batch is `process_count` times the local one along axis 0.
    """
    import jax

    out = {}
    for k, v in local_batch.items():
        sh = sharding[k] if isinstance(sharding, Mapping) else sharding
        out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v))
    return out
