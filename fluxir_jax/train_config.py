"""`fluxir train` configuration: dataclasses, YAML + key=value overrides, and validation.

Every default comes from the paper's FluxIR section (or our documented choice where it is silent). A mistake a
user can make (unknown key, mesh that does not fit the devices, batch that does not divide over
the data axes, base/adapter mismatch, missing dataset) raises `UserError` naming the field,
before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import pathlib

from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError
from fluxir_jax.models.adapter import FluxIRConfig
from fluxir_jax.parallel import MeshConfig

TIMESTEP_SAMPLERS = ("logit_normal", "uniform", "high_noise")
PIXEL_LOSSES = ("l1", "l2")
LR_SCHEDULES = ("constant", "cosine")
LPIPS_NETS = ("alex", "vgg")


@dataclasses.dataclass
class DataConfig:
    """The paired datasets the run reads.

    train          training pairs: a `fluxir degrade` or `fluxir gen` output directory (its `pairs/`),
                   or `tfds:NAME:SPLIT` for a TFDS dataset prepared in ArrayRecord format under
                   `data_dir` (e.g. `tfds:div2k/bicubic_x4:train`, `tfds:fluxir_pairs:train`;
                   HQ from its hq/hr/image feature, LQ from lq/lr if any; no TensorFlow)
    val            validation pairs in the same forms ("" = no validation)
    data_dir       TFDS data_dir for `tfds:` datasets ("": TFDS's default, ~/tensorflow_datasets)
    val_count      how many val examples are restored every `val.every` steps
    workers        Grain worker processes decoding training batches (0: in the training process)
    read_threads   threads reading and decoding examples (per process / worker)
    shuffle        shuffle the training examples (order seeded by `seed`)
    flip           random horizontal flip (p = 0.5), the same for HQ and LQ
    on_the_fly     degrade HQ crops at load time instead of reading the stored LQ
    """

    train: str = ""
    val: str = ""
    data_dir: str = ""
    val_count: int = 4
    workers: int = 0
    read_threads: int = 4
    shuffle: bool = True
    flip: bool = True
    on_the_fly: bool = False


@dataclasses.dataclass
class ModelConfig:
    """Load-time overrides of the frozen models.

    dtype          base compute and storage dtype (the base is frozen; bf16 on accelerators)
    vae_dtype      VAE compute / storage dtype
    remat_policy   what the base's backward keeps (see FluxConfig.remat_policy)
    keep_gelu_grad
                   which blocks also keep their MLP GELU's derivative: "none", "double", "single"
                   or "all" (see FluxConfig.keep_gelu_grad; 302 MB per flux-dev block per chip
                   at 8 examples of 512² per chip)
    attention      attention implementation (see FluxConfig.attention)
    frozen_sharding
                   how the frozen base and VAE weights lie on the mesh's fsdp axis: "fsdp" (split
                   over it, as the adapter and its optimizer state are: least HBM, but every
                   weight is all-gathered in each micro-batch's forward and backward pass) or
                   "replicated" (whole on every chip: no weight collectives, +23.8 GB per chip
                   for flux-dev in bf16; for chips with the HBM to spare, e.g. v5p)
    frozen_replicated
                   regexes searched in the frozen base's parameter paths (such as
                   `single_blocks/linear1/kernel`): weights whose path one finds are whole on
                   every chip even when frozen_sharding is fsdp, so their layers run without
                   weight all-gathers, at their full bytes per chip (flux-dev's 38 single
                   blocks: 8.6 GB in bf16). For chips with HBM for part of the base, e.g.
                   `[^single_blocks/]`. Each regex must find a parameter
    """

    dtype: str = "bfloat16"
    vae_dtype: str = "bfloat16"
    remat_policy: str = "save_attention"
    keep_gelu_grad: str = "none"
    attention: str = "xla"
    frozen_sharding: str = "fsdp"
    frozen_replicated: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OptimConfig:
    """AdamW on the adapter's fp32 master weights.

    lr             peak learning rate (after warm-up)
    warmup_steps   linear warm-up from 0 to `lr` over this many optimizer steps
    schedule       "constant" after warm-up, or "cosine" decay to lr * final_lr_ratio at `steps`
    final_lr_ratio
                   cosine only: the learning rate at `steps` as a fraction of `lr`
    b1, b2         AdamW moment decay rates
    eps            AdamW denominator epsilon
    weight_decay   AdamW decoupled weight decay (0: none)
    clip_norm      global-norm gradient clip (0: off)
    accum_steps    micro-batches per optimizer step (the global batch is split into them)
    """

    lr: float = 5e-5
    warmup_steps: int = 500
    schedule: str = "constant"
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accum_steps: int = 1


@dataclasses.dataclass
class LossConfig:
    """Flow matching on the velocity + pixel loss through the frozen VAE decoder.

    timesteps          "logit_normal" (t = sigmoid(logit_mean + logit_std * u)), "uniform", or
                       "high_noise" (uniform t shifted by `high_noise_shift`, SD3-style)
    logit_mean, logit_std
                       mean and std of the normal variable u of logit_normal t
    resolution_shift   apply FLUX's resolution shift (mu = lin_mu(tokens)) to logit_normal t
    high_noise_shift   shift factor of "high_noise" t (mu = log(high_noise_shift); > 1 favours noise)
    pixel_weight       weight of the pixel loss (L = L_flow + pixel_weight * L_pix; 0: flow loss only)
    pixel_loss         "l1" or "l2" distance between the decoded x0 estimate and the HQ crop
    pixel_crop         pixel crop side decoded for the pixel loss (multiple of 8; <= crop_size)
    pix_t_min, pix_t_max
                       only examples with t in this range get the pixel loss
    guidance           guidance value fed to a guidance-distilled base (flux-dev); ignored otherwise
    """

    timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = True
    high_noise_shift: float = 3.0
    pixel_weight: float = 1.0
    pixel_loss: str = "l1"
    pixel_crop: int = 256
    pix_t_min: float = 0.0
    pix_t_max: float = 1.0
    guidance: float = 3.5


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints in `run_dir/checkpoints/<step>/` (adapter, optimizer, step, RNG, data iterator).

    every          save every this many steps (also at the end and on SIGTERM)
    keep           how many of the newest checkpoints to keep
    """

    every: int = 1000
    keep: int = 3


