"""`fluxir train` as users run it: resume after SIGKILL, SIGTERM, --compile-only, bad configs."""
from __future__ import annotations

import json
import signal
import time

import jax
import numpy as np
import pytest

from fluxir_jax import cli
from tests.train.helpers import TINY, fluxir, run_fluxir, write_pairs

# The cut run is killed after step 6 (2 steps before the end, so it cannot finish first) and
# resumes from its checkpoint at step 6 (or 3, if 6 was still being written): steps 4..8 must
# match the uninterrupted run bit for bit.
RUN = ["steps=8", "checkpoint.every=3", "log_every=1", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs", 8)


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run logs some steps again: the last record wins
    return out


def _adapter(run_dir) -> dict:
    from flax import nnx

    from fluxir_jax.models import adapter_io

    a = adapter_io.load_adapter(run_dir / "adapter")
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(a, nnx.Param))}


def _wait_for_step(proc, run_dir, step: int, timeout: float = 900) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = run_dir / "metrics.jsonl"
        if f.is_file() and max(_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(pairs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_fluxir("train", TINY, f"data.train={pairs}", f"run_dir={full}", *RUN)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = fluxir("train", TINY, f"data.train={pairs}", f"run_dir={cut}", *RUN)
    try:
        _wait_for_step(proc, cut, 6)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / "adapter").exists()
    r = run_fluxir("train", TINY, f"data.train={pairs}", f"run_dir={cut}", *RUN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from step 6" in r.stdout + r.stderr or "resumed from step 3" in r.stdout + r.stderr
    a, b = _losses(full), _losses(cut)
    assert [a[s] for s in range(4, 9)] == [b[s] for s in range(4, 9)]
    pa, pb = _adapter(full), _adapter(cut)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    # outputs of a finished run
    for name in ("config.yaml", "metrics.jsonl", "events", "adapter"):
        assert (full / name).exists(), name
    assert sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())[-1] == 8


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(pairs, tmp_path):
    run = tmp_path / "run"
    # warmup_steps=0 as in RUN: the same step program, so it comes from the compilation cache
    proc = fluxir("train", TINY, f"data.train={pairs}", f"run_dir={run}", "steps=1000", "checkpoint.every=1000",
                  "log_every=1", "optim.warmup_steps=0")
    _wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) >= 3


@pytest.mark.slow
def test_compile_only_reports_memory_and_flops(tmp_path):
    # the RUN settings: the scan step is the program the runs above compiled (a persistent-cache hit),
    # so only the unrolled FLOP-count variants compile here
    r = run_fluxir("train", TINY, "--compile-only", f"run_dir={tmp_path}", *RUN)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    mem = report["per_chip_bytes"]
    assert set(mem) >= {"arguments", "temporaries", "outputs", "total"} and mem["total"] > mem["arguments"] > 0
    flops = report["flops_per_step"]
    assert abs(flops["xla"] - flops["analytic"]) <= 0.1 * flops["analytic"], flops
    assert json.loads((tmp_path / "compile.json").read_text())["flops_per_step"] == flops


@pytest.fixture
def no_compile(monkeypatch):
    """Any jax.jit (and therefore any compilation) fails the test."""
    import fluxir_jax.train  # noqa: F401  (imported before the patch)
    import fluxir_jax.train_loop  # noqa: F401
    import fluxir_jax.train_setup  # noqa: F401

    def boom(*a, **k):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", boom)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    from fluxir_jax.init_checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint("tiny", out, seed=0, text_len=6, progress=False)
    return out


