"""bench/run_all.py and bench/results_table.py on small synthetic results (no real benchmark runs)."""
from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest

from bench import results_table as rt
from bench import run_all

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(path, records, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records[0]))


def _fwd(ratio, jax_s, date, model="small", **extra):
    return dict(model=model, res=256, tokens=256, txt=128, batch=1, dtype="float32", jax_median_s=jax_s,
                torch_median_s=jax_s * ratio, torch_over_jax=ratio, device="cpu", cpu="AMD EPYC", cores=2,
                repeats=7, date=date, **extra)


def test_table_takes_the_latest_run_of_each_configuration_and_names_its_machine(tmp_path):
    _write(tmp_path / "flux_forward.jsonl", [_fwd(7.8, 0.5, "2026-11-01"), _fwd(1.5, 0.134, "2026-11-02"),
                                            _fwd(2.0, 0.004, "2026-11-03", model="tiny")])
    _write(tmp_path / "degrade.json", [dict(gt_size=512, repeats=5, cpu="AMD EPYC", machine_cpus=2, date="2026-11-26T16:55",
                                            median_pairs_per_s_per_core=dict(ours=58.11, torch=10.52),
                                            speedup_vs_torch=dict(wall=5.52))], jsonl=False)
    _write(tmp_path / "convert_memory.json", [dict(date="2026-11-26 23:33", cpus=2, note="n", file_bytes=2e9, repeats=3,
                                                   convert_all_s=[30.0, 40.0, 33.0], convert_s=33.0, convert_MBps=60.6,
                                                   throughput_vs_plain_read=0.5, peak_rss_GiB=1.2)], jsonl=False)
    _write(tmp_path / "train_step.jsonl", [dict(benchmark="train step", device="NVIDIA H200", cpu="Xeon", cores=16, date="2026-12-02",
                                                figures=[dict(figure="small 256²: JAX", value=12.5, unit="ms", repeats=10),
                                                         dict(figure="PyTorch / JAX", value=1.8, unit="x")])])
    _write(tmp_path / "misc.jsonl", [dict(median_s=0.25, other=3, repeats=4, cpu="c", cores=1)])
    rows = rt.figures(tmp_path)
    by_fig = {r.figure: r for r in rows}

    small = "small 256² (256 img + 128 txt tokens), batch 1, float32"
    assert by_fig[f"{small}: JAX"].value == "134 ms"  # the later of the two small runs
    assert by_fig[f"{small}: PyTorch time / JAX time"].value == "1.50x"
    assert by_fig[f"{small}: JAX"].date == "2026-11-02" and by_fig[f"{small}: JAX"].repeats == "7"
    assert by_fig["tiny 256² (256 img + 128 txt tokens), batch 1, float32: JAX"].value == "4 ms"
    assert sum(1 for r in rows if r.benchmark == "transformer forward") == 6  # 2 configurations x 3 figures

    assert by_fig["degradation pairs, GT 512², one thread: ours / torch"].value == "5.52x"
    assert by_fig["degradation pairs, GT 512², one thread: ours (numpy/OpenCV)"].machine == "AMD EPYC, 2 cores"
    conv = by_fig["checkpoint conversion (n, 2.0 GB): wall time"]
    assert conv.value == "33 s" and conv.repeats == "3" and conv.machine == "CPU model not recorded, 2 cores"

    gpu = by_fig["small 256²: JAX"]
    assert (gpu.benchmark, gpu.value, gpu.repeats, gpu.machine) == ("train step", "12.5 ms", "10", "NVIDIA H200; Xeon, 16 cores")
    assert by_fig["PyTorch / JAX"].value == "1.80x"
    assert by_fig["median_s"].value == "0.25 s" and "other" not in by_fig

    text = rt.render(tmp_path)
    assert "| transformer forward | " + small + ": JAX | 134 ms | 7 | AMD EPYC, 2 cores | 2026-11-02 |" in text
    assert text.count("\n| ") == len(rows) + 1  # header + one line per figure


def _script(path, body):
    path.write_text(textwrap.dedent(body))


