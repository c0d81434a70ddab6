"""Ahead-of-time compilation reports: per-chip memory and FLOPs of a jitted function.

    report = compile_report(jitted_fn, *abstract_args)          # lower + compile, no data
    flops = analytic_flops(fn, *abstract_args)                  # from the traced program

`analytic_flops` counts the matrix-multiply and convolution FLOPs of the jaxpr (2 per multiply-
add), descending into sub-programs and multiplying a `scan` body by its trip count, a `shard_map`
body by its number of shards and a Pallas kernel's body by its grid, so remat recomputation,
every scanned layer and the work inside kernels (splash attention) are counted. XLA's `cost_analysis` counts a while-loop
(scan) body only once; `xla_flops_unrolled` corrects for that by compiling unrolled variants, and
`scanned_program_cost` (the `--topology` records) by compiling scanned ones whose loop bodies hold 1
or 2 blocks.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
from jax.extend import core as jcore

from fluxir_jax.models.layers import PAIR_SWAP_SCOPE


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lc)
    batch = math.prod(lhs.shape[d] for d in lb)
    lfree = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
    rfree = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
    return 2.0 * batch * lfree * rfree * contract


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    kernel_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
    cin_per_group = rhs.shape[dn.rhs_spec[1]]
    return 2.0 * math.prod(out.shape) * kernel_spatial * cin_per_group


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        if isinstance(v, jcore.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jcore.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, jcore.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jcore.Jaxpr):
                    yield x


def _pallas_grid(eqn) -> int:
    """Kernel invocations of a `pallas_call`: the product of its grid (vmap adds a grid dimension)."""
    return math.prod(int(n) for n in eqn.params["grid_mapping"].grid)


def _shards(eqn) -> int:
    """Shards of a `shard_map`: the product of its mesh's sizes over the axes it makes manual."""
    sizes = dict(eqn.params["mesh"].shape)
    return math.prod(int(sizes[a]) for a in eqn.params["newly_manual_axes"])


def _flops(jaxpr) -> tuple[float, float]:
    """(all, inside Pallas kernels) matmul + convolution FLOPs of a jaxpr."""
    total = kernels = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            # rope's pair swap is a permutation written as a matmul (models/layers.py): data movement, not model work
            if PAIR_SWAP_SCOPE not in str(eqn.source_info.name_stack):
                total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "pallas_call":  # the body runs once per grid point; all of it is kernel work
            body = _pallas_grid(eqn) * _flops(eqn.params["jaxpr"])[0]
            total, kernels = total + body, kernels + body
        else:
            if name == "scan":
                parts = [(eqn.params["length"], _flops(eqn.params["jaxpr"].jaxpr))]
            elif name == "cond":  # the costliest branch
                parts = [(1, max(_flops(b.jaxpr) for b in eqn.params["branches"]))]
            elif name == "while":  # trip count unknown: the body once
                parts = [(1, _flops(eqn.params["body_jaxpr"].jaxpr))]
            elif name == "shard_map":  # the body (local shapes) runs once per shard of its manual axes
                parts = [(_shards(eqn), _flops(eqn.params["jaxpr"]))]
            else:
                parts = [(1, _flops(sub)) for sub in _sub_jaxprs(eqn)]
            for times, (t, k) in parts:
                total, kernels = total + times * t, kernels + times * k
    return total, kernels


def jaxpr_flops(jaxpr) -> float:
    return _flops(jaxpr)[0]


def analytic_flops(fn: Callable, *args: Any) -> float:
    """Matmul + convolution FLOPs of `fn(*args)` (args may be abstract) over all devices: scans times their
    length, shard_map bodies times their shards, Pallas kernel bodies times their grid."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def flop_counts(fn: Callable, *args: Any) -> tuple[float, float]:
    """(all, inside Pallas kernels) FLOPs of `fn(*args)`, counted like `analytic_flops`. XLA's
    cost analysis sees none of the kernels' FLOPs (a Pallas kernel is an opaque custom call)."""
    return _flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _cost_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def memory_report(compiled) -> dict[str, int]:
    """Per-chip bytes from XLA's memory analysis: arguments, temporaries, outputs, total."""
    m = compiled.memory_analysis()
    args, temps, outs = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes), int(m.output_size_in_bytes)
    alias = int(getattr(m, "alias_size_in_bytes", 0))
    return {"arguments": args, "temporaries": temps, "outputs": outs, "aliased": alias,
            "total": args + temps + outs - alias}


