"""Ahead-of-time compilation reports: per-chip memory and FLOPs of a jitted function.

    report = compile_report(jitted_fn, *abstract_args)          # lower + compile, no data
    flops = analytic_flops(fn, *abstract_args)                  # from the traced program

`analytic_flops` counts the matrix-multiply and convolution FLOPs of the jaxpr (2 per multiply-
add), descending into sub-programs and multiplying a `scan` body by its trip count, so remat
recomputation and every scanned layer are counted. XLA's `cost_analysis` counts a while-loop
(scan) body only once; `xla_flops_unrolled` corrects for that by compiling variants.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


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


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)  # trip count unknown: once
        else:
            total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
    return total


def analytic_flops(fn: Callable, *args: Any) -> float:
    """Matmul + convolution FLOPs of `fn(*args)` (args may be abstract), scans times their length."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


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
    at (1, 1), (2, 1), (1, 2), give it at any depth without XLA counting a loop body once.
    """
    def cost(d, s):
        jitted, args = build(d, s)
        return _cost_flops(jitted.lower(*args).compile())

    c11 = cost(1, 1)
    per_double = cost(2, 1) - c11 if depth > 1 else 0.0
    per_single = cost(1, 2) - c11 if depth_single > 1 else 0.0
    return c11 + (depth - 1) * per_double + (depth_single - 1) * per_single
