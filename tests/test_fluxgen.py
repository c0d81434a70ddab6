"""`fluxir gen` on the tiny preset (random weights, `fluxir init`), 8 emulated devices, 192 px, 2 steps.

One uninterrupted reference run (24 images, shards of 8) is compared with: other batch sizes
and device counts (byte-identical), the sharded mode with its default FSDP-sharded parameters
(byte-identical to pmap, across its batch sizes and on 1 or 8 devices: each weight is
all-gathered before use), a SIGKILLed-then-resumed run and two simulated processes (byte-identical).
"""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fluxir_jax import cli
from fluxir_jax.data.dataset import PairedSource
from fluxir_jax.fluxgen_select import read_headers, select
from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "gen" / "tiny.yaml")
COUNT, SHARD = 24, 8
COMMON = [f"count={COUNT}", f"shard_size={SHARD}", "progress=false", "select.percentile=20"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_ckpt") / "tiny"
    assert cli.main(["init", "tiny", "-o", str(out)]) == 0
    return str(out)


def gen(ckpt, out, *extra):
    assert cli.main(["gen", TINY, f"base={ckpt}", f"out={out}", *COMMON, *extra]) == 0
    return pathlib.Path(out)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """Uninterrupted run: batch 8 on 8 devices, pmap, one degradation worker process."""
    return gen(ckpt, tmp_path_factory.mktemp("gen_ref") / "out", "batch_size=8", "parallel=pmap", "workers=1")


def records(path) -> list[tuple]:
    """(id, seed, HQ bytes hash, LQ bytes hash, scores, params) of every example, in order."""
    h = lambda b: None if b is None else hashlib.sha256(b).hexdigest()  # noqa: E731
    return [(r["id"], r["seed"], h(r["hq_png"]), h(r["lq_png"]), r["iqa"], r["params"]) for r in PairedSource(path)]


def shard_bytes(path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((pathlib.Path(path) / "shards").glob("*.array_record"))]


@pytest.mark.slow
def test_outputs_counts_selection_and_training_pipeline(reference):
    from fluxir_jax.data.pipeline import PipelineConfig, make_iterator

    pool = PairedSource(reference / "pool")
    assert len(pool) == COUNT and [r["id"] for r in pool] == [f"{i:09d}" for i in range(COUNT)]
    assert [r["seed"] for r in pool] == list(range(COUNT))  # seed 0 + index
    assert all(r["lq_png"] is None and set(r["iqa"]) == {"niqe"} for r in pool)
    assert len(set(hashlib.sha256(r["hq_png"]).digest() for r in pool)) == COUNT  # every seed its own image
    assert len(shard_bytes(reference / "pool")) == COUNT // SHARD
    # selection recomputed from the stored scores: NIQE is lower-is-better, drop above the 80th percentile
    niqe = np.array([r["iqa"]["niqe"] for r in pool])
    expect = [r["id"] for r, v in zip(pool, niqe) if v <= np.percentile(niqe, 80)]
    pairs = PairedSource(reference / "pairs")
    assert [r["id"] for r in pairs] == expect and 0 < len(expect) < COUNT
    by_id = {r["id"]: r for r in pool}
    for r in pairs:
        assert r["hq_png"] == by_id[r["id"]]["hq_png"] and r["iqa"] == by_id[r["id"]]["iqa"]
        assert r["lq_png"] is not None and r["params"]["scale"] == 4 and r["params"]["gt_hw"] == [192, 192]
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["generated"], summary["kept"]) == (COUNT, len(expect))
    assert summary["metrics"]["niqe"]["dropped"] == COUNT - len(expect)
    assert summary["devices"] == 8 and summary["mode"] == "pmap"
    assert {"generate", "score", "select", "pairs"} <= set(summary["seconds"])
    assert (reference / "contact_sheet.png").stat().st_size > 0
    # the training pipeline reads pairs/
    cfg = PipelineConfig(batch_size=4, crop_size=64, scale=4, num_epochs=1, read_threads=1)
    batch = next(make_iterator(pairs, cfg, process_index=0, process_count=1))
    assert batch["hq"].shape == (4, 64, 64, 3) and batch["lq"].shape == (4, 16, 16, 3)


