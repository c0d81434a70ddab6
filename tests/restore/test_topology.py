"""`fluxir gen --topology` and `fluxir restore --topology`: their device programs compiled for a TPU slice."""
import json
import pathlib

import pytest

from fluxir_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _record(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _check(rec, program):
    assert rec["program"] == program and rec["device_kind"] == "TPU v5" and rec["chips"] == 4 and rec["fits"]
    mem = rec["per_chip_bytes"]
    assert mem["total"] > 0 and mem["temporaries"] > 0 and mem["code"] > 0
    assert rec["flops_per_step"]["analytic"] > 0 and rec["est_step_seconds"] > 0
    assert rec["flops_per_step"]["xla"] is None and rec["est_mfu"] is None  # no whole-program XLA figures here


@pytest.mark.slow  # one TPU compile of the tiny sampler + decode: 65 s on the loaded 2-core machine
def test_gen_topology_record(tiny_models, capsys, tmp_path):
    ckpt, _ = tiny_models
    rec = _record(capsys, ["gen", str(ROOT / "configs" / "gen" / "tiny.yaml"), f"base={ckpt}", f"out={tmp_path}",
                           "batch_size=4", "resolution=64", "steps=2", "--topology", "v5p-8"])
    _check(rec, "gen")
    assert rec["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and rec["batch_size"] == 4
    assert json.loads((tmp_path / "compile.json").read_text()) == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compile.json"]  # nothing generated


@pytest.mark.slow  # one TPU compile of the tiny restore program: 90 s on the loaded 2-core machine
def test_restore_topology_record(tiny_models, capsys, tmp_path):
    ckpt, adapter = tiny_models
    rec = _record(capsys, ["restore", "--checkpoint", ckpt, "--adapter", adapter, "--topology", "v5p-8", "--lq-size", "16",
                           "steps=2"])
    _check(rec, "restore")
    assert rec["bucket"] == [64, 64] and rec["batch_size"] == 4 and not rec["tiled"]


def test_restore_without_input_needs_topology(tiny_models, capsys):
    ckpt, adapter = tiny_models
    assert cli.main(["restore", "--checkpoint", ckpt, "--adapter", adapter]) == 2
    assert "--input is required" in capsys.readouterr().err
