"""`fluxir demo --quick`: the whole pipeline (init, gen, degrade, train, restore, eval) on the tiny preset.

Runs the real command in this process (8 emulated CPU devices, tests/conftest.py); about 2 CPU
minutes on a 2-core machine, hence `slow` (it is still part of `make test`).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fluxir_jax import cli


@pytest.mark.slow
def test_quick_demo_trains_restores_and_reports(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert cli.main(["demo", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and str(out / "report.json") in printed
    assert not (tmp_path / "demo_out.partial").exists()
    report = json.loads((out / "report.json").read_text())

    # the loss falls: mean of the first vs the last logged losses, recomputed from metrics.jsonl
    recs = [json.loads(line) for line in (out / report["artifacts"]["metrics"]).read_text().splitlines()]
    losses = [r["loss"] for r in sorted((r for r in recs if "loss" in r), key=lambda r: r["step"])]
    assert len(losses) == report["train"]["steps"]
    w = report["train"]["loss"]["window"]
    first, last = float(np.mean(losses[:w])), float(np.mean(losses[-w:]))
    assert last < first, (first, last)
    assert report["train"]["loss"]["first_mean"] == pytest.approx(first)
    assert report["train"]["loss"]["last_mean"] == pytest.approx(last)

    # the three-way comparison, overall and per held-out image, with finite PSNR / SSIM
    assert set(report["comparison"]) == {"bicubic", "untrained", "trained"}
    for method in report["comparison"].values():
        assert np.isfinite(method["psnr"]) and 0 < method["psnr"] < 100
        assert -1 <= method["ssim"] <= 1
    assert len(report["per_image"]) == report["data"]["test_images"] >= 2
    for row in report["per_image"].values():
        assert set(row) == {"bicubic", "untrained", "trained"}
    # training changed the adapter: the trained restorations differ from the untrained ones
    assert report["comparison"]["trained"] != report["comparison"]["untrained"]

    # every artifact it names exists (files non-empty, folders non-empty)
    for name, rel in report["artifacts"].items():
        path = out / rel
        assert path.exists(), name
        assert (path.stat().st_size > 0) if path.is_file() else any(path.iterdir()), name
    for stage in ("bicubic", "untrained", "trained"):
        assert len(list((out / report["artifacts"][f"restored_{stage}"]).glob("*.png"))) == report["data"]["test_images"]
    assert report["statement"].startswith("The base is the tiny preset with random weights")
