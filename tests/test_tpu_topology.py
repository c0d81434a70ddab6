"""Compiling for TPU slices on this CPU machine (libtpu's compiler, compile-only devices)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fluxir_jax import libtpu_env, parallel, tpu_topology
from fluxir_jax.errors import UserError
from fluxir_jax.models.flux import Flux
from tests.models import tiny_flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, chips, topology", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-32", 16, "v4:2x2x4"),
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-16", 8, "v5p:2x2x2"), ("v5p-32", 16, "v5p:2x2x4"), ("v5p-128", 64, "v5p:4x4x4"),
    ("v5litepod-8", 8, "v5e:2x4"), ("v5e-4", 4, "v5e:2x2"), ("v5litepod-16", 16, "v5e:4x4"),
    ("v6e-8", 8, "v6e:2x4"), ("v6e-64", 64, "v6e:8x8"), ("v6e-1", 1, "v6e:1x1"),
    ("v5p:2x2x3", 12, "v5p:2x2x3"),
])
def test_accelerator_names(name, chips, topology):
    acc = tpu_topology.parse_accelerator(name)
    assert (acc.chips, acc.topology) == (chips, topology)


def test_hbm_and_peak_tables():
    gib = 1024**3
    table = {g: (s.hbm_bytes / gib, s.peak_bf16_flops / 1e12) for g, s in tpu_topology.GENERATIONS.items()}
    assert table == {"v4": (32, 275), "v5p": (95, 459), "v5litepod": (16, 197), "v6e": (32, 918)}
    bandwidth = {g: s.hbm_bandwidth / 1e9 for g, s in tpu_topology.GENERATIONS.items()}
    assert bandwidth == {"v4": 1228, "v5p": 2765, "v5litepod": 819, "v6e": 1640}  # GB/s per chip


_CONCAT_BITCAST = """
import json, jax
from jax.sharding import PartitionSpec as P
from fluxir_jax import tpu_topology
w, details = jax.ShapeDtypeStruct((3072, 9216), jax.numpy.bfloat16), {}
for rows in (12288, 24576):
    x = jax.ShapeDtypeStruct((rows, 3072), jax.numpy.bfloat16)
    _, compiled = tpu_topology.compile_for_topology(lambda x, w: x @ w, (x, w), "v6e-8", (1, -1, 1),
                                                    in_shardings=(P("fsdp"), P("fsdp")))
    details[rows] = tpu_topology.cost_details(compiled, "v6e-8")
