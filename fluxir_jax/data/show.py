"""`fluxir show DATASET`: what a paired dataset holds, and a contact sheet to look at it.

Prints the counts, sizes, shards and producer from `dataset_info.json`, then writes a PNG
contact sheet of `--n` examples spread evenly over the dataset: one row per example with the
HQ image, the LQ image (nearest-neighbour enlarged to the HQ's displayed size, so blur and
noise stay visible), and the example's id, seed and recorded degradation summary. Images
larger than `--size` pixels are shown downscaled to fit.
"""
from __future__ import annotations

import argparse
import io
import pathlib

import numpy as np

from fluxir_jax.errors import UserError

PAD = 8
TEXT_WIDTH = 360
LINE = 12
BG = (24, 24, 24)
FG = (230, 230, 230)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, (list, tuple)):
        return "x".join(_fmt(v) for v in x)
    return str(x)


def _kernel(k: dict) -> str:
    kind = k.get("type", "?")
    if kind == "sinc":
        return f"sinc {k.get('size', '?')}px w={_fmt(k.get('omega', '?'))}"
    sig = [k[s] for s in ("sigma_x", "sigma_y") if s in k]
    return f"{kind} {k.get('size', '?')}px" + (f" s={'/'.join(_fmt(v) for v in sig)}" if sig else "")


def _noise(n: dict) -> str:
    kind = n.get("type", "?")
    level = f" s={_fmt(n['sigma'])}" if "sigma" in n else f" x{_fmt(n['scale'])}" if "scale" in n else ""
    return f"{kind}{level}{' gray' if n.get('gray') else ''}"


def degradation_summary(params: dict) -> list[str]:
    """Short lines describing a record's degradation parameters (`{}`: no degradation recorded)."""
    if not params:
        return ["no degradation recorded"]
    params = {k: v for k, v in params.items() if v is not None}  # None: that step was skipped
    lines = []
    if "scale" in params:
        lines.append(f"scale x{params['scale']}" + (" +USM sharpen" if params.get("usm") else ""))
    for stage in ("1", "2"):
        parts = []
        if f"blur{stage}" in params:
            parts.append("blur " + _kernel(params[f"blur{stage}"]))
        if f"resize{stage}" in params:
            r = params[f"resize{stage}"]
            parts.append(f"resize {r.get('direction', '')} {_fmt(r.get('scale', '?'))} {r.get('mode', '')}".strip())
        if f"noise{stage}" in params:
            parts.append("noise " + _noise(params[f"noise{stage}"]))
        if f"jpeg{stage}" in params and stage == "1":
            parts.append(f"jpeg q{params[f'jpeg{stage}'].get('quality', '?')}")
        if parts:
            lines.append(f"stage {stage}: {parts[0]}")
            lines += [f"  {part}" for part in parts[1:]]
    final = []
    if "final_order" in params:
        final.append(params["final_order"].replace("_", " > "))
    if params.get("final_sinc"):
        final.append(_kernel(params["final_sinc"]))
    if "jpeg2" in params:
        final.append(f"jpeg q{params['jpeg2'].get('quality', '?')}")
    if final:
        lines.append(f"final: {final[0]}")
        lines += [f"  {part}" for part in final[1:]]
    known = {"scale", "usm", "gt_hw", "final_order", "final_sinc", "final_resize", "jpeg2"}
    known |= {f"{k}{s}" for k in ("blur", "resize", "noise", "jpeg") for s in "12"}
    other = sorted(set(params) - known)
    if other:
        lines.append("also: " + ", ".join(other))
    return lines


def _span(v) -> str:
    if not v:
        return "-"
    return str(v[0]) if v[0] == v[1] else f"{v[0]}-{v[1]}"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def describe(info: dict, path) -> list[str]:
    """Human lines for a dataset_info.json: counts, sizes, shards, producer."""
    s = info.get("sizes", {})
    n, n_lq = info.get("num_examples", 0), info.get("num_with_lq", 0)
    lines = [
        f"dataset {path}: {n} pairs ({n_lq} with a stored LQ), {len(info.get('shards', []))} shard(s), "
        f"{_size(s.get('total_bytes', 0))}, {'complete' if info.get('complete') else 'INCOMPLETE'}",
        f"  HQ {_span(s.get('hq_height'))} x {_span(s.get('hq_width'))} px (height x width)"
        + (f", LQ {_span(s.get('lq_height'))} x {_span(s.get('lq_width'))} px" if n_lq else ", no stored LQ"),
        f"  made by {info.get('producer', 'an unknown producer')} (fluxir-jax {info.get('code_version', '?')}), "
        f"created {info.get('created', '?')}",
    ]
    cfg = info.get("config") or {}
    deg = cfg.get("degradation") if isinstance(cfg, dict) else None
    if isinstance(deg, dict) and "scale" in deg:
        lines.append(f"  degradation: Real-ESRGAN second order, scale x{deg['scale']}, "
                     f"GT crop {deg.get('gt', {}).get('crop_size', '?')} (settings in dataset_info.json 'config')")
    return lines


