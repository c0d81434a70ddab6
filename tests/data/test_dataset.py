"""The paired dataset on disk: record encoding, writer (atomic, resumable), reader."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from fluxir_jax import fileio
from fluxir_jax.data import dataset as ds
from fluxir_jax.errors import UserError
from tests.data.pairs_fixture import block_mean_pairs, degraded_pairs


@pytest.fixture(scope="module")
def pairs50():
    return degraded_pairs(50)


def _ids_and_bytes(path):
    src = ds.PairedSource(path)
    return [(r["id"], r["hq_png"], r["lq_png"]) for r in src]


def test_record_round_trip_and_format():
    ex = block_mean_pairs(1)[0]
    ex.iqa = {"musiq": 61.5}
    ex.params = {"blur1": {"kernel": "iso", "size": 7}}
    rec = ds.encode_example(ex)
    assert rec[:4] == b"FXPR" and rec[4] == ds.FORMAT_VERSION
    header, off = ds.decode_header(rec)
    assert header["id"] == ex.id and header["hq_hw"] == [64, 64] and header["lq_hw"] == [16, 16]
    assert header["lq_len"] == len(ex.lq_png) and off + len(ex.hq_png) + len(ex.lq_png) == len(rec)
    assert ds.decode_example(rec) == ex
    no_lq = ds.PairExample(id="x", hq_png=ex.hq_png)
    back = ds.decode_example(ds.encode_example(no_lq))
    assert back.lq_png is None and back.hq_png == ex.hq_png
    with pytest.raises(ValueError, match="magic"):
        ds.decode_header(b"XXXX" + rec[4:])
    with pytest.raises(ValueError, match="version"):
        ds.decode_header(rec[:4] + bytes([99]) + rec[5:])


def test_write_then_read_50(tmp_path, pairs50):
    out = tmp_path / "pairs"
    cfg = {"crop_size": 512, "degradation": {"scale": 4}}
    with ds.DatasetWriter(out, config=cfg, shard_size=8) as w:
        for ex in pairs50:
            assert w.add(ex)
            assert not out.exists()  # appears only when complete
        assert not w.add(pairs50[3])  # a duplicate id is skipped
    assert out.is_dir() and not (tmp_path / "pairs.partial").exists()
    info = json.loads((out / ds.INFO_NAME).read_text())
    assert info["complete"] and info["num_examples"] == 50 and info["has_lq"]
    assert [s["num_examples"] for s in info["shards"]] == [8] * 6 + [2]
    assert info["config"] == cfg and info["code_version"].startswith("0.")
    assert info["sizes"]["hq_height"] == [64, 96] and info["sizes"]["lq_width"] == [16, 24]
    assert info["sizes"]["total_bytes"] == sum(os.path.getsize(out / s["file"]) for s in info["shards"])
    src = ds.PairedSource(out)
    assert len(src) == 50
    src = pickle.loads(pickle.dumps(src))  # goes to Grain workers
    for i, ex in enumerate(pairs50):
        r = src[i]
        assert r["index"] == i and r["id"] == ex.id and r["seed"] == ex.seed
        assert r["hq_png"] == ex.hq_png and r["lq_png"] == ex.lq_png
        assert r["params"] == ex.params and r["iqa"] == ex.iqa and r["params"]  # real degradation params
    assert src[-1]["id"] == pairs50[-1].id
    with pytest.raises(IndexError):
        src[50]


class _Crash(Exception):
    pass


def test_writer_resumes_after_interruption(tmp_path, pairs50, monkeypatch):
    out = tmp_path / "pairs"
    cfg = {"seed": 1}
    real_replace = os.replace
    calls = {"n": 0}

    def replace_dying_on_4th_shard(src, dst):
        if str(dst).endswith(ds.SHARD_SUFFIX):
            calls["n"] += 1
        if calls["n"] >= 4:  # "killed" after the 4th shard's sidecar, before its rename: no more I/O
            raise _Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(ds.os, "replace", replace_dying_on_4th_shard)
    with pytest.raises(_Crash):
        with ds.DatasetWriter(out, config=cfg, shard_size=6) as w:
            for ex in pairs50[:30]:
                w.add(ex)
    monkeypatch.setattr(ds.os, "replace", real_replace)
    shard_dir = tmp_path / "pairs.partial" / ds.SHARD_DIR
    names = sorted(p.name for p in shard_dir.iterdir())
    assert any(fileio.is_temp(n) for n in names)  # the half-written shard
    assert f"{ds.SHARD_PREFIX}00003{ds.SHARD_SUFFIX}.json" in names  # its orphan sidecar
    assert not out.exists()

    with pytest.raises(UserError, match="different config"):
        ds.DatasetWriter(out, config={"seed": 2})

    w = ds.DatasetWriter(out, config=cfg, shard_size=6)
    assert w.resumed_examples == 18  # three finished shards; the fourth and the buffer are gone
    kept = [f"{ds.SHARD_PREFIX}{i:05d}{ds.SHARD_SUFFIX}" for i in range(3)]
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(kept + [k + ".json" for k in kept])
    added = [w.add(ex) for ex in reversed(pairs50)]  # feed everything again, in another order
    assert sum(added) == 32 and not any(added[-18:])
    w.close()
    got = _ids_and_bytes(out)
    assert sorted(i for i, _, _ in got) == sorted(ex.id for ex in pairs50)  # no loss, no duplicate
    by_id = {ex.id: ex for ex in pairs50}
    assert all(h == by_id[i].hq_png and l == by_id[i].lq_png for i, h, l in got)
    info = json.loads((out / ds.INFO_NAME).read_text())
    assert info["num_examples"] == 50 and info["complete"]


def test_resume_rebuilds_a_lost_sidecar(tmp_path):
    out = tmp_path / "pairs"
    exs = block_mean_pairs(7)
    w = ds.DatasetWriter(out, shard_size=3)
    for ex in exs[:6]:
        w.add(ex)
    # interrupted with one example in the buffer; then the first sidecar is lost
    (tmp_path / "pairs.partial" / ds.SHARD_DIR / f"{ds.SHARD_PREFIX}00000{ds.SHARD_SUFFIX}.json").unlink()
    w2 = ds.DatasetWriter(out, shard_size=3)
    assert w2.resumed_examples == 6 and exs[0].id in w2 and exs[6].id not in w2
    assert [w2.add(ex) for ex in exs] == [False] * 6 + [True]
    w2.close()
    assert [i for i, _, _ in _ids_and_bytes(out)] == [ex.id for ex in exs]


def test_writer_refuses_existing_outputs(tmp_path):
    out = tmp_path / "pairs"
    with ds.DatasetWriter(out, shard_size=4) as w:
        w.add(block_mean_pairs(1)[0])
    with pytest.raises(UserError, match="finished dataset"):
        ds.DatasetWriter(out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty directory"):
        ds.DatasetWriter(busy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with ds.DatasetWriter(empty) as w:  # an empty directory is fine
        w.add(block_mean_pairs(1)[0])
    assert len(ds.PairedSource(empty)) == 1


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="not a fluxir paired dataset"):
        ds.PairedSource(tmp_path)
    out = tmp_path / "pairs"
    with ds.DatasetWriter(out, shard_size=2) as w:
        for ex in block_mean_pairs(3):
            w.add(ex)
    (out / ds.SHARD_DIR / f"{ds.SHARD_PREFIX}00001{ds.SHARD_SUFFIX}").unlink()
    with pytest.raises(UserError, match="missing"):
        ds.PairedSource(out)
