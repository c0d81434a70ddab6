"""The pictures and the page of `fluxir demo`: report.png, loss.png and report.html (PIL only).

    comparison_grid(rows, columns, out_png)   rows of images with a caption under each
    loss_plot(steps, losses, out_png)         the training loss curve with axes
    write_html(report, out_html)              one page linking everything report.json names
"""
from __future__ import annotations

import html
import json
import pathlib

import numpy as np

CAPTION_H = 30
PAD = 6


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap font size
        return ImageFont.load_default()


def _save_atomic(img, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def comparison_grid(rows: list[list[tuple[np.ndarray, str]]], columns: list[str], out_png: pathlib.Path,
                    cell: int = 128) -> None:
    """`rows`: per row, one (uint8 HxWx3 image, caption) per column; images are shown at `cell` pixels
    (nearest neighbour, so the LQ's pixels stay visible)."""
    from PIL import Image, ImageDraw

    font = _font()
    head = 22
    width = PAD + len(columns) * (cell + PAD)
    height = head + len(rows) * (cell + CAPTION_H + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((PAD + j * (cell + PAD), 4), name, fill="black", font=font)
    for i, row in enumerate(rows):
        y = head + i * (cell + CAPTION_H + PAD)
        for j, (img, caption) in enumerate(row):
            x = PAD + j * (cell + PAD)
            tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, y))
            for k, line in enumerate(caption.split("\n")[:2]):
                draw.text((x, y + cell + 2 + 13 * k), line, fill="black", font=font)
    _save_atomic(canvas, out_png)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** np.floor(np.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 1e-6, step)]


def loss_plot(steps: list[int], losses: list[float], out_png: pathlib.Path, size=(640, 360),
              smooth: int = 5) -> None:
    """Raw loss (light) and its running mean over `smooth` logged steps (dark), with labelled axes."""
    from PIL import Image, ImageDraw

    font = _font()
    w, h = size
    left, right, top, bottom = 60, 16, 24, 40
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    x = np.asarray(steps, np.float64)
    y = np.asarray(losses, np.float64)
    lo, hi = float(np.min(y)), float(np.max(y))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))

    def px(sx, sy):
        return (left + (sx - x0) / (x1 - x0) * (w - left - right),
                top + (hi - sy) / (hi - lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _nice_ticks(lo, hi, 6):
        _, py = px(x0, t)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{t:.3g}", fill="black", font=font)
    for t in _nice_ticks(x0, x1):
        qx, _ = px(t, lo)
        draw.line([qx, h - bottom, qx, h - bottom + 4], fill="black")
        draw.text((qx - 8, h - bottom + 6), f"{int(t)}", fill="black", font=font)
    draw.text((w // 2 - 20, h - 16), "step", fill="black", font=font)
    draw.text((left, 4), "training loss (light: per step; dark: running mean of "
              f"{smooth})", fill="black", font=font)
    if len(x) > 1:
        draw.line([px(a, b) for a, b in zip(x, y)], fill=(170, 190, 230), width=1)
        k = max(1, min(smooth, len(y)))
        mean = np.convolve(y, np.ones(k) / k, mode="valid")
        draw.line([px(a, b) for a, b in zip(x[k - 1:], mean)], fill=(20, 50, 160), width=2)
    _save_atomic(canvas, out_png)


def write_html(report: dict, out_html: pathlib.Path) -> None:
    """report.html next to the artifacts (relative links)."""
    e = html.escape
    cmp = report["comparison"]
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{v['psnr']:.3f}</td><td>{v['ssim']:.4f}</td></tr>" for name, v in cmp.items())
    loss = report["train"]["loss"]
    a = report["artifacts"]
    links = "".join(f"<li><a href='{e(p)}'>{e(k)}</a>: {e(p)}</li>" for k, p in sorted(a.items()))
    times = "".join(f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>" for k, v in report["seconds"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fluxir demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>fluxir demo{' (--quick)' if report['quick'] else ''}</h1>
<p>{e(report['statement'])}</p>
<h2>Held-out restoration ({report['data']['test_images']} images, mean over images)</h2>
<table><tr><th>method</th><th>PSNR (dB)</th><th>SSIM</th></tr>{rows}</table>
<p><img src="{e(a['report_png'])}" alt="LQ | bicubic | untrained adapter | trained adapter | HQ"></p>
<h2>Training ({report['train']['steps']} steps, batch {report['train']['batch_size']})</h2>
<p>Loss: mean of the first {loss['window']} logged steps {loss['first_mean']:.4f}, of the last
{loss['window']} {loss['last_mean']:.4f}.</p>
<p><img src="{e(a['loss_png'])}" alt="loss curve"></p>
<h2>Time (seconds, wall clock)</h2><table>{times}</table>
<p>CPU time of the process: {report['process_cpu_seconds']:.1f} s.</p>
<h2>Files</h2><ul>{links}</ul>
<pre>{e(json.dumps(report['data'], indent=1))}</pre>
</body></html>
"""
    tmp = out_html.with_name(f".{out_html.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out_html)
