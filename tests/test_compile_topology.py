"""`fluxir train CONFIG --compile-only --topology NAME`: the real train step compiled for a TPU slice here."""
import json
import pathlib

import pytest

from fluxir_jax import aot, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
REQUIRED = {"accelerator", "chips", "device_kind", "mesh", "per_chip_bytes", "hbm_bytes", "fits", "flops_per_step",
            "xla_seconds", "est_step_seconds", "est_mfu", "compile_seconds", "method"}


def _run(capsys, *argv):
    rc = cli.main(["train", TINY, *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow  # seven TPU compiles (steps + scanned variants, for XLA's whole-step figures): ~2 min of CPU
def test_tiny_train_step_for_v5p_8(capsys, tmp_path):
    out_file = tmp_path / "sub" / "record.json"
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p-8", "--out", out_file, f"run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert REQUIRED <= set(rec)
    assert "--xla_tpu_enable_windowed_einsum_for_all_gather=false" in rec["libtpu_init_args"]  # libtpu_env.LIBTPU_FLAGS
    assert rec["device_kind"] == "TPU v5" and rec["chips"] == 4 and rec["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert rec["compiler_options"] == {}  # libtpu's defaults on v5p (libtpu_env.compiler_options)
    mem = rec["per_chip_bytes"]
    assert {"arguments", "temporaries", "outputs", "code", "total"} <= set(mem)
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] + mem["code"] - mem["aliased"] > 0
    assert rec["hbm_bytes"] == 95 * 1024**3 and rec["fits"] is True
    flops = rec["flops_per_step"]
    # XLA also counts elementwise work; both count the whole step (no loop body counted once)
    assert 0.9 * flops["analytic"] < flops["xla"] < 1.5 * flops["analytic"], flops
    assert rec["xla_seconds"] > 0 and rec["est_step_seconds"] >= rec["xla_seconds"]
    assert rec["est_step_seconds"] >= flops["analytic"] / (4 * rec["peak_flops_per_chip"])
    # MFU counts model FLOPs (no remat recompute: a separate trace without remat), HFU every FLOP the step runs
    assert 0 < flops["model"] <= flops["analytic"]
    assert rec["est_mfu"] == pytest.approx(flops["model"] / (4 * rec["peak_flops_per_chip"] * rec["est_step_seconds"]))
    assert rec["est_hfu"] == pytest.approx(flops["analytic"] / (4 * rec["peak_flops_per_chip"] * rec["est_step_seconds"]))
    # tiny has 1 double + 2 single blocks: the rolled single loop counts 1 of 2, so one single block's cost
    # comes from two scanned variants (4 blocks of each kind, single loop bodies of 1 and 2 blocks)
    kept = rec["xla_cost_analysis"]
    assert kept["reading"] == "scanned" and kept["counted"] == [1, 1] and "micro" not in kept
    assert [v["group"] for v in kept["variants"]] == [[1, 1], [1, 2]] and "blocks per loop body written out" in rec["method"]
    assert "estimate" in rec["method"] and "read off the scanned program" in rec["method"]
    assert json.loads(out_file.read_text()) == rec
    assert not (tmp_path / "run").exists()  # --out given: nothing in run_dir
    # derived again from the libtpu figures the record keeps: the same estimates as the compile gave
    again = aot.rederive(rec, 1, 2, rec["accum_steps"])
    for key in ("xla_seconds", "est_step_seconds", "est_mfu", "est_hfu", "flops_per_step"):
        assert again[key] == pytest.approx(rec[key]), key
    # two micro-batches of half the batch: the micro-batch step is compiled apart and read the same way,
    # and twice its XLA FLOPs land near the one-batch step's (the optimizer update counted twice)
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p-8", "optim.accum_steps=2", f"run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    two = json.loads(out.strip().splitlines()[-1])
    assert "micro" in two["xla_cost_analysis"] and "x 2 micro-batches" in two["method"]
    assert two["flops_per_step"]["xla"] == pytest.approx(flops["xla"], rel=0.05)
    again = aot.rederive(two, 1, 2, two["accum_steps"])
    assert again["xla_seconds"] == pytest.approx(two["xla_seconds"]) and again["est_mfu"] == pytest.approx(two["est_mfu"])


def test_memory_only_compiles_the_step_once(capsys, tmp_path, monkeypatch):
    """--memory-only: the scanned step's memory and fits from one compile; no unrolled FLOP variants,
    so no XLA whole-step figures and the step-time estimate is the FLOP bound."""
    compiles = []
    compile_on = aot.compile_on
    monkeypatch.setattr(aot, "compile_on", lambda *a, **k: compiles.append(1) or compile_on(*a, **k))
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p-8", "--memory-only", f"run_dir={tmp_path}")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert len(compiles) == 1 and rec["fits"] is True and rec["per_chip_bytes"]["total"] > 0
    assert rec["flops_per_step"]["xla"] is None and rec["xla_seconds"] is None and rec["est_mfu"] is None
    assert rec["est_step_seconds"] == pytest.approx(rec["flops_per_step"]["analytic"] / (4 * rec["peak_flops_per_chip"]))
    assert "because --memory-only was given" in rec["method"]
    rc, out, err = _run(capsys, "--memory-only", f"run_dir={tmp_path}")
    assert rc == 2 and "--memory-only is for --compile-only --topology NAME" in err


def test_slice_knobs_apply_on_their_slice_under_the_command_line(capsys, tmp_path):
    """The config's slice_knobs for the --topology slice are compiled (and named in the record); the
    command line still wins; other slices' knobs and other slices are left alone."""
    knobs = "slice_knobs={v5p-8: [optim.accum_steps=2, model.remat_policy=full, adapter.se_reduction=8], v6e-8: [mesh.fsdp=2]}"
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p:2x2x1", "--memory-only", f"run_dir={tmp_path}",
                        knobs, "model.remat_policy=save_attention")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["slice_knobs"] == ["optim.accum_steps=2", "model.remat_policy=full", "adapter.se_reduction=8"]
    assert (rec["accum_steps"], rec["remat_policy"], rec["mesh"]["fsdp"]) == (2, "save_attention", 4)
    # the knob reached the compiled program: a wider SE bottleneck has more trainable (and AdamW) bytes
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p-8", "--memory-only", f"run_dir={tmp_path}",
                        knobs.replace("se_reduction=8", "se_reduction=4"), "model.remat_policy=save_attention")
    assert rc == 0, err
    wider = json.loads(out.strip().splitlines()[-1])
    assert wider["per_chip_bytes"]["arguments"] > rec["per_chip_bytes"]["arguments"]
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5p-16", "--memory-only", f"run_dir={tmp_path}", knobs)
    assert rc == 0, err
    other = json.loads(out.strip().splitlines()[-1])
    assert other["slice_knobs"] == [] and other["accum_steps"] == 1 and other["remat_policy"] == "none"
    assert other["splash_fused_bwd"] is True and rec["splash_fused_bwd"] is True  # the default, named in the record


