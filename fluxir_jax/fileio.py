"""Files: atomic writes (a file or a directory appears complete or not at all) and image I/O.

Atomic writes go to a temporary sibling (same directory, so the final rename stays on one
file system), which is renamed onto the target only once complete and removed on failure.

Images: `read_image` is the one reader used for every image file the package reads (degrade
inputs, eval predictions/references, dataset PNGs). It returns uint8 HWC RGB:

  * 8-bit RGB as stored; grayscale, bilevel, palette, CMYK, YCbCr, LAB, HSV converted to RGB;
  * 16-bit (modes I;16*, I): each value x in 0..65535 becomes round(x / 257), the nearest 8-bit
    value (65535 -> 255, 257 -> 1); gray is repeated to RGB;
  * 32-bit float (mode F): values in [0, 1] are scaled by 255 (larger ranges are taken as 0..255),
    rounded and clipped;
  * alpha: composited on white when some pixel is not opaque, otherwise dropped;
  * the EXIF orientation tag is applied.

A file that cannot be used raises `ImageReadError` (a UserError) with the reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import warnings
from typing import Any, Iterator

import numpy as np

from fluxir_jax.errors import UserError

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- atomic writes
TEMP_SUFFIX = ".tmp"


def temp_path(path: PathLike) -> pathlib.Path:
    """A fresh temporary sibling of `path`: `.NAME.XXXXXXXX.tmp` in the same directory."""
    path = pathlib.Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def is_temp(name: str) -> bool:
    """Whether a file name is one of `temp_path`'s (a leftover of an interrupted write)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def check_output(path: pathlib.Path, overwrite: bool) -> None:
    """UserError if `path` exists (and not `overwrite`) or its directory does not exist."""
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UserError(f"output {path}: directory {path.parent} does not exist")


@contextlib.contextmanager
def atomic_file(path: PathLike, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yields a temporary path to write; it replaces `path` when the block ends without error and
    is removed otherwise. `overwrite=False` refuses an existing `path` (UserError)."""
    path = pathlib.Path(path).absolute()
    check_output(path, overwrite)
    tmp = temp_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: PathLike, obj: Any, overwrite: bool = True, indent: int = 1) -> None:
    """`obj` as UTF-8 JSON (with a final newline)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n", overwrite)


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a new empty temporary directory next to `path`; it becomes `path` when the block ends
    without error (replacing an existing `path` only if `overwrite`, and only then) and is removed
    otherwise. `path` existing without `overwrite` is a UserError raised before anything is made."""
    path = pathlib.Path(path).absolute()
    check_output(path, overwrite)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = temp_path(path)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------- images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(UserError):
    """An image file that cannot be used; the message is the reason."""


def read_image(path: PathLike, notes: list[str] | None = None) -> np.ndarray:
    """uint8 HWC RGB of an image file (the rules are in the module docstring). Conversions made
    (16-bit, alpha, EXIF orientation, ...) are appended to `notes` when given."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return _decode(path, str(path), notes)


def decode_image(data: bytes, notes: list[str] | None = None, what: str = "image") -> np.ndarray:
    """`read_image` for encoded bytes (PNG, JPEG, ...)."""
    return _decode(io.BytesIO(data), what, notes)


def read_image_float(path: PathLike, notes: list[str] | None = None) -> np.ndarray:
    """`read_image` / 255 as float64 HWC RGB in [0, 1]: 8-bit values are exactly k / 255."""
    return read_image(path, notes).astype(np.float64) / 255.0


def _decode(src: Any, what: str, notes: list[str] | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes = [] if notes is None else notes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                im.load()
                if _orientation(im) not in (None, 1):
                    notes.append("EXIF orientation applied")
                    arr = _to_rgb8(ImageOps.exif_transpose(im), notes)
                else:
                    arr = _to_rgb8(im, notes)
    except UnidentifiedImageError:
        raise ImageReadError(f"{what}: not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{what}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            raise ImageReadError(f"{what}: truncated image ({msg})") from None
        raise ImageReadError(f"{what}: corrupt or unreadable image ({msg})") from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{what}: image has no pixels")
    return np.ascontiguousarray(arr)


def _orientation(im) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return None


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]


def _to_rgb8(im, notes: list[str]) -> np.ndarray:
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.round(np.asarray(im).astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        notes.append(f"16-bit ({mode}) -> 8-bit RGB")
        return _gray_to_rgb(a)
    if mode == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float64))
        a = a * 255.0 if a.size and np.max(a) <= 1.0 else a
        notes.append("32-bit float (F) -> 8-bit RGB")
        return _gray_to_rgb(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
        notes.append("palette with transparency -> RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            notes.append(f"{mode} -> RGB (alpha composited on white)")
        else:
            notes.append(f"{mode} -> RGB (opaque alpha dropped)")
        return np.asarray(rgba.convert("RGB"))
    names = {"L": "grayscale (L)", "1": "bilevel (1)", "P": "palette (P)", "CMYK": "CMYK"}
    notes.append(f"{names.get(mode, mode)} -> RGB")
    return np.asarray(im.convert("RGB"))


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an HWC RGB image: uint8 as is, float taken as [0, 1] (clipped, rounded)."""
    from PIL import Image

    a = np.asarray(image)
    if np.issubdtype(a.dtype, np.floating):
        a = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, np.uint8), "RGB").save(buf, format="PNG", compress_level=int(compress_level))
    return buf.getvalue()


def write_png(path: PathLike, image: np.ndarray, overwrite: bool = True, compress_level: int = 6) -> None:
    """An HWC RGB image (uint8, or float in [0, 1]) as a PNG file, atomically."""
    write_bytes(path, encode_png(image, compress_level), overwrite)
