"""`fluxir degrade --input DIR --out DIR [key=value ...]`: a paired dataset from your own HQ images.

Every png/jpg/jpeg/webp/tif/tiff file under `--input` (recursive, case-insensitive extension) is
read with `fluxir_jax.fileio.read_image` (8-bit RGB; 16-bit, gray, palette, CMYK converted, alpha
composited on white, EXIF orientation applied), cropped to a multiple of the scale, degraded with the
Real-ESRGAN second-order model (`fluxir_jax.data.degrade`) with a per-image seed derived from
`(seed, relative path)`, and stored as one example of a paired dataset
(`fluxir_jax.data.dataset`). An image with a side shorter than the GT crop (`gt.crop_size`) is
skipped with the reason (`small_images=skip`, the default) or upscaled (Lanczos, aspect kept)
until its shorter side is the crop size (`small_images=upscale`); it is never padded. Files that
cannot be decoded (empty, truncated, not an image) are skipped and listed with the reason; the summary is printed and written as
`degrade_summary.json` inside the dataset.

`--tfds NAME:SPLIT --data-dir DIR` reads the HQ images from a TFDS dataset prepared in ArrayRecord
format instead (e.g. `--tfds div2k/bicubic_x4:train`; its `hr`/`hq`/`image` feature, see
`fluxir_jax.data.tfds_source`; no TensorFlow); example ids are `SPLIT/INDEX` (8 digits).

Output: the dataset appears atomically at `--out` when the run completes; until then it is
built in `<out>.partial/`, and re-running the same command after an interruption resumes there
(finished shards are kept, images already stored are not processed again). An `--out` that
already holds a finished dataset is an error.

Settings: `configs/degrade/default.yaml` lists every key with its default and meaning. The same
keys work in a `--config` YAML file and as `key=value` overrides: `seed=1 store_lq=false
small_images=upscale ...` set `DegradeFolderConfig`; degradation keys (`gt.crop_size=512`,
`scale=4`, `stage1.noise.gray_prob=0.4`, ..., optionally under `degradation:` / prefixed
`degradation.`) set `DegradationConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

from fluxir_jax import config as config_lib
from fluxir_jax import fileio
from fluxir_jax.errors import UserError

IMAGE_EXTENSIONS = fileio.IMAGE_SUFFIXES
SUMMARY_NAME = "degrade_summary.json"


@dataclasses.dataclass
class DegradeFolderConfig:
    """Settings of `fluxir degrade` (the degradation model has its own `DegradationConfig`)."""

    seed: int = 0  # base seed; each image's seed is derived from (seed, its relative path)
    store_lq: bool = True  # false: store HQ only and degrade on the fly in training
    max_side: int = 0  # >0: downscale (Lanczos) images whose longer side exceeds this
    small_images: str = "skip"  # a side < gt.crop_size: "skip" (with the reason) or "upscale" (Lanczos)
    shard_size: int = 128  # examples per ArrayRecord shard
    workers: int = 0  # worker processes; 0 = all cores available to this process
    png_compress_level: int = 1  # 0..9, zlib level of the stored PNGs


def image_seed(seed: int, rel: str) -> int:
    """Per-image seed (63 bits) from the base seed and the image's relative path."""
    digest = hashlib.sha256(f"{int(seed)}:{rel}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def find_images(root: pathlib.Path) -> tuple[list[pathlib.Path], int]:
    """Image files under `root` (sorted by relative path) and the number of other files."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = pathlib.Path(dirpath) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p)
            else:
                others += 1
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, others


SMALL_IMAGES = ("skip", "upscale")


class SmallImage(Exception):
    """The image is smaller than the GT crop and `small_images=skip`; the message is the reason."""


def _lanczos(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))


def prepare_hq(img: np.ndarray, cfg: DegradeFolderConfig, crop_size: int, scale: int, notes: list[str]) -> np.ndarray:
    """Downscale (max_side), settle a side shorter than `crop_size` (`small_images`), crop to a
    multiple of `scale`. Raises SmallImage for a small image with `small_images=skip`."""
    h, w = img.shape[:2]
    if cfg.max_side > 0 and max(h, w) > cfg.max_side:
        r = cfg.max_side / max(h, w)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        img = _lanczos(img, nh, nw)
        notes.append(f"downscaled {h}x{w} -> {nh}x{nw}")
        h, w = nh, nw
    if h < crop_size or w < crop_size:
        if cfg.small_images == "skip":
            raise SmallImage(f"{h}x{w} is smaller than the GT crop {crop_size}x{crop_size} (gt.crop_size); "
                             f"small_images=upscale would upscale it")
        r = crop_size / min(h, w)
        nh, nw = max(crop_size, round(h * r)), max(crop_size, round(w * r))
        img = _lanczos(img, nh, nw)
        notes.append(f"upscaled {h}x{w} -> {nh}x{nw} (smaller than the GT crop {crop_size})")
    h2, w2 = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    if (h2, w2) != img.shape[:2]:
        notes.append(f"cropped {img.shape[0]}x{img.shape[1]} -> {h2}x{w2} (multiple of {scale})")
        img = img[:h2, :w2]
    return np.ascontiguousarray(img)


def _read_input(src: str | tuple, rel: str, notes: list[str]) -> np.ndarray:
    """A task's image: `src` is a file path or (name, split, data_dir, index) of a TFDS dataset."""
    if isinstance(src, str):
        return fileio.read_image(src, notes)
    from fluxir_jax.data.tfds_source import cached_source

    name, split, data_dir, index = src
    return fileio.decode_image(cached_source(name, split, data_dir)[index]["hq_png"], notes, what=rel)


def process_image(task: tuple[str | tuple, str, dict, Any]) -> dict:
    """Worker: one file (or TFDS record) -> {"rel", "example" (PairExample or None), "reason", "notes"}."""
    from fluxir_jax.data.dataset import PairExample

    src, rel, cfg_dict, deg_cfg = task
    cfg = DegradeFolderConfig(**cfg_dict)
    try:
        notes: list[str] = []
        img = _read_input(src, rel, notes)
    except fileio.ImageReadError as e:
        return {"rel": rel, "example": None, "reason": str(e).removeprefix(f"{src if isinstance(src, str) else rel}: "),
                "notes": []}
    src_hw = list(img.shape[:2])
    try:
        hq = prepare_hq(img, cfg, deg_cfg.gt.crop_size, deg_cfg.scale, notes)
    except SmallImage as e:
        return {"rel": rel, "example": None, "reason": str(e), "notes": []}
    seed = image_seed(cfg.seed, rel)
    lq_png, params = None, {}
    if cfg.store_lq:
        from fluxir_jax.data.degrade import degrade

        rng = np.random.default_rng(seed)
        lq, _, params = degrade(hq.astype(np.float32) / 255.0, rng, deg_cfg)
        lq8 = np.clip(np.round(np.asarray(lq, np.float64) * 255.0), 0, 255).astype(np.uint8)
        lq_png = fileio.encode_png(lq8, cfg.png_compress_level)
    ex = PairExample(
        id=rel,
        hq_png=fileio.encode_png(hq, cfg.png_compress_level),
        lq_png=lq_png,
        seed=seed,
        params=params,
        meta={"source": rel if isinstance(src, str) else f"tfds:{src[0]}:{src[1]}", "source_hw": src_hw, "notes": notes,
              **({} if isinstance(src, str) else {"tfds_index": src[3]})},
    )
    return {"rel": rel, "example": ex, "reason": None, "notes": notes}


def _worker_init() -> None:
    # Workers only decode and degrade on numpy/OpenCV; keep each to one thread.
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`DegradeFolderConfig` overrides, `DegradationConfig` overrides).

    A key goes to `DegradeFolderConfig` when its first part is one of its fields, to
    `DegradationConfig` when it starts with `degradation.` or its first part is a field of
    `DegradationConfig` (`scale`, `gt.crop_size`, `stage1.noise.gray_prob`, ...).
    """
    from fluxir_jax.data.degrade import DegradationConfig

    mine_fields, deg_fields = _field_names(DegradeFolderConfig), _field_names(DegradationConfig)
    mine, deg = [], []
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override {o!r} is not of the form key=value")
        key = o.split("=", 1)[0].strip()
        if key.startswith("degradation."):
            deg.append(o.strip()[len("degradation."):])
        elif key.split(".")[0] in mine_fields:
            mine.append(o)
        elif key.split(".")[0] in deg_fields:
            deg.append(o)
        else:
            raise UserError(
                f"unknown config key {key} (known: {', '.join(sorted(mine_fields))}, "
                f"and the degradation keys {', '.join(sorted(deg_fields))}, optionally prefixed with degradation.)"
            )
    return mine, deg


def load_configs(config_path: str | None, overrides: Sequence[str]):
    """(`DegradeFolderConfig`, `DegradationConfig`) from an optional YAML file plus overrides.

    The YAML file holds `DegradeFolderConfig` keys at the top level and the degradation keys
    under `degradation:` (or, as on the command line, at the top level). The GT crop size
    (`gt.crop_size`, the smallest usable side)
    and `scale` are the degradation's.
    """
    from fluxir_jax.data.degrade import DegradationConfig

    data = config_lib.read_yaml(config_path) if config_path is not None else {}
    deg_data = data.pop("degradation", None) or {}
    if not isinstance(deg_data, dict):
        raise UserError("config key degradation must be a mapping")
    # the command line's rule in the file too: degradation keys may sit at the top level
    deg_fields, mine_fields = _field_names(DegradationConfig), _field_names(DegradeFolderConfig)
    for key in [k for k in data if k in deg_fields and k not in mine_fields]:
        if key in deg_data:
            raise UserError(f"config key {key} is given both at the top level and under degradation:")
        deg_data[key] = data.pop(key)
    unknown = sorted(k for k in data if k not in mine_fields)
    if unknown:
        raise UserError(f"unknown config key {unknown[0]} in {config_path} (known keys: "
                        f"{', '.join(sorted(mine_fields | deg_fields | {'degradation'}))})")
    mine, deg = split_overrides(overrides)
    cfg = config_lib.apply_overrides(config_lib.from_dict(DegradeFolderConfig, data), mine)
    deg_cfg = config_lib.apply_overrides(config_lib.from_dict(DegradationConfig, deg_data), deg)
    if cfg.shard_size < 1 or cfg.workers < 0 or not 0 <= cfg.png_compress_level <= 9 or cfg.max_side < 0:
        raise UserError("shard_size must be >= 1, workers >= 0, png_compress_level in 0..9, max_side >= 0")
    if cfg.small_images not in SMALL_IMAGES:
        raise UserError(f"small_images must be one of {', '.join(SMALL_IMAGES)}, got {cfg.small_images!r}")
    if 0 < cfg.max_side < deg_cfg.gt.crop_size:
        raise UserError(f"max_side {cfg.max_side} is below gt.crop_size {deg_cfg.gt.crop_size}: every image would be "
                        f"too small")
    return cfg, deg_cfg


def degrade_folder(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: DegradeFolderConfig,
    degradation: Any,
    *,
    progress: bool = True,
    tfds: tuple[str, str, str | None] | None = None,
) -> dict:
    """Build the paired dataset at `out_dir` from the images under `input_dir` (or, with `tfds` =
    (name, split, data_dir) and `input_dir` None, from a TFDS dataset); returns the summary."""
    from tqdm import tqdm

    from fluxir_jax.data.dataset import DatasetWriter

    out = pathlib.Path(out_dir).absolute()
    if tfds is not None:
        from fluxir_jax.data.tfds_source import TfdsSource

        src = TfdsSource(*tfds)
        root = f"tfds:{tfds[0]}:{tfds[1]}"
        items, others = [(tuple(tfds) + (i,), src.example_id(i)) for i in range(len(src))], 0
        if not items:
            raise UserError(f"TFDS dataset {tfds[0]} split {tfds[1]} is empty")
    else:
        root = pathlib.Path(input_dir).absolute()
        if not root.is_dir():
            raise UserError(f"input directory not found: {input_dir}")
        images, others = find_images(root)
        if not images:
            raise UserError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {root}")
        items = [(str(p), p.relative_to(root).as_posix()) for p in images]
    t0 = time.time()
    mine = config_lib.to_dict(cfg)
    mine.pop("workers")  # does not change the output
    full_config = {"degrade_folder": mine, "degradation": config_lib.to_dict(degradation)}
    writer = DatasetWriter(out, config=full_config, shard_size=cfg.shard_size, info={"producer": "fluxir degrade"})
    cfg_dict = config_lib.to_dict(cfg)
    tasks = []
    already = 0
    for task_src, rel in items:
        if rel in writer:
            already += 1
        else:
            tasks.append((task_src, rel, cfg_dict, degradation))
    workers = min(cfg.workers or available_cores(), max(1, len(tasks)))
    skipped, converted = [], []
    written = 0
    bar = tqdm(total=len(tasks), desc="fluxir degrade", unit="img", disable=not progress, file=sys.stderr)
    with writer:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_worker_init)
            results = pool.imap(process_image, tasks, chunksize=1)
        else:
            pool = None
            results = map(process_image, tasks)
        try:
            for res in results:
                bar.update(1)
                if res["example"] is None:
                    skipped.append({"file": res["rel"], "reason": res["reason"]})
                    continue
                if res["notes"]:
                    converted.append({"file": res["rel"], "notes": res["notes"]})
                if writer.add(res["example"]):
                    written += 1
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        summary = {
            "input": str(root),
            "out": str(out),
            "found": len(items),
            "written": written,
            "already_present": already,
            "skipped": skipped,
            "converted": converted,
            "ignored_other_files": others,
            "num_examples": writer.num_examples,
            "workers": workers,
            "seconds": round(time.time() - t0, 3),
        }
        if writer.num_examples == 0:
            shutil.rmtree(writer.work_dir, ignore_errors=True)
            raise UserError(f"none of the {len(items)} images in {root} could be used: " + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]))
        (writer.work_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
        writer.close(extra_info={"summary_file": SUMMARY_NAME})
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"wrote {summary['written']} pairs to {summary['out']} "
        f"({summary['num_examples']} in the dataset; {summary['already_present']} already present, "
        f"{len(summary['skipped'])} skipped, {summary['ignored_other_files']} non-image files ignored)"
    ]
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])}:")
        lines += [f"  {s['file']}: {s['reason']}" for s in summary["skipped"]]
    if summary["converted"]:
        lines.append(f"converted {len(summary['converted'])}:")
        lines += [f"  {c['file']}: {'; '.join(c['notes'])}" for c in summary["converted"]]
    return "\n".join(lines)


def run(args) -> int:
    """`func` of the `degrade` subcommand."""
    tfds = None
    if args.tfds is not None:
        from fluxir_jax.data.tfds_source import TfdsSource, parse_spec

        tfds = (*parse_spec(args.tfds), args.data_dir)
        TfdsSource(*tfds)  # a missing dataset or split is a UserError before the settings are read
    elif args.data_dir is not None:
        raise UserError("--data-dir goes with --tfds NAME:SPLIT")
    elif not pathlib.Path(args.input).is_dir():
        raise UserError(f"input directory not found: {args.input}")
    cfg, deg_cfg = load_configs(args.config, args.overrides)
    summary = degrade_folder(args.input, args.out, cfg, deg_cfg, progress=not args.no_progress, tfds=tfds)
    print(format_summary(summary))
    return 0


def register(subparsers) -> None:
    """Add `fluxir degrade` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "degrade",
        help="build a paired LQ/HQ dataset from your own images",
        description=(
            "Build a paired LQ/HQ dataset (ArrayRecord shards, with a TFDS view in <out>/tfds/) from a folder of "
            "your own HQ images (png/jpg/jpeg/webp/tif/tiff, recursive) or a TFDS dataset (--tfds), degraded with the Real-ESRGAN second-order model. "
            "The dataset appears at --out when complete; an interrupted run resumes from <out>.partial."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="DIR", help="folder of HQ images (searched recursively)")
    src.add_argument("--tfds", metavar="NAME:SPLIT",
                     help="read the HQ images from a TFDS dataset prepared in ArrayRecord format instead "
                          "(e.g. div2k/bicubic_x4:train or fluxir_pool:train[:100]); no TensorFlow needed")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="TFDS data_dir holding NAME/VERSION/ for --tfds (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output dataset directory (must not hold a finished dataset)")
    p.add_argument("--config", metavar="YAML", default=None, help="settings file (DegradeFolderConfig keys; degradation: {...})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. seed=1 workers=8 gt.crop_size=512 stage1.noise.gray_prob=0.4")
    p.set_defaults(func=run)