def test_select_percentile_rule():
    scores = {f"{i}": {"up": float(i), "down": float(i * 7 % 20)} for i in range(20)}
    kept, report = select(scores, {"up": False, "down": True}, 10)
    up_thr, down_thr = np.percentile(np.arange(20.0), 10), np.percentile(np.arange(20.0), 90)
    assert kept == sorted(k for k, s in scores.items() if s["up"] >= up_thr and s["down"] <= down_thr)
    assert report["up"]["dropped"] == 2 and report["down"]["dropped"] == 2 and len(kept) == 16
    assert select(scores, {"up": False}, 0)[0] == sorted(scores)
    scores["3"]["down"] = float("nan")  # a score that is not a number never passes
    assert "3" not in select(scores, {"up": False, "down": True}, 10)[0]
    assert "3" not in select(scores, {"down": True}, 0)[0]


@pytest.mark.slow
def test_bytes_independent_of_batch_and_devices(ckpt, reference, tmp_path):
    other = gen(ckpt, tmp_path / "b16", "batch_size=16", "parallel=pmap", "workers=0")
    for kind in ("pool", "pairs", "degraded"):
        assert shard_bytes(other / kind) == shard_bytes(reference / kind), kind
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")  # the in-process reference's flags, 1 device
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "fluxir_jax.cli", "gen", TINY, f"base={ckpt}", f"out={one}", *COMMON,
                    "batch_size=4", "workers=0"], env=env, cwd=ROOT, check=True, capture_output=True)
    assert json.loads((one / "summary.json").read_text())["devices"] == 1
    for kind in ("pool", "pairs"):
        assert shard_bytes(one / kind) == shard_bytes(reference / kind), kind


@pytest.fixture(scope="module")
def sharded(ckpt, tmp_path_factory):
    """parallel=sharded (parameters FSDP-sharded over the 8 devices), 8 images, batch 8."""
    return gen(ckpt, tmp_path_factory.mktemp("gen_sh") / "out", "parallel=sharded", "workers=0", "count=8")


def test_sharded_mode_bytes_equal_pmap(reference, sharded):
    """FSDP-sharded parameters, gathered whole before use: every byte as in pmap mode (images, scores, LQs)."""
    from fluxir_jax.infer import Engine

    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["mode"] == "sharded" and summary["devices"] == 8
    assert records(sharded / "pool") == records(reference / "pool")[:8]
    for kind in ("pool", "degraded"):  # shard 0 holds images 0-7 in both runs
        assert shard_bytes(sharded / kind)[0] == shard_bytes(reference / kind)[0], kind
    assert Engine({"w": np.zeros(8, np.float32)}, parallel="sharded").gather_weights  # what gen ran with


@pytest.mark.slow
def test_sharded_bytes_independent_of_batch_and_devices(ckpt, reference, sharded, tmp_path):
    """Sharded batch 16 (8 devices, padded) and batch 4 on 1 device give the bytes of batch 8 on 8 (and of pmap)."""
    runs = {"b16": ("batch_size=16",), "one": ("batch_size=4", "devices=1")}
    for name, extra in runs.items():
        other = gen(ckpt, tmp_path / name, "parallel=sharded", "workers=0", "count=8", *extra)
        summary = json.loads((other / "summary.json").read_text())
        assert summary["mode"] == "sharded" and summary["devices"] == (1 if name == "one" else 8), name
        for kind in ("pool", "degraded", "pairs"):
            assert shard_bytes(other / kind) == shard_bytes(sharded / kind), (name, kind)
        assert records(other / "pool") == records(reference / "pool")[:8], name


def test_pool_and_pairs_are_tfds_datasets(reference):
    """pool/ and pairs/ open with `tfds.builder_from_directory` / `tfds.data_source` (no TensorFlow)
    and yield the examples of `PairedSource`, in order; the degraded/ cache has no view."""
    from tests.data.tfds_fixture import assert_view_matches

    assert assert_view_matches(reference / "pool", "fluxir_pool") == COUNT
    assert assert_view_matches(reference / "pairs", "fluxir_pairs") == len(PairedSource(reference / "pairs")) > 0
    assert not (reference / "degraded" / "tfds").exists()