@pytest.mark.parametrize("argv, needle", [
    (["--topology", "v9x-8"], "unknown TPU accelerator 'v9x-8'"),
    (["--topology=v5p-8", "mesh.data=3", "mesh.fsdp=1"], "mesh sizes data=3 x fsdp=1 x tensor=1"),
    (["--topology", "v5p-8", "batch_size=6"], "batch_size=6"),
])
def test_bad_topology_or_mesh_exits_2_with_one_line(capsys, tmp_path, argv, needle):
    rc, out, err = _run(capsys, "--compile-only", *argv, f"run_dir={tmp_path}")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_config_that_does_not_fit_exits_2_naming_knobs(capsys, tmp_path):
    """v5e-4 chips have 16 GiB; 2^20 tiny 64^2 crops per step need far more, and the TPU compiler stops
    saying how much (RESOURCE_EXHAUSTED, in seconds). A batch just over the HBM (65536 crops: 16.9 GiB)
    compiles instead, but only after the compiler's rematerialization has tried for ~2 minutes; the
    record's `fits` then comes from the per-chip total (aot.topology_record), the same exit and message."""
    rc, out, err = _run(capsys, "--compile-only", "--topology", "v5litepod-4", "batch_size=1048576", f"run_dir={tmp_path}")
    assert rc == 2, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["fits"] is False and rec["chips"] == 4 and rec["hbm_bytes"] == 16 * 1024**3
    assert rec["compiler_error"].startswith("RESOURCE_EXHAUSTED")
    need = rec["per_chip_bytes"]["temporaries"]  # parsed from the compiler's message
    assert need > 200 * 1024**3 and need > rec["hbm_bytes"]
    assert rec["flops_per_step"]["analytic"] > 0 and rec["est_mfu"] is None
    assert rec["compiler_options"] == {"xla_tpu_scoped_vmem_limit_kib": "98304"}  # libtpu_env.compiler_options
    line = err.strip().splitlines()[-1]
    assert "does not fit v5litepod-4" in line
    for knob in ("model.remat_policy", "mesh.fsdp", "batch_size", "optim.accum_steps"):
        assert knob in line
    assert json.loads((tmp_path / "compile.json").read_text()) == rec