@pytest.mark.parametrize("overrides, field", [
    (["bogus=1"], "bogus"),
    (["mesh.data=3", "mesh.fsdp=1"], "mesh"),
    (["batch_size=12"], "batch_size"),
    (["optim.accum_steps=3"], "accum_steps"),
    (["data.train=/nonexistent/pairs"], "data.train"),
    (["loss.pixel_crop=12"], "loss.pixel_crop"),
    (["adapter.control_blocks=some"], "control_blocks"),
    (["base=/nonexistent/ckpt"], "base"),
    (["BASE", "adapter.text_len=8"], "text length"),
    (["data.val=PAIRS", "val.every=1", "val.lpips_weights=/nonexistent/lpips.safetensors"], "val.lpips_weights"),
    (["val.lpips_net=squeeze"], "val.lpips_net"),
    (["run_dir=gs://bucket/run"], "run_dir"),  # not a local directory named 'gs:'
    (["slice_knobs={v9x-8: [steps=2]}"], "v9x-8"),
    (["slice_knobs={v5p-8: [bogus=1]}"], "slice_knobs.v5p-8: unknown config key bogus"),
    (["slice_knobs={v5p-8: [optim.accum_steps=3]}"], "accum_steps"),  # checked even off that slice
    (["slice_knobs={v5p-8: steps=2}"], "slice_knobs.v5p-8: expected a list"),
])
def test_bad_config_exits_2_before_compiling(overrides, field, pairs, init_ckpt, tmp_path, capsys, no_compile):
    overrides = [f"base={init_ckpt}" if o == "BASE" else o.replace("PAIRS", str(pairs)) for o in overrides]
    args = ["train", str(TINY), f"data.train={pairs}", f"run_dir={tmp_path / 'run'}", *overrides]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]  # (a random base adds a one-line notice first)
    assert len(errors) == 1 and errors[0] == err[-1] and field in errors[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_metrics_logger_writes_tensorboard_scalars_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it can (~3 s of every run's start-up); the logger keeps it out, and
    a live TensorBoard sees each scalar within seconds (tensorboardX's default: up to 120 s)."""
    import subprocess
    import sys

    from tests.train.helpers import ROOT, cli_env

    code = f"""
import pathlib, struct, sys, time
from fluxir_jax import train_metrics
run = pathlib.Path({str(tmp_path)!r})
log = train_metrics.MetricsLogger(run, 2, 0, progress=False)
log.write({{"step": 1, "loss": 0.5}}, echo=False)
log.write({{"step": 2, "loss": 0.25}}, echo=False)
assert "torch" not in sys.modules, "torch was imported"
from tensorboardX.proto import event_pb2

def scalars():
    data, i, out = next((run / "events").iterdir()).read_bytes(), 0, []
    while i + 12 <= len(data):  # TFRecord framing: length (8 bytes), its CRC (4), the Event, its CRC (4)
        n = struct.unpack("<Q", data[i:i + 8])[0]
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        i += 16 + n
    return out

t0 = time.time()  # a live TensorBoard sees both scalars within seconds, before the writer closes
while len(scalars()) < 2 and time.time() - t0 < 15:
    time.sleep(0.2)
live = scalars()
log.close()
print(live, scalars())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = "[(1, 'loss', 0.5), (2, 'loss', 0.25)]"
    assert r.stdout.strip().splitlines()[-1] == f"{want} {want}"


def test_a_run_on_a_slice_with_knobs_trains_with_them(monkeypatch, capsys, tmp_path):
    """`fluxir train` finds its slice from its devices and trains with that slice's knobs, under the
    command line's overrides (the training itself is replaced: what matters is the config it gets)."""
    from fluxir_jax import tpu_topology, train_loop

    seen = []
    monkeypatch.setattr(train_loop, "train", lambda cfg, **k: seen.append(cfg) or {})
    slices = []
    monkeypatch.setattr(tpu_topology, "accelerator_of", lambda devices, n=1: slices.append(len(devices)) or "v5p-8")
    knobs = "slice_knobs={v5p-8: [optim.accum_steps=2, loss.pixel_crop=16], v6e-8: [optim.accum_steps=4]}"
    assert cli.main(["train", str(TINY), f"run_dir={tmp_path}", knobs, "loss.pixel_crop=24"]) == 0
    (cfg,) = seen
    assert (cfg.optim.accum_steps, cfg.loss.pixel_crop) == (2, 24) and slices == [len(jax.devices())]
    assert "config: slice_knobs for v5p-8: optim.accum_steps=2 loss.pixel_crop=16" in capsys.readouterr().out
    monkeypatch.setattr(tpu_topology, "accelerator_of", lambda devices, n=1: None)  # CPU, GPU: the base knobs
    assert cli.main(["train", str(TINY), f"run_dir={tmp_path}", knobs]) == 0
    assert seen[-1].optim.accum_steps == 1 and "slice_knobs for" not in capsys.readouterr().out
