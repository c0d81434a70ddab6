"""XLA attention vs Pallas splash attention in the frozen FLUX blocks, compiled for TPU slices on this
CPU machine (libtpu's compiler, compile-only devices): does the kernel move the paper's run toward
its FLOP bound?

    .venv/bin/python bench/tpu_attention.py                        # v5p-8 and v6e-8 (~2 min of CPU each)
    .venv/bin/python bench/tpu_attention.py --accelerators v5p-8 --examples-per-chip 4
    .venv/bin/python bench/tpu_attention.py --accelerators v5p-8 --examples-per-chip 2 --kinds splash --weights fsdp
    .venv/bin/python bench/tpu_attention.py --quick                # the tiny preset at 64² on v5p-8 (smoke)

One flux-dev double block and one single block (bf16, unrolled), forward and backward with respect
to the input (the frozen base's part of a FluxIR step: no weight gradients), 512^2 (1024 image + 512
text tokens), the configured micro-batch per chip (4 on v5p-8, 2 on v6e-8), batch sharded over the
chips, weights replicated (no FSDP gathers; `--weights fsdp`: sharded by the training rules, as
`model.frozen_sharding: fsdp` does, so each block all-gathers them). Per kernel: the analytic FLOPs (splash's counted inside
the kernel, whose work XLA's cost analysis does not see), XLA's bytes and optimal_seconds per chip,
the estimated time (optimal_seconds + the kernels' FLOPs at peak, as `fluxir train --topology`
does), the FLOP bound and per-chip memory, and where libtpu's estimate puts the time: the
compiled program's instructions carry libtpu's `estimated_cycles` each, summed per kind (matmul,
splash, layout copy, slice, ...) into `cycle_shares` (`--breakdown N` also prints the N costliest
instructions). Estimates from the compiler: no TPU ran. Appends to bench/results/tpu_attention.jsonl.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench.common import append_record, cpu_name  # noqa: E402
from fluxir_jax import aot, parallel, tpu_topology  # noqa: E402
from fluxir_jax.models import presets  # noqa: E402
from fluxir_jax.models.flux import Flux  # noqa: E402

PER_CHIP = {"v5p-8": 4, "v6e-8": 2}  # configs/train/fluxir-dev.yaml: micro-batch 16 over the slice's chips


def blocks_fwd_bwd(model: str, kind: str, batch: int, res: int, txt: int, **overrides):
    """(fn, abstract args): d/d img of one double + one single block of `model`, bf16, unrolled
    (`overrides`: other FluxConfig fields, e.g. depth, scan_layers, remat_policy)."""
    cfg = dataclasses.replace(presets.get(model), **{"depth": 1, "depth_single_blocks": 1, "scan_layers": False,
                                                     "attention": kind, "dtype": "bfloat16", "param_dtype": "bfloat16",
                                                     **overrides})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    tokens = (res // 16) ** 2
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    x = dict(img=S((batch, tokens, cfg.in_channels), bf), img_ids=S((batch, tokens, 3), bf),
             txt=S((batch, txt, cfg.context_in_dim), bf), txt_ids=S((batch, txt, 3), bf), t=S((batch,), bf),
             y=S((batch, cfg.vec_in_dim), bf), guidance=S((batch,), bf))

    def fn(state, x):
        def loss(img):
            out = nnx.merge(graphdef, state)(img, x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])
            return out.astype(jnp.float32).sum()

        return jax.grad(loss)(x["img"])

    return fn, (state, x)


def block_shardings(state, x, weights: str):
    """mesh -> (weight, input) shardings of `blocks_fwd_bwd`'s args: weights sharded by the FSDP rules
    ("fsdp") or whole on every chip ("replicated"), the batch split over the chips."""
    return lambda mesh: (parallel.state_shardings(state, mesh) if weights == "fsdp" else jax.tree.map(lambda _: P(), state),
                         jax.tree.map(lambda _: P("fsdp"), x))


_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")


_HEADER = re.compile(r"(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_CALLED = re.compile(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")


def _computations(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
    """(entry name, {computation name: its instruction lines}) of an HLO module's text; an instruction's
    attributes may continue on the next lines."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = None if line.startswith(" ") else _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY ") else entry
        elif current is not None and re.match(r"\s+(ROOT )?%", line):
            current.append(line)
        elif current:
            current[-1] += " " + line
    return entry, comps