def test_out_of_hbm_message_is_parsed():
    err = aot.OutOfHBM("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                       "(47.63G) exceeds available HBM (31.25G).", 1.0)
    assert err.required_bytes == int(47.63 * 1024**3)


def test_model_flops_leave_remat_recompute_out_on_a_tpu_topology_mesh():
    """The MFU numerator: the step's FLOPs traced without remat (and with XLA attention); full remat
    adds recompute on top of it, splash attention its kernels' recompute.

    `--compile-only --topology` with a remat policy counts analytic and model FLOPs over compile-only
    TPU devices (nothing may run eagerly there); the counts do not depend on the mesh's devices."""
    import jax

    from fluxir_jax import parallel, tpu_topology, train_config
    from fluxir_jax.train_loop import Trainer, step_flops

    cfg = train_config.load(TINY, ["model.remat_policy=full", "mesh.data=4", "mesh.fsdp=1"])
    cpu_mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:4])
    counts = []
    for mesh in (tpu_topology.topology_mesh("v5p-8", (4, 1, 1), parallel.AXES), cpu_mesh):  # 4 chips / 4 CPUs
        counts.append(step_flops(cfg, Trainer(cfg, mesh, abstract=True, log=lambda *a: None), mesh))
    analytic, model, kernels = counts[0]
    assert counts[0] == counts[1] and kernels == 0  # XLA attention: no Pallas kernel
    none = train_config.load(TINY, ["model.remat_policy=none", "mesh.data=4", "mesh.fsdp=1"])
    with jax.set_mesh(cpu_mesh):
        t = Trainer(none, cpu_mesh, abstract=True, log=lambda *a: None)
        assert model == aot.analytic_flops(t.step_fn, *t.abstract_args())  # the step without remat
    assert analytic > model > 0  # + the recomputed block forwards (a few % here: tiny blocks, VAE-heavy step)

    # attention=splash: the analytic count includes the kernels' work (which XLA's cost analysis cannot
    # see: `kernels`); the model count is the same math with XLA attention, so neither remat nor the
    # kernel's own recompute (QK^T and dO V^T again in its backward, 24 tokens padded to 128) is useful work
    splash = train_config.load(TINY, ["model.remat_policy=full", "mesh.data=4", "mesh.fsdp=1", "model.attention=splash"])
    tpu_mesh = tpu_topology.topology_mesh("v5p-8", (4, 1, 1), parallel.AXES)
    s_analytic, s_model, s_kernels = step_flops(splash, Trainer(splash, tpu_mesh, abstract=True, log=lambda *a: None), tpu_mesh)
    assert s_model == model and s_kernels > 0 and s_analytic - s_kernels < analytic < s_analytic

    whole = {"flops": 1e12, "seconds": 0.5, "variants": 3, "base": 1}
    est = aot.step_estimates(s_analytic, s_model, 4, 459e12, whole, repeat=2, kernel_flops=s_kernels)
    assert est["xla_flops"] == 2 * 1e12 * 4 + s_kernels  # XLA's own count of a Pallas kernel is ~0: ours is added
    assert est["xla_seconds"] == pytest.approx(2 * 0.5 + s_kernels / (4 * 459e12))  # at peak: a lower bound
    assert "Pallas kernels" in est["how"]