print(json.dumps(details))
"""


@pytest.mark.parametrize("windowed", [True, False])
def test_v6e_optimal_seconds_without_the_minus_one_per_concat_bitcast(windowed):
    """libtpu's v6e cost model counts each ConcatBitcast custom call (the collective matmuls of large FSDP
    matmuls, XLA's windowed einsums, use them) as -1 s: `cost_details` adds those back. A program whose
    raw optimal_seconds is negative gets a time no lower than its roofline max(FLOPs / peak, bytes /
    bandwidth), and the same matmul below the size that uses the call (raw time, nothing to correct)
    costs about as much. With libtpu_env's flags (no windowed einsums) there is no such call at all."""
    env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
    if windowed:
        env["LIBTPU_INIT_ARGS"] = "--xla_tpu_enable_windowed_einsum_for_all_gather=true"
    out = subprocess.run([sys.executable, "-c", _CONCAT_BITCAST], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    details = json.loads(out.stdout.strip().splitlines()[-1])
    small, big = details["12288"], details["24576"]
    assert small["unmodelled"] == 0 and small["seconds"] == small["raw_seconds"] > 0
    if windowed:
        assert big["raw_seconds"] < 0 and big["unmodelled"] == 1  # without the correction: no v6e time at all
        assert big["seconds"] == pytest.approx(big["raw_seconds"] + 1)
    else:
        assert big["unmodelled"] == 0 and big["seconds"] == big["raw_seconds"] > 0
    spec = tpu_topology.GENERATIONS["v6e"]
    assert big["seconds"] >= max(big["flops"] / spec.peak_bf16_flops, big["bytes"] / spec.hbm_bandwidth)
    assert 0.5 * small["seconds"] < big["seconds"] < 4 * small["seconds"]  # twice the rows: about 1-2x the time


def test_usable_seconds_keeps_corrected_v6e_figures_and_rejects_a_missed_sentinel():
    """libtpu's figures for the flux-dev train step's (2, 1) variant on v6e-8 (bench/results/
    tpu_memory.json): corrected, it lies 2% under bytes / HBM bandwidth (bytes accessed counts
    on-chip traffic too) and is kept; one ConcatBitcast fewer (a -1 s missed) is rejected."""
    flops, nbytes, raw = 13350199099392.0, 162499641344.0, -298.903076171875
    assert tpu_topology.usable_seconds(flops, nbytes, raw, 299, "v6e-8") == pytest.approx(0.0969, abs=1e-4)
    assert nbytes / tpu_topology.GENERATIONS["v6e"].hbm_bandwidth > 0.099  # above the corrected figure
    assert tpu_topology.usable_seconds(flops, nbytes, raw, 298, "v6e-8") is None
    assert tpu_topology.usable_seconds(flops, 0.0, -298.99, 299, "v6e-8") is None  # 10 ms: under the FLOP bound 14.5
    assert tpu_topology.usable_seconds(flops, 0.0, -298.98, 299, "v6e-8") == pytest.approx(0.02, abs=1e-4)
    assert tpu_topology.usable_seconds(flops, nbytes, 0.25, 0, "v6e-8") == 0.25  # not negative: as reported
    assert tpu_topology.usable_seconds(flops, nbytes, None, 0, "v6e-8") is None


@pytest.mark.parametrize("name", ["v7-8", "v5p-6", "v5p-7", "v6e-3", "tpu", "v5p-0", "v5p:2x2", "v6e:2x2x1", ""])
def test_unknown_accelerator_is_user_error_listing_known_forms(name):
    with pytest.raises(UserError, match="known forms: v4-<TensorCores>") as err:
        tpu_topology.parse_accelerator(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, n, kind", [("v5p-8", 4, "TPU v5"), ("v4-8", 4, "TPU v4"), ("v6e-8", 8, "TPU v6 lite"),
                                           ("v5litepod-4", 4, "TPU v5 lite")])
def test_topology_devices(name, n, kind):
    devices = tpu_topology.topology_devices(name)
    assert len(devices) == n and {d.platform for d in devices} == {"tpu"} and devices[0].device_kind == kind


@pytest.mark.parametrize("name", ["v5p-8", "v5p-16", "v4-8", "v6e-8", "v5litepod-4"])
def test_accelerator_of_names_the_slice_its_devices_are(name):
    """A run finds its slice (for the config's slice_knobs) from its devices: the same name back."""
    assert tpu_topology.accelerator_of(tpu_topology.topology_devices(name)) == name
    assert tpu_topology.accelerator_of(tpu_topology.topology_devices(name, num_slices=2), num_slices=2) == name


def test_accelerator_of_other_devices_and_device_kinds():
    class Dev:
        def __init__(self, kind, platform="tpu"):
            self.device_kind, self.platform = kind, platform

    assert tpu_topology.accelerator_of(jax.devices("cpu")) is None  # no TPU: no slice
    assert tpu_topology.accelerator_of([Dev("NVIDIA H100 80GB HBM3", "gpu")] * 8) is None
    assert tpu_topology.accelerator_of([Dev("TPU v5p")] * 4) == "v5p-8"  # real v5p chips may say v5p
    assert tpu_topology.accelerator_of([Dev("TPU v5e")] * 8) == "v5litepod-8"
    assert tpu_topology.accelerator_of([Dev("TPU v7x")] * 8) is None  # a generation without a table entry
    assert tpu_topology.same_slice("v5e-8", "v5litepod-8") and tpu_topology.same_slice("v5p:2x2x1", "v5p-8")
    assert not tpu_topology.same_slice("v5p-8", "v5p-16") and not tpu_topology.same_slice("v5p-8", "v4-8")


