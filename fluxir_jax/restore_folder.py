"""`fluxir restore --checkpoint DIR --adapter DIR --input PATH --out DIR [key=value ...]`.

Restores every png/jpg/jpeg/webp/tif/tiff under `--input` (a folder, searched recursively, or
one file) into `--out`, keeping relative paths and names (the extension becomes .png, or .jpg
with `format=jpeg`). Images are read as 8-bit RGB (grayscale, palette, RGBA/LA composited on
white, 16-bit, CMYK converted; EXIF orientation applied). Files that cannot be decoded (empty,
truncated, not an image) are skipped with the reason; so are images whose output already
exists (unless `--overwrite`), so an interrupted run resumes where it stopped. Each image's
seed comes from `(seed, relative path)`, so a result does not depend on which other images
are in the folder. Outputs are written atomically (temp file, then rename). At the end a
summary is printed and written as `restore_summary.json` in `--out` (with the resolved config
in `restore_config.yaml`). On several hosts each host takes its slice of the sorted file list
and writes its own outputs and `restore_summary.<host>.json`.

Overrides (`steps=8 guidance=3.5 control_scale=0.8 color_fix=adain tile.size=512
parallel=pmap batch_size=2 format=jpeg ...`) set `RestoreConfig` fields (configs/restore/default.yaml).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import uuid

import numpy as np

from fluxir_jax.errors import UserError
from fluxir_jax.restore import RestoreConfig, Restorer, load_config, output_size, padded

SUMMARY_NAME = "restore_summary.json"
CONFIG_NAME = "restore_config.yaml"


def _write_atomic(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_image(img: np.ndarray, path: pathlib.Path, cfg: RestoreConfig) -> None:
    """uint8 HWC RGB -> PNG or JPEG at `path`, atomically."""
    from PIL import Image

    def write(tmp):
        im = Image.fromarray(img, "RGB")
        if cfg.format == "jpeg":
            im.save(tmp, format="JPEG", quality=cfg.jpeg_quality)
        else:
            im.save(tmp, format="PNG", compress_level=cfg.png_compress_level)

    _write_atomic(path, write)


def list_inputs(input_path: pathlib.Path, out_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, list[str]]:
    """(root, sorted relative paths of the image files) for a folder or a single file.

    Files under `out_dir` (when the output folder lies inside the input folder) are not inputs.
    """
    from fluxir_jax.data.degrade_folder import IMAGE_EXTENSIONS, find_images

    if input_path.is_file():
        if input_path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"--input {input_path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return input_path.parent, [input_path.name]
    if not input_path.is_dir():
        raise UserError(f"--input {input_path}: no such file or folder")
    files, _ = find_images(input_path)
    if out_dir is not None:
        out_abs = out_dir.resolve()
        files = [f for f in files if out_abs not in f.resolve().parents]
    if not files:
        raise UserError(f"--input {input_path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return input_path, [f.relative_to(input_path).as_posix() for f in files]


def _probe_size(path: pathlib.Path) -> tuple[int, int]:
    """(height, width) from the header, or BadImage; full decoding happens later."""
    from PIL import Image, UnidentifiedImageError

    from fluxir_jax.fileio import ImageReadError as BadImage

    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
    except UnidentifiedImageError:
        raise BadImage("not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or unreadable image ({e or type(e).__name__})") from None
    if h < 1 or w < 1:
        raise BadImage("image has no pixels")
    return h, w


def restore_folder(checkpoint: str, adapter: str, input_path: str, out: str, cfg: RestoreConfig,
                   overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Restore a folder (see module doc); returns the summary dict."""
    from fluxir_jax import config as config_io
    from fluxir_jax.data.degrade_folder import image_seed
    from fluxir_jax.fileio import ImageReadError as BadImage
    from fluxir_jax.fileio import read_image
    from fluxir_jax.infer import host_slice

    import jax

    def load_rgb8(path):
        notes: list[str] = []
        return read_image(path, notes), notes

    out_dir = pathlib.Path(out)
    root, rels = list_inputs(pathlib.Path(input_path), out_dir)
    rels = host_slice(rels)
    suffix = ".jpg" if cfg.format == "jpeg" else ".png"
    skipped: list[dict] = []
    notes: dict[str, list[str]] = {}
    todo: dict[tuple[int, int], list[tuple[str, pathlib.Path]]] = {}
    claimed: dict[str, str] = {}
    for rel in rels:
        target = out_dir / pathlib.PurePosixPath(rel).with_suffix(suffix)
        key = target.as_posix()
        if key in claimed:
            skipped.append({"input": rel, "reason": f"output name {target.name} is also the output of {claimed[key]}"})
            continue
        claimed[key] = rel
        if target.exists() and not overwrite:
            skipped.append({"input": rel, "reason": "output exists (pass --overwrite to redo)"})
            continue
        try:
            h, w = _probe_size(root / rel)
        except BadImage as e:
            skipped.append({"input": rel, "reason": str(e)})
            continue
        oh, ow = output_size(h, w, cfg)
        todo.setdefault((padded(oh), padded(ow)), []).append((rel, target))
    total = sum(len(v) for v in todo.values())
    restored: list[str] = []
    t0 = time.time()
    if total:
        restorer = Restorer(checkpoint, adapter, cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / CONFIG_NAME, lambda p: config_io.dump(cfg, p))
        bar = _bar(total, progress)
        try:
            for bucket in sorted(todo):
                items = todo[bucket]
                for start in range(0, len(items), restorer.global_batch):
                    batch, imgs = [], []
                    for rel, target in items[start:start + restorer.global_batch]:
                        try:
                            img, n = load_rgb8(root / rel)
                        except BadImage as e:
                            skipped.append({"input": rel, "reason": str(e)})
                            bar.update(1)
                            continue
                        if n:
                            notes[rel] = n
                        batch.append((rel, target))
                        imgs.append(img)
                    if not imgs:
                        continue
                    seeds = [image_seed(cfg.seed, rel) for rel, _ in batch]
                    for (rel, target), res in zip(batch, restorer.restore(imgs, seeds)):
                        save_image(res, target, cfg)
                        restored.append(rel)
                    bar.update(len(imgs))
                    bar.set_postfix_str(f"{len(restored) / max(time.time() - t0, 1e-9):.2f} images/s")
        finally:
            bar.close()
    seconds = time.time() - t0
    summary = {
        "restored": len(restored), "skipped": len(skipped), "seconds": round(seconds, 3),
        "images_per_second": round(len(restored) / seconds, 4) if restored and seconds > 0 else None,
        "skipped_files": sorted(skipped, key=lambda s: s["input"]), "restored_files": sorted(restored),
        "notes": notes, "input": str(input_path), "out": str(out_dir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = SUMMARY_NAME if jax.process_count() == 1 else f"restore_summary.{jax.process_index()}.json"
    _write_atomic(out_dir / name, lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"))
    log(format_summary(summary))
    return summary


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="restore", file=sys.stderr, smoothing=0.1)


def format_summary(summary: dict) -> str:
    lines = [f"restored {summary['restored']} image(s), skipped {summary['skipped']}"
             + (f", {summary['images_per_second']:.3f} images/s" if summary["images_per_second"] else "")]
    lines += [f"  skipped {s['input']}: {s['reason']}" for s in summary["skipped_files"]]
    return "\n".join(lines)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.topology:
        from fluxir_jax import restore_topology

        return restore_topology.run(args, cfg)
    for flag, name in (("input", "--input"), ("out", "-o/--out")):
        if not getattr(args, flag):
            raise UserError(f"{name} is required (except with --topology)")
    for flag in ("checkpoint", "adapter"):
        if not pathlib.Path(getattr(args, flag)).is_dir():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such folder")
    restore_folder(args.checkpoint, args.adapter, args.input, args.out, cfg, overwrite=args.overwrite,
                   progress=not args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("restore", help="restore low-quality images with a FluxIR adapter",
                              description="Restore every image under --input into --out (relative paths kept) with the "
                                          "FLUX.1 base and a FluxIR adapter; bad files are skipped and listed in "
                                          "restore_summary.json. key=value fields: configs/restore/default.yaml.")
    p.add_argument("--checkpoint", required=True, help="converted FLUX checkpoint folder (fluxir convert)")
    p.add_argument("--adapter", required=True, help="FluxIR adapter checkpoint folder (adapter.json + params/)")
    p.add_argument("--input", help="LQ image file or folder (searched recursively); required unless --topology")
    p.add_argument("-o", "--out", help="output folder (relative paths of the inputs are kept); required unless --topology "
                                       "(then compile.json is written there if given)")
    p.add_argument("--config", help="RestoreConfig YAML file (default: built-in defaults, configs/restore/default.yaml)")
    p.add_argument("--overwrite", action="store_true", help="restore images whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="RestoreConfig overrides, e.g. steps=8 tile.size=512")
    p.add_argument("--topology", metavar="NAME",
                   help="restore nothing: compile the restore program for this Cloud TPU slice (v5p-8, v6e-8, ...) "
                        "from abstract shapes and print the memory/FLOP record (docs/tpu.md)")
    p.add_argument("--lq-size", type=int, default=256, metavar="PIXELS",
                   help="with --topology: side of the square LQ image the program is compiled for (default 256)")
    p.set_defaults(func=run)