class _Compiled:
    """Stands in for a compiled program: only its cost analysis (libtpu gives v6e no optimal_seconds)."""

    def __init__(self, flops, seconds, concat_bitcasts=0):
        self.analysis = {"flops": flops} if seconds is None else {"flops": flops, "optimal_seconds": seconds}
        self.text = 'custom-call(), custom_call_target="ConcatBitcast"\n' * concat_bitcasts

    def cost_analysis(self):
        return self.analysis

    def as_text(self):
        return self.text


def _scanned(cost):
    """`aot.scanned_program_cost` for flux-dev's 19 + 38 blocks, rolled (one of each counted), where
    `cost(d, s)` is a compiled program whose XLA figures count d double and s single blocks."""
    from fluxir_jax import tpu_topology

    main = tpu_topology.cost_details(cost(1, 1), "v6e-8")
    return aot.scanned_program_cost(main, cost, 19, 38, (1, 1), accelerator="v6e-8")


@pytest.mark.parametrize("timed", [True, False], ids=["optimal_seconds", "no_optimal_seconds"])
def test_whole_step_estimates_with_and_without_xla_seconds(timed):
    """A chip whose cost analysis has no optimal_seconds gets no XLA time and no MFU, never a zero time."""
    whole = _scanned(lambda d, s: _Compiled(1e12 * (1 + d + 2 * s), 0.01 * (d + s) if timed else None))
    assert whole["flops"] == 1e12 * (1 + 19 + 76) and whole["variants"] == 3 and not whole["exact"]
    chips, peak, analytic, model = 8, 918e12, 4e15, 3e15
    est = aot.step_estimates(analytic, model, chips, peak, whole, repeat=4)
    bound = analytic / (chips * peak)
    assert est["xla_flops"] == 4 * whole["flops"] * chips
    if timed:
        assert whole["seconds"] == pytest.approx(0.01 * 57) and est["xla_seconds"] == pytest.approx(4 * 0.57)
        assert est["est_step_seconds"] == max(bound, est["xla_seconds"])
        assert est["est_mfu"] == pytest.approx(model / (chips * peak * est["est_step_seconds"]))
    else:
        assert whole["seconds"] is None and est["xla_seconds"] is None
        assert est["est_step_seconds"] == bound and est["est_mfu"] is None and est["est_hfu"] is None
        assert "gave no optimal_seconds" in est["how"]


def test_whole_step_seconds_add_back_libtpus_minus_one_per_concat_bitcast():
    """v6e: each compile's optimal_seconds holds -1 s per ConcatBitcast; the whole-step figure does not."""
    def variant(d, s):  # 0.01 s per block, and one ConcatBitcast per block
        return _Compiled(1e9 * (1 + d + 2 * s), 0.01 * (d + s) - (d + s), concat_bitcasts=d + s)

    whole = _scanned(variant)
    assert whole["seconds"] == pytest.approx(0.01 * 57) and whole["unmodelled"] == 2 + 2 + 3 + 3
    est = aot.step_estimates(4e15, 3e15, 8, 918e12, whole, repeat=4)
    assert est["xla_seconds"] == pytest.approx(4 * 0.57) and est["est_mfu"] is not None
    assert "10 ConcatBitcast custom calls" in est["how"]
    # 0.5 s after adding back, below the 1e15 FLOPs at peak (1.09 s): a sentinel it does not know, unusable
    bad = _scanned(lambda d, s: _Compiled(1e15, -1.5, concat_bitcasts=2))
    assert bad["seconds"] is None and bad["unmodelled"] == 0


