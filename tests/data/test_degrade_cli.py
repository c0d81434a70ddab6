"""`fluxir degrade`: a paired dataset from a folder of the user's own (sometimes odd) images."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fluxir_jax import cli
from fluxir_jax.data import degrade_folder as dfm
from fluxir_jax.data.dataset import INFO_NAME, PairedSource
from tests.data.pairs_fixture import photo

CROP = 64


@pytest.fixture
def fluxir():
    """`fluxir ...` through `fluxir_jax.cli.main`."""
    return lambda *argv: cli.main([str(a) for a in argv])


def _save(path, img, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with good, odd-but-valid and bad images (and what the converted HQ must be)."""
    import skimage.data

    root = tmp_path_factory.mktemp("in")
    expect = {}
    ast = photo("astronaut", 96)
    _save(root / "astronaut.png", Image.fromarray(ast))
    expect["astronaut.png"] = ast
    _save(root / "sub" / "coffee.jpg", Image.fromarray(photo("coffee", 72)), quality=95)
    _save(root / "sub" / "deeper" / "chelsea.webp", Image.fromarray(photo("chelsea", 80)), quality=90)
    _save(root / "ROCKET.TIF", Image.fromarray(photo("rocket", 68)))  # upper-case extension
    cam = np.asarray(Image.fromarray(skimage.data.camera()).resize((80, 80), Image.Resampling.LANCZOS))
    _save(root / "odd" / "gray.png", Image.fromarray(cam, "L"))
    expect["odd/gray.png"] = np.repeat(cam[..., None], 3, axis=2)
    rgb = photo("rocket", 72)[:, :72]
    yy, xx = np.mgrid[:72, :72]
    alpha = np.clip(255 - 4 * np.hypot(yy - 36, xx - 36), 0, 255).astype(np.uint8)  # opaque centre, clear corners
    logo = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    _save(root / "odd" / "logo_rgba.png", logo)
    white = Image.new("RGBA", logo.size, (255, 255, 255, 255))
    expect["odd/logo_rgba.png"] = np.asarray(Image.alpha_composite(white, logo).convert("RGB"))
    deep = cam.astype(np.uint16) * 257 + 100  # full 16-bit range, not a multiple of 257
    im16 = Image.fromarray(deep)
    assert im16.mode.startswith("I;16")
    _save(root / "odd" / "deep16.png", im16)
    assert Image.open(root / "odd" / "deep16.png").mode.startswith("I;16")
    expect["odd/deep16.png"] = np.repeat(np.clip(np.round(deep / 257.0), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    _save(root / "odd" / "cmyk.jpg", Image.fromarray(photo("chelsea", 72)).convert("CMYK"), quality=95)
    assert Image.open(root / "odd" / "cmyk.jpg").mode == "CMYK"
    tiny = photo("coffee", 20)[:, :30]
    _save(root / "odd" / "tiny.png", Image.fromarray(np.ascontiguousarray(tiny)))
    expect["odd/tiny.png"] = np.asarray(Image.fromarray(np.ascontiguousarray(tiny)).resize(
        (96, 64), Image.Resampling.LANCZOS))                       # small_images=upscale: 20x30 -> 64x96
    buf = io.BytesIO()
    Image.fromarray(photo("rocket", 90)).save(buf, format="JPEG", quality=90)
    (root / "bad").mkdir()
    (root / "bad" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "notes.png").write_text("this is not a picture\n")
    (root / "readme.txt").write_text("ignored")
    return root, expect


GOOD = ["ROCKET.TIF", "astronaut.png", "odd/cmyk.jpg", "odd/deep16.png", "odd/gray.png", "odd/logo_rgba.png",
        "sub/coffee.jpg", "sub/deeper/chelsea.webp"]
BAD = {"bad/empty.jpg": "empty file", "bad/notes.png": "not a recognised image", "bad/truncated.jpg": "truncated",
       "odd/tiny.png": f"20x30 is smaller than the GT crop {CROP}x{CROP} (gt.crop_size); small_images=upscale"}


def _decode(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def test_degrade_folder_with_odd_and_bad_files(tmp_path, inputs, fluxir, capsys):
    root, expect = inputs
    out = tmp_path / "pairs"
    rc = fluxir("degrade", "--input", root, "--out", out, "--no-progress", f"gt.crop_size={CROP}", "workers=2",
                "shard_size=4", "seed=5")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not (tmp_path / "pairs.partial").exists()
    summary = json.loads((out / dfm.SUMMARY_NAME).read_text())
    assert summary["found"] == 12 and summary["written"] == 8 and summary["already_present"] == 0
    assert summary["ignored_other_files"] == 1 and summary["workers"] == 2
    assert {s["file"]: s["reason"] for s in summary["skipped"]}.keys() == BAD.keys()
    for s in summary["skipped"]:
        assert BAD[s["file"]] in s["reason"], s
    notes = {c["file"]: " | ".join(c["notes"]) for c in summary["converted"]}
    assert "grayscale (L) -> RGB" in notes["odd/gray.png"]
    assert "alpha composited on white" in notes["odd/logo_rgba.png"]
    assert "16-bit" in notes["odd/deep16.png"] and "CMYK -> RGB" in notes["odd/cmyk.jpg"]
    assert "astronaut.png" not in notes and "sub/coffee.jpg" not in notes
    assert "wrote 8 pairs" in captured.out and "bad/truncated.jpg: truncated" in captured.out
    assert "odd/tiny.png: 20x30 is smaller than the GT crop" in captured.out

    info = json.loads((out / INFO_NAME).read_text())
    assert info["complete"] and info["num_examples"] == 8 and info["has_lq"]
    assert info["config"]["degradation"]["gt"]["crop_size"] == CROP and info["config"]["degrade_folder"]["seed"] == 5
    src = PairedSource(out)
    recs = sorted(src, key=lambda r: r["id"])
    assert [r["id"] for r in recs] == GOOD
    for r in recs:
        hq, lq = _decode(r["hq_png"]), _decode(r["lq_png"])
        assert hq.dtype == np.uint8 and hq.ndim == 3 and hq.shape[2] == 3
        assert min(hq.shape[:2]) >= CROP and hq.shape[0] % 4 == 0 and hq.shape[1] % 4 == 0
        assert lq.shape == (hq.shape[0] // 4, hq.shape[1] // 4, 3) and lq.dtype == np.uint8
        assert r["seed"] == dfm.image_seed(5, r["id"]) and r["params"]["scale"] == 4
        assert r["meta"]["source"] == r["id"]
        if r["id"] in expect:
            np.testing.assert_array_equal(hq, expect[r["id"]], err_msg=r["id"])
    cmyk = _decode(recs[GOOD.index("odd/cmyk.jpg")]["hq_png"]).astype(float)
    assert abs(cmyk.mean() - photo("chelsea", 72).mean()) < 12  # colours survive CMYK -> RGB


def test_same_output_whatever_the_worker_count(tmp_path, inputs, fluxir):
    root, _ = inputs
    args = ["--input", root, "--no-progress", f"gt.crop_size={CROP}", "seed=5", "shard_size=4"]
    assert fluxir("degrade", "--out", tmp_path / "a", *args, "workers=2") == 0
    assert fluxir("degrade", "--out", tmp_path / "b", *args, "workers=1") == 0
    a, b = PairedSource(tmp_path / "a"), PairedSource(tmp_path / "b")
    for ra, rb in zip(a, b):
        assert ra["id"] == rb["id"] and ra["hq_png"] == rb["hq_png"] and ra["lq_png"] == rb["lq_png"]
        assert ra["params"] == rb["params"]
    assert fluxir("degrade", "--out", tmp_path / "c", *args[:-2], "seed=6", "workers=1", "store_lq=false") == 0
    c = PairedSource(tmp_path / "c")
    assert c.info["has_lq"] is False and c[0]["lq_png"] is None and c[0]["seed"] != a[0]["seed"]


def test_interrupted_run_resumes(tmp_path, inputs, fluxir, monkeypatch, capsys):
    root, _ = inputs
    out = tmp_path / "pairs"
    args = ["degrade", "--input", root, "--out", out, "--no-progress", f"gt.crop_size={CROP}", "workers=1", "shard_size=2"]
    real = dfm.process_image
    done = []

    def dies_on_the_9th(task):
        if len(done) == 8:
            raise KeyboardInterrupt
        done.append(task[1])
        return real(task)

    monkeypatch.setattr(dfm, "process_image", dies_on_the_9th)
    assert fluxir(*args) == 130
    assert not out.exists() and (tmp_path / "pairs.partial").is_dir()
    monkeypatch.setattr(dfm, "process_image", real)
    capsys.readouterr()
    assert fluxir(*args) == 0
    summary = json.loads((out / dfm.SUMMARY_NAME).read_text())
    # 8 files processed before the interrupt: 5 good ones stored (2 shards + the flushed buffer)
    good_done = [f for f in done if f in GOOD]
    assert summary["already_present"] == len(good_done) == 5
    assert summary["written"] == 3 and summary["num_examples"] == 8 and len(summary["skipped"]) == 4
    assert sorted(r["id"] for r in PairedSource(out)) == GOOD


def test_user_mistakes_exit_2(tmp_path, inputs, fluxir, capsys):
    root, _ = inputs
    assert fluxir("degrade", "--input", tmp_path / "nope", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "input directory not found" in err and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert fluxir("degrade", "--input", root, "--out", tmp_path / "o", "no_such_key=1") == 2
    assert "unknown config key no_such_key" in capsys.readouterr().err
    assert fluxir("degrade", "--input", root, "--out", tmp_path / "o", "stage1.noise.gray_prob=7") == 2
    assert "stage1.noise" in capsys.readouterr().err
    (tmp_path / "empty_in").mkdir()
    (tmp_path / "empty_in" / "a.txt").write_text("x")
    assert fluxir("degrade", "--input", tmp_path / "empty_in", "--out", tmp_path / "o") == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_small_images_upscaled_on_request(tmp_path, inputs, fluxir, capsys):
    """small_images=upscale: Lanczos, aspect kept, shorter side to gt.crop_size; never padded."""
    root, expect = inputs
    only = tmp_path / "only"
    only.mkdir()
    (only / "tiny.png").write_bytes((root / "odd" / "tiny.png").read_bytes())
    out = tmp_path / "pairs"
    assert fluxir("degrade", "--input", only, "-o", out, "--no-progress", f"gt.crop_size={CROP}", "workers=1",
                  "small_images=upscale") == 0
    assert "upscaled 20x30 -> 64x96" in capsys.readouterr().out
    rec = next(iter(PairedSource(out)))
    np.testing.assert_array_equal(_decode(rec["hq_png"]), expect["odd/tiny.png"])
    # the default skips it, and a folder of only small images is an error naming the reason
    assert fluxir("degrade", "--input", only, "-o", tmp_path / "p2", "--no-progress", f"gt.crop_size={CROP}") == 2
    assert "smaller than the GT crop" in capsys.readouterr().err
    assert fluxir("degrade", "--input", only, "-o", tmp_path / "p3", "small_images=pad") == 2
    assert "small_images must be one of skip, upscale" in capsys.readouterr().err


def test_default_yaml_lists_every_setting_with_comments():
    """configs/degrade/default.yaml: every key of both configs, each commented or in a commented
    section, and loading it gives exactly the defaults."""
    import pathlib

    import yaml

    from fluxir_jax import config as config_lib
    from fluxir_jax.data.degrade import DegradationConfig

    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "degrade" / "default.yaml"
    cfg, deg = dfm.load_configs(str(path), [])
    assert cfg == dfm.DegradeFolderConfig() and deg == DegradationConfig()
    data = yaml.safe_load(path.read_text())
    want = {**config_lib.to_dict(dfm.DegradeFolderConfig()), **config_lib.to_dict(DegradationConfig())}

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}
    assert keys(data) == keys(want)
    lines = path.read_text().splitlines()
    top = [ln for ln in lines if ln and not ln.startswith((" ", "#"))]
    assert all("#" in ln for ln in top), [ln for ln in top if "#" not in ln]   # every top-level key explained


def test_same_keys_in_yaml_and_on_the_command_line(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 3\nsmall_images: upscale\ngt:\n  crop_size: 128\nstage1:\n  noise:\n    gray_prob: 0.2\n")
    (tmp_path / "b.yaml").write_text("seed: 3\nsmall_images: upscale\ndegradation:\n  gt:\n    crop_size: 128\n"
                                     "  stage1:\n    noise:\n      gray_prob: 0.2\n")
    cli_cfg = dfm.load_configs(None, ["seed=3", "small_images=upscale", "gt.crop_size=128", "stage1.noise.gray_prob=0.2"])
    assert dfm.load_configs(str(tmp_path / "a.yaml"), []) == cli_cfg == dfm.load_configs(str(tmp_path / "b.yaml"), [])
    assert cli_cfg == dfm.load_configs(None, ["seed=3", "small_images=upscale", "degradation.gt.crop_size=128",
                                              "degradation.stage1.noise.gray_prob=0.2"])


def test_unknown_keys_list_the_valid_keys_at_their_level(tmp_path, inputs, fluxir, capsys):
    root, _ = inputs
    assert fluxir("degrade", "--input", root, "-o", tmp_path / "o", "stage1.noise.grey_prob=0.3") == 2
    err = capsys.readouterr().err
    assert "unknown config key stage1.noise.grey_prob" in err
    assert "known keys of stage1.noise: gaussian_prob, gray_prob, poisson_scale_range, sigma_range" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "bad.yaml").write_text("gt:\n  crop: 64\n")
    assert fluxir("degrade", "--input", root, "-o", tmp_path / "o", "--config", tmp_path / "bad.yaml") == 2
    err = capsys.readouterr().err
    assert "unknown config key gt.crop" in err and "crop_size, hflip_prob" in err
    (tmp_path / "bad2.yaml").write_text("sed: 1\n")
    assert fluxir("degrade", "--input", root, "-o", tmp_path / "o", "--config", tmp_path / "bad2.yaml") == 2
    err = capsys.readouterr().err
    assert "unknown config key sed" in err and "seed" in err and "small_images" in err and "stage1" in err