def compile_report(jitted, *args: Any) -> tuple[Any, dict]:
    """Lower and compile `jitted` for abstract `args`; (compiled, {per_chip_bytes, xla_flops_once, compile_s})."""
    import time

    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"per_chip_bytes": memory_report(compiled), "xla_flops_once": _cost_flops(compiled),
                      "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}


def xla_flops_unrolled(build: Callable[[int, int], tuple[Any, tuple]], depth: int, depth_single: int) -> float:
    """XLA's FLOP count for a model of (depth, depth_single) layers, from unrolled small variants.

    `build(d, s)` returns (jitted, abstract_args) for a model with d double and s single blocks
    *unrolled* (no scan). The count is affine in (d, s) (identical layers), so three compiles,
    at (1, 1), (2, 1), (1, 2), give it at any depth without XLA counting a loop body once
    (`tpu_topology.extrapolate_flops`, base 1); a model no bigger than the largest of them is compiled once,
    as it is (exact).
    """
    from fluxir_jax import tpu_topology

    def cost(counts):
        jitted, args = build(counts["double"], counts["single"])
        return _cost_flops(jitted.lower(*args).compile())

    return tpu_topology.extrapolate_flops(cost, {"double": depth, "single": depth_single}, base=1)["total"]


# ----------------------------------------------------------------------------- TPU slice records

EST_MODEL = ("est_step_seconds = max(analytic FLOPs / (chips * peak bf16 FLOP/s), whole-step XLA optimal_seconds per "
             "chip); est_mfu = model FLOPs / (chips * peak * est_step_seconds) (model FLOPs utilisation: remat "
             "recompute not counted as useful work); est_hfu = the same with analytic FLOPs (recompute included). "
             "All are estimates: no TPU ran.")
FLOP_BOUND = ("est_step_seconds is the FLOP bound, analytic FLOPs / (chips * peak bf16 FLOP/s), a lower bound (an "
              "estimate: no TPU ran), and est_mfu / est_hfu are null (they would be model / analytic and 100% by "
              "construction).")
KNOBS = ("model.remat_policy (full or offload_* keep the least in HBM), model.keep_gelu_grad=none, "
         "mesh.fsdp (shard weights and optimizer state over more chips), model.frozen_sharding=fsdp (frozen weights split, not whole on every chip) and fewer "
         "model.frozen_replicated patterns, "
         "a smaller per-chip batch (batch_size, or optim.accum_steps to keep the global batch), "
         "a bigger slice")


