"""The Grain pipeline: per-process slicing, paired crops, determinism, checkpointed iterator state."""
from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fluxir_jax.data.dataset import DatasetWriter, PairedSource
from fluxir_jax.data.pipeline import (
    PipelineConfig,
    iterator_restore_arg,
    iterator_save_arg,
    make_global_batch,
    make_iterator,
    per_host_batch_size,
)
from fluxir_jax.errors import UserError
from tests.data.pairs_fixture import block_mean_pairs, degraded_pairs, hq_tiles


def _write(path, examples, shard_size=8):
    with DatasetWriter(path, shard_size=shard_size) as w:
        for ex in examples:
            w.add(ex)
    return PairedSource(path)


@pytest.fixture(scope="module")
def degraded50(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("deg") / "pairs", degraded_pairs(50))


@pytest.fixture(scope="module")
def blockmean20(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("bm") / "pairs", block_mean_pairs(20), shard_size=6)


CFG = PipelineConfig(batch_size=10, crop_size=32, scale=4, seed=3, read_threads=2, read_buffer_size=4)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_every_example_once_per_epoch_over_two_processes(degraded50):
    assert per_host_batch_size(CFG, 2) == 5
    its = [make_iterator(degraded50, CFG, process_index=p, process_count=2) for p in range(2)]
    batches = [_take(it, 10) for it in its]  # 2 epochs: 50 examples / 2 processes / 5 per batch
    b = batches[0][0]
    assert set(b) == {"hq", "lq", "index"}
    assert b["hq"].shape == (5, 32, 32, 3) and b["lq"].shape == (5, 8, 8, 3)
    assert b["hq"].dtype == np.float32 and b["lq"].dtype == np.float32 and b["index"].dtype == np.int64
    assert 0 <= b["hq"].min() and b["hq"].max() <= 1 and 0 <= b["lq"].min() and b["lq"].max() <= 1
    epochs = []
    for e in range(2):
        seen = np.concatenate([bb["index"] for p in range(2) for bb in batches[p][5 * e : 5 * e + 5]])
        assert sorted(seen.tolist()) == list(range(50)), f"epoch {e}"  # all, exactly once
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    p0 = {int(i) for bb in batches[0][:5] for i in bb["index"]}
    p1 = {int(i) for bb in batches[1][:5] for i in bb["index"]}
    assert len(p0) == len(p1) == 25 and not p0 & p1
    # the degraded LQ differs from a plain downsample of the HQ, i.e. the stored LQ is what we read
    hq_ds = b["hq"].reshape(5, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    assert np.abs(hq_ds - b["lq"]).mean() > 0.01


def test_global_batch_on_8_devices(degraded50):
    assert jax.device_count() == 8
    cfg = dataclasses.replace(CFG, batch_size=16)
    its = [make_iterator(degraded50, cfg, process_index=p, process_count=2) for p in range(2)]
    local = [next(it) for it in its]
    # one real process here: it feeds the rows both simulated hosts would feed
    rows = {k: np.concatenate([local[0][k], local[1][k]]) for k in local[0]}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = make_global_batch(rows, NamedSharding(mesh, P("data")))
    assert batch["hq"].shape == (16, 32, 32, 3) and batch["index"].shape == (16,)
    assert len(batch["hq"].addressable_shards) == 8
    for shard in batch["hq"].addressable_shards:
        assert shard.data.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), rows["hq"][shard.index])
    assert sorted(np.asarray(batch["index"]).tolist()) == sorted(rows["index"].tolist())
    assert len(set(rows["index"].tolist())) == 16


def test_crops_are_aligned_and_flipped(blockmean20):
    cfg = dataclasses.replace(CFG, batch_size=4, num_epochs=1, seed=0)
    tiles = hq_tiles(20)
    flips = n = 0
    for b in make_iterator(blockmean20, cfg, process_index=0, process_count=1):
        want = b["hq"].reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4))
        np.testing.assert_allclose(b["lq"], want, atol=0.5 / 255 + 1e-6)  # LQ crop = block mean of HQ crop
        for hq, idx in zip(b["hq"], b["index"]):
            n += 1
            full = tiles[int(idx)].astype(np.float32) / 255.0
            hits = [
                (f, y, x)
                for f, img in ((0, full), (1, full[:, ::-1]))
                for y in range(0, full.shape[0] - 31, 4)
                for x in range(0, full.shape[1] - 31, 4)
                if np.array_equal(img[y : y + 32, x : x + 32], hq)
            ]
            assert hits, f"crop of example {idx} is not a scale-aligned window of its HQ"
            flips += hits[0][0]
    assert n == 20 and 3 <= flips <= 17