@pytest.mark.parametrize("n,unroll", [(1, 1), (5, 1), (4, 2), (5, 2), (2, 2), (3, 4), (6, 3), (3, 3), (7, 0)])
def test_counted_blocks_is_what_xla_counts_of_a_scan(n, unroll):
    """XLA's CPU cost analysis of an n-step lax.scan of one matmul, with `unroll`, counts the matmuls
    `counted_blocks` says: a rolled body once, jax's unrolled remainder, or all of them."""
    import jax
    import jax.numpy as jnp

    from fluxir_jax import tpu_topology

    def f(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws, unroll=unroll)[0]

    x, ws = jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((n, 64, 64), jnp.float32)
    flops = tpu_topology.cost_details(jax.jit(f).lower(x, ws).compile())["flops"]
    assert round(flops / (2 * 64**3)) == aot.counted_blocks(n, unroll)
    assert aot.counted_blocks(n, unroll, scanned=False) == n


def test_rederive_gives_the_v6e_flux_dev_step_the_time_its_variants_imply():
    """The v6e-8 flux-dev train step as recorded (libtpu 0.0.42.1, fluxir-dev.yaml's base knobs): the (2, 1)
    variant's corrected optimal_seconds lies 2% under bytes / HBM bandwidth and was once dropped, so
    the step had no estimate; derived again, the three variants give 0.532 s per micro-batch."""
    variants = [dict(double=d, single=s, flops=f, bytes=b, seconds=None, raw_seconds=r, unmodelled=n)
                for d, s, f, b, r, n in [(1, 1, 11518737383424.0, 146227544064.0, -247.91151428222656, 248),
                                         (2, 1, 13350199099392.0, 162499641344.0, -298.903076171875, 299),
                                         (1, 2, 13108082900992.0, 158641537024.0, -257.90362548828125, 258)]]
    scanned = dict(double=None, single=None, flops=17545055698944.0, bytes=266808360960.0, seconds=None,
                   raw_seconds=-290.83941650390625, unmodelled=291)
    rec = {"accelerator": "v6e-8", "chips": 8, "fits": True, "xla_seconds": None, "est_mfu": None,
           "flops_per_step": {"analytic": 3982686012047360.0, "model": 3153825238089728.0, "kernels": 0.0},
           "xla_cost_analysis": {"scanned": scanned, "variants": variants},
           "method": "train step. (model FLOPs). libtpu's cost analysis gave no optimal_seconds"}
    again = aot.rederive(rec, 19, 38, repeat=4)
    per_micro_batch = 0.0884857 + 18 * (0.0969238 - 0.0884857) + 37 * (0.0963745 - 0.0884857)
    assert again["xla_seconds"] == pytest.approx(4 * per_micro_batch, rel=1e-5)
    assert again["est_step_seconds"] == again["xla_seconds"]
    assert again["est_mfu"] == pytest.approx(3153825238089728.0 / (8 * 918e12 * again["xla_seconds"]))
    assert again["method"].startswith("train step. (model FLOPs). flops_per_step.xla") and "no optimal_seconds" not in again["method"]
    assert again["xla_seconds_scan_body_once"] == pytest.approx(0.1606, abs=1e-4)


def _recorded(*keys):
    """The records of bench/results/tpu_memory.json's cases `keys`."""
    cases = json.loads((pathlib.Path(__file__).parents[1] / "bench/results/tpu_memory.json").read_text())["cases"]
    return [cases[k]["record"] for k in keys]


def _assert_rederives(rec):
    """A flux-dev record derived again (`aot.rederive`) gives the step estimate it was recorded with."""
    again = aot.rederive(rec, 19, 38, rec["accum_steps"])
    assert again["est_step_seconds"] == pytest.approx(rec["est_step_seconds"], rel=1e-9)
    return again


