"""FluxGen after generation: degrade (worker processes), select by IQA percentiles, write pairs/.

    kept, report = select(scores, {"niqe": True, "musiq": False}, percentile=5)

Selection rule: an image is dropped when it falls below the `percentile` of the pool on any
metric ("below" in quality: under the percentile for higher-is-better metrics, over the
100 - percentile for lower-is-better ones such as NIQE); percentiles by `numpy.percentile`
(linear interpolation) over the finite scores; a NaN / infinite score is always dropped. Degradation of one image is a pure function of its bytes, its seed and
the `DegradationConfig` (`numpy.random.default_rng(seed)`), so it runs in any worker, in any
order, and gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
import time
from typing import Iterable, Iterator

import numpy as np

from fluxir_jax.data.dataset import INFO_NAME, DatasetWriter, PairedSource, PairExample

POOL, DEGRADED, PAIRS = "pool", "degraded", "pairs"


def image_id(index: int) -> str:
    """The id of image `index` (its seed is seed + index): 9 digits, so ids sort like indices."""
    return f"{index:09d}"


# ----------------------------------------------------------------------------- degradation (workers)


def encode_png(arr: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, np.uint8), "RGB").save(buf, format="PNG", compress_level=int(level))
    return buf.getvalue()


def degrade_example(task: tuple[PairExample, object, int]) -> PairExample:
    """Worker: a pool example (HQ only) -> the same example with its LQ and degradation params."""
    from PIL import Image

    from fluxir_jax.data.degrade import degrade

    ex, deg_cfg, level = task
    hq = np.asarray(Image.open(io.BytesIO(ex.hq_png)).convert("RGB"), np.float32) / np.float32(255)
    lq, _, params = degrade(hq, np.random.default_rng(int(ex.seed)), deg_cfg)
    lq8 = np.clip(np.round(np.asarray(lq, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return dataclasses.replace(ex, lq_png=encode_png(lq8, level), params=params)


def _worker_init() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def make_executor(workers: int):
    """A spawn-context process pool (JAX in the parent is not fork-safe), or None for in-process."""
    if workers <= 0:
        return None
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_init)


def degrade_all(examples: Iterable[PairExample], deg_cfg, level: int, executor) -> Iterator[PairExample]:
    """Degrade `examples` (in order, results in the same order) in `executor` or in this process."""
    if executor is None:
        for ex in examples:
            yield degrade_example((ex, deg_cfg, level))
        return
    pending = []
    for ex in examples:
        pending.append(executor.submit(degrade_example, (ex, deg_cfg, level)))
        while len(pending) > 4 * executor._max_workers:  # bounded memory
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


# ----------------------------------------------------------------------------- pool reading


def dataset_dirs(out: pathlib.Path, kind: str) -> list[pathlib.Path]:
    """Complete datasets of `kind` in `out`: `kind/` or the per-process `kind-NNNNN-of-MMMMM/` parts."""
    dirs = [p for p in sorted(out.glob(f"{kind}*")) if p.is_dir() and (p.name == kind or p.name.startswith(kind + "-"))
            and not p.name.endswith(".partial") and (p / INFO_NAME).is_file()]
    return dirs


def read_headers(path: pathlib.Path) -> list[dict]:
    """The record headers (id, seed, iqa ...) of a dataset, in order, without decoding images."""
    from array_record.python.array_record_module import ArrayRecordReader

    from fluxir_jax.data.dataset import decode_header

    info = json.loads((path / INFO_NAME).read_text())
    out = []
    for shard in info["shards"]:
        reader = ArrayRecordReader(str(path / shard["file"]), "readahead_buffer_size:0")
        try:
            for i in range(reader.num_records()):
                out.append(decode_header(reader.read([i])[0])[0])
        finally:
            reader.close()
    return out


def read_pool(out: pathlib.Path) -> tuple[list[dict], dict]:
    """(headers of every pool image sorted by id, the metrics' directions {name: lower_better})."""
    from fluxir_jax.errors import UserError

    dirs = dataset_dirs(out, POOL)
    if not dirs:
        raise UserError(f"{out}: no finished pool/ (run fluxir gen first)")
    headers, lower = [], {}
    for d in dirs:
        info = json.loads((d / INFO_NAME).read_text())
        if not info.get("complete"):
            raise UserError(f"{d}: the pool is not complete (rerun fluxir gen to finish it)")
        lower.update(info.get("metrics_lower_better", {}))
        headers.extend(read_headers(d))
    headers.sort(key=lambda h: h["id"])
    return headers, lower


# ----------------------------------------------------------------------------- selection


def select(scores: dict[str, dict[str, float]], lower_better: dict[str, bool], percentile: float) -> tuple[list[str], dict]:
    """Ids kept by the percentile rule (sorted) and a report {metric: {threshold, dropped}}."""
    ids = sorted(scores)
    dropped_any = np.zeros(len(ids), bool)
    report = {}
    for name, lower in sorted(lower_better.items()):
        v = np.array([scores[i][name] for i in ids], np.float64)
        finite = np.isfinite(v)
        with np.errstate(invalid="ignore"):
            if percentile <= 0 or not finite.any():
                thr, bad = None, np.zeros(len(ids), bool)
            elif lower:
                thr = float(np.percentile(v[finite], 100.0 - percentile))
                bad = v > thr
            else:
                thr = float(np.percentile(v[finite], percentile))
                bad = v < thr
        bad |= ~finite  # a score that is not a number (e.g. NIQE of a flat image) never passes
        dropped_any |= bad
        report[name] = {"threshold": thr, "lower_better": bool(lower), "dropped": int(bad.sum())}
    return [i for i, d in zip(ids, dropped_any) if not d], report


def quality_order(scores: dict[str, dict[str, float]], lower_better: dict[str, bool]) -> list[str]:
    """Ids from best to worst by the mean over metrics of each image's rank (ties by id)."""
    ids = sorted(scores)
    rank = np.zeros(len(ids))
    for name, lower in lower_better.items():
        v = np.array([scores[i][name] for i in ids], np.float64)
        order = np.argsort(v if lower else -v, kind="stable")
        r = np.empty(len(ids))
        r[order] = np.arange(len(ids))
        rank += r
    return [ids[k] for k in np.argsort(rank, kind="stable")]


# ----------------------------------------------------------------------------- pairs and report


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Put `src` at `dst`, replacing an old `dst` (renames only)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def _examples_by_id(dirs: list[pathlib.Path], wanted: set[str]) -> Iterator[PairExample]:
    """The examples with ids in `wanted` from the datasets in `dirs`, in id order."""
    found = []
    for d in dirs:
        src = PairedSource(d)
        ids = [h["id"] for h in read_headers(d)]
        found.extend((i, src, k) for k, i in enumerate(ids) if i in wanted)
    found.sort(key=lambda t: t[0])
    for _, src, k in found:
        r = src[k]
        yield PairExample(id=r["id"], hq_png=r["hq_png"], lq_png=r["lq_png"], seed=r["seed"], iqa=r["iqa"],
                          params=r["params"], meta=r["meta"])


def degradation_key(cfg) -> dict:
    """The settings that decide a degraded example's bytes (the config of degraded/ and pairs/)."""
    from fluxir_jax.config import to_dict

    return {"degrade": to_dict(cfg.degrade), "png_compress_level": cfg.png_compress_level}


def degraded_matches(out: pathlib.Path, deg_key: dict) -> list[pathlib.Path]:
    """The complete degraded/ datasets made with the degradation settings `deg_key` ([] if any differs)."""
    dirs = dataset_dirs(out, DEGRADED)
    for d in dirs:
        info = json.loads((d / INFO_NAME).read_text())
        if not info.get("complete") or info.get("config") != json.loads(json.dumps(deg_key, sort_keys=True)):
            return []
    return dirs


def write_pairs(out: pathlib.Path, kept: list[str], cfg, executor) -> tuple[int, str]:
    """Write pairs/ (the kept images with LQ): copied from degraded/ when it was made with the same
    degradation settings, else degraded now from pool/. Returns (count, "copied" | "degraded")."""
    deg_key = degradation_key(cfg)
    wanted = set(kept)
    cache = degraded_matches(out, deg_key)
    tmp = out / ".pairs-new"
    for stale in (tmp, tmp.with_name(tmp.name + ".partial")):  # pairs/ is derived: always rebuilt whole
        if stale.exists():
            shutil.rmtree(stale)
    with DatasetWriter(tmp, config=deg_key, shard_size=cfg.shard_size,
                       info={"selected_by": {"percentile": cfg.select.percentile, "metrics": list(cfg.metrics)}}) as w:
        if cache:
            for ex in _examples_by_id(cache, wanted):
                w.add(ex)
            how = "copied"
        else:
            todo = _examples_by_id(dataset_dirs(out, POOL), wanted)
            for ex in degrade_all(todo, cfg.degrade, cfg.png_compress_level, executor):
                w.add(ex)
            how = "degraded"
    _replace_dir(tmp, out / PAIRS)
    return len(kept), how


def contact_sheet(out: pathlib.Path, order: list[str], scores: dict, n: int, thumb: int = 128) -> None:
    """contact_sheet.png: the n best (top row) and n worst (bottom row) images with their scores."""
    from PIL import Image, ImageDraw

    if n <= 0 or not order:
        return
    best, worst = order[:n], order[::-1][:n]
    want = set(best) | set(worst)
    images = {ex.id: ex.hq_png for ex in _examples_by_id(dataset_dirs(out, POOL), want)}
    label_h = 12 * (1 + len(next(iter(scores.values()))))
    sheet = Image.new("RGB", (thumb * max(len(best), 1), 2 * (thumb + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, ids in enumerate((best, worst)):
        for col, i in enumerate(ids):
            im = Image.open(io.BytesIO(images[i])).convert("RGB").resize((thumb, thumb), Image.Resampling.BICUBIC)
            y = row * (thumb + label_h)
            sheet.paste(im, (col * thumb, y))
            text = "\n".join([f"{'best' if row == 0 else 'worst'} {i}"] + [f"{k} {v:.3f}" for k, v in sorted(scores[i].items())])
            draw.multiline_text((col * thumb + 2, y + thumb + 1), text, fill="black", spacing=0)
    tmp = out / ".contact_sheet.png.tmp"
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out / "contact_sheet.png")


def run_selection(out: pathlib.Path, cfg, executor, stats: dict | None = None) -> dict:
    """Selection + pairs/ + contact sheet + summary.json from a finished pool; returns the summary."""
    t0 = time.perf_counter()
    headers, lower = read_pool(out)
    expect = [image_id(i) for i in range(cfg.count)]
    if [h["id"] for h in headers] != expect:
        from fluxir_jax.errors import UserError

        raise UserError(f"{out}: the pool holds {len(headers)} of count={cfg.count} images; "
                        "finish every process's fluxir gen first")
    lower = {m: lower[m] for m in cfg.metrics} if all(m in lower for m in cfg.metrics) else lower
    scores = {h["id"]: {m: float(h["iqa"][m]) for m in lower} for h in headers}
    kept, report = select(scores, lower, cfg.select.percentile)
    t1 = time.perf_counter()
    n_pairs, how = write_pairs(out, kept, cfg, executor)
    t2 = time.perf_counter()
    contact_sheet(out, quality_order(scores, lower), scores, cfg.contact_sheet)
    t3 = time.perf_counter()
    stats = dict(stats or {})
    seconds = dict(stats.pop("seconds", {}))
    seconds.update({"select": t1 - t0, "pairs": t2 - t1, "contact_sheet": t3 - t2})
    summary = {
        "generated": len(headers), "kept": len(kept), "dropped": len(headers) - len(kept),
        "percentile": cfg.select.percentile, "metrics": report, "pairs_from": how, **stats, "seconds": seconds,
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    return summary


def format_summary(s: dict) -> str:
    lines = [f"generated {s['generated']}, kept {s['kept']}, dropped {s['dropped']} "
             f"(percentile {s['percentile']}; pairs {s['pairs_from']})"]
    for m, r in s["metrics"].items():
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"  {m:10s} {'lower' if r['lower_better'] else 'higher'} is better, threshold {thr}, dropped {r['dropped']}")
    if "images_per_s" in s:
        lines.append(f"  {s['images_per_s']:.3g} images/s on {s.get('devices')} {s.get('mode')} device(s)")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)