def cycle_breakdown(hlo_text: str, loops: bool = False) -> list[dict]:
    """The entry computation's instructions of a compiled TPU program with libtpu's `estimated_cycles`:
    [{name, opcode, kind, op_name, block, cycles}], costliest first. `loops`: also the instructions of
    the loops' bodies (and conditions, and conditionals' branches) called from it, each counted once, as
    libtpu's estimate counts a loop body. `kind` groups them: `matmul` (any instruction from a
    dot_general but rope's pair swap), `rope swap`, `splash` (the Pallas kernels and their operands'
    reformatting), else the opcode and the JAX op it came from (`copy: transpose`). `block`: "double"
    or "single" for instructions of a flux block (its named scope, `layers.BLOCK_SCOPES`), else ""."""
    from fluxir_jax.models.layers import BLOCK_SCOPES

    entry, comps = _computations(hlo_text)
    names, todo = [], [entry]
    while todo:
        name = todo.pop()
        if name in names or name not in comps:
            continue
        names.append(name)
        if loops:
            for line in comps[name]:
                for m in _CALLED.finditer(line):
                    todo += [m.group(1)] if m.group(1) else [c.strip().lstrip("%") for c in m.group(2).split(",")]
    rows = []
    for line in (line for name in names for line in comps[name]):
        m, cycles = _INSTRUCTION.match(line), re.search(r'"estimated_cycles":"(\d+)"', line)
        if not (m and cycles):
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        if "splash" in op_name or "tpu_custom_call" in line:
            kind = "splash"
        elif "rope_pair_swap" in op_name:
            kind = "rope swap"
        elif "dot_general" in op_name:
            kind = "matmul"
        else:
            kind = f"{m.group(2)}: {op_name.rsplit('/', 1)[-1] or '-'}"
        block = next((b for b, scope in BLOCK_SCOPES.items() if scope in op_name), "")
        rows.append(dict(name=m.group(1), opcode=m.group(2), kind=kind, op_name=op_name, block=block,
                         cycles=int(cycles.group(1))))
    return sorted(rows, key=lambda r: -r["cycles"])


def cycles_by_kind(rows: list[dict]) -> dict[str, int]:
    """The estimated cycles summed per kind, largest first."""
    by_kind = collections.Counter()
    for r in rows:
        by_kind[r["kind"]] += r["cycles"]
    return dict(by_kind.most_common())


def cycle_shares(rows: list[dict]) -> dict[str, float]:
    """Share of the summed estimated cycles per kind (kinds under 0.5% pooled as `other`), largest first."""
    total = sum(r["cycles"] for r in rows) or 1
    shares = {k: v / total for k, v in cycles_by_kind(rows).items() if v / total >= 0.005}
    rest = 1 - sum(shares.values())
    return {k: round(v, 4) for k, v in {**shares, **({"other": rest} if rest > 0 else {})}.items()}