def pick(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over `n_total` examples (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, n)})


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def _fit(img: np.ndarray, size: int):
    """(image downscaled to fit in size x size if larger, displayed (h, w))."""
    from PIL import Image

    h, w = img.shape[:2]
    r = min(1.0, size / max(h, w))
    dh, dw = max(1, round(h * r)), max(1, round(w * r))
    if (dh, dw) == (h, w):
        return img, (h, w)
    return np.asarray(Image.fromarray(img).resize((dw, dh), Image.Resampling.LANCZOS)), (dh, dw)


def contact_sheet(rows: list[dict], size: int = 256) -> np.ndarray:
    """uint8 sheet: per row HQ | LQ (nearest, enlarged to the HQ's displayed size) | text lines."""
    from PIL import Image, ImageDraw, ImageFont

    cells = []
    for r in rows:
        hq, (dh, dw) = _fit(_decode(r["hq_png"]), size)
        lq = None
        if r["lq_png"] is not None:
            lq = np.asarray(Image.fromarray(_decode(r["lq_png"])).resize((dw, dh), Image.Resampling.NEAREST))
        text = [f"{r['index']}: {r['id']}", f"seed {r['seed']}"]
        h = r["hq_hw"]
        text.append(f"HQ {h[0]}x{h[1]}" + (f", LQ {r['lq_hw'][0]}x{r['lq_hw'][1]}" if r["lq_hw"] else ", no stored LQ"))
        if r["iqa"]:
            text.append("iqa " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(r["iqa"].items())))
        text += degradation_summary(r["params"])
        cells.append((hq, lq, text))
    col = max(c[0].shape[1] for c in cells)
    width = PAD + col + PAD + col + PAD + TEXT_WIDTH
    heights = [max(c[0].shape[0], LINE * len(c[2])) + PAD for c in cells]
    sheet = Image.new("RGB", (width, PAD + sum(heights)), BG)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = PAD
    for (hq, lq, text), rh in zip(cells, heights):
        sheet.paste(Image.fromarray(hq), (PAD, y))
        if lq is not None:
            sheet.paste(Image.fromarray(lq), (2 * PAD + col, y))
        else:
            draw.text((2 * PAD + col, y), "no stored LQ", fill=FG, font=font)
        for i, line in enumerate(text):
            while len(line) > 4 and draw.textlength(line, font=font) > TEXT_WIDTH - PAD:
                line = line[:-4] + "..."
            draw.text((3 * PAD + 2 * col, y + i * LINE), line, fill=FG, font=font)
        y += rh
    return np.asarray(sheet)


def show(dataset, out=None, *, n: int = 16, size: int = 256, overwrite: bool = False, log=print) -> pathlib.Path | None:
    """Print what `dataset` holds; write its contact sheet to `out` (None: `<name>_sheet.png` here)."""
    from fluxir_jax.data.dataset import PairedSource, png_size
    from fluxir_jax.fileio import write_png

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {size}")
    src = PairedSource(dataset)
    for line in describe(src.info, src.path):
        log(line)
    if len(src) == 0:
        raise UserError(f"{src.path}: the dataset holds no examples, nothing to show")
    out = pathlib.Path(out) if out is not None else pathlib.Path(f"{src.path.name}_sheet.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"-o {out}: the contact sheet is a PNG; give a name ending in .png")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    idx = pick(len(src), n)
    rows = []
    for i in idx:
        r = src[i]
        r["hq_hw"] = list(png_size(r["hq_png"]))
        r["lq_hw"] = list(png_size(r["lq_png"])) if r["lq_png"] is not None else None
        rows.append(r)
    sheet = contact_sheet(rows, size)
    write_png(out, sheet)
    log(f"wrote {out}: {len(rows)} of {len(src)} examples (rows: HQ | LQ | id, seed, degradation), "
        f"{sheet.shape[1]}x{sheet.shape[0]} px")
    return out


def run(args: argparse.Namespace) -> int:
    show(args.dataset, args.out, n=args.n, size=args.size, overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "show", help="print a paired dataset's counts and sizes and write a contact sheet",
        description="Print what a paired dataset (from `fluxir degrade`) holds and write a PNG contact sheet: "
                    "one row per example with HQ | LQ (enlarged, nearest) | id, seed and the recorded degradation.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset directory (holding dataset_info.json)")
    p.add_argument("-o", "--out", default=None, metavar="PNG",
                   help="contact sheet to write (default: <dataset name>_sheet.png in the current directory)")
    p.add_argument("--n", type=int, default=16, help="examples to show, spread evenly over the dataset (default 16)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="largest displayed HQ side; larger images are downscaled (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sheet")
    p.set_defaults(func=run)