def test_runner_runs_every_benchmark_present_and_survives_a_failure(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("__init__", "common"):
        (bench / f"{name}.py").write_text("")
    _script(bench / "flux_forward.py", """
        import json, os, pathlib, sys
        rec = dict(model=sys.argv[2], res=int(sys.argv[4]), tokens=16, txt=int(sys.argv[6]), batch=1, dtype="float32",
                   jax_median_s=0.01, device="cpu", cpu="test cpu", cores=2, repeats=int(sys.argv[8]), date="2026-12-02")
        with (pathlib.Path(os.environ["FLUXIR_BENCH_RESULTS"]) / "flux_forward.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\\n")
    """)
    _script(bench / "newbench.py", 'import sys\nassert sys.argv[1:] == ["--quick"]  # "--quick"\nsys.exit(3)\n')
    _script(bench / "noquick.py", "raise SystemExit('must not run in quick mode')\n")
    assert run_all.discover(bench) == ["flux_forward", "newbench", "noquick"]
    assert run_all.plan("convert_memory", True).startswith("writes")

    results = tmp_path / "results"
    outcomes = run_all.run(run_all.discover(bench), True, results, bench)
    assert [(n, o.split(" ")[0]) for n, _, o in outcomes] == [("flux_forward", "ok"), ("newbench", "FAILED"), ("noquick", "skipped:")]
    rec = json.loads((results / "flux_forward.jsonl").read_text())
    assert (rec["model"], rec["res"], rec["repeats"]) == ("tiny", 64, 2)  # the quick arguments
    assert "| tiny 64² (16 img + 16 txt tokens), batch 1, float32: JAX | 10 ms | 2 | test cpu, 2 cores |" in rt.render(results)


def test_table_only_rebuilds_readme(tmp_path, monkeypatch):
    _write(tmp_path / "flux_forward.jsonl", [_fwd(1.5, 0.134, "2026-11-02")])
    monkeypatch.setattr(sys, "argv", ["run_all"])
    assert run_all.main(["--table-only", "--results", str(tmp_path)]) == 0
    assert "134 ms" in (tmp_path / "README.md").read_text()
    assert run_all.main(["--only", "nonexistent", "--table-only", "--results", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- train_step / fluxgen / restore


def _table_rows(tmp_path, name, records):
    _write(tmp_path / f"{name}.jsonl", records)
    return {r.figure: r for r in rt.figures(tmp_path)}


def test_a_figure_measured_again_shows_its_latest_value_and_the_load_average(tmp_path):
    common = dict(benchmark="b", cpu="AMD EPYC", cores=2)
    rows = _table_rows(tmp_path, "x", [
        dict(common, date="2026-12-01", load_avg_before=[0.5, 0, 0], load_avg_after=[0.7, 0, 0],
             figures=[dict(figure="f", value=1.0, unit="s", repeats=3), dict(figure="g", value=2.0, unit="s")]),
        dict(common, date="2026-12-02", load_avg_before=[24.0, 0, 0], load_avg_after=[21.5, 0, 0],
             figures=[dict(figure="f", value=5.0, unit="s", repeats=2)])])
    assert (rows["f"].value, rows["f"].repeats, rows["f"].date) == ("5 s", "2", "2026-12-02")
    assert rows["f"].machine == "AMD EPYC, 2 cores, load 24.0" and rows["g"].machine == "AMD EPYC, 2 cores, load 0.7"
    assert len(rt.figures(tmp_path)) == 2


def test_a_later_run_retracts_figures_it_shows_to_be_stale(tmp_path):
    common = dict(benchmark="b", cpu="AMD EPYC", cores=2)
    rows = _table_rows(tmp_path, "x", [
        dict(common, date="2026-12-01", figures=[dict(figure="mode", value=1.0, unit="s"), dict(figure="ratio", value=2.0, unit="x"),
                                                 dict(figure="other", value=3.0, unit="s")]),
        dict(common, date="2026-12-02", retracts=["ratio"], figures=[dict(figure="mode", value=5.0, unit="s")])])
    assert set(rows) == {"mode", "other"} and rows["mode"].value == "5 s"


def test_new_benchmarks_are_registered_with_quick_runs():
    names = run_all.discover()
    assert {"train_step", "fluxgen", "restore"} <= set(names) and "torch_twin" not in names
    for n in ("train_step", "fluxgen", "restore"):
        assert run_all.plan(n, True) == [["--quick"]] and run_all.plan(n, False) == [[]]


def test_train_step_rows(tmp_path):
    from bench import train_step

    step = dict(model="small", res=256, batch=1, per_device_batch=1, devices=1, step_median_s=0.5, compile_s=40.0,
                torch_median_s=2.0, torch_over_flax=4.0, cpu="AMD EPYC", cores=2, date="2026-12-02", repeats=3)
    rows = _table_rows(tmp_path, "train_step", [train_step.step_record(step)])
    what = "small 256², batch 1 (1/device)"
    assert rows[f"{what}, 1 CPU device(s): Flax step"].value == "500 ms"
    assert rows[f"{what}, 1 CPU device(s): Flax images/s"].value == "2 img/s"
    assert rows[f"{what}: PyTorch step time / Flax step time (1 device)"].value == "4.00x"
    args = train_step.parse(["--quick"])
    assert (args.model, args.res, args.compile_res, args.devices) == ("tiny", 64, [], [1, 8])
    assert train_step.parse([]).compile_res == [512, 1024]


def test_fluxgen_and_restore_rows(tmp_path):
    from bench import fluxgen, restore

    gen = dict(model="small", res=256, steps=4, devices=8, repeats=2, torch_per_image_s=3.0,
               host_per_image_s=dict(score=0.1, encode_png=0.01, degrade=0.2),
               pmap=dict(images_per_s=0.5, first_call_s=30.0, per_image_s=dict(sampling=1.5, decoding=0.5)),
               sharded=dict(images_per_s=0.25, first_call_s=31.0, per_image_s=dict(sampling=3.5, decoding=0.5)))
    rows = {f["figure"]: f for f in fluxgen.figures(gen)}
    what = "small 256², 4 steps, 8 CPU devices x 1 image"
    assert rows[f"{what}: FluxPipeline time / ours (pmap)"]["value"] == 1.5  # 3 s vs 2 s per image
    assert rows[f"{what}: FluxPipeline time / ours (sharded)"]["value"] == 0.75
    assert rows[f"{what}, pmap: per image sampling / decoding"]["value"] == "1.5 / 0.5 s"
    res = dict(model="small", res=512, lq=128, steps=4, devices=8, images_per_call=8, repeats=1, torch_per_image_s=10.0,
               pmap=dict(images_per_s=0.2, first_call_s=60.0), sharded=dict(images_per_s=0.1, first_call_s=61.0),
               **{"one device": dict(images_per_s=0.15, first_call_s=20.0)})
    rows = {f["figure"]: f for f in restore.figures(res)}
    what = "small 128² -> 512², 4 steps, 8 images"
    assert rows[f"{what}: PyTorch time / ours (pmap)"]["value"] == 2.0
    assert rows[f"{what}, 1 CPU device: images/s"]["value"] == 0.15
    assert rows[f"{what}, 8 CPU devices, sharded: first call (compile + run)"]["repeats"] == 1


def test_torch_twins_hold_exactly_the_flax_weights():
    """bench/torch_twin.py: Flax -> diffusers gives back the diffusers weights the Flax models were made from."""
    import dataclasses

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from bench import torch_twin
    from fluxir_jax.models.autoencoder import AE_PRESETS
    from tests.models.flux_reference import TINY_DIFFUSERS, flax_from_diffusers, randomize_torch_
    from tests.models.test_autoencoder import make_model

    dm = FluxTransformer2DModel(guidance_embeds=True, **TINY_DIFFUSERS).eval()
    randomize_torch_(dm, 0)
    dv = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                       scaling_factor=0.3611, shift_factor=0.1159).eval()
    randomize_torch_(dv, 1)
    twins = ((dm, torch_twin.diffusers_flux(flax_from_diffusers(dm))),
             (dv, torch_twin.diffusers_vae(make_model({k: v.numpy().copy() for k, v in dv.state_dict().items()}),
                                           dataclasses.replace(AE_PRESETS["tiny"]))))
    for ref, twin in twins:
        want, got = ref.state_dict(), twin.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert not any(p.requires_grad for p in twin.parameters())
    assert np.isclose(twins[1][1].config.scaling_factor, 0.3611)


def test_machine_names_the_highest_load_of_a_run_in_several_processes():
    rec = dict(cpu="AMD EPYC", cores=2, load_avg_before=[7.8, 0, 0], load_avg_after=[7.6, 0, 0],
               pmap=dict(load_avg_1min=[8.4, 12.7]), torch_load_avg_1min=[12.6, 7.6])
    assert rt.machine(rec) == "AMD EPYC, 2 cores, load 12.7"
    assert rt.machine(dict(rec, pmap={})) == "AMD EPYC, 2 cores, load 12.6"


def test_tpu_memory_rows_name_model_and_hardware_flops_utilisation():
    from bench import tpu_memory

    rec = dict(per_chip_bytes={"total": 2 * 1024**3}, fits=True, compile_seconds=10.0, est_step_seconds=2.0,
               flops_per_step={"model": 3e15, "analytic": 4e15, "xla": 3.1e15}, est_mfu=0.3, est_hfu=0.4, hbm_bytes=1)
    rows = {r["figure"].split(": ", 1)[1]: r["value"] for r in tpu_memory.figures("v5p-8/config", {"record": rec})}
    assert rows["per-chip bytes"] == 2.0 and rows["fits HBM"] == "yes"
    assert rows["FLOPs per step, model / analytic (recompute) / XLA"] == "3000 / 4000 / 3100"
    # a record without the reading predates the scanned one: its figures were read off unrolled compiles
    assert rows["est. MFU (model FLOPs, estimate, unrolled reading)"] == 30.0
    assert rows["est. HFU (recompute counted, estimate)"] == 40.0
    scanned = dict(rec, xla_cost_analysis={"reading": "scanned"})
    rows = {r["figure"].split(": ", 1)[1]: r["value"] for r in tpu_memory.figures("v5p-8/config", {"record": scanned})}
    assert rows["est. step time (estimate, scanned reading)"] == 2.0
    old = dict(rec, flops_per_step={"analytic": 4e15, "xla": 3.1e15}, est_mfu=0.4)
    del old["est_hfu"]  # written before the model count: its est_mfu counted the recompute
    rows = {r["figure"].split(": ", 1)[1]: r["value"] for r in tpu_memory.figures("k", {"record": old})}
    assert rows["est. HFU (recompute counted, estimate)"] == 40.0 and not any("MFU" in k for k in rows)
    assert rows["FLOPs per step, model / analytic (recompute) / XLA"] == "- / 4000 / 3100"


def test_tpu_memory_record_without_an_xla_time_estimate_shows_a_lower_bound_and_no_mfu():
    """libtpu gives no optimal_seconds for v6e: the step time is the FLOP bound, and no MFU is claimed."""
    from bench import tpu_memory

    rec = dict(per_chip_bytes={"total": 24 * 1024**3}, fits=True, compile_seconds=10.0, est_step_seconds=0.542,
               flops_per_step={"model": 3e15, "analytic": 4e15, "xla": 3.1e15}, xla_seconds=None, est_mfu=None,
               est_hfu=None, hbm_bytes=32 * 1024**3)
    rows = {r["figure"].split(": ", 1)[1]: r["value"] for r in tpu_memory.figures("v6e-8/config", {"record": rec})}
    assert rows["step-time lower bound (FLOP bound; no XLA time estimate)"] == 0.542
    assert rows["FLOPs per step, model / analytic (recompute) / XLA"] == "3000 / 4000 / 3100"
    assert not any("MFU" in k or "HFU" in k or k.startswith("est. step") for k in rows)
    line = tpu_memory.summary("v6e-8/config", {"record": rec, "wall_seconds": 20.0})
    assert "fits=True" in line and "no XLA time estimate" in line and "no MFU estimate" in line


def test_tpu_attention_rows_compare_the_kernels_and_skip_missing_time_estimates():
    from bench import tpu_attention

    row = dict(est_seconds=0.02, flop_bound_seconds=0.01, per_chip_bytes=3 * 2**30)
    rows = {r["figure"].split(": ", 1)[1]: r["value"]
            for r in tpu_attention.figures("v5p-8", 4, 512, {"xla": row, "splash": dict(row, est_seconds=0.015)})}
    assert rows["est. time, xla attention (estimate)"] == 20.0 and rows["est. time, splash attention (estimate)"] == 15.0
    assert rows["est. time splash / xla (estimate)"] == 0.75 and rows["per-chip memory, xla attention"] == 3.0
    rows = {r["figure"].split(": ", 1)[1]: r["value"]  # no optimal_seconds from libtpu: no time, no ratio
            for r in tpu_attention.figures("v6e-8", 2, 512, {"xla": dict(row, est_seconds=None), "splash": row})}
    assert "est. time, xla attention (estimate)" not in rows and not any("/ xla" in k for k in rows)
    # one kernel with FSDP-sharded weights: its own figure names (no ratio without both kernels)
    names = [r["figure"] for r in tpu_attention.figures("v5p-8", 2, 512, {"splash": row}, weights="fsdp")]
    assert names and all("FSDP-sharded weights" in n for n in names) and not any("/ xla" in n for n in names)


HLO = """HloModule jit_fn, is_scheduled=true

%fused_computation (p: bf16[8,128]) -> bf16[8,128] {
  ROOT %copy.9 = bf16[8,128]{1,0} copy(%p), backend_config={"estimated_cycles":"999999"}
}

ENTRY %main (param.1: bf16[8,128]) -> bf16[8,128] {
  %param.1 = bf16[8,128]{1,0} parameter(0)
  %fusion.1 = bf16[8,128]{1,0} fusion(%param.1), kind=kOutput, metadata={op_name="jit(fn)/jvp()/dot_general"}, backend_config={"estimated_cycles":"600"}
  %fusion.2 = bf16[8,128]{1,0} fusion(%fusion.1), kind=kOutput, metadata={op_name="jit(fn)/jvp(rope_pair_swap)/dot_general"}, backend_config={"estimated_cycles":"100"}
  %splash.3 = (f32[8,128]{1,0}, bf16[8,128]{1,0}) custom-call(%fusion.2), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
}}, metadata={op_name="jit(fn)/splash_mha_fwd/pallas_call"}, backend_config={"estimated_cycles":"200"}
  %copy.4 = bf16[8,128]{0,1} copy(%fusion.2), metadata={op_name="jit(fn)/jvp()/transpose"}, backend_config={"estimated_cycles":"98"}
  %add.5 = bf16[8,128]{1,0} add(%copy.4, %copy.4), backend_config={"estimated_cycles":"2"}
  ROOT %tuple = (bf16[8,128]{1,0}) tuple(%add.5)
}
"""


def test_tpu_attention_cycle_breakdown_reads_the_entry_instructions_estimated_cycles():
    from bench import tpu_attention

    rows = tpu_attention.cycle_breakdown(HLO)  # the fused computation's instructions are not the program's
    assert [(r["name"], r["kind"], r["cycles"]) for r in rows] == [
        ("fusion.1", "matmul", 600), ("splash.3", "splash", 200), ("fusion.2", "rope swap", 100),
        ("copy.4", "copy: transpose", 98), ("add.5", "add: -", 2)]
    assert tpu_attention.cycle_shares(rows) == {"matmul": 0.6, "splash": 0.2, "rope swap": 0.1, "copy: transpose": 0.098,
                                                "other": 0.002}


HLO_LOOP = """HloModule jit_fn, is_scheduled=true

%fused_computation (p: bf16[8,128]) -> bf16[8,128] {
  ROOT %copy.9 = bf16[8,128]{1,0} copy(%p), backend_config={"estimated_cycles":"999999"}
}

%region_0.body (arg: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %arg = (s32[], bf16[8,128]{1,0}) parameter(0)
  %gte.1 = bf16[8,128]{1,0} get-tuple-element(%arg), index=1
  %fusion.7 = bf16[8,128]{1,0} fusion(%gte.1), kind=kOutput, calls=%fused_computation,
    metadata={op_name="jit(fn)/while/body/double_block/dot_general"}, backend_config={"estimated_cycles":"300"}
  %add.8 = bf16[8,128]{1,0} add(%fusion.7, %fusion.7), metadata={op_name="jit(fn)/while/body/single_block/add"}, backend_config={"estimated_cycles":"40"}
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %t = (s32[], bf16[8,128]{1,0}) tuple(%i, %add.8)
}

%region_1.cond (arg: (s32[], bf16[8,128])) -> pred[] {
  %arg = (s32[], bf16[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT, backend_config={"estimated_cycles":"1"}
}

ENTRY %main (param.1: bf16[8,128]) -> bf16[8,128] {
  %param.1 = bf16[8,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,128]{1,0}) tuple(%zero, %param.1)
  %while.1 = (s32[], bf16[8,128]{1,0}) while(%init), condition=%region_1.cond, body=%region_0.body, backend_config={"estimated_cycles":"5"}
  ROOT %out = bf16[8,128]{1,0} get-tuple-element(%while.1), index=1
}
"""


def test_tpu_attention_cycle_breakdown_reads_loop_bodies_once_with_their_block():
    """With `loops` the instructions of the loops called from the entry count once each (as libtpu's
    estimate counts a loop body), tagged with the flux block whose named scope they carry; the fused
    computation's instructions still do not count."""
    from bench import tpu_attention

    assert [r["name"] for r in tpu_attention.cycle_breakdown(HLO_LOOP)] == ["while.1"]
    rows = tpu_attention.cycle_breakdown(HLO_LOOP, loops=True)
    assert [(r["name"], r["kind"], r["block"], r["cycles"]) for r in rows] == [
        ("fusion.7", "matmul", "double", 300), ("add.8", "add: add", "single", 40), ("while.1", "while: -", "", 5),
        ("lt", "compare: -", "", 1)]
    assert [r["block"] for r in tpu_attention.cycle_breakdown(HLO, loops=True)] == [""] * 5


def test_tpu_memory_cases_merged_on_another_machine_keep_their_own_machine_and_date(tmp_path, monkeypatch):
    """tpu_memory.json gathers cases compiled on different days and machines: merging one must not relabel the rest."""
    from bench import tpu_memory

    rec = dict(per_chip_bytes={"total": 2 * 1024**3}, fits=True, compile_seconds=10.0, hbm_bytes=1)
    path = tmp_path / "tpu_memory.json"
    monkeypatch.setattr(tpu_memory, "cpu_name", lambda: "Intel Xeon")
    tpu_memory.merge(path, "v5p-8/old", {"record": rec})
    monkeypatch.setattr(tpu_memory, "cpu_name", lambda: "AMD EPYC")
    tpu_memory.merge(path, "v5p-8/new", {"record": rec, "date": "2099-01-02 03:04 UTC"})
    rows = {r.figure: r for r in rt.figures(tmp_path)}
    assert "Intel Xeon" in rows["v5p-8/old: fits HBM"].machine and "AMD EPYC" not in rows["v5p-8/old: fits HBM"].machine
    assert "AMD EPYC" in rows["v5p-8/new: fits HBM"].machine and rows["v5p-8/new: fits HBM"].date == "2099-01-02"
    assert rows["v5p-8/old: fits HBM"].date != "2099-01-02"


def test_tpu_matmul_share_of_peak_weights_each_block_shape_by_its_flops():
    from bench import tpu_matmul

    peak = 1e15
    rows = []
    for t, k, n in tpu_matmul.SHAPES["double"]:  # the image stream's matmuls at peak, the text stream's at half
        flops = 2.0 * 2 * t * k * n
        rows.append(dict(tokens=2 * t, k=k, n=n, flops=flops, seconds=flops / peak * (1 if t == tpu_matmul.IMG else 2)))
    img = sum(r["flops"] for r in rows if r["tokens"] == 2 * tpu_matmul.IMG)
    txt = sum(r["flops"] for r in rows) - img
    names = {f["figure"]: f["value"] for f in tpu_matmul.figures("v6e-8", rows, peak, [2])}
    # the single block's shapes are missing: no figure for it; none for an example count not measured
    assert names == {"v6e-8, flux-dev double block matmuls, 2 x 512² per chip: share of peak (libtpu estimate)":
                     round(100 * (img + txt) / (img + 2 * txt), 1)}
    assert tpu_matmul.block_of_peak([dict(r, seconds=None) for r in rows], "double", 2, peak) is None


def test_tpu_memory_rederive_keeps_the_case_and_derives_its_estimates_again(tmp_path, monkeypatch):
    """--rederive: no compile; the recorded v6e-8 case as it was before libtpu's corrected (2, 1) variant was
    accepted (no time) gets its estimate from the figures it kept, and keeps its machine and date."""
    from bench import tpu_memory

    entry = json.loads((ROOT / "bench" / "results" / "tpu_memory.json").read_text())["cases"]["v6e-8/base"]
    rec = entry["record"]
    kept = rec["xla_cost_analysis"]
    old = dict(rec, xla_seconds=None, est_mfu=None, est_hfu=None, est_step_seconds=0.5423,
               xla_cost_analysis={"scanned": kept["scanned"], "variants": [dict(v, seconds=None) for v in kept["variants"]]})
    (tmp_path / "tpu_memory.json").write_text(json.dumps({"cases": {"v6e-8/base": dict(entry, record=old)}}))
    monkeypatch.setattr(tpu_memory, "RESULTS", tmp_path)
    assert tpu_memory.main(["--rederive", "v6e-8/base"]) == 0
    again = json.loads((tmp_path / "tpu_memory.json").read_text())["cases"]["v6e-8/base"]
    assert again["cpu"] == entry["cpu"] and again["date"] == entry["date"] and "rederived" in again
    assert again["record"]["est_mfu"] == pytest.approx(0.2017, abs=1e-4)  # 4 micro-batches x 0.532 s
    assert again["record"]["per_chip_bytes"] == rec["per_chip_bytes"]


def test_tpu_layer_cost_reads_one_block_both_ways(tmp_path, monkeypatch):
    """The smoke run compiles the tiny model for v5p-8 unrolled (1, 2 single blocks) and scanned (4 blocks,
    groups of 1 and 2) and records one block's cost from each: both positive (a second block costs time); with
    `--breakdown` also each block's cycles in a scanned program of 2 + 2 blocks, matmuls among them."""
    from bench import common, tpu_layer_cost

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert tpu_layer_cost.main(["--quick", "--breakdown", "2"]) == 0
    rec = json.loads((tmp_path / "tpu_layer_cost.jsonl").read_text().splitlines()[-1])
    row = rec["row"]
    assert row["block_unrolled_ms"] > 0 and row["block_scanned_ms"] > 0, row
    for block in ("double", "single"):  # each block's loop body, with its matmuls
        cycles = row["loop_cycles"][block]
        assert cycles["cycles"] == sum(cycles["by_kind"].values()) > cycles["by_kind"]["matmul"] > 0, cycles
    assert [f["value"] for f in rec["figures"]] == [row["block_unrolled_ms"], row["block_scanned_ms"]]
    assert "tiny single block" in rec["figures"][0]["figure"]
    assert rec["compiler_options"] == {} and "windowed_einsum" in rec["libtpu_init_args"]  # v5p: libtpu's VMEM default


def test_tpu_layer_cost_gelu_diagnostic_swaps_the_blocks_gelu_and_restores_it():
    """`--gelu identity` traces the blocks without GELU's tanh (what libtpu charges for GELU is the
    difference); the model's GELU is back afterwards, also after an error."""
    import jax

    from bench import tpu_attention, tpu_layer_cost
    from fluxir_jax.models import layers

    def has_tanh():
        fn, args = tpu_attention.blocks_fwd_bwd("tiny", "xla", 1, 64, 16)
        return "tanh" in str(jax.make_jaxpr(fn)(*args))

    real = layers.gelu_tanh
    assert has_tanh()
    with tpu_layer_cost.gelu_as("identity"):
        assert not has_tanh()
    assert layers.gelu_tanh is real and has_tanh()
    with pytest.raises(RuntimeError), tpu_layer_cost.gelu_as("identity"):
        raise RuntimeError
    assert layers.gelu_tanh is real
    figs = tpu_layer_cost.figures("v6e-8", "flux-dev", 8, "save_attention", "fsdp", "single",
                                  {"block_unrolled_ms": 1.0, "block_scanned_ms": 2.0}, "identity")
    assert all("GELU replaced by identity (diagnostic)" in f["figure"] for f in figs)


def test_tpu_vae_cost_compiles_the_steps_vae_work_for_a_tpu_slice(tmp_path, monkeypatch):
    """The smoke run compiles the tiny VAE's step work (two encodes, decode fwd+bwd) for v5p-8 and
    records libtpu's estimate, the FLOP bound and their ratio (a share of peak in (0, 1])."""
    from bench import common, tpu_vae_cost

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert tpu_vae_cost.main(["--quick"]) == 0
    rec = json.loads((tmp_path / "tpu_vae_cost.jsonl").read_text().splitlines()[-1])
    row = rec["row"]
    assert row["flops"] > 0 and row["xla_seconds"] > 0
    assert 0 < row["share_of_peak"] <= 1.0, row
    assert row["flop_bound_seconds"] == pytest.approx(row["flops"] / 4 / 459e12, rel=1e-6)
    assert [f["unit"] for f in rec["figures"]] == ["ms", "ms", "%"]
    assert rec["compiler_options"] == {}  # v5p (libtpu_env.compiler_options)