def test_rederive_reads_records_whose_variants_were_unrolled_by_lax_scan():
    """Records before 2026-12-05 read a block's cost off lax.scan unroll 2 (variants keyed `unroll`);
    derived again they give the estimate they were recorded with, and say how their variants were made."""
    rec, grouped_rec = _recorded("v6e-8/config@8ed5a7f-unroll", "v6e-8/config@fa7a116-groups")
    assert all("unroll" in v for v in rec["xla_cost_analysis"]["variants"])
    again = aot.rederive(rec, 19, 38, rec["accum_steps"])
    assert again["xla_seconds"] == pytest.approx(rec["xla_seconds"], rel=1e-9)
    assert again["est_mfu"] == pytest.approx(rec["est_mfu"], rel=1e-9)
    assert "lax.scan unroll (double, single)" in again["method"]
    grouped = [dict({k: v for k, v in d.items() if k != "unroll"}, group=d["unroll"]) for d in rec["xla_cost_analysis"]["variants"]]
    main = rec["xla_cost_analysis"]["scanned"]
    old = aot.whole_from_scanned(main, rec["xla_cost_analysis"]["variants"], 19, 38, (1, 1))
    new = aot.whole_from_scanned(main, grouped, 19, 38, (1, 1))
    assert (old["block_variant"], new["block_variant"]) == ("unroll", "group") and new["seconds"] == old["seconds"]
    assert old["seconds"] == pytest.approx(0.1054 + 18 * 0.0163 + 37 * 0.0134, abs=2e-3)  # docs/tpu.md's breakdown
    # the config as recorded on fa7a116: the same main program, its (2, 1) and (1, 2) variants compiled with groups
    assert all("group" in v for v in grouped_rec["xla_cost_analysis"]["variants"])
    again = aot.rederive(grouped_rec, 19, 38, grouped_rec["accum_steps"])
    assert again["est_step_seconds"] == pytest.approx(0.9264, abs=1e-4) and again["est_step_seconds"] < rec["est_step_seconds"]
    assert "blocks per loop body written out" in again["method"]


def test_the_v6e8_config_record_keeps_the_double_blocks_gelu_derivative():
    """The v6e-8 config as shipped (`keep_gelu_grad: double` in its slice_knobs) was compiled with it:
    its record says so, re-derives to its estimate, fits, and estimates a shorter step than the same
    config without it (record `v6e-8/config@fa7a116-groups`), with fewer FLOPs recomputed (the double
    blocks' first MLP projection ran again in the backward pass only for GELU's derivative)."""
    import yaml

    root = pathlib.Path(__file__).parents[1]
    knobs = yaml.safe_load((root / "configs/train/fluxir-dev.yaml").read_text())["slice_knobs"]["v6e-8"]
    assert "model.keep_gelu_grad=double" in knobs
    rec, before = _recorded("v6e-8/config", "v6e-8/config@fa7a116-groups")
    assert rec["keep_gelu_grad"] == "double" and "keep_gelu_grad" not in before and rec["fits"]
    _assert_rederives(rec)
    assert rec["est_step_seconds"] < before["est_step_seconds"] and rec["est_mfu"] > before["est_mfu"]
    assert rec["flops_per_step"]["analytic"] < before["flops_per_step"]["analytic"]
    assert rec["flops_per_step"]["model"] == before["flops_per_step"]["model"]


@pytest.mark.parametrize("key, before_key, want, want_before, mfu", [
    ("v6e-8/config@daf20cc", "v6e-8/config@1cae0eb", 0.8775, 0.8959, 0.489),
    ("v5p-8/config", "v5p-8/config@698613d-groups", 2.3914, 2.4509, 0.718)])
