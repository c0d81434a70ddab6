"""`max_bad_steps`: a run whose batches keep giving non-finite losses stops with a clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fluxir_jax import cli, parallel
from tests.train.helpers import TINY, write_pairs

FIRST_BAD = 3  # steps 3, 4, 5 get a NaN pixel; max_bad_steps=3 stops the run at step 5
MAX_BAD = 3


def _stored_params(ckpt_dir) -> dict:
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(ckpt_dir / "state")
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}")
        else:
            flat[prefix] = np.asarray(node)

    walk(tree["params"], "")
    return flat, {k: int(np.asarray(tree[k])) for k in ("step", "skipped", "bad_run")}


@pytest.mark.slow  # a whole (short) tiny training run in-process: ~60 s on 2 shared cores
def test_max_bad_steps_stops_the_run(tmp_path, monkeypatch, capsys):
    pairs = write_pairs(tmp_path / "pairs", 8)
    run = tmp_path / "run"
    real_put = parallel.put_global
    calls = {"n": 0}

    def poisoned_put(local, mesh):
        """Step n's batch is the n-th put; from FIRST_BAD on its HQ holds a NaN (loss -> NaN)."""
        calls["n"] += 1
        if calls["n"] >= FIRST_BAD and "hq" in local:
            local = dict(local)
            local["hq"] = np.array(local["hq"], copy=True)
            local["hq"][0, 0, 0, 0] = np.nan
        return real_put(local, mesh)

    monkeypatch.setattr(parallel, "put_global", poisoned_put)
    code = cli.main(["train", str(TINY), f"data.train={pairs}", f"run_dir={run}", "steps=8", "checkpoint.every=2",
                     "checkpoint.keep=5", "log_every=1", f"max_bad_steps={MAX_BAD}", "optim.warmup_steps=0"])
    err = capsys.readouterr().err
    stop = FIRST_BAD + MAX_BAD - 1
    assert code == 2
    assert (f"fluxir train: error: training stopped at step {stop}: {MAX_BAD} consecutive non-finite steps "
            f"(max_bad_steps={MAX_BAD})") in err
    assert calls["n"] == stop  # no step after the stop
    assert not (run / "adapter").exists()  # a stopped run exports no adapter

    # the metrics count the skipped steps, up to the stop
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in recs if "skipped_steps" in r}
    assert skipped[FIRST_BAD - 1] == 0
    assert [skipped[s] for s in range(FIRST_BAD, stop + 1)] == list(range(1, MAX_BAD + 1))
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r and r["step"] < FIRST_BAD)
    assert all(not np.isfinite(r["loss"]) for r in recs if "loss" in r and r["step"] >= FIRST_BAD)
    assert recs[-1]["step"] == stop and recs[-1]["skipped_steps"] == MAX_BAD and "stopped" in recs[-1]
    # the throughput's FLOPs (counted from the compiled step's own trace) are the step's analytic FLOPs
    from fluxir_jax import train_config
    from fluxir_jax.train_loop import Trainer

    cfg = train_config.load(TINY, ["steps=8", "optim.warmup_steps=0"])
    mesh = parallel.make_mesh(cfg.mesh)
    analytic = Trainer(cfg, mesh, abstract=True, log=lambda *a: None).analytic_flops()
    first = recs[0]
    assert first["tflops_per_device"] * 1e12 * first["step_time_s"] * mesh.devices.size == pytest.approx(analytic, rel=1e-9)

    # checkpoints: the one inside the bad run holds exactly the last good parameters (finite), no update
    ckpts = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [2, 4]
    good, good_meta = _stored_params(run / "checkpoints" / "2")
    during, meta = _stored_params(run / "checkpoints" / "4")
    assert good_meta == {"step": 2, "skipped": 0, "bad_run": 0}
    assert meta == {"step": 4, "skipped": 2, "bad_run": 2}
    assert good.keys() == during.keys() and len(good) > 0
    assert all(np.all(np.isfinite(during[k])) and np.array_equal(during[k], good[k]) for k in good)
