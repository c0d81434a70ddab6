"""Settings of `fluxir gen` (FluxGen) and the checks that run before any device work.

    cfg = load_config("configs/gen/tiny.yaml", ["count=64", "select.percentile=10"])
    metrics = check_inputs(cfg)          # UserError (exit 2) on a bad checkpoint / metric / weights

`configs/gen/fluxgen-dev.yaml` documents every field (the paper's run).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Sequence

from fluxir_jax import config as config_io
from fluxir_jax.data.degrade import DegradationConfig
from fluxir_jax.errors import UserError

PARALLEL_MODES = ("auto", "pmap", "sharded")
LEARNED_METRICS = ("clipiqa", "maniqa", "musiq")  # the paper's three; used when their weights are given


@dataclasses.dataclass
class WeightsConfig:
    """Converted weights of each metric (`fluxir convert-iqa`); "" = not given.

    clipiqa        CLIP-IQA weights (.safetensors); given: the metric is scored
    maniqa         MANIQA weights (.safetensors); given: the metric is scored
    musiq          MUSIQ weights (.safetensors); given: the metric is scored
    """

    clipiqa: str = ""
    maniqa: str = ""
    musiq: str = ""
    niqe: str = ""  # optional: NIQE's pristine parameters ship with the package


@dataclasses.dataclass
class SelectConfig:
    """Which pool images become training pairs (re-run with `fluxir gen select OUT`)."""

    percentile: float = 5.0  # drop an image below this percentile of the pool on any metric (0: keep all)


@dataclasses.dataclass
class GenConfig:
    """The whole `fluxir gen` (FluxGen) run: generate, score, select, degrade.

    weights        converted weights of the learned metrics
    select         the selection rule applied to the scored pool
    degrade        the second-order degradation that makes each LQ (DegradationConfig)
    """

    base: str = ""  # base checkpoint directory (`fluxir convert` / `fluxir init`)
    out: str = ""  # output directory
    count: int = 350000  # images to generate over all processes
    batch_size: int = 8  # global batch (all local devices); the devices used divide it
    resolution: int = 1024  # image side in pixels (multiple of 16)
    steps: int = 28  # Euler steps
    guidance: float = 3.5  # distilled guidance (ignored by schnell-style models)
    seed: int = 0  # image i uses seed + i
    metrics: tuple[str, ...] = ()  # () = clipiqa/maniqa/musiq with weights given, plus niqe
    weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    parallel: str = "auto"  # pmap | sharded | auto (infer.Engine)
    devices: int = 0  # local devices to use (0: all that divide batch_size)
    degrade: DegradationConfig = dataclasses.field(default_factory=DegradationConfig)
    shard_size: int = 1000  # images per committed shard (the unit of resume)
    score_batch: int = 8  # images per metric call (fixed, so scores do not depend on batch_size)
    workers: int = 2  # degradation worker processes (0: in this process, after generation)
    degrade_while_generating: bool = True  # degrade every pool image as it is made (degraded/)
    png_compress_level: int = 1  # 0-9; same level, same bytes
    contact_sheet: int = 8  # highest- and lowest-scoring images shown in contact_sheet.png
    dtype: str = ""  # "" = the checkpoint's; float32 | bfloat16
    allow_zero_text: bool = False  # accept a checkpoint whose empty-prompt embeddings are zeros
    process_index: int = -1  # -1: jax.process_index(); set both to simulate hosts
    process_count: int = -1  # -1: jax.process_count()
    progress: bool = True  # progress bar on process 0

    def __post_init__(self):
        checks = [
            (self.count >= 1, f"count={self.count} must be positive"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be positive"),
            (self.resolution >= 16 and self.resolution % 16 == 0, f"resolution={self.resolution} must be a positive multiple of 16"),
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
            (0 <= self.select.percentile < 100, f"select.percentile={self.select.percentile} must be in [0, 100)"),
            (self.parallel in PARALLEL_MODES, f"parallel={self.parallel!r} is not one of {', '.join(PARALLEL_MODES)}"),
            (self.devices >= 0, f"devices={self.devices} must be >= 0"),
            (self.shard_size >= 1, f"shard_size={self.shard_size} must be positive"),
            (self.score_batch >= 1, f"score_batch={self.score_batch} must be positive"),
            (self.workers >= 0, f"workers={self.workers} must be >= 0"),
            (0 <= self.png_compress_level <= 9, f"png_compress_level={self.png_compress_level} must be in 0..9"),
            (self.contact_sheet >= 0, f"contact_sheet={self.contact_sheet} must be >= 0"),
            (self.dtype in ("", "float32", "bfloat16"), f"dtype={self.dtype!r} must be '', float32 or bfloat16"),
            (self.resolution % self.degrade.scale == 0, f"resolution={self.resolution} is not a multiple of degrade.scale={self.degrade.scale}"),
            ((self.process_index < 0) == (self.process_count < 0), "process_index and process_count are set together"),
            (self.process_count < 0 or 0 <= self.process_index < self.process_count,
             f"process_index={self.process_index} must be in [0, process_count={self.process_count})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"gen config: {msg}")

    def generation_key(self) -> dict:
        """The settings that decide the pool's bytes (a resumed run must match them)."""
        return {"base": str(pathlib.Path(self.base).absolute()), "count": self.count, "resolution": self.resolution,
                "steps": self.steps, "guidance": self.guidance, "seed": self.seed, "metrics": list(self.metrics),
                "weights": dataclasses.asdict(self.weights), "shard_size": self.shard_size,
                "score_batch": self.score_batch, "dtype": self.dtype, "png_compress_level": self.png_compress_level}


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> GenConfig:
    return config_io.load(GenConfig, path, overrides)


