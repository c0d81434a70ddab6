"""Compile for a Cloud TPU slice from any machine: accelerator names, topologies, per-chip figures.

With `libtpu` installed, `jax.experimental.topologies.get_topology_desc` describes the devices
of a TPU slice without any TPU attached, and `jit(...).lower(...).compile()` over a mesh of
them runs the real TPU compiler: real per-chip `memory_analysis()` and `cost_analysis()`.
Run with `JAX_PLATFORMS=cpu` on a machine without TPUs so JAX does not try to open one.

Accelerator names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores, two per chip
(`v5p-8` is 4 chips, topology `v5p:2x2x1`); `v5litepod-N` (alias `v5e-N`) and `v6e-N` count
chips (`v6e-8` is 8 chips, `v6e:2x4`). A libtpu topology name (`v5p:2x2x4`) is accepted too.

Whole-step FLOPs: XLA's `cost_analysis()` counts the body of a loop (`lax.scan`, a while loop)
once, whatever its trip count, so a program with scanned layers reports the FLOPs of one layer
per scan. `extrapolate_flops` corrects this the way `flux_step_flops` uses it: compile small
*unrolled* variants (every loop a Python loop, `FluxConfig.scan_layers=False`) with each trip
count at 2, then one count at 3 at a time; the differences are the per-iteration FLOPs, and
the whole-step count is F(2, ..., 2) + sum_k (n_k - 2) * (F(.., 3_k, ..) - F(2, ..., 2)). This
assumes every iteration of a loop does the same work (stacked identical blocks); XLA's fusion
choices make it approximate at the 0.1-1% level. It costs 1 + (number of loops) small compiles
instead of one compile of the fully unrolled program (whose compile time grows with depth); a
program no bigger than its largest variant (the tiny preset at base 1) is compiled once, fully
unrolled, instead: exact, and fewer compiles.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fluxir_jax.errors import UserError

GIB = 1024**3
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how Cloud TPU names count, the libtpu name, per-chip HBM and peak."""

    libtpu: str  # prefix of libtpu topology names
    cores_per_chip: int  # what one unit of the accelerator-type suffix counts (2: TensorCores)
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    hbm_bytes: int  # nominal HBM per chip
    peak_bf16_flops: float  # per chip, dense bf16
    hbm_bandwidth: float  # per chip, bytes/s (nominal)
    megacore: bool  # one JAX device per chip spanning both TensorCores
    chips_per_host: int


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 2, 3, 32 * GIB, 275e12, 1228e9, True, 4),
    "v5p": Generation("v5p", 2, 3, 95 * GIB, 459e12, 2765e9, True, 4),
    "v5litepod": Generation("v5e", 1, 2, 16 * GIB, 197e12, 819e9, False, 8),
    "v6e": Generation("v6e", 1, 2, 32 * GIB, 918e12, 1640e9, False, 8),
}
ALIASES = {"v5e": "v5litepod"}
_BY_LIBTPU = {g.libtpu: name for name, g in GENERATIONS.items()}
KNOWN_FORMS = ("v4-<TensorCores> (v4-8 = 4 chips), v5p-<TensorCores> (v5p-8 = 4 chips), v5litepod-<chips> "
               "(or v5e-<chips>), v6e-<chips>, or a libtpu topology such as v5p:2x2x1 or v6e:2x4")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice: `name` as given, its generation key, chip count and libtpu topology name."""

    name: str
    generation: str
    chips: int
    topology: str

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def hbm_bytes(self) -> int:
        return self.spec.hbm_bytes

    @property
    def peak_bf16_flops(self) -> float:
        return self.spec.peak_bf16_flops


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
    """Cloud TPU's default chip grid for a power-of-two chip count (v5p-8: 2x2x1; v6e-8: 2x4)."""
    if chips < 1 or chips & (chips - 1):
        return None
    if dims == 3:
        if chips < 4:
            return None
        if chips == 4:
            return (2, 2, 1)
        shape = [2, 2, 2]  # grow the smallest dimension first, keeping a <= b <= c
        while math.prod(shape) < chips:
            shape[shape.index(min(shape))] *= 2
            shape.sort()
        return tuple(shape)
    a = 1 << (chips.bit_length() - 1) // 2
    return (a, chips // a)


def parse_accelerator(name: str) -> Accelerator:
    """`v5p-8` / `v6e-64` / `v5litepod-16` / `v5p:2x2x1` -> Accelerator; anything else is a UserError."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    if m and m.group(1) in _BY_LIBTPU:
        gen_key = _BY_LIBTPU[m.group(1)]
        grid = tuple(int(v) for v in m.group(2).split("x"))
        if len(grid) == GENERATIONS[gen_key].dims and all(grid):
            return Accelerator(name, gen_key, math.prod(grid), text)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if m:
        gen_key = ALIASES.get(m.group(1), m.group(1))
        gen = GENERATIONS.get(gen_key)
        if gen is not None and int(m.group(2)) % gen.cores_per_chip == 0:
            chips = int(m.group(2)) // gen.cores_per_chip
            grid = _grid(chips, gen.dims)
            if grid is not None:
                return Accelerator(name, gen_key, chips, f"{gen.libtpu}:{'x'.join(map(str, grid))}")
    raise UserError(f"unknown TPU accelerator {name!r}; known forms: {KNOWN_FORMS}")


# device_kind prefixes (lower case) of each generation, most specific first; real v5p chips report
# "TPU v5p" or "TPU v5" (libtpu's compile-only devices say "TPU v5")
_KINDS = (("tpu v6", "v6e"), ("tpu v5 lite", "v5litepod"), ("tpu v5e", "v5litepod"), ("tpu v5", "v5p"), ("tpu v4", "v4"))


def accelerator_of(devices, num_slices: int = 1) -> str | None:
    """The Cloud TPU accelerator type of one slice of `devices` (`v5p-8` for 4 v5p chips), or None
    when they are not TPUs of a known generation (CPU, GPU)."""
    devices = list(devices)
    if not devices or devices[0].platform != "tpu" or len(devices) % max(num_slices, 1):
        return None
    kind = str(devices[0].device_kind).lower()
    gen_key = next((g for prefix, g in _KINDS if kind.startswith(prefix)), None)
    if gen_key is None:
        return None
    return f"{gen_key}-{len(devices) // max(num_slices, 1) * GENERATIONS[gen_key].cores_per_chip}"


def same_slice(a: str, b: str) -> bool:
    """Whether two accelerator names (`v5e-8` and `v5litepod-8`, `v5p-8` and `v5p:2x2x1`) are one slice."""
    x, y = parse_accelerator(a), parse_accelerator(b)
    return (x.generation, x.chips) == (y.generation, y.chips)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of the slice `name` (`num_slices` copies joined over DCN)."""
    from jax.experimental import topologies

    acc = parse_accelerator(name)
    spec = acc.spec
    grid = [int(v) for v in acc.topology.split(":")[1].split("x")]
    host = (2, 2, 1) if spec.dims == 3 else ((grid[0], grid[1], 1) if acc.chips <= spec.chips_per_host else (2, 2, 1))
    kwargs: dict[str, Any] = dict(chips_per_host_bounds=host)
    if spec.megacore:
        kwargs["chip_config_name"] = "megacore"
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=acc.topology, **kwargs)
    except (ImportError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot describe TPU topology {acc.topology} ({name}): {first} "
                        "(is libtpu installed? `pip install \".[tpu]\"`)") from None
    return list(desc.devices)


