"""`fluxir restore` on a folder: sizes, relative paths, odd and bad inputs, resume, errors."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tests.convert.test_convert import run_cli
from tests.restore import fixtures


def make_inputs(root: pathlib.Path) -> dict[str, tuple[int, int] | None]:
    """Inputs and their expected LQ (height, width), None for files that must be skipped."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    rgb = fixtures.textured_image(16, 16, seed=1)
    Image.fromarray(rgb).save(root / "a" / "x.png")
    Image.fromarray(fixtures.textured_image(12, 20, seed=2)).save(root / "b" / "c" / "y.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).save(root / "photo.webp")
    Image.fromarray(rgb[:1, :1]).save(root / "dot.png")
    Image.fromarray(rgb).save(root / "tiff.tif")
    full = (root / "a" / "x.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "notimage.jpg").write_text("this is not an image\n")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return {"a/x.png": (16, 16), "b/c/y.jpg": (12, 20), "gray.png": (16, 16), "rgba.png": (16, 16),
            "deep16.png": (16, 16), "cmyk.jpg": (16, 16), "photo.webp": (16, 16), "dot.png": (1, 1),
            "tiff.tif": (16, 16), "truncated.png": None, "zero.png": None, "notimage.jpg": None}


@pytest.mark.slow
def test_folder_restore_sizes_paths_odd_and_bad_inputs_and_resume(tiny_models, tmp_path):
    ckpt, adapter = tiny_models
    inp, out = tmp_path / "in", tmp_path / "out"
    expected = make_inputs(inp)
    argv = ["restore", "--checkpoint", ckpt, "--adapter", adapter, "--input", str(inp), "--out", str(out),
            "--quiet", "steps=2", "parallel=pmap"]
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    summary = json.loads((out / "restore_summary.json").read_text())
    good = sorted(k for k, v in expected.items() if v)
    bad = sorted(k for k, v in expected.items() if not v)
    assert summary["restored"] == len(good) and summary["restored_files"] == good
    assert summary["skipped"] == len(bad) and [s["input"] for s in summary["skipped_files"]] == bad
    reasons = {s["input"]: s["reason"] for s in summary["skipped_files"]}
    assert "empty" in reasons["zero.png"] and "not a recognised image" in reasons["notimage.jpg"]
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert f"restored {len(good)} image(s), skipped {len(bad)}" in stdout
    for rel in good:
        h, w = expected[rel]
        res = out / pathlib.PurePosixPath(rel).with_suffix(".png")
        with Image.open(res) as im:
            assert im.mode == "RGB" and im.size == (4 * w, 4 * h), rel
    assert not list(out.rglob("*.tmp")) and (out / "restore_config.yaml").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    rc, stdout, stderr = run_cli(argv)  # rerun: every finished output is skipped, nothing rewritten
    assert rc == 0, stderr
    again = json.loads((out / "restore_summary.json").read_text())
    assert again["restored"] == 0 and again["skipped"] == len(good) + len(bad)
    assert sum("output exists" in s["reason"] for s in again["skipped_files"]) == len(good)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


def test_missing_checkpoint_and_mismatched_adapter_exit_2_with_one_line(tiny_models, tmp_path):
    ckpt, adapter = tiny_models
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(fixtures.textured_image(16, 16)).save(inp / "x.png")
    base = ["restore", "--input", str(inp), "--out", str(tmp_path / "out"), "--quiet"]
    rc, _, err = run_cli(base + ["--checkpoint", str(tmp_path / "nope"), "--adapter", adapter])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
    other = fixtures.write_adapter(tmp_path / "deeper_adapter", depth=2)  # built for a 2-double-block base
    rc, _, err = run_cli(base + ["--checkpoint", ckpt, "--adapter", str(other)])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "depth" in err, err
    rc, _, err = run_cli(base + ["--checkpoint", ckpt, "--adapter", adapter, "color_fix=sepia"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "color_fix" in err, err
    assert not (tmp_path / "out").exists()