def test_the_config_records_run_splash_fused_backward(key, before_key, want, want_before, mfu):
    """The configs compiled with splash's backward as one kernel (the default since daf20cc; records
    `v6e-8/config@daf20cc`, `v5p-8/config` on 47a81b9) against the same configs with the two-kernel
    backward: the kernels' FLOPs are 7/9 of what they were (forward 2 + backward 5 matmuls against 2 +
    7), the model's FLOPs and the per-chip arguments are the same, and the estimate is shorter. Both
    re-derive to what they say."""
    rec, before = _recorded(key, before_key)
    assert rec["attention"] == before["attention"] == "splash" and rec["fits"] and rec.get("splash_fused_bwd", True)  # older records: the default
    assert rec["flops_per_step"]["kernels"] == pytest.approx(before["flops_per_step"]["kernels"] * 7 / 9, rel=1e-9)
    assert rec["flops_per_step"]["model"] == before["flops_per_step"]["model"]
    assert rec["per_chip_bytes"]["arguments"] == before["per_chip_bytes"]["arguments"]
    for r, w in ((rec, want), (before, want_before)):
        _assert_rederives(r)
        assert r["est_step_seconds"] == pytest.approx(w, abs=1e-4)
    assert rec["est_mfu"] > mfu > before["est_mfu"]


def test_the_v5p8_config_record_reads_the_same_program_with_groups():
    """The v5p-8 config compiled again on 698613d (record `v5p-8/config@698613d-groups`, before splash's
    fused backward) against the record it replaced
    (`v5p-8/config@71e0ecf-unroll`): the same per-chip bytes and the same scanned step (its own
    optimal_seconds); only how one block's cost was read differs (groups of 2 written out instead of
    lax.scan unroll 2), which moves the estimate from 2.70 s to 2.45 s. Both re-derive to what they say."""
    rec, before = _recorded("v5p-8/config@698613d-groups", "v5p-8/config@71e0ecf-unroll")
    assert rec["fits"] and rec["per_chip_bytes"]["temporaries"] == before["per_chip_bytes"]["temporaries"]
    assert rec["per_chip_bytes"]["arguments"] == before["per_chip_bytes"]["arguments"]
    main, main_before = rec["xla_cost_analysis"]["scanned"], before["xla_cost_analysis"]["scanned"]
    assert main["seconds"] == pytest.approx(main_before["seconds"], rel=1e-3)
    assert all("group" in v for v in rec["xla_cost_analysis"]["variants"])
    assert all("unroll" in v for v in before["xla_cost_analysis"]["variants"])
    for r, want in ((rec, 2.451), (before, 2.698)):
        _assert_rederives(r)
        assert r["est_step_seconds"] == pytest.approx(want, abs=1e-3)
    assert rec["est_mfu"] > 0.70 > before["est_mfu"]


def test_the_v6e8_config_record_compiles_with_96_mib_of_scoped_vmem():
    """The v6e-8 config compiled with 96 MiB of scoped VMEM (record `v6e-8/config`: the option
    `libtpu_env.compiler_options` passes with each v6e compile) against the
    same config with libtpu's default (`v6e-8/config@daf20cc`): the same program by its FLOPs (model,
    analytic, kernels) and arguments, a shorter estimate, and both re-derive to what they say."""
    from fluxir_jax import libtpu_env

    rec, before = _recorded("v6e-8/config", "v6e-8/config@daf20cc")
    assert rec["compiler_options"] == libtpu_env.compiler_options("TPU v6 lite") == {"xla_tpu_scoped_vmem_limit_kib": "98304"}
    assert not before.get("compiler_options") and "scoped_vmem" not in before["libtpu_init_args"] + rec["libtpu_init_args"]
    for key in ("analytic", "model", "kernels"):
        assert rec["flops_per_step"][key] == before["flops_per_step"][key], key
    assert rec["per_chip_bytes"]["arguments"] == before["per_chip_bytes"]["arguments"] and rec["fits"]
    for r in (rec, before):
        _assert_rederives(r)
    assert rec["est_step_seconds"] < before["est_step_seconds"] and rec["est_mfu"] > before["est_mfu"]