def test_same_data_whatever_the_process_count(blockmean20):
    cfg = dataclasses.replace(CFG, batch_size=4, lq_up=True)
    one = _take(make_iterator(blockmean20, cfg, process_index=0, process_count=1), 6)  # crosses an epoch
    two = [_take(make_iterator(blockmean20, cfg, process_index=p, process_count=2), 6) for p in range(2)]
    # global batch k = process 0's rows then process 1's rows, exactly the one-process batch k
    _assert_same(one, [{k: np.concatenate([two[0][i][k], two[1][i][k]]) for k in one[0]} for i in range(6)])
    # any row assignment (as the devices of a process hold them) and a start batch
    odd = _take(make_iterator(blockmean20, cfg, process_index=1, process_count=2, rows=[3, 1], start_batch=4), 2)
    _assert_same(odd, [{k: b[k][[3, 1]] for k in b} for b in one[4:6]])
    assert one[0]["lq_up"].shape == (4, 32, 32, 3)
    err = np.abs(one[0]["lq_up"] - one[0]["hq"]).mean()
    assert err < 0.1  # an upsampled version of the (aligned) LQ
    with pytest.raises(UserError, match="rows"):
        make_iterator(blockmean20, cfg, process_index=0, process_count=1, rows=[4])


def test_on_the_fly_degradation_is_deterministic(degraded50):
    from fluxir_jax.data.degrade import DegradationConfig

    cfg = dataclasses.replace(CFG, on_the_fly=True, lq_up=True)
    a = _take(make_iterator(degraded50, cfg, degradation=DegradationConfig(), process_index=1, process_count=2), 2)
    b = _take(make_iterator(degraded50, cfg, process_index=1, process_count=2), 2)
    _assert_same(a, b)
    assert a[0]["lq"].shape == (5, 8, 8, 3) and a[0]["lq_up"].shape == (5, 32, 32, 3)
    stored = _take(make_iterator(degraded50, CFG, process_index=1, process_count=2), 2)
    np.testing.assert_array_equal(a[0]["index"], stored[0]["index"])
    assert not np.array_equal(a[0]["lq"], stored[0]["lq"])  # fresh degradation, not the stored LQ
    c = _take(make_iterator(degraded50, dataclasses.replace(cfg, seed=4), process_index=1, process_count=2), 1)
    assert not np.array_equal(c[0]["index"], a[0]["index"])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_through_orbax(tmp_path, degraded50, workers):
    import orbax.checkpoint as ocp

    cfg = dataclasses.replace(CFG, workers=workers, on_the_fly=bool(workers))
    kw = dict(process_index=1, process_count=2)
    it = make_iterator(degraded50, cfg, **kw)
    _take(it, 3)  # mid-epoch (an epoch is 5 batches per process)
    mngr = ocp.CheckpointManager((tmp_path / "ckpt").absolute(), item_names=("data",))
    mngr.save(3, args=ocp.args.Composite(data=iterator_save_arg(it)))
    mngr.wait_until_finished()
    expected = _take(it, 4)  # crosses the epoch boundary
    it.close()
    fresh = make_iterator(degraded50, cfg, **kw)
    mngr.restore(3, args=ocp.args.Composite(data=iterator_restore_arg(fresh)))
    got = _take(fresh, 4)
    fresh.close()
    mngr.close()
    assert (tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").is_file()  # Grain's Orbax handler
    _assert_same(got, expected)
    assert not np.array_equal(got[0]["index"], _take(make_iterator(degraded50, CFG, **kw), 1)[0]["index"])


def test_config_errors(tmp_path, degraded50):
    with pytest.raises(UserError, match="multiple of the process count"):
        make_iterator(degraded50, dataclasses.replace(CFG, batch_size=5), process_index=0, process_count=2)
    with pytest.raises(UserError, match="multiple of scale"):
        make_iterator(degraded50, dataclasses.replace(CFG, crop_size=30), process_index=0, process_count=1)
    with DatasetWriter(tmp_path / "hq_only") as w:
        ex = block_mean_pairs(1)[0]
        ex.lq_png = None
        w.add(ex)
    with pytest.raises(UserError, match="on_the_fly"):
        make_iterator(PairedSource(tmp_path / "hq_only"), CFG, process_index=0, process_count=1)
    cfg = dataclasses.replace(CFG, on_the_fly=True, batch_size=2, shuffle=False)
    b = next(make_iterator(PairedSource(tmp_path / "hq_only"), cfg, process_index=0, process_count=1))
    assert b["lq"].shape == (2, 8, 8, 3) and b["index"].tolist() == [0, 0]
    counts = collections.Counter()
    for b in make_iterator(degraded50, dataclasses.replace(CFG, num_epochs=2), process_index=0, process_count=1):
        counts.update(b["index"].tolist())
    assert set(counts.values()) == {2} and len(counts) == 50
