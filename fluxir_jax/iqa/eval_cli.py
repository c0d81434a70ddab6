"""`fluxir eval`: image-quality metrics over a folder of results (and optionally references).

    fluxir eval --pred OUT_DIR [--gt HR_DIR] --metrics psnr,ssim,lpips,dists,niqe \
        [--convention basicsr|pyiqa] [--crop-border N] \
        [--weights lpips=alex.pth --weights lpips=alexnet-owt.pth ...] [--out scores.csv|scores.json]

Prints mean and standard deviation (population, ddof 0) per metric; `--out` writes per-image scores
(CSV: one row per image; JSON: per-image rows plus the summary, unavailable metrics and skipped
images). Predictions are paired with references by file name, else by stem (`0801.png` with
`0801.jpg`). Full-reference metrics need `--gt`; metrics whose weights were not given are listed as
unavailable. A prediction and reference of different sizes is an error naming the pair; unreadable
images and predictions without a reference are skipped and reported.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pathlib
from collections import OrderedDict

import numpy as np

from fluxir_jax import fileio
from fluxir_jax.errors import UserError

IMAGE_EXTS = set(fileio.IMAGE_SUFFIXES)


# ------------------------------------------------------------------ images
def list_images(folder: str | os.PathLike, what: str) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _probe(path: pathlib.Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def _why(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"cannot read image ({type(e).__name__}{': ' + msg if msg else ''})"


def _pair(preds: list[pathlib.Path], gts: list[pathlib.Path], skipped: list):
    by_name = {p.name: p for p in gts}
    by_stem: dict[str, list[pathlib.Path]] = {}
    for p in gts:
        by_stem.setdefault(p.stem, []).append(p)
    pairs = []
    for p in preds:
        g = by_name.get(p.name)
        if g is None:
            cands = by_stem.get(p.stem, [])
            if len(cands) == 1:
                g = cands[0]
            else:
                skipped.append((str(p), "no reference image with this name" if not cands
                                else "several reference images share this name: " + ", ".join(c.name for c in cands)))
                continue
        pairs.append((p, g))
    return pairs


# ------------------------------------------------------------------ evaluation
def parse_weights(items: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--weights takes NAME=PATH, got {item!r}")
        out.setdefault(name.strip().lower(), []).append(path.strip())
    return out


def evaluate(pred_dir, gt_dir=None, metrics: list[str] | tuple = ("psnr", "ssim"), *, convention: str = "basicsr",
             crop_border: int = 0, weights: dict[str, list[str]] | None = None, batch_size: int = 8) -> dict:
    """Score a folder. Returns {"summary", "per_image", "unavailable", "skipped", "notes", "options"}."""
    from fluxir_jax.iqa import registry
    from fluxir_jax.iqa.psnr_ssim import check_convention

    check_convention(convention)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    names = list(OrderedDict.fromkeys(m.strip().lower() for m in metrics if m.strip()))
    if not names:
        raise UserError("no metrics requested (--metrics psnr,ssim,...)")
    specs = {n: registry.metric_spec(n) for n in names}   # unknown names are an error
    weights = dict(weights or {})
    for n in weights:
        if n not in specs:
            raise UserError(f"--weights given for {n!r}, which is not among --metrics ({', '.join(names)})")

    unavailable: dict[str, str] = {}
    scorers: dict[str, registry.Metric] = {}
    for n, spec in specs.items():
        if spec.kind == "fr" and gt_dir is None:
            unavailable[n] = "full-reference metric: needs --gt"
            continue
        opts = {k: v for k, v in (("convention", convention), ("crop_border", crop_border)) if spec.accepts(k)}
        w = weights.get(n)
        try:
            scorers[n] = registry.get_metric(n, weights=(w[0] if w and len(w) == 1 else w), **opts)
        except registry.MetricUnavailable as e:
            unavailable[n] = str(e)
    if not scorers:
        raise UserError("none of the requested metrics can run: "
                        + "; ".join(f"{n}: {why}" for n, why in unavailable.items()))

    skipped: list[tuple[str, str]] = []
    preds = list_images(pred_dir, "--pred")
    if not preds:
        raise UserError(f"no images in {pred_dir} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    need_gt = any(s.kind == "fr" for s in scorers.values())
    if need_gt:
        pairs = _pair(preds, list_images(gt_dir, "--gt"), skipped)
    else:
        pairs = [(p, None) for p in preds]

    # Sizes from the headers first: a size mismatch is an error before any work is done.
    groups: dict[tuple[int, int], list] = {}
    for p, g in pairs:
        try:
            size = _probe(p)
        except Exception as e:  # noqa: BLE001
            skipped.append((str(p), _why(e)))
            continue
        if g is not None:
            try:
                gsize = _probe(g)
            except Exception as e:  # noqa: BLE001
                skipped.append((str(g), _why(e)))
                continue
            if gsize != size:
                raise UserError(f"size mismatch: {p} is {size[1]}x{size[0]} but {g} is {gsize[1]}x{gsize[0]}")
        groups.setdefault(size, []).append((p, g))

    rows: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for size, items in groups.items():
        for start in range(0, len(items), batch_size):
            batch, xs, ys = [], [], []
            for p, g in items[start:start + batch_size]:
                try:
                    x = fileio.read_image_float(p)
                except Exception as e:  # noqa: BLE001
                    skipped.append((str(p), _why(e)))
                    continue
                y = None
                if g is not None:
                    try:
                        y = fileio.read_image_float(g)
                    except Exception as e:  # noqa: BLE001
                        skipped.append((str(g), _why(e)))
                        continue
                batch.append((p, g))
                xs.append(x)
                ys.append(y)
            if not batch:
                continue
            # pad a short last batch with copies so each image size compiles one batch shape
            pad = min(batch_size, len(items)) - len(batch)
            x = np.stack(xs + xs[-1:] * pad)
            y = np.stack(ys + ys[-1:] * pad) if need_gt else None
            for p, g in batch:
                rows[p.name] = {"image": p.name, "reference": g.name if g is not None else None}
            for n, m in scorers.items():
                try:
                    vals = m(x, y) if m.kind == "fr" else m(x)
                except UserError as e:     # e.g. NIQE on an image smaller than two blocks
                    notes.setdefault(n, str(e))
                    vals = np.full(len(batch), np.nan)
                for (p, _), v in zip(batch, vals):
                    rows[p.name][n] = float(v)

    per_image = [rows[k] for k in sorted(rows)]
    summary = {}
    for n, m in scorers.items():
        v = np.asarray([r[n] for r in per_image], np.float64)
        v = v[~np.isnan(v)]
        summary[n] = {"mean": float(np.mean(v)) if v.size else math.nan,
                      "std": float(np.std(v)) if v.size else math.nan,
                      "n": int(v.size), "lower_better": m.lower_better}
    return {"summary": summary, "per_image": per_image, "unavailable": unavailable,
            "skipped": [{"file": f, "reason": r} for f, r in skipped], "notes": notes,
            "options": {"pred": str(pred_dir), "gt": str(gt_dir) if gt_dir is not None else None,
                        "metrics": names, "convention": convention, "crop_border": crop_border}}


# ------------------------------------------------------------------ output
def format_table(result: dict) -> str:
    w = max([12] + [len(n) + 2 for n in list(result["summary"]) + list(result["unavailable"])])
    lines = [f"{'metric':<{w}}{'mean':>12}{'std':>12}{'n':>7}  better"]
    for n, s in result["summary"].items():
        lines.append(f"{n:<{w}}{s['mean']:>12.4f}{s['std']:>12.4f}{s['n']:>7}  {'lower' if s['lower_better'] else 'higher'}")
    for n, why in result["unavailable"].items():
        lines.append(f"{n:<{w}}{'unavailable':>12}  {why}")
    for n, why in result["notes"].items():
        lines.append(f"note: {n}: some images not scored: {why}")
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} file(s):")
        lines += [f"  {s['file']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _json_clean(obj):
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_clean(v) for v in obj]
    return _json_value(obj)


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(_json_clean(result), indent=2, allow_nan=False) + "\n"
    names = list(result["summary"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "reference"] + names)
    for r in result["per_image"]:
        w.writerow([r["image"], r["reference"] or ""] + [format(r[n], ".10g") for n in names])
    return buf.getvalue()


# ------------------------------------------------------------------ CLI
def run(args: argparse.Namespace) -> int:
    from fluxir_jax.iqa import registry

    if args.list:
        names = registry.list_metrics()
        width = max(len(n) for n in names) + 2
        for n in names:
            s = registry.metric_spec(n)
            print(f"{n:<{width}}{s.kind:<4}{'weights' if s.needs_weights else '':<9}{s.description}")
        return 0
    if not args.pred:
        raise UserError("--pred is required")
    fmt = None
    if args.out:
        suffix = pathlib.Path(args.out).suffix.lower()
        fmt = {".csv": "csv", ".json": "json"}.get(suffix)
        if fmt is None:
            raise UserError(f"--out must end in .csv or .json, got {args.out}")
    result = evaluate(args.pred, args.gt, args.metrics.split(","), convention=args.convention,
                      crop_border=args.crop_border, weights=parse_weights(args.weights), batch_size=args.batch_size)
    print(format_table(result))
    if args.out:
        fileio.write_text(args.out, render(result, fmt))
        print(f"per-image scores written to {args.out}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="image-quality metrics over folders (PSNR, SSIM, LPIPS, DISTS, NIQE, ...)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", help="folder of images to score")
    p.add_argument("--gt", help="folder of reference images (full-reference metrics)")
    p.add_argument("--metrics", default="psnr,ssim", help="comma-separated metric names (default psnr,ssim)")
    p.add_argument("--convention", choices=("basicsr", "pyiqa"), default="basicsr",
                   help="PSNR/SSIM/NIQE convention (default basicsr)")
    p.add_argument("--crop-border", type=int, default=0, help="pixels cropped from each side (PSNR/SSIM/NIQE)")
    p.add_argument("--weights", action="append", metavar="NAME=PATH",
                   help="weights file for a metric; repeat for metrics that take several files")
    p.add_argument("-o", "--out", metavar="FILE", help="write per-image scores to FILE.csv or FILE.json")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--list", action="store_true", help="list the metrics and exit")
    p.set_defaults(func=run)
    return p
