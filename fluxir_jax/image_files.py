"""Image files: model outputs to uint8 PNGs, written atomically.

Models work in [-1, 1] (NHWC float), data and metrics in [0, 1]; uint8 exists only here, at
the file boundary. A PNG is written to a hidden temporary name beside its target and renamed
into place, so a file at the target path is always complete.
"""
from __future__ import annotations

import os
import pathlib
import uuid
from typing import Sequence

import numpy as np

from fluxir_jax.errors import UserError


def to_uint8(images, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Float images in `value_range` -> uint8 (clipped to the range, then rounded)."""
    lo, hi = value_range
    x = np.asarray(images, np.float32)
    x = (np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(x).astype(np.uint8)


def write_png(path, image: np.ndarray) -> pathlib.Path:
    """Write a uint8 [H, W, 3] (or [H, W]) array to `path` as PNG, atomically."""
    from PIL import Image

    path = pathlib.Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ValueError(f"write_png: expected uint8 [H, W(, 1|3|4)], got {image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_images(images, out_dir, *, names: Sequence[str] | None = None, prefix: str = "image",
                value_range: tuple[float, float] = (-1.0, 1.0), overwrite: bool = False) -> list[pathlib.Path]:
    """Write a batch of decoded images [B, H, W, 3] (floats in `value_range`, e.g. `AutoEncoder.decode`
    output) as PNGs in `out_dir` (created if missing): `names[i]` or `{prefix}_{i:04d}.png`.

    Values outside the range are clipped. An existing file is a UserError unless `overwrite`.
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"save_images: expected [B, H, W, 3] images, got shape {arr.shape}")
    if names is not None and len(names) != arr.shape[0]:
        raise ValueError(f"save_images: {len(names)} names for {arr.shape[0]} images")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / (names[i] if names is not None else f"{prefix}_{i:04d}.png") for i in range(arr.shape[0])]
    if not overwrite:
        for p in paths:
            if p.exists():
                raise UserError(f"{p} already exists (pass overwrite=True to replace it)")
    u8 = to_uint8(arr, value_range)
    return [write_png(p, img) for p, img in zip(paths, u8)]
