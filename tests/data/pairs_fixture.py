"""Small real-photo LQ/HQ pairs for the dataset and pipeline tests (scikit-image photos)."""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


@functools.lru_cache(maxsize=None)
def photo(name: str, short_side: int = 160) -> np.ndarray:
    """A scikit-image photo, downscaled (Lanczos) so its shorter side is `short_side`."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)())
    r = short_side / min(img.size)
    return np.asarray(img.resize((round(img.width * r), round(img.height * r)), Image.Resampling.LANCZOS))


def hq_tiles(n: int, sizes=((64, 64), (64, 96), (96, 64))) -> list[np.ndarray]:
    """`n` distinct uint8 RGB tiles cut from the photos at different offsets and sizes."""
    out = []
    for i in range(n):
        img = photo(PHOTOS[i % len(PHOTOS)])
        h, w = sizes[i % len(sizes)]
        k = i // len(PHOTOS)
        y = (k * 13) % (img.shape[0] - h)
        x = (k * 29) % (img.shape[1] - w)
        out.append(np.ascontiguousarray(img[y : y + h, x : x + w]))
    return out


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)


def degraded_pairs(n: int, seed: int = 0) -> list:
    """`n` PairExamples whose LQ comes from the real second-order `degrade` (seed per example)."""
    from fluxir_jax.data.dataset import PairExample
    from fluxir_jax.data.degrade import DegradationConfig, degrade

    cfg = DegradationConfig()
    out = []
    for i, hq in enumerate(hq_tiles(n)):
        s = seed * 100_003 + i
        lq, _, params = degrade(hq.astype(np.float32) / 255.0, np.random.default_rng(s), cfg)
        out.append(PairExample(id=f"ex{i:03d}", hq_png=png(hq), lq_png=png(to_u8(lq)), seed=s,
                               iqa={"clipiqa": round(0.5 + i / 1000, 4)}, params=params, meta={"tile": i}))
    return out


def block_mean_pairs(n: int, scale: int = 4) -> list:
    """`n` PairExamples whose LQ is the exact `scale`x`scale` block mean of the HQ (crop checks)."""
    from fluxir_jax.data.dataset import PairExample

    out = []
    for i, hq in enumerate(hq_tiles(n)):
        h, w = hq.shape[0] // scale, hq.shape[1] // scale
        lq = hq.reshape(h, scale, w, scale, 3).astype(np.float64).mean(axis=(1, 3))
        out.append(PairExample(id=f"bm{i:03d}", hq_png=png(hq), lq_png=png(np.round(lq)), seed=i))
    return out