def measure(accelerator: str, kind: str, per_chip: int, res: int, txt: int, model: str,
            weights: str = "replicated", breakdown: int = 0) -> dict:
    acc = tpu_topology.parse_accelerator(accelerator)
    fn, (state, x) = blocks_fwd_bwd(model, kind, per_chip * acc.chips, res, txt)
    mesh = tpu_topology.topology_mesh(accelerator, (1, -1, 1))
    with jax.set_mesh(mesh):
        analytic, kernels = aot.flop_counts(fn, state, x)
    t0 = time.perf_counter()
    rec, compiled = tpu_topology.compile_for_topology(fn, (state, x), accelerator, (1, -1, 1),
                                                      in_shardings=block_shardings(state, x, weights))
    seconds = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
    cycles = cycle_breakdown(compiled.as_text())
    for r in cycles[:breakdown]:
        print(f"  {r['cycles']:>10d} cycles  {r['kind']:<24.24s} {r['name']:<36.36s} {r['op_name'][-70:]}")
    peak = acc.peak_bf16_flops
    est = None if rec.xla_seconds is None else rec.xla_seconds + kernels / (acc.chips * peak)
    return {"kind": kind, "analytic_flops": analytic, "kernel_flops": kernels, "xla_flops_per_chip": ca.get("flops"),
            "xla_bytes_per_chip": ca.get("bytes accessed"), "xla_seconds": rec.xla_seconds, "est_seconds": est,
            "flop_bound_seconds": analytic / (acc.chips * peak), "per_chip_bytes": rec.per_chip_bytes["total"],
            "cycle_shares": cycle_shares(cycles), "compile_seconds": round(seconds, 1)}


def figures(accelerator: str, per_chip: int, res: int, rows: dict[str, dict], weights: str = "replicated") -> list[dict]:
    what = f"{accelerator}, 1 double + 1 single flux-dev block fwd+bwd (dX), {per_chip}/chip, {res}²"
    what += ", FSDP-sharded weights" if weights == "fsdp" else ""
    out = []
    for kind, r in rows.items():
        if r["est_seconds"] is not None:
            out.append({"figure": f"{what}: est. time, {kind} attention (estimate)", "value": r["est_seconds"] * 1e3,
                        "unit": "ms"})
        out.append({"figure": f"{what}: FLOP bound, {kind} attention", "value": r["flop_bound_seconds"] * 1e3, "unit": "ms"})
        out.append({"figure": f"{what}: per-chip memory, {kind} attention", "value": r["per_chip_bytes"] / 2**30,
                    "unit": "GiB"})
    if {"xla", "splash"} <= set(rows) and all(r["est_seconds"] for r in rows.values()):
        out.append({"figure": f"{what}: est. time splash / xla (estimate)",
                    "value": rows["splash"]["est_seconds"] / rows["xla"]["est_seconds"], "unit": "x"})
    return [dict(f, repeats=1) for f in out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerators", nargs="+", default=list(PER_CHIP))
    ap.add_argument("--examples-per-chip", type=int, default=0, help="0: the config's micro-batch per chip")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--kinds", nargs="+", default=["xla", "splash"], choices=["xla", "splash"])
    ap.add_argument("--weights", default="replicated", choices=["replicated", "fsdp"],
                    help="frozen block weights whole on every chip, or sharded by the FSDP rules (all-gathered per block)")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="print the N instructions libtpu estimates costliest (estimated_cycles)")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny preset at 64² on v5p-8")
    args = ap.parse_args(argv)
    if args.quick:
        args.accelerators, args.model, args.res, args.txt = ["v5p-8"], "tiny", 64, 16
    jax.config.update("jax_enable_compilation_cache", False)
    for accelerator in args.accelerators:
        per_chip = args.examples_per_chip or PER_CHIP.get(accelerator, 1)
        rows = {kind: measure(accelerator, kind, per_chip, args.res, args.txt, args.model, args.weights, args.breakdown)
                for kind in args.kinds}
        for kind, r in rows.items():
            print(f"{accelerator} {kind}: {r}", flush=True)
        append_record("tpu_attention.jsonl", {
            "benchmark": "TPU attention (compile-only)", "accelerator": accelerator, "model": args.model,
            "res": args.res, "txt": args.txt, "examples_per_chip": per_chip, "weights": args.weights, "rows": rows,
            "figures": figures(accelerator, per_chip, args.res, rows, args.weights), "cpu": cpu_name(), "cores": os.cpu_count(),
            "device": "no TPU attached: libtpu compile-only on this CPU machine", "date": time.strftime("%Y-%m-%d")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