def test_multislice_devices_span_slices():
    devices = tpu_topology.topology_devices("v5p-8", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = tpu_topology.topology_mesh("v5p-8", (2, 4, 1), num_slices=2)
    assert {d.slice_index for d in mesh.devices[0].flat} == {0} and {d.slice_index for d in mesh.devices[1].flat} == {1}


def test_mesh_shape_errors():
    with pytest.raises(UserError, match="has 8 devices, the slice has 4"):
        tpu_topology.topology_mesh("v5p-8", (2, 2, 2))
    with pytest.raises(UserError, match="at most one axis"):
        tpu_topology.topology_mesh("v5p-8", (-1, -1, 1))


def _step(cfg, batch=4, train=True):
    """(fn, abstract args, in_shardings) of the tiny Flux forward or gradient step, batch over `data`."""
    gdef = tiny_flux.graphdef(cfg)
    state = tpu_topology.abstract(nnx.state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    x = tpu_topology.abstract(tiny_flux.inputs(batch=batch))
    if train:
        fn = lambda s, x: jax.grad(lambda s: tiny_flux.loss(gdef, s, x))(s)  # noqa: E731
    else:
        fn = lambda s, x: tiny_flux.forward(gdef, s, x)  # noqa: E731
    return fn, (state, x), (None, jax.tree.map(lambda _: P("data"), x))


@pytest.mark.parametrize("train", [False, True], ids=["forward", "fwd+bwd"])
def test_compile_tiny_flux_for_v5p_8(train):
    fn, args, shardings = _step(tiny_flux.config(), train=train)
    record, compiled = tpu_topology.compile_for_topology(fn, args, "v5p-8", (4, 1, 1), in_shardings=shardings)
    print(json.dumps(record.to_json()))
    assert record.device_kind == "TPU v5" and record.chips == 4 and record.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    mem = record.per_chip_bytes
    assert mem["total"] > 0 and mem["arguments"] > 0 and mem["temporaries"] > 0 and mem["code"] > 0
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] + mem["code"] - mem["aliased"]
    assert record.hbm_bytes == 95 * 1024**3 and record.fits
    assert record.flops > 0 and record.xla_seconds is not None and record.xla_seconds > 0
    assert json.loads(json.dumps(record.to_json()))["per_chip_bytes"] == mem


def test_flops_are_per_chip():
    """The batch sharded over 4 chips costs each chip about a quarter of the replicated program."""
    fn, args, shardings = _step(tiny_flux.config(), train=False)
    sharded = tpu_topology.compile_for_topology(fn, args, "v5p-8", (4, 1, 1), in_shardings=shardings)[0].flops
    # the 4 chips on the unused `tensor` axis: with a batch axis, layers.batch_split would split the batch anyway
    replicated = tpu_topology.compile_for_topology(fn, args, "v5p-8", (1, 1, 4))[0].flops
    assert 3.5 < replicated / sharded < 4.5


def test_modulations_are_computed_where_their_fsdp_sharded_kernels_lie():
    """flux.py computes every layer's modulation vectors before the layer loop, from vec split like the
    kernels' input dimension: no chip all-gathers a modulation kernel (a third of a double block's
    weights), in the forward or in a remat'ed backward; only the small partial products are summed."""
    cfg = tiny_flux.config(remat_policy="save_attention")
    c = cfg.hidden_size
    fn, (state, x), _ = _step(cfg, batch=8, train=True)
    _, compiled = tpu_topology.compile_for_topology(
        fn, (state, x), "v5p-8", (1, 4, 1),
        in_shardings=lambda mesh: (parallel.state_shardings(state, mesh), jax.tree.map(lambda _: P("fsdp"), x)))
    gathered = tiny_flux.all_gather_shapes(compiled.as_text())
    assert any(s[-2:] == (c, 4 * c) for s in gathered)  # the MLP kernels are gathered, as FSDP does
    assert not any(s[-2:] == (c, 6 * c) for s in gathered), gathered  # the double blocks' modulation kernels are not


@pytest.mark.slow
def test_scanned_blocks_are_undercounted_and_extrapolation_corrects_it():
    cfg = tiny_flux.config(depth=3, depth_single_blocks=4)

    def step_for(c):  # the forward: the same loop undercount as fwd+bwd, quicker to compile
        fn, args, _ = _step(c, train=False)
        return fn, args

    kw = dict(in_shardings=_step(cfg, train=False)[2])
    scanned = tpu_topology.compile_for_topology(*step_for(cfg), "v5p-8", (4, 1, 1), **kw)[0].flops
    unrolled = tpu_topology.compile_for_topology(*step_for(tiny_flux.config(depth=3, depth_single_blocks=4, scan_layers=False)),
                                                 "v5p-8", (4, 1, 1), **kw)[0].flops
    est = tpu_topology.flux_step_flops(step_for, cfg, "v5p-8", (4, 1, 1), **kw)
    print(f"scanned {scanned:.4g}, unrolled {unrolled:.4g}, extrapolated {est}")
    assert scanned < 0.5 * unrolled  # XLA counts each scan body once
    assert abs(est["total"] - unrolled) / unrolled < 0.01
    assert set(est) == {"per_double", "per_single", "total"}


def test_extrapolation_compiles_a_program_no_bigger_than_its_largest_variant_once():
    calls = []

    def flops_at(counts):  # affine in the block counts, like identical stacked blocks
        calls.append((counts["double"], counts["single"]))
        return 10.0 + 3.0 * counts["double"] + 5.0 * counts["single"]

    assert tpu_topology.extrapolate_flops(flops_at, {"double": 1, "single": 2}, base=1) == {"total": 23.0}
    assert calls == [(1, 2)]  # the tiny preset: the whole program, not (1, 1) then (1, 2)
    calls.clear()
    out = tpu_topology.extrapolate_flops(flops_at, {"double": 19, "single": 38}, base=1)  # flux-dev
    assert out == {"total": 10.0 + 3 * 19 + 5 * 38, "per_double": 3.0, "per_single": 5.0}
    assert calls == [(1, 1), (2, 1), (1, 2)]
    calls.clear()
    assert tpu_topology.extrapolate_flops(flops_at, {"double": 3, "single": 4}, base=2)["per_single"] == 5.0
    assert calls == [(2, 2), (3, 2), (2, 3)]  # 7 blocks: bigger than any variant, extrapolated


def test_unknown_accelerator_in_compile_is_user_error():
    fn, args, _ = _step(tiny_flux.config(), train=False)
    with pytest.raises(UserError, match="unknown TPU accelerator 'v9x-8'"):
        tpu_topology.compile_for_topology(fn, args, "v9x-8")


def test_libtpu_is_quiet_on_a_machine_without_tpu():
    assert not libtpu_env.has_tpu_chips()  # this test is about CPU machines
    env = {k: v for k, v in os.environ.items() if k not in (*libtpu_env.QUIET_DEFAULTS, "JAX_PLATFORMS")}
    code = "import fluxir_jax, jax; from fluxir_jax import tpu_topology; jax.devices(); tpu_topology.topology_devices('v5p-8')"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == ""
    loud = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "TPU_WORKER_HOSTNAMES" in loud.stderr  # what fluxir_jax keeps quiet (libtpu installed, no TPU here)


@pytest.mark.slow
def test_splash_fwd_bwd_compiles_for_v6e_8():
    """attention=splash: the real Mosaic kernel (not interpret mode) inside the v6e program, sharded 2 x 4."""
    fn, args, shardings = _step(tiny_flux.config(attention="splash"), batch=2)
    record, compiled = tpu_topology.compile_for_topology(fn, args, "v6e-8", (2, 1, 4), in_shardings=shardings)
    assert record.device_kind == "TPU v6 lite" and record.chips == 8 and record.per_chip_bytes["total"] > 0
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # Pallas kernels lower to TPU custom calls
    xla_hlo = tpu_topology.compile_for_topology(*_step(tiny_flux.config(), batch=2, train=False)[:2], "v6e-8", (2, 1, 4),
                                                in_shardings=shardings)[1].as_text()
    assert "tpu_custom_call" not in xla_hlo


@pytest.mark.parametrize("user, want", [
    ("", "--xla_tpu_enable_windowed_einsum_for_all_gather=false --xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"),
    ("--xla_tpu_enable_windowed_einsum_for_all_gather=true --xla_other=1",
     "--xla_tpu_enable_windowed_einsum_for_all_gather=true --xla_other=1 "
     "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"),
    ("--noxla_tpu_enable_windowed_einsum_for_reduce_scatter --xla_tpu_enable_windowed_einsum_for_all_gather",
     "--noxla_tpu_enable_windowed_einsum_for_reduce_scatter --xla_tpu_enable_windowed_einsum_for_all_gather"),
])
def test_libtpu_flags_are_defaults_the_user_overrides(monkeypatch, user, want):
    if user:
        monkeypatch.setenv("LIBTPU_INIT_ARGS", user)
    else:
        monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    libtpu_env.default_libtpu_flags()
    assert os.environ["LIBTPU_INIT_ARGS"] == want


def test_compiler_options_by_chip_unless_the_user_names_the_flag(monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_windowed_einsum_for_all_gather=false")
    for kind in ("TPU v6 lite", "TPU v5 lite"):  # 128 MiB of VMEM per core
        assert libtpu_env.compiler_options(kind) == {"xla_tpu_scoped_vmem_limit_kib": "98304"}
    for kind in ("TPU v5", "TPU v4", "cpu"):
        assert libtpu_env.compiler_options(kind) == {}
    assert libtpu_env.mesh_compiler_options(parallel.make_mesh(parallel.MeshConfig(), jax.devices())) == {}
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_scoped_vmem_limit_kib=65536")  # the user's value wins
    assert libtpu_env.compiler_options("TPU v6 lite") == {}


def test_v6e_fusions_compile_with_more_scoped_vmem():
    """A flux-dev LayerNorm + modulation over [8, 1536, 3072] per chip on v6e-8: compiled with the chip's
    options (96 MiB of scoped VMEM) libtpu estimates it well under the same program with its default
    limit, for the same FLOPs; the record names the options."""
    import jax.numpy as jnp

    def ln_mod(x, scale, shift):
        m = x.astype(jnp.float32)
        m = (m - m.mean(-1, keepdims=True)) * jax.lax.rsqrt(m.var(-1, keepdims=True) + 1e-6)
        return (m * (1 + scale[:, None]) + shift[:, None]).astype(x.dtype)

    S = jax.ShapeDtypeStruct
    args = (S((64, 1536, 3072), jnp.bfloat16), S((64, 3072), jnp.bfloat16), S((64, 3072), jnp.bfloat16))
    rec, _ = tpu_topology.compile_for_topology(ln_mod, args, "v6e-8", in_shardings=(P("fsdp"),) * 3)
    plain, _ = tpu_topology.compile_for_topology(ln_mod, args, "v6e-8", in_shardings=(P("fsdp"),) * 3,
                                                 compiler_options={})
    assert rec.compiler_options == {"xla_tpu_scoped_vmem_limit_kib": "98304"} and plain.compiler_options == {}
    assert rec.flops == plain.flops and rec.per_chip_bytes["arguments"] == plain.per_chip_bytes["arguments"]
    assert rec.xla_seconds < 0.7 * plain.xla_seconds  # libtpu 0.0.42.1: 0.185 against 0.370 ms
    v5p, _ = tpu_topology.compile_for_topology(ln_mod, args, "v5p-16", in_shardings=(P("fsdp"),) * 3)
    assert v5p.compiler_options == {}  # other chips: libtpu's default


_FSDP_MATMUL = """
import json, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from fluxir_jax import tpu_topology
x, w = jax.ShapeDtypeStruct((64, 1536, 3072), jnp.bfloat16), jax.ShapeDtypeStruct((3072, 12288), jnp.bfloat16)
rec, compiled = tpu_topology.compile_for_topology(lambda x, w: jnp.einsum("blc,cm->blm", x, w), (x, w), "v6e-8",
                                                  in_shardings=lambda mesh: (P("fsdp"), P("fsdp", None)))
print(json.dumps(dict(loops=compiled.as_text().count(" while("), flops=rec.flops, seconds=rec.xla_seconds,
                      args=rec.libtpu_init_args)))
"""


def test_fsdp_matmuls_compile_without_windowed_einsum_loops_whose_cost_libtpu_counts_once():
    """A flux-dev-sized matmul with its weight split over v6e-8's fsdp axis: with libtpu_env's flags it is an
    all-gather and a matmul whose FLOPs XLA counts in full; with XLA's windowed einsum back on it is a loop
    whose body (2 of 8 weight shards) libtpu counts once: fewer FLOPs than the matmul has, and an estimate
    below the one without the loop although the loop does the same work."""
    per_chip = 2 * (64 // 8) * 1536 * 3072 * 12288
    env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
    runs = {}
    for name, args in (("ours", None), ("windowed", "--xla_tpu_enable_windowed_einsum_for_all_gather=true")):
        run_env = dict(env, **({"LIBTPU_INIT_ARGS": args} if args else {}))
        out = subprocess.run([sys.executable, "-c", _FSDP_MATMUL], env=run_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, windowed = runs["ours"], runs["windowed"]
    assert "--xla_tpu_enable_windowed_einsum_for_all_gather=false" in ours["args"]
    assert ours["loops"] == 0 and ours["flops"] == per_chip
    assert windowed["loops"] == 1 and windowed["flops"] <= 0.75 * per_chip
    assert windowed["seconds"] < ours["seconds"]
