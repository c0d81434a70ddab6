"""Datasets speak TFDS (ArrayRecord, no TensorFlow): our datasets carry a TFDS view, and `fluxir
degrade --tfds` and the training pipeline read any TFDS ArrayRecord dataset."""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from fluxir_jax import cli
from fluxir_jax.data import dataset as ds
from fluxir_jax.data.pipeline import PipelineConfig, make_iterator
from fluxir_jax.data.sources import open_source
from fluxir_jax.data.tfds_source import TfdsSource, parse_spec
from fluxir_jax.errors import UserError
from tests.data.pairs_fixture import block_mean_pairs, photo
from tests.data.tfds_fixture import assert_view_matches, make_image_dataset

CROP = 48


@pytest.fixture(scope="module")
def photos_tfds(tmp_path_factory):
    """A TFDS dataset `tiny_photos` (3 PNG images, one not a multiple of 4) and its images."""
    data_dir = tmp_path_factory.mktemp("tfds_data")
    images = [photo("astronaut", 48), np.ascontiguousarray(photo("coffee", 50)[:, :66]), photo("chelsea", 56)]
    make_image_dataset(data_dir, images)
    return data_dir, images


@pytest.fixture(scope="module")
def degraded(photos_tfds, tmp_path_factory):
    """`fluxir degrade --tfds tiny_photos:train` output (2 worker processes read the TFDS dataset)."""
    data_dir, _ = photos_tfds
    out = tmp_path_factory.mktemp("deg") / "pairs"
    assert cli.main(["degrade", "--tfds", "tiny_photos:train", "--data-dir", str(data_dir), "-o", str(out),
                     "--no-progress", f"gt.crop_size={CROP}", "workers=2", "shard_size=2"]) == 0
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_degrade_reads_a_tfds_dataset(photos_tfds, degraded):
    data_dir, images = photos_tfds
    src = TfdsSource("tiny_photos", "train", str(data_dir))
    assert len(src) == 3 and not src.info["has_lq"]
    pairs = list(ds.PairedSource(degraded))
    assert [r["id"] for r in pairs] == [f"train/{i:08d}" for i in range(3)]
    by_bytes = {img.tobytes(): img for img in images}  # TFDS shuffles the examples it prepares
    for i, r in enumerate(pairs):
        original = _pixels(src[i]["hq_png"])
        assert original.tobytes() in by_bytes
        h, w = original.shape[0] // 4 * 4, original.shape[1] // 4 * 4
        assert np.array_equal(_pixels(r["hq_png"]), original[:h, :w])  # cropped to a multiple of the scale
        assert _pixels(r["lq_png"]).shape == (h // 4, w // 4, 3) and r["params"]["scale"] == 4
        assert r["meta"]["source"] == "tfds:tiny_photos:train" and r["meta"]["tfds_index"] == i
    summary = json.loads((degraded / "degrade_summary.json").read_text())
    assert summary["input"] == "tfds:tiny_photos:train" and summary["written"] == 3
    info = json.loads((degraded / ds.INFO_NAME).read_text())
    assert info["tfds"] == {"data_dir": "tfds", "name": "fluxir_pairs", "version": "1.0.0", "split": "train"}
    assert assert_view_matches(degraded, "fluxir_pairs") == 3


def test_bad_tfds_inputs_exit_2_with_one_line(photos_tfds, tmp_path, capsys):
    data_dir, _ = photos_tfds
    cases = [(["--tfds", "no_such_set:train", "--data-dir", data_dir], "TFDS dataset no_such_set not found"),
             (["--tfds", "tiny_photos:test", "--data-dir", data_dir], "has no split 'test' (it has: train)"),
             (["--tfds", "tiny_photos:train", "--data-dir", tmp_path / "nowhere"], "TFDS data_dir not found"),
             (["--tfds", "tiny_photos", "--data-dir", data_dir], "is not of the form NAME:SPLIT"),
             (["--input", tmp_path, "--data-dir", data_dir], "--data-dir goes with --tfds")]
    for args, needle in cases:
        assert cli.main(["degrade", *map(str, args), "-o", str(tmp_path / "o")]) == 2, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert parse_spec("tfds:div2k/bicubic_x4:2.0.0:train[:10]") == ("div2k/bicubic_x4:2.0.0", "train[:10]")
    with pytest.raises(UserError, match="no split"):
        open_source("tfds:tiny_photos:validation", str(data_dir))


def test_training_pipeline_reads_tfds_as_its_own_datasets(photos_tfds, degraded):
    cfg = PipelineConfig(batch_size=3, crop_size=32, scale=4, num_epochs=1, read_threads=1)
    ours = next(make_iterator(open_source(str(degraded)), cfg, process_index=0, process_count=1))
    view = open_source("tfds:fluxir_pairs:train", str(degraded / "tfds"))
    theirs = next(make_iterator(view, cfg, process_index=0, process_count=1))
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    # a plain TFDS image dataset has no LQ: the pipeline degrades on the fly, or says why not
    data_dir, _ = photos_tfds
    photos = open_source("tfds:tiny_photos:train[:2]", str(data_dir))
    assert len(photos) == 2
    with pytest.raises(UserError, match="no LQ"):
        make_iterator(photos, cfg, process_index=0, process_count=1)
    fly = dataclasses_replace(cfg, on_the_fly=True, batch_size=2)
    batch = next(make_iterator(photos, fly, process_index=0, process_count=1))
    assert batch["hq"].shape == (2, 32, 32, 3) and batch["lq"].shape == (2, 8, 8, 3)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _view_records(path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for f in sorted((path / "tfds" / "fluxir_pairs" / "1.0.0").glob("*.array_record-*")):
        reader = ArrayRecordReader(str(f))
        out += reader.read_all()
        reader.close()
    return out


def test_view_is_resumed_with_the_dataset(tmp_path):
    """An interrupted writer resumes its view too: the result equals an uninterrupted run's, byte for byte."""
    examples = block_mean_pairs(7)
    with ds.DatasetWriter(tmp_path / "ref", shard_size=3) as w:
        for ex in examples:
            w.add(ex)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError):
        with ds.DatasetWriter(out, shard_size=3) as w:
            for ex in examples[:5]:
                w.add(ex)
            raise RuntimeError("killed")
    view = out.with_name("resumed.partial") / "tfds" / "fluxir_pairs" / "1.0.0"
    (view / "fluxir_pairs-train.array_record-00000").unlink()  # lost: rebuilt from our shard 0
    (view / "fluxir_pairs-train.array_record-00002").write_bytes(b"half")  # its shard never finished: dropped
    with ds.DatasetWriter(out, shard_size=3) as w:
        assert w.resumed_examples == 5
        for ex in examples:
            w.add(ex)
    assert assert_view_matches(out, "fluxir_pairs") == 7
    assert _view_records(out) == _view_records(tmp_path / "ref")  # shards of 3, 2 (flushed), 2 vs 3, 3, 1
    with pytest.raises(ValueError, match="an LQ image, or none"):
        with ds.DatasetWriter(tmp_path / "mixed", shard_size=4) as w:
            w.add(examples[0])
            w.add(ds.PairExample(id="hq only", hq_png=examples[1].hq_png))
            w.flush()
    with ds.DatasetWriter(tmp_path / "no_view", tfds_name=None) as w:
        w.add(examples[0])
    assert not (tmp_path / "no_view" / "tfds").exists()
    assert json.loads((tmp_path / "no_view" / ds.INFO_NAME).read_text())["tfds"] is None


def test_training_config_names_a_tfds_dataset(photos_tfds, tmp_path, capsys):
    from fluxir_jax import train_config

    data_dir, _ = photos_tfds
    root = pathlib.Path(__file__).resolve().parents[2]
    good = ["data.train=tfds:tiny_photos:train[:2]", f"data.data_dir={data_dir}", "val.every=0"]
    train_config.check_data(train_config.load(str(root / "configs/train/tiny.yaml"), good))
    for spec, needle in (("tfds:tiny_photos:test", "has no split 'test'"), ("tfds:nope:train", "TFDS dataset nope not found")):
        assert cli.main(["train", str(root / "configs/train/tiny.yaml"), f"data.train={spec}", f"data.data_dir={data_dir}",
                         "val.every=0", f"run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