class OutOfHBM(Exception):
    """The TPU compiler refused the program: it needs more HBM than a chip has (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.message, self.seconds = message, seconds
        sizes = [float(v) * {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[u]
                 for v, u in re.findall(r"\(([\d.]+)([KMGT])\)", message)]
        self.required_bytes = int(sizes[0]) if sizes else None


def compile_on(jitted, args, mesh) -> tuple[Any, float]:
    """Compile `jitted` for abstract `args` on a (TPU topology) mesh, outside the persistent cache, with the
    chips' compiler options (`libtpu_env.compiler_options`); (compiled, s).

    Raises OutOfHBM when libtpu's compiler stops because the program does not fit a chip's HBM.
    """
    import time

    from fluxir_jax import libtpu_env, tpu_topology

    t0 = time.perf_counter()
    try:
        with tpu_topology._without_persistent_cache(), jax.set_mesh(mesh):
            compiled = jitted.lower(*args).compile(compiler_options=libtpu_env.mesh_compiler_options(mesh))
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
            raise
        first = next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
        raise OutOfHBM(first, time.perf_counter() - t0) from None
    return compiled, time.perf_counter() - t0


def out_of_hbm_record(accelerator: str, mesh, err: OutOfHBM, method: str, analytic: float, **extra) -> dict:
    """The record of a program the TPU compiler refused for lack of HBM (figures from its message)."""
    from fluxir_jax import libtpu_env, tpu_topology

    acc = tpu_topology.parse_accelerator(accelerator)
    chips = int(mesh.devices.size)
    return {
        "accelerator": accelerator, "topology": acc.topology, "chips": chips,
        "device_kind": mesh.devices.flat[0].device_kind, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "per_chip_bytes": {"arguments": None, "temporaries": err.required_bytes, "outputs": None, "code": None,
                           "total": None},
        "hbm_bytes": acc.hbm_bytes, "fits": False, "compiler_error": err.message,
        "flops_per_step": {"analytic": analytic, "xla": None}, "xla_seconds": None,
        "peak_flops_per_chip": acc.peak_bf16_flops, "est_step_seconds": None, "est_mfu": None,
        "compile_seconds": round(err.seconds, 2), "compiler_options": libtpu_env.mesh_compiler_options(mesh),
        "method": (f"{method} The TPU compiler stopped with RESOURCE_EXHAUSTED: per_chip_bytes.temporaries is the "
                   "requirement it reported (the other figures are unknown); no step estimate for a program that "
                   "cannot run."),
        **extra,
    }


SCAN_DEPTH = 4  # blocks of each kind in the scanned variants: loops of 4 (1 block per body) or 2 (2 blocks) iterations


def counted_blocks(n: int, unroll: int, scanned: bool = True) -> int:
    """How many of a loop's n blocks XLA's cost analysis counts: a while-loop body once (`unroll`
    blocks) plus jax's unrolled remainder (n mod unroll), or all n when nothing is left rolled
    (`scanned` false, unroll 0, fewer than 2 iterations of more than one block; jax's `_scan_impl`)."""
    if not scanned or n == 0 or unroll == 0:
        return n
    trips, rest = divmod(n, unroll)
    if trips == 0 or (unroll != 1 and trips == 1 and rest == 0):
        return n
    return unroll + rest


def scanned_program_cost(main: dict, compile_variant: Callable[[int, int], Any], depth: int, depth_single: int,
                         counted: tuple[int, int], accelerator: str | None = None) -> dict:
    """Per-chip XLA FLOPs and optimal_seconds of the program at full depth, read off the scanned program.

    `main` is `tpu_topology.cost_details` of the program as it runs, at full depth with its loops
    rolled, in which XLA counts `counted` = (double, single) blocks (`counted_blocks`: one loop body
    each). One block's cost per kind is the difference between two loop bodies, of 2 blocks and of 1:
    `compile_variant(group_double, group_single)` returns the compiled program with SCAN_DEPTH
    blocks of each kind, scanned with that many blocks per loop body written out
    (`FluxConfig.scan_group`: each block writes its own residuals, as in the loop of 1 that runs;
    lax.scan's unroll, which records before 2026-12-05 used, stacks them first), at (1, 1), (2, 1)
    and (1, 2) (only the kinds that need it). Whole = main + (n - counted) x one block, per kind
    (`whole_from_scanned`).
    This reads the loop the chips run: an unrolled program can differ (bench/tpu_layer_cost.py,
    docs/tpu.md "One block's cost, read two ways").
    """
    from fluxir_jax import tpu_topology

    need = [depth > counted[0], depth_single > counted[1]]
    groups = ([(1, 1)] if any(need) else []) + [g for g, n in zip(((2, 1), (1, 2)), need) if n]
    details = [{"double": SCAN_DEPTH, "single": SCAN_DEPTH, "group": list(g),
                **tpu_topology.cost_details(compile_variant(*g), accelerator)} for g in groups]
    return whole_from_scanned(main, details, depth, depth_single, counted)


def whole_from_scanned(main: dict, details: list[dict], depth: int, depth_single: int,
                       counted: tuple[int, int]) -> dict:
    """`scanned_program_cost`'s figures from the `cost_details` of the main program and its variants
    (each with `group`, the [double, single] blocks per loop body it was compiled with, or, in
    records made before 2026-12-05, `unroll`, the lax.scan unrolls)."""
    by_variant = {tuple(d["group"] if "group" in d else d["unroll"]): d for d in details}
    grow = [(n - c, u) for n, c, u in ((depth, counted[0], (2, 1)), (depth_single, counted[1], (1, 2))) if n > c]

    def total(key):
        return main[key] + sum(extra * (by_variant[u][key] - by_variant[(1, 1)][key]) for extra, u in grow)

    # libtpu gives no usable optimal_seconds for some programs: then no XLA time estimate, not a zero one
    timed = all(d["seconds"] is not None for d in [main, *details])
    return {"flops": total("flops"), "seconds": total("seconds") if timed else None, "reading": "scanned",
            "block_variant": "unroll" if any("unroll" in d for d in details) else "group",
            "variants": len(details), "counted": list(counted), "exact": not grow,
            "unmodelled": sum(d["unmodelled"] for d in [main, *details]) if timed else 0, "main": main,
            "details": details}


def whole_from_details(details: list[dict], depth: int, depth_single: int, base: int = 1) -> dict:
    """Whole-program figures of the *unrolled* reading, which records made before the scanned one
    kept (`rederive`): from the `cost_details` of unrolled variants (each with `double` and `single`,
    the block counts it was compiled with) at (b, b), (b + 1, b), (b, b + 1), extrapolated per kind
    (`tpu_topology.extrapolate_flops`), or one exact compile at full depth."""
    from fluxir_jax import tpu_topology

    by_counts = {(d["double"], d["single"]): d for d in details}

    def at(counts):
        return by_counts[(counts["double"], counts["single"])]

    trips = {"double": depth, "single": depth_single}
    flops = tpu_topology.extrapolate_flops(lambda c: at(c)["flops"], trips, base)
    # libtpu gives no usable optimal_seconds for some programs: then no XLA time estimate, not a zero one
    timed = all(d["seconds"] is not None for d in details)
    seconds = tpu_topology.extrapolate_flops(lambda c: at(c)["seconds"], trips, base)["total"] if timed else None
    return {"flops": flops["total"], "seconds": seconds, "reading": "unrolled", "variants": len(details), "base": base,
            "exact": list(by_counts) == [(depth, depth_single)],
            "unmodelled": sum(d["unmodelled"] for d in details) if timed else 0, "details": details}


def _derivation(whole: dict, repeat: int) -> str:
    """How `whole`'s figures were made, for a record's `method`."""
    micro = f" x {repeat} micro-batches" if repeat > 1 else ""
    if whole.get("reading") == "scanned":
        if whole.get("exact"):
            return f"are those of the compiled program (every block counted){micro}"
        d, s = whole["counted"]
        return ("are read off the scanned program, the one the chips run: XLA's figures for it at full depth "
                f"{'(one micro-batch, compiled apart) ' if repeat > 1 else ''}count {d} double and {s} single "
                "blocks (one loop body each), and every other block adds one block's cost, the difference between "
                f"a loop body of 2 blocks and of 1 ({whole.get('variants', 0)} compiles with {SCAN_DEPTH} blocks of "
                + ("each kind, lax.scan unroll (double, single) = (1, 1), (2, 1), (1, 2))"
                   if whole.get("block_variant") == "unroll" else
                   "each kind, blocks per loop body written out (double, single) = (1, 1), (2, 1), (1, 2): "
                   "FluxConfig.scan_group)")
                + (f"{micro} (the once-per-step optimizer update is then counted {repeat} times: a small overcount)"
                   if repeat > 1 else ""))
    if whole.get("exact"):
        return ("come from one compile of the whole step with its blocks unrolled (exact: no bigger than the "
                f"extrapolation's largest variant){micro}")
    return (f"are extrapolated from {whole.get('variants', 0)} unrolled compiles (double, single blocks) = "
            f"(b, b), (b+1, b), (b, b+1), b = {whole.get('base')} (total = F(b,b) + (n-b) x per-block "
            f"difference, per kind of block){micro} (the unrolled reading: docs/tpu.md)")


def step_estimates(analytic: float, model: float, chips: int, peak: float, whole: dict | None, repeat: int = 1,
                   fits: bool = True, kernel_flops: float = 0.0, not_derived: str = "") -> dict:
    """Whole-step XLA figures and the step-time / MFU estimates of a `--topology` record, and how they were made.

    `whole` is `scanned_program_cost`'s (or, for older records, `whole_from_details`') per-chip
    figures for one of `repeat` identical passes, or None.
    MFU and HFU are given only with an XLA time estimate: without one the step time is the FLOP
    bound, and they would be model / analytic and 100% by construction. `kernel_flops` (whole step,
    all chips) is the work inside Pallas kernels, which XLA's cost analysis does not see: it is
    added to XLA's FLOPs, and to its seconds at the chip's peak rate (optimistic: kernels run below peak;
    XLA's figure already holds the kernels' operand traffic).
    """
    bound = analytic / (chips * peak)
    xla_flops = xla_seconds = None
    if whole is not None:
        xla_flops = repeat * whole["flops"] * chips + kernel_flops
        xla_seconds = None if whole["seconds"] is None else repeat * whole["seconds"] + kernel_flops / (chips * peak)
        derived = _derivation(whole, repeat)
        how = (f"flops_per_step.xla: XLA cost_analysis per chip x {chips} chips. XLA counts a scanned loop body once, so "
               f"the whole-step xla figures (flops, xla_seconds) {derived}; xla_seconds is per chip (the chips run in "
               f"parallel). ")
        if kernel_flops:
            how += (f"Pallas kernels (splash attention) are custom calls whose work XLA's cost analysis does not see: "
                    f"their FLOPs ({kernel_flops:.4g} over all chips, counted from the kernel bodies x their grids) are "
                    f"added to flops_per_step.xla{' and their time at the peak bf16 rate (optimistic: kernels run below peak) to xla_seconds' if xla_seconds is not None else ''}. ")
        if xla_seconds is not None and whole.get("unmodelled"):
            how += (f"libtpu's optimal_seconds counted {whole['unmodelled']} ConcatBitcast custom calls (the buffers of "
                    "collective matmuls) as -1 s each; those seconds were added back (their own time is not "
                    "counted: tpu_topology.cost_details). ")
        how += ("libtpu's cost analysis gave no optimal_seconds for this chip, so xla_seconds is null, "
                + FLOP_BOUND) if xla_seconds is None else EST_MODEL
    else:
        why = not_derived or ("it does not fit" if not fits else "")
        how = "The whole-step xla figures were not derived (null) " + (f"because {why}; " if why else "") + "so " + FLOP_BOUND
    est = bound if xla_seconds is None else max(bound, xla_seconds)
    timed = xla_seconds is not None and est > 0
    return {"xla_flops": xla_flops, "xla_seconds": xla_seconds, "est_step_seconds": est,
            "est_mfu": model / (chips * peak * est) if timed else None,
            "est_hfu": analytic / (chips * peak * est) if timed else None, "how": how}


def topology_record(accelerator: str, mesh, compiled, compile_seconds: float, analytic: float, whole: dict | None,
                    method: str, repeat: int = 1, model_flops: float | None = None, kernel_flops: float = 0.0,
                    not_derived: str = "", **extra) -> dict:
    """The `--topology` JSON record of one compiled program (docs/tpu.md describes every key).

    `analytic` is the whole program's FLOPs over all chips (jaxpr count, remat recompute included);
    `model_flops` the same count without remat recompute (the MFU numerator; default `analytic`,
    right for programs without remat); `kernel_flops` the part of `analytic` inside Pallas kernels
    (`flop_counts`), which XLA does not see; `whole` the per-chip XLA
    figures at full depth (`scanned_program_cost`) for one of `repeat` identical passes (micro-batches),
    or None when they were not derived (then the xla figures are None and the estimate is FLOP-bound only).
    """
    from fluxir_jax import libtpu_env, tpu_topology

    acc = tpu_topology.parse_accelerator(accelerator)
    chips = int(mesh.devices.size)
    mem = tpu_topology.memory_bytes(compiled)
    once = tpu_topology.cost_details(compiled, accelerator)
    once_flops, once_seconds = once["flops"], once["seconds"]
    peak = acc.peak_bf16_flops
    fits = mem["total"] <= acc.hbm_bytes
    model = analytic if model_flops is None else model_flops
    est = step_estimates(analytic, model, chips, peak, whole, repeat, fits, kernel_flops, not_derived)
    return {
        "accelerator": accelerator, "topology": acc.topology, "chips": chips,
        "device_kind": mesh.devices.flat[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "per_chip_bytes": mem, "hbm_bytes": acc.hbm_bytes, "fits": fits,
        "flops_per_step": {"analytic": analytic, "model": model, "kernels": kernel_flops, "xla": est["xla_flops"],
                           "xla_scan_body_once": once_flops * chips},
        "xla_seconds": est["xla_seconds"], "xla_seconds_scan_body_once": once_seconds,
        # libtpu's own figures per compile (raw optimal_seconds, ConcatBitcasts added back), for diagnosis
        "xla_cost_analysis": _kept_costs(once, whole),
        "peak_flops_per_chip": peak,
        "est_step_seconds": est["est_step_seconds"], "est_mfu": est["est_mfu"], "est_hfu": est["est_hfu"],
        "compile_seconds": round(compile_seconds, 2),
        **libtpu_env.compile_settings(mesh.devices.flat[0].device_kind),
        "method": (f"{method} flops_per_step.analytic: matmul/conv FLOPs of the jaxpr over all chips, scans times their "
                   f"trip counts, remat recompute included; flops_per_step.model: the same without remat recompute "
                   f"(model FLOPs). {est['how']}"),
        **extra,
    }


def _kept_costs(once: dict, whole: dict | None) -> dict:
    """The libtpu figures a record keeps per compile: the program as compiled (`scanned`), the
    variants, and for the scanned reading the blocks counted and the micro-batch program when it was
    compiled apart (`micro`)."""
    kept = {"scanned": once, "variants": (whole or {}).get("details", [])}
    if whole is not None and whole.get("reading") == "scanned":
        kept["reading"], kept["counted"] = "scanned", whole["counted"]
        if whole["main"] != once:
            kept["micro"] = whole["main"]
    return kept


def rederive(record: dict, depth: int, depth_single: int, repeat: int = 1) -> dict:
    """`record` (a `--topology` record with `xla_cost_analysis`) with its time estimates derived again
    from the libtpu figures it kept (raw optimal_seconds, ConcatBitcast counts, FLOPs, bytes per
    compile) by today's `tpu_topology.usable_seconds`: what compiling it again would give, without the
    compile. `depth`, `depth_single`: the model's blocks; `repeat`: micro-batches per step."""
    from fluxir_jax import tpu_topology

    acc = tpu_topology.parse_accelerator(record["accelerator"])

    def again(d):
        return dict(d, seconds=tpu_topology.usable_seconds(d["flops"], d["bytes"], d["raw_seconds"], d["unmodelled"],
                                                           record["accelerator"]))

    kept = record["xla_cost_analysis"]
    variants = [again(d) for d in kept["variants"]]
    scanned = again(kept["scanned"])
    if kept.get("reading") == "scanned":
        micro = again(kept["micro"]) if "micro" in kept else scanned
        whole = whole_from_scanned(micro, variants, depth, depth_single, tuple(kept["counted"]))
    else:
        whole = whole_from_details(variants, depth, depth_single, min(d["double"] for d in variants)) if variants else None
    fl = record["flops_per_step"]
    est = step_estimates(fl["analytic"], fl.get("model", fl["analytic"]), record["chips"], acc.peak_bf16_flops,
                         whole, repeat, record["fits"], fl.get("kernels", 0.0))
    prefix, sep, _ = record["method"].partition("(model FLOPs). ")
    return {**record, "flops_per_step": {**fl, "xla": est["xla_flops"]}, "xla_seconds": est["xla_seconds"],
            "xla_seconds_scan_body_once": scanned["seconds"],
            "xla_cost_analysis": {**kept, "scanned": scanned, "variants": variants,
                                  **({"micro": whole["main"]} if "micro" in kept else {})},
            "est_step_seconds": est["est_step_seconds"], "est_mfu": est["est_mfu"], "est_hfu": est["est_hfu"],
            "method": f"{prefix}{sep}{est['how']} (Derived again from the recorded libtpu figures: aot.rederive.)"}


def fit_message(record: dict, knobs: str = KNOBS) -> str:
    """One line: why a record does not fit and what would help."""
    gib = 1024**3
    mem = record["per_chip_bytes"]
    hbm = f"{record['hbm_bytes'] / gib:.0f} GiB HBM"
    if mem.get("total") is None:
        need = f"{mem['temporaries'] / gib:.1f} GiB of temporaries" if mem.get("temporaries") else "more"
        what = f"the TPU compiler needs {need} per chip > {hbm} ({record.get('compiler_error', '')})"
    else:
        what = (f"{mem['total'] / gib:.1f} GiB per chip > {hbm} (arguments {mem['arguments'] / gib:.1f}, temporaries "
                f"{mem['temporaries'] / gib:.1f}, outputs {mem['outputs'] / gib:.1f} GiB)")
    return f"does not fit {record['accelerator']}: {what}; knobs that would help: {knobs}"


def write_record(record: dict, path) -> None:
    """Write the record as JSON atomically (temp file + rename)."""
    import json
    import pathlib

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def tpu_topology_fits(compiled, accelerator: str) -> bool:
    """Whether the compiled program's per-chip bytes fit the HBM of `accelerator`'s chips."""
    from fluxir_jax import tpu_topology

    return tpu_topology.memory_bytes(compiled)["total"] <= tpu_topology.parse_accelerator(accelerator).hbm_bytes


def compile_sharded_program(fn: Callable, abstract_params, abstract_batch, accelerator: str, mesh_sizes,
                            method: str, **extra) -> dict:
    """The `--topology` record of an `infer.Engine` program in its sharded mode (gen, restore).

    `mesh_sizes` is an `infer.MeshShape` (one -1 fills the slice); parameters take the engine's
    shardings (`parallel.state_shardings`), the batch (leading axis, global) is split over (data, fsdp), and
    each weight is gathered whole before use as the engine does (`gather_weights`, models/weight_gather.py).
    Only the main program is compiled: its whole-program XLA figures are not derived (see topology_record).
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from fluxir_jax import tpu_topology
    from fluxir_jax.errors import UserError
    from fluxir_jax.models.weight_gather import gather_unscanned, gathering
    from fluxir_jax.parallel import state_shardings

    tpu_topology.parse_accelerator(accelerator)
    sizes = mesh_sizes.resolve(len(tpu_topology.topology_devices(accelerator)))
    mesh = tpu_topology.topology_mesh(accelerator, sizes)
    n = jax.tree.leaves(abstract_batch)[0].shape[0]
    if n % (sizes[0] * sizes[1]):
        raise UserError(f"batch {n} does not split over data x fsdp = {sizes[0] * sizes[1]} chips of {accelerator}")
    param_sh = state_shardings(abstract_params, mesh)  # the engine's sharded mode: one rules table
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    gathered = lambda params, batch: fn(gather_unscanned(params), batch)  # noqa: E731
    jitted = jax.jit(gathered, in_shardings=(param_sh, batch_sh), out_shardings=batch_sh)
    with jax.set_mesh(mesh), gathering(mesh):
        analytic, kernels = flop_counts(gathered, abstract_params, abstract_batch)
    try:
        with gathering(mesh):
            compiled, seconds = compile_on(jitted, (abstract_params, abstract_batch), mesh)
    except OutOfHBM as e:
        return out_of_hbm_record(accelerator, mesh, e, method, analytic, **extra)
    return topology_record(accelerator, mesh, compiled, seconds, analytic, None, method, kernel_flops=kernels, **extra)


def emit_record(record: dict, path, command: str) -> int:
    """Write the record, print it as the last line; 0, or 2 with a one-line reason when it does not fit."""
    import json
    import sys

    if path is not None:
        write_record(record, path)
    print(json.dumps(record), flush=True)
    if not record["fits"]:
        print(f"fluxir {command}: error: {fit_message(record, record.get('knobs', KNOBS))}", file=sys.stderr)
        return 2
    return 0