def test_gen_select_rewrites_pairs_without_sampling(ckpt, reference, tmp_path, monkeypatch):
    import shutil

    from fluxir_jax import fluxgen

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    monkeypatch.setattr(fluxgen, "generate", lambda *a, **k: pytest.fail("gen select must not generate"))
    assert cli.main(["gen", "select", str(out), "select.percentile=50", "workers=0"]) == 0
    niqe = {h["id"]: h["iqa"]["niqe"] for h in read_headers(out / "pool")}
    thr = np.percentile(list(niqe.values()), 50)
    kept = [r["id"] for r in PairedSource(out / "pairs")]
    assert kept == sorted(i for i, v in niqe.items() if v <= thr) and len(kept) == COUNT // 2
    assert json.loads((out / "summary.json").read_text())["percentile"] == 50
    # another degradation setting: pairs/ degraded again from pool/ (no degraded/ cache for it)
    assert cli.main(["gen", "select", str(out), "degrade.jpeg1_range=[90,95]", "workers=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_from"] == "degraded" and summary["percentile"] == 50  # kept in config.yaml
    assert all(90 <= r["params"]["jpeg1"]["quality"] <= 95 for r in PairedSource(out / "pairs"))


@pytest.mark.slow
def test_kill_then_resume_is_identical(ckpt, reference, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "fluxir_jax.cli", "gen", TINY, f"base={ckpt}", f"out={out}",
                             *COMMON, "batch_size=8", "workers=1"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / "pool.partial" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(shards.glob("*.array_record"))) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, degradation workers included (a preemption)
    proc.wait()
    done = len(list(shards.glob("*.array_record")))
    assert 1 <= done < COUNT // SHARD and not (out / "pool").exists()
    # resuming with settings that change the images is refused (exit 2), before any device work
    assert cli.main(["gen", TINY, f"base={ckpt}", f"out={out}", *COMMON, "steps=3"]) == 2
    gen(ckpt, out, "batch_size=8", "workers=1")
    for kind in ("pool", "degraded", "pairs"):
        assert shard_bytes(out / kind) == shard_bytes(reference / kind), kind
    assert json.loads((out / "pool" / "dataset_info.json").read_text())["generation_stats"]["generated_this_run"] \
        == COUNT - done * SHARD


@pytest.mark.slow
def test_two_processes_write_disjoint_ranges(ckpt, reference, tmp_path):
    out = tmp_path / "two"
    gen(ckpt, out, "process_index=0", "process_count=2", "workers=0")
    assert cli.main(["gen", "select", str(out), "workers=0"]) == 2  # half the pool: refused
    gen(ckpt, out, "process_index=1", "process_count=2", "workers=0")
    parts = [out / f"pool-{p:05d}-of-00002" for p in range(2)]
    ids = [[r["id"] for r in PairedSource(d)] for d in parts]
    assert ids[0] == [f"{i:09d}" for i in range(12)] and ids[1] == [f"{i:09d}" for i in range(12, 24)]
    assert not (out / "pairs").exists()
    assert cli.main(["gen", "select", str(out), "workers=0"]) == 0
    assert records(out / "pairs") == records(reference / "pairs")
    assert [r for d in parts for r in records(d)] == records(reference / "pool")


@pytest.mark.parametrize("args, needle", [
    (["colour=red"], "unknown config key colour"),
    (["count=0"], "count=0 must be positive"),
    (["base=/nonexistent/ckpt"], "not a converted checkpoint"),
    (["metrics=[niqe,musiq]"], "musiq needs weights"),
    (["weights.nosuch=x"], "unknown config key weights.nosuch"),
    (["resolution=128"], "niqe needs images of at least 192"),
])
def test_bad_inputs_exit_2_before_device_work(ckpt, tmp_path, monkeypatch, capsys, args, needle):
    from fluxir_jax import fluxgen

    monkeypatch.setattr(fluxgen, "generate", lambda *a, **k: pytest.fail("device work started"))
    out = tmp_path / "bad"
    assert cli.main(["gen", TINY, f"base={ckpt}", f"out={out}", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fluxir: note:")]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