def resolve_metrics(cfg: GenConfig) -> GenConfig:
    """`cfg` with `metrics` filled in when empty: the learned metrics whose weights are given, plus niqe."""
    if cfg.metrics:
        return cfg
    names = [m for m in LEARNED_METRICS if getattr(cfg.weights, m)] + ["niqe"]
    return dataclasses.replace(cfg, metrics=tuple(names))


def metric_weights(cfg: GenConfig, name: str) -> str | None:
    return getattr(cfg.weights, name, "") or None


def check_inputs(cfg: GenConfig) -> dict[str, bool]:
    """Everything a user can get wrong, before any device work. Returns {metric: lower_better}."""
    from fluxir_jax import checkpoint
    from fluxir_jax.iqa import registry

    if not cfg.base:
        raise UserError("gen config: base (the checkpoint directory) is not set")
    if not cfg.out:
        raise UserError("gen config: out (the output directory) is not set")
    checkpoint.read_config(cfg.base)
    if not (pathlib.Path(cfg.base) / "transformer").is_dir() or not (pathlib.Path(cfg.base) / "vae").is_dir():
        raise UserError(f"{cfg.base}: checkpoint has no transformer/ and vae/")
    if len(set(cfg.metrics)) != len(cfg.metrics):
        raise UserError(f"gen config: metrics {list(cfg.metrics)} lists a metric twice")
    known = {f.name for f in dataclasses.fields(WeightsConfig)}
    out = {}
    for name in cfg.metrics:
        spec = registry.metric_spec(name)
        if spec.kind != "nr":
            raise UserError(f"metric {name} needs reference images; FluxGen scores with no-reference metrics")
        w = metric_weights(cfg, name) if name in known else None
        if spec.needs_weights and not w:
            raise UserError(f"metric {name} needs weights: set weights.{name}=PATH (fluxir convert-iqa)")
        if w and not pathlib.Path(w).exists():
            raise UserError(f"weights.{name}: {w} does not exist")
        if name == "niqe" and cfg.resolution < 192:
            raise UserError(f"metric niqe needs images of at least 192 x 96 pixels; resolution={cfg.resolution}")
        out[name] = spec.lower_better
    if not out:
        raise UserError("gen config: no metrics")
    return out


def host_range(count: int, index: int, n: int) -> tuple[int, int]:
    """Process `index` of `n` takes the contiguous slice [start, stop) of [0, count)."""
    return count * index // n, count * (index + 1) // n


def devices_for(batch_size: int, requested: int, available: int) -> int:
    """Devices to use: `requested` (must divide batch_size), or the most that divide batch_size."""
    if requested:
        if requested > available:
            raise UserError(f"devices={requested}: this host has {available} local devices")
        if batch_size % requested:
            raise UserError(f"batch_size={batch_size} is not a multiple of devices={requested}")
        return requested
    return math.gcd(batch_size, available)


def part_name(kind: str, index: int, count: int) -> str:
    """`pool` / `degraded` for one process; `pool-00001-of-00004` when several processes write."""
    return kind if count == 1 else f"{kind}-{index:05d}-of-{count:05d}"
