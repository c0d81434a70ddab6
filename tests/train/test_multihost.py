"""Multi-host training: two processes x 4 CPU devices (jax.distributed over gloo) against one x 8.

Also the pieces that need no second process: the multi-host flags and environment variables,
and the multi-slice mesh (data parallelism on the outer, DCN, part of `data`) on fake devices.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from fluxir_jax import cli, distributed, parallel
from fluxir_jax.errors import UserError
from tests.train.helpers import ROOT, TINY, cli_env, run_fluxir, write_pairs

# float32 throughout; the two layouts run the same sharded program, only the cross-process
# all-reduces (gloo) sum the gradients in another order. The losses agree to 1e-6 relative
# (measured 1.2e-7). Adam's m / sqrt(v) turns those last-bit gradient differences into visible
# ones for parameters that start at zero with near-zero gradients (lq_in, biases): measured
# after 5 steps, the whole adapter agrees to 1.3e-5 relative and every parameter to 5.7e-5
# absolute (6% of one Adam step of lr = 1e-3). Bounds: 1e-4 relative and 0.2 x lr absolute.
REL_TOL = 1e-6
ADAPTER_REL_TOL = 1e-4
ADAPTER_ABS_TOL = 0.2 * 1e-3  # tiny.yaml optim.lr = 1e-3
TIMEOUT = 1800  # seconds per run (a cold compile of the tiny step takes minutes on a busy 2-core machine)
RUN = ["steps=5", "checkpoint.every=3", "checkpoint.keep=3", "log_every=1", "optim.warmup_steps=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run logs again: the last record wins
    return out


def _adapter(run_dir) -> dict:
    from flax import nnx

    from fluxir_jax.models import adapter_io

    a = adapter_io.load_adapter(run_dir / "adapter")
    return {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(nnx.state(a, nnx.Param))}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_adapters_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    keys = sorted(want)
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])  # noqa: E731
    assert _rel(flat(got), flat(want)) <= ADAPTER_REL_TOL
    worst = max(keys, key=lambda k: np.abs(got[k] - want[k]).max())
    assert np.abs(got[worst] - want[worst]).max() <= ADAPTER_ABS_TOL, worst


def _two_processes(run_dir, pairs) -> list[subprocess.Popen]:
    port = _free_port()
    env = cli_env(devices=4)
    procs = []
    for i in range(2):
        args = ["train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                TINY, f"data.train={pairs}", f"run_dir={run_dir}", *RUN]
        procs.append(subprocess.Popen([sys.executable, "-m", "fluxir_jax.cli", *map(str, args)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", 8)
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    procs = _two_processes(two, pairs)
    try:
        r = run_fluxir("train", TINY, f"data.train={pairs}", f"run_dir={one}", *RUN, timeout=TIMEOUT)
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert "process 1 of 2, 4 local / 8 devices" in outs[1]
    assert "step=" not in outs[1] and "step=5" in outs[0]  # only process 0 logs

    # same losses and final adapter as one process x 8 devices
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(b[s] - a[s]) <= REL_TOL * abs(a[s]), (s, a[s], b[s])
    pa, pb = _adapter(one), _adapter(two)
    _assert_adapters_close(pb, pa)
    # process 0 alone wrote the run's files; both wrote the checkpoints
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert {p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()} == {"3", "5"}

    # the two-process checkpoint at step 3 resumes in one process (8 devices) to the same end
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("adapter"))
    shutil.rmtree(resumed / "checkpoints" / "5")
    r = run_fluxir("train", TINY, f"data.train={pairs}", f"run_dir={resumed}", *RUN, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from step 3" in r.stdout + r.stderr
    c = _losses(resumed)
    for s in (4, 5):
        assert abs(c[s] - a[s]) <= REL_TOL * abs(a[s]), (s, a[s], c[s])
    _assert_adapters_close(_adapter(resumed), pa)


# ----------------------------------------------------------------------------- no second process


def test_flags_and_environment(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    ns = lambda **kw: type("Args", (), {"coordinator": None, "num_processes": None, "process_id": None, **kw})  # noqa: E731
    assert distributed.explicit_settings(ns()) is None
    assert distributed.explicit_settings(ns(coordinator="h:1", num_processes=2, process_id=1)) == ("h:1", 2, 1)
    with pytest.raises(UserError, match="--process-id missing"):
        distributed.explicit_settings(ns(coordinator="h:1", num_processes=2))
    with pytest.raises(UserError, match="HOST:PORT"):
        distributed.explicit_settings(ns(coordinator="h", num_processes=2, process_id=0))
    with pytest.raises(UserError, match=r"\[0, --num-processes 2\)"):
        distributed.explicit_settings(ns(coordinator="h:1", num_processes=2, process_id=2))
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.explicit_settings(ns()) == ("10.0.0.1:1234", 4, 3)
    assert distributed.explicit_settings(ns(process_id=0)) == ("10.0.0.1:1234", 4, 0)  # a flag wins
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(UserError, match=distributed.ENV_PROCESS_ID):
        distributed.explicit_settings(ns())
    # nothing given and no cluster on this machine: a single process, jax.distributed untouched
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID)
    assert distributed.detected_process_count() == 1
    assert distributed.initialize(ns()) is False


def test_incomplete_flags_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert cli.main(["train", "--num-processes", "2", str(TINY), f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fluxir train: error: multi-host: --coordinator, --process-id missing (give --coordinator, "
                   "--num-processes and --process-id together, or $FLUXIR_COORDINATOR / $FLUXIR_NUM_PROCESSES / "
                   "$FLUXIR_PROCESS_ID)"], err


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def _ids(grid):
    return np.vectorize(lambda d: d.id)(grid)


def test_multi_slice_mesh_puts_data_on_the_slice_axis():
    # 2 slices x 2 hosts x 2 chips: dcn_data is taken from the slices when left at 1
    devs = [_FakeDevice(i, i // 2, i // 4) for i in range(8)]
    for cfg in (parallel.MeshConfig(data=1, fsdp=-1), parallel.MeshConfig(data=1, fsdp=-1, dcn_data=2)):
        grid = parallel.device_grid(cfg, devs)
        assert grid.shape == (2, 4, 1)
        assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]  # data across slices
    grid = parallel.device_grid(parallel.MeshConfig(data=2, fsdp=2), devs)  # data = 2 slices x 2 within
    assert grid.shape == (4, 2, 1)
    assert [d.slice_index for d in grid[:, 0, 0]] == [0, 0, 1, 1]
    with pytest.raises(UserError, match="dcn_data=4 does not match the 2 slices"):
        parallel.device_grid(parallel.MeshConfig(dcn_data=4), devs)
    # no slice indices (GPU / CPU hosts): a process is a DCN granule
    hosts = [_FakeDevice(i, i // 4) for i in range(8)]
    grid = parallel.device_grid(parallel.MeshConfig(data=1, fsdp=-1, dcn_data=2), hosts)
    assert _ids(grid[:, :, 0]).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UserError, match="2 processes"):
        parallel.device_grid(parallel.MeshConfig(data=1, fsdp=-1, dcn_data=4), hosts)


def test_host_rows_cover_the_batch_in_process_order():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
    assert parallel.host_rows(mesh, 16) == list(range(16))  # one process holds every row