@dataclasses.dataclass
class ValConfig:
    """Validation: restored samples of `data.val` written to `run_dir/samples/` with PSNR/SSIM in the metrics.

    every          restore `data.val_count` val images every this many steps (0: never)
    steps          Euler sampler steps of each validation restoration
    seed           seed of the validation noise and crops (fixed, so grids are comparable over steps)
    lpips_weights  LPIPS weights (`fluxir convert-iqa lpips ... -o FILE`, or the published
                   tensors as .safetensors/.npz); given, val_lpips is scored too ("": no LPIPS)
    lpips_net      the LPIPS backbone of those weights: alex or vgg
    """

    every: int = 1000
    steps: int = 28
    seed: int = 0
    lpips_weights: str = ""
    lpips_net: str = "alex"


@dataclasses.dataclass
class TrainConfig:
    """The whole `fluxir train` run.

    base           converted checkpoint directory, or a preset name (tiny, small, flux-dev,
                   flux-schnell) meaning random weights (for --compile-only and benchmarks)
    run_dir        output directory (config.yaml, metrics.jsonl, events/, checkpoints/, samples/,
                   adapter/); rerunning with the same run_dir resumes
    data           datasets and input pipeline
    batch_size     global batch (over all devices and processes)
    crop_size      HQ training crop; the LQ crop is crop_size / scale
    scale          HQ side / LQ side of the pairs (must match the dataset)
    steps          optimizer steps of the whole run (the schedule's length)
    seed           seed of data order, crops, flips, timesteps and noise
    mesh           device mesh of the step (see the mesh fields)
    model          load-time settings of the frozen base and VAE
    adapter        the FluxIR adapter (FluxIRConfig)
    optim          optimizer and learning-rate schedule
    loss           timestep sampling and the loss terms
    checkpoint     when checkpoints are written and how many are kept
    val            validation restorations during training
    log_every      print and record metrics every this many steps
    max_bad_steps  consecutive non-finite steps after which the run stops
    peak_tflops    per-device peak for MFU (0: from the device-kind table)
    slice_knobs    knobs for the Cloud TPU slices they were compiled for: {accelerator type:
                   [key=value, ...]} (e.g. `v5p-8: [optim.accum_steps=2]`), applied when the run's
                   devices (or `--topology`) are that slice, before the command line's overrides
                   (`slice_knobs={}` turns them off); docs/tpu.md
    """

    base: str = "flux-dev"
    run_dir: str = "runs/fluxir"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    batch_size: int = 64
    crop_size: int = 512
    scale: int = 4
    steps: int = 100_000
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    adapter: FluxIRConfig = dataclasses.field(default_factory=FluxIRConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    log_every: int = 10
    max_bad_steps: int = 10
    peak_tflops: float = 0.0
    slice_knobs: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def load(path: str | None, overrides=()) -> TrainConfig:
    try:
        return config_io.load(TrainConfig, path, overrides)
    except ValueError as e:  # a nested dataclass's __post_init__ (e.g. adapter.control_blocks)
        raise UserError(f"config: {e}") from None


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def check_static(cfg: TrainConfig) -> None:
    """Checks that need neither devices nor files."""
    _need(cfg.steps >= 1, f"steps={cfg.steps}: must be >= 1")
    _need("://" not in cfg.run_dir, f"run_dir={cfg.run_dir}: must be a file system path, not a URL (mount a bucket "
          "with gcsfuse and give its path: README, 'Where data and checkpoints live')")
    _need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1")
    _need(cfg.scale >= 1 and cfg.crop_size % cfg.scale == 0, f"crop_size={cfg.crop_size} must be a multiple of scale={cfg.scale}")
    _need(cfg.crop_size % 16 == 0, f"crop_size={cfg.crop_size}: must be a multiple of 16 (8x VAE, 2x2 packing)")
    o, lo = cfg.optim, cfg.loss
    _need(o.schedule in LR_SCHEDULES, f"optim.schedule={o.schedule!r}: expected one of {LR_SCHEDULES}")
    _need(o.accum_steps >= 1, f"optim.accum_steps={o.accum_steps}: must be >= 1")
    _need(o.lr > 0 and o.warmup_steps >= 0, "optim.lr must be > 0 and optim.warmup_steps >= 0")
    _need(cfg.batch_size % o.accum_steps == 0, f"batch_size={cfg.batch_size} is not divisible by optim.accum_steps={o.accum_steps}")
    _need(lo.timesteps in TIMESTEP_SAMPLERS, f"loss.timesteps={lo.timesteps!r}: expected one of {TIMESTEP_SAMPLERS}")
    _need(lo.pixel_loss in PIXEL_LOSSES, f"loss.pixel_loss={lo.pixel_loss!r}: expected one of {PIXEL_LOSSES}")
    _need(lo.pixel_crop % 8 == 0 and 8 <= lo.pixel_crop <= cfg.crop_size,
          f"loss.pixel_crop={lo.pixel_crop}: must be a multiple of 8 in [8, crop_size={cfg.crop_size}]")
    _need(0.0 <= lo.pix_t_min <= lo.pix_t_max <= 1.0, "loss.pix_t_min/pix_t_max: need 0 <= min <= max <= 1")
    _need(lo.pixel_weight >= 0, "loss.pixel_weight must be >= 0")
    _need(cfg.checkpoint.every >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")
    _need(cfg.log_every >= 1, "log_every must be >= 1")
    _need(cfg.val.every >= 0 and cfg.val.steps >= 1, "val.every must be >= 0 and val.steps >= 1")
    _need(cfg.val.lpips_net in LPIPS_NETS, f"val.lpips_net={cfg.val.lpips_net!r}: expected one of {LPIPS_NETS}")
    _need(cfg.max_bad_steps >= 1, "max_bad_steps must be >= 1")
    _check_slice_knobs(cfg)


def _check_slice_knobs(cfg: TrainConfig) -> None:
    """Every `slice_knobs` entry names a TPU slice and overrides that give a valid config."""
    from fluxir_jax import tpu_topology

    for name, knobs in cfg.slice_knobs.items():
        where = f"slice_knobs.{name}"
        tpu_topology.parse_accelerator(name)  # UserError naming the known forms
        _need(isinstance(knobs, list) and all(isinstance(k, str) and "=" in k for k in knobs),
              f"{where}: expected a list of key=value overrides, got {knobs!r}")
        _need(not any(k.strip().startswith("slice_knobs") for k in knobs), f"{where}: cannot change slice_knobs")
        try:
            knobbed = config_io.apply_overrides(dataclasses.replace(cfg, slice_knobs={}), knobs)
        except (UserError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None
        check_static(knobbed)


def slice_knobs(cfg: TrainConfig, accelerator: str | None) -> list[str]:
    """The overrides `cfg.slice_knobs` gives the slice `accelerator` ([] for none, or no TPU)."""
    from fluxir_jax import tpu_topology

    if not accelerator:
        return []
    return next((list(knobs) for name, knobs in cfg.slice_knobs.items() if tpu_topology.same_slice(name, accelerator)), [])


def for_slice(cfg: TrainConfig, accelerator: str | None, overrides=()) -> tuple[TrainConfig, list[str]]:
    """`cfg` with its knobs for the slice `accelerator`, and the command line's `overrides` applied
    again on top (they win); (config, the knobs applied)."""
    knobs = slice_knobs(cfg, accelerator)
    if not knobs:
        return cfg, []
    out = config_io.apply_overrides(cfg, [*knobs, *overrides])
    check_static(out)
    return out, knobs


def check_data(cfg: TrainConfig) -> None:
    """The datasets exist (needed for training, not for --compile-only)."""
    from fluxir_jax.data.dataset import INFO_NAME
    from fluxir_jax.data.tfds_source import TFDS_PREFIX, TfdsSource, parse_spec

    for field in ("train", "val"):
        path = getattr(cfg.data, field)
        if field == "val" and (not path or cfg.val.every == 0):
            continue
        _need(bool(path), f"data.{field}: no dataset given")
        if path.startswith(TFDS_PREFIX):  # a missing TFDS dataset or split: UserError naming it
            TfdsSource(*parse_spec(path), data_dir=cfg.data.data_dir or None)
            continue
        _need((pathlib.Path(path) / INFO_NAME).is_file(), f"data.{field}: no dataset at {path} (no {INFO_NAME})")
    lpips = cfg.val.lpips_weights
    if lpips and cfg.val.every > 0 and cfg.data.val:
        _need(pathlib.Path(lpips).is_file(), f"val.lpips_weights: no file at {lpips}")
