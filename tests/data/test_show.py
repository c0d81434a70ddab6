"""`fluxir show`: counts, sizes and a contact sheet of a dataset made by `fluxir degrade`."""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from fluxir_jax import cli
from fluxir_jax.data import dataset as ds
from fluxir_jax.data import show as show_mod
from tests.data.pairs_fixture import photo


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        (root / "in").mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(photo(name, 64 + 16 * i)[:, :96])).save(root / "in" / f"{name}.png")
    rc, out, err = run_cli(["degrade", "--input", root / "in", "--out", root / "pairs", "--no-progress",
                            "gt.crop_size=64", "workers=1", "seed=3"])
    assert rc == 0, err
    return root / "pairs"


def test_show_prints_counts_and_writes_the_sheet(pairs, tmp_path):
    sheet = tmp_path / "sheet.png"
    rc, out, err = run_cli(["show", pairs, "-o", sheet, "--n", "2"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert re.fullmatch(rf"dataset {re.escape(str(pairs))}: 3 pairs \(3 with a stored LQ\), 1 shard\(s\), "
                        r"[0-9.]+ KiB, complete", lines[0]), lines[0]
    assert lines[1] == "  HQ 64-96 x 64-96 px (height x width), LQ 16-24 x 16-24 px"
    assert lines[2].startswith("  made by fluxir degrade (fluxir-jax ")
    assert lines[3] == ("  degradation: Real-ESRGAN second order, scale x4, GT crop 64 "
                        "(settings in dataset_info.json 'config')")
    img = np.asarray(Image.open(sheet))
    assert lines[4] == (f"wrote {sheet}: 2 of 3 examples (rows: HQ | LQ | id, seed, degradation), "
                        f"{img.shape[1]}x{img.shape[0]} px")

    # row 1 is example 0 at its own size: HQ at (PAD, PAD), its LQ enlarged x4 (nearest) beside it
    src = ds.PairedSource(pairs)
    assert show_mod.pick(3, 2) == [0, 2]
    hq = np.asarray(Image.open(io.BytesIO(src[0]["hq_png"])))
    lq = np.asarray(Image.open(io.BytesIO(src[0]["lq_png"])))
    p, (h, w) = show_mod.PAD, hq.shape[:2]
    np.testing.assert_array_equal(img[p:p + h, p:p + w], hq)
    col = max(np.asarray(Image.open(io.BytesIO(src[i]["hq_png"]))).shape[1] for i in (0, 2))
    np.testing.assert_array_equal(img[p:p + h, 2 * p + col:2 * p + col + w], lq.repeat(4, 0).repeat(4, 1))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sheet.png"]  # no temporary left

    rc, _, err = run_cli(["show", pairs, "-o", sheet])
    assert rc == 2 and err.strip() == f"fluxir show: error: {sheet} already exists (pass --overwrite to replace it)"
    rc, _, err = run_cli(["show", pairs, "-o", sheet, "--overwrite"])
    assert rc == 0, err


def test_show_default_output_and_refusals(pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["show", pairs])
    assert rc == 0, err
    assert (tmp_path / "pairs_sheet.png").is_file() and "wrote pairs_sheet.png: 3 of 3 examples" in out
    rc, _, err = run_cli(["show", pairs, "--n", "0"])
    assert rc == 2 and err.strip() == "fluxir show: error: --n must be at least 1, got 0"
    rc, _, err = run_cli(["show", pairs, "-o", "sheet.jpg"])
    assert rc == 2 and "-o sheet.jpg: the contact sheet is a PNG; give a name ending in .png" in err
    rc, _, err = run_cli(["show", tmp_path])
    assert rc == 2 and err.strip() == (f"fluxir show: error: {tmp_path} is not a fluxir paired dataset "
                                       "(no dataset_info.json)")


def test_dataset_info_documents_its_own_fields(pairs):
    info = json.loads((pairs / ds.INFO_NAME).read_text())
    assert set(info) <= set(info["fields"]), sorted(set(info) - set(info["fields"]))
    assert "dataset.py" not in json.dumps(info["record_encoding"])
    header, _ = ds.decode_header(ds.PairedSource(pairs)._src()[0])
    assert set(header) == set(info["record_header"])


def test_degradation_summary():
    params = {"blur1": {"omega": 2.43, "size": 19, "type": "sinc"}, "blur2": None,
              "final_order": "jpeg_resize_sinc", "final_resize": {"mode": "bilinear", "out_hw": [24, 24]},
              "final_sinc": {"omega": 1.13, "size": 21, "type": "sinc"}, "gt_hw": [96, 96], "jpeg1": {"quality": 69},
              "jpeg2": {"quality": 49}, "noise1": {"gray": False, "sigma": 11.67, "type": "gaussian"},
              "noise2": {"gray": True, "scale": 1.99, "type": "poisson", "vals": 256},
              "resize1": {"direction": "down", "mode": "bilinear", "out_hw": [77, 77], "scale": 0.808},
              "resize2": {"direction": "down", "mode": "area", "out_hw": [16, 16], "scale": 0.668},
              "scale": 4, "usm": False}
    assert show_mod.degradation_summary(params) == [
        "scale x4", "stage 1: blur sinc 19px w=2.43", "  resize down 0.808 bilinear", "  noise gaussian s=11.7",
        "  jpeg q69", "stage 2: resize down 0.668 area", "  noise poisson x1.99 gray",
        "final: jpeg > resize > sinc", "  sinc 21px w=1.13", "  jpeg q49"]
    assert show_mod.degradation_summary({}) == ["no degradation recorded"]