def _fill(shape, n: int) -> tuple[int, ...]:
    shape = list(shape)
    if shape.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or n % known:
            raise UserError(f"mesh shape {tuple(shape)} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise UserError(f"mesh shape {tuple(shape)} has {math.prod(shape)} devices, the slice has {n}")
    return tuple(shape)


def topology_mesh(name: str, mesh_shape=(1, -1, 1), axis_names=MESH_AXES, num_slices: int = 1) -> Mesh:
    """A mesh (Auto axes) over the TPU devices of `name`; -1 fills; with slices, the first axis spans them."""
    devices = topology_devices(name, num_slices)
    shape = _fill(mesh_shape, len(devices))
    from jax.experimental import mesh_utils

    if num_slices > 1:
        if shape[0] % num_slices:
            raise UserError(f"mesh axis {axis_names[0]} = {shape[0]} must be a multiple of num_slices {num_slices}")
        ici = (shape[0] // num_slices, *shape[1:])
        dcn = (num_slices,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class CompileRecord:
    """What the TPU compiler says about one program on one slice (per chip unless named)."""

    accelerator: str
    topology: str
    chips: int
    num_slices: int
    device_kind: str
    mesh: dict[str, int]
    per_chip_bytes: dict[str, int]  # arguments, temporaries, outputs, code, aliased, total, host_*
    hbm_bytes: int
    fits: bool
    flops: float  # XLA's count for the program one chip runs (loop bodies counted once)
    xla_seconds: float | None  # XLA's own estimate (cost_analysis "optimal_seconds"), if reported
    compile_seconds: float
    libtpu_init_args: str = ""  # LIBTPU_INIT_ARGS the compiler ran with (libtpu_env.LIBTPU_FLAGS)
    compiler_options: dict = dataclasses.field(default_factory=dict)  # per-compile options (libtpu_env.compiler_options)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _to_shardings(mesh: Mesh, specs):
    """PartitionSpec leaves -> NamedSharding on `mesh`; None stays None (let the compiler choose)."""
    if specs is None:
        return None
    if callable(specs):
        return specs(mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s,
        specs, is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None,
    )


def memory_bytes(compiled) -> dict[str, int]:
    """Per-chip bytes from `compiled.memory_analysis()`; total = arguments + outputs + temporaries + code - aliased."""
    m = compiled.memory_analysis()
    get = lambda key: int(getattr(m, key, 0) or 0)  # noqa: E731
    out = dict(
        arguments=get("argument_size_in_bytes"), temporaries=get("temp_size_in_bytes"),
        outputs=get("output_size_in_bytes"), code=get("generated_code_size_in_bytes"),
        aliased=get("alias_size_in_bytes"),
    )
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] + out["code"] - out["aliased"]
    for key in ("argument", "output", "temp"):
        host = get(f"host_{key}_size_in_bytes")
        if host:
            out[f"host_{key}s" if key != "temp" else "host_temporaries"] = host
    return out


# libtpu's cost model has no time for these custom calls and counts each as -1 s in `optimal_seconds`
# (measured with libtpu 0.0.42.1 on v6e, where large FSDP matmuls compile to collective matmuls that
# use them: programs with one report optimal_seconds = S - 1; the same programs on v5p, and smaller
# ones without the call, report S >= 0; test_tpu_topology.py checks it). Whole flux-dev programs
# for v6e hold several, so their optimal_seconds came out negative: no time estimate at all.
UNMODELLED_CUSTOM_CALLS = ("ConcatBitcast",)


def usable_seconds(flops: float, nbytes: float, raw: float | None, unmodelled: int,
                   accelerator: str | None = None) -> float | None:
    """libtpu's `optimal_seconds` (`raw`) as reported when it is not negative; else with one second added
    back per unmodelled custom call, or None when that is not a usable time: negative, or, with
    `accelerator` given, below the compute roofline flops / peak (a bound no schedule beats) or below
    half of bytes / HBM bandwidth (a sentinel this correction does not know; a missed -1 s is many
    times the figures corrected here). Not the full memory roofline: libtpu's `bytes accessed`
    counts traffic to buffers in on-chip memory (VMEM, `S(1)` in the HLO) as well, and v6e's corrected
    figures lie just under bytes / HBM bandwidth (measured with libtpu 0.0.42.1: 0.978 to 0.996 of it
    for the flux-dev train-step variants; 1.000 for single matmuls without the call; v5p: 1.6 to 1.7).
    """
    if raw is None or raw >= 0:
        return raw
    seconds = raw + unmodelled
    spec = parse_accelerator(accelerator).spec if accelerator else None
    if seconds < 0 or (spec and (seconds < 0.99 * flops / spec.peak_bf16_flops
                                 or seconds < 0.5 * nbytes / spec.hbm_bandwidth)):
        return None
    return seconds


def cost_details(compiled, accelerator: str | None = None) -> dict[str, Any]:
    """XLA's cost analysis of a compiled program (loop bodies counted once), per chip.

    `flops`, `bytes` (bytes accessed) and `seconds`: `optimal_seconds` with the -1 s that libtpu
    counts for each call in `UNMODELLED_CUSTOM_CALLS` added back (`unmodelled`: how many; their own
    time is then not counted), or None when there is no usable figure (`usable_seconds`).
    `raw_seconds`: what libtpu reported.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    flops, nbytes = float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))
    raw = analysis.get("optimal_seconds")
    raw = None if raw is None else float(raw)
    unmodelled = 0
    if raw is not None and raw < 0:
        text = compiled.as_text() or ""
        unmodelled = sum(text.count(f'custom_call_target="{name}"') for name in UNMODELLED_CUSTOM_CALLS)
    seconds = usable_seconds(flops, nbytes, raw, unmodelled, accelerator)
    return {"flops": flops, "bytes": nbytes, "seconds": seconds, "raw_seconds": raw, "unmodelled": unmodelled}


def cost(compiled, accelerator: str | None = None) -> tuple[float, float | None]:
    """(flops, optimal_seconds or None) per chip, from `cost_details`."""
    c = cost_details(compiled, accelerator)
    return c["flops"], c["seconds"]


@contextlib.contextmanager
def _without_persistent_cache():
    """Compile-only executables cannot be read back from JAX's persistent cache (there is no TPU
    client to load them): keep them out of it, then restore the cache as it was."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache decides once per process whether it is used
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def compile_for_topology(
    fn: Callable,
    abstract_args: tuple,
    accelerator: str,
    mesh_shape=(1, -1, 1),
    *,
    axis_names=MESH_AXES,
    in_shardings=None,
    out_shardings=None,
    donate_argnums=(),
    static_argnums=(),
    num_slices: int = 1,
    compiler_options: dict | None = None,
) -> tuple[CompileRecord, Any]:
    """Compile `fn(*abstract_args)` for the TPU slice `accelerator` over a mesh; returns (record, compiled).

    `abstract_args` are arrays or `jax.ShapeDtypeStruct`s. `in_shardings` / `out_shardings` are
    pytrees of `PartitionSpec` (over `axis_names`), `NamedSharding`s, None (the compiler
    chooses), or a callable `mesh -> shardings`. `fn` is traced under `jax.set_mesh(mesh)`, so
    code that reads the current mesh (splash attention's shard_map) sees the TPU mesh. `compiler_options`
    default to the chip's (`libtpu_env.compiler_options`); the record names them.
    """
    from fluxir_jax import libtpu_env

    acc = parse_accelerator(accelerator)
    mesh = topology_mesh(accelerator, mesh_shape, axis_names, num_slices)
    if compiler_options is None:
        compiler_options = libtpu_env.mesh_compiler_options(mesh)
    jit_kw: dict[str, Any] = dict(donate_argnums=donate_argnums, static_argnums=static_argnums)
    if in_shardings is not None:
        jit_kw["in_shardings"] = _to_shardings(mesh, in_shardings)
    if out_shardings is not None:
        jit_kw["out_shardings"] = _to_shardings(mesh, out_shardings)
    start = time.perf_counter()
    with _without_persistent_cache(), jax.set_mesh(mesh):
        compiled = jax.jit(fn, **jit_kw).lower(*abstract_args).compile(compiler_options=compiler_options)
    seconds = time.perf_counter() - start
    mem = memory_bytes(compiled)
    flops, xla_seconds = cost(compiled, accelerator)
    record = CompileRecord(
        accelerator=str(accelerator), topology=acc.topology, chips=acc.chips * num_slices, num_slices=num_slices,
        device_kind=mesh.devices.flat[0].device_kind, mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        per_chip_bytes=mem, hbm_bytes=acc.hbm_bytes, fits=mem["total"] <= acc.hbm_bytes, flops=flops,
        xla_seconds=xla_seconds, compile_seconds=round(seconds, 3),
        libtpu_init_args=os.environ.get("LIBTPU_INIT_ARGS", ""), compiler_options=dict(compiler_options),
    )
    return record, compiled


# ----------------------------------------------------------------------------- whole-step FLOPs


def extrapolate_flops(flops_at: Callable[[dict[str, int]], float], trip_counts: dict[str, int], base: int = 2) -> dict[str, float]:
    """Whole-program FLOPs of a program whose loops run `trip_counts` times, from small compiles.

    `flops_at(counts)` compiles the program with every loop unrolled at the given trip counts and
    returns XLA's FLOPs (per chip, like `CompileRecord.flops`). Each loop starts at
    min(base, n) iterations; one more iteration of loop k gives its per-iteration FLOPs. XLA's
    count per added block is not perfectly constant (fusion choices); measured on the tiny Flux
    fwd+bwd for v5p-8, base 2 lands 0.2% from the fully unrolled count, base 1 1.2%.
    Returns `total` and `per_<name>` for every loop that needed extrapolating (none when the
    whole program is no bigger than the largest variant: then it is compiled once as it is).
    """
    if any(n < 1 for n in trip_counts.values()):
        raise ValueError(f"trip counts must be >= 1, got {trip_counts}")
    start = {k: min(base, n) for k, n in trip_counts.items()}
    if any(n > start[k] for k, n in trip_counts.items()) and sum(trip_counts.values()) <= sum(start.values()) + 1:
        # the whole program, unrolled, is no bigger than the largest variant: one exact compile instead
        return {"total": flops_at(dict(trip_counts))}
    first = flops_at(start)
    out: dict[str, float] = {}
    total = first
    for k, n in trip_counts.items():
        if n > start[k]:
            per = flops_at({**start, k: start[k] + 1}) - first
            out[f"per_{k}"] = per
            total += (n - start[k]) * per
    out["total"] = total
    return out


def flux_step_flops(step_for_config: Callable, config, accelerator: str, mesh_shape=(1, -1, 1), **compile_kw) -> dict[str, float]:
    """Per-chip FLOPs of a Flux program with the real depths, from unrolled 1- and 2-block compiles.

    `step_for_config(cfg) -> (fn, abstract_args)` builds the program for a FluxConfig; it is
    called with `config` reduced to 2 or 3 double / single blocks and `scan_layers=False`.
    """

    def flops_at(counts):
        cfg = dataclasses.replace(config, depth=counts["double"], depth_single_blocks=counts["single"], scan_layers=False)
        fn, args = step_for_config(cfg)
        return compile_for_topology(fn, args, accelerator, mesh_shape, **compile_kw)[0].flops

    return extrapolate_flops(flops_at, {"double": config.depth, "single": config.depth_single_blocks})


def abstract(tree) -> Any:
    """Arrays / ShapeDtypeStructs -> ShapeDtypeStructs (no data), e.g. `abstract(nnx.state(model))`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
