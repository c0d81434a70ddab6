"""What one flux-dev block costs in libtpu's estimate, read two ways, compiled for a TPU slice on this
CPU machine (compile-only: no TPU runs):

    .venv/bin/python bench/tpu_layer_cost.py --accelerator v6e-8 --examples-per-chip 8 --policy save_attention --weights fsdp
    .venv/bin/python bench/tpu_layer_cost.py --accelerator v5p-8 --examples-per-chip 8 --policy none --weights replicated
    .venv/bin/python bench/tpu_layer_cost.py --quick            # the tiny preset on v5p-8 (smoke)

XLA's cost analysis counts a loop body once. `fluxir train --topology` took whole-step figures
from unrolled compiles (F(b+1 blocks) - F(b blocks) per kind of block, `aot.whole_from_details`)
until it switched to the scanned reading below (`aot.scanned_program_cost`). Unrolled, the remat'ed blocks carry jax's CSE barriers (`prevent_cse=True`), and without remat
XLA may fuse across the layer boundary; the program that runs is the scanned loop. This bench reads
one block's cost both ways, for the block kind asked (single or double), bf16, forward + backward
with respect to the input (the frozen base's part of a FluxIR step), splash attention:

- unrolled: optimal_seconds(2 blocks) - optimal_seconds(1 block), scan_layers false;
- scanned: optimal_seconds(4 blocks, 2 per loop body) - optimal_seconds(4 blocks, 1 per loop body):
  a loop body of two blocks against one, both loops running (trip counts 2 and 4). The body of two
  is written out (`FluxConfig.scan_group`), each block writing its own residuals as in the loop of 1;
  records before 2026-12-05 used lax.scan's unroll 2 instead (`scanned_by: unroll`), which writes
  the two blocks' residuals stacked together and read 0.7 ms more for a v6e-8 single block.

The unrolled programs have one block of the other kind besides, the scanned ones none (a 1-block
loop of the other kind could be unrolled whole, and XLA could merge its remat away).
XLA seconds only: the Pallas kernels' FLOPs (counted at peak by `--topology`) are the same on both
sides of each difference. Appends to bench/results/tpu_layer_cost.jsonl.

`--breakdown N` also compiles 2 double + 2 single blocks scanned and sums libtpu's `estimated_cycles`
per block (the blocks' named scopes) and per kind of instruction, loop bodies counted once
(`loop_cycles` in the row; the N costliest instructions of each block printed).

`--gelu identity` is a diagnostic, not a model: the MLP's GELU-tanh replaced by the identity, so
the difference to the real block is what libtpu's model charges for GELU (its forward in the second
projection's input, its derivative in float32 on the backward pass's [tokens, 4C] tensor).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bench.common import append_record, cpu_name  # noqa: E402
from bench.tpu_attention import block_shardings, blocks_fwd_bwd, cycle_breakdown, cycles_by_kind  # noqa: E402
from fluxir_jax import libtpu_env, tpu_topology  # noqa: E402
from fluxir_jax.models.flux import KEEP_GELU_GRAD  # noqa: E402


def seconds(accelerator: str, model: str, batch: int, res: int, txt: int, weights: str, **cfg) -> float:
    """XLA's optimal_seconds per chip of the blocks' fwd+bwd with FluxConfig fields `cfg`."""
    fn, (state, x) = blocks_fwd_bwd(model, "splash", batch, res, txt, **cfg)
    rec, _ = tpu_topology.compile_for_topology(fn, (state, x), accelerator, (1, -1, 1),
                                               in_shardings=block_shardings(state, x, weights))
    if rec.xla_seconds is None:
        raise SystemExit(f"libtpu gave no time estimate for {accelerator} {cfg}")
    return rec.xla_seconds


@contextlib.contextmanager
def gelu_as(kind: str):
    """The blocks' GELU as given: "tanh" (the model's) or "identity" (the `--gelu` diagnostic)."""
    from fluxir_jax.models import layers

    real = layers.gelu_tanh
    if kind == "identity":
        layers.gelu_tanh = lambda x: x
    try:
        yield
    finally:
        layers.gelu_tanh = real


def measure(accelerator: str, model: str, per_chip: int, res: int, txt: int, policy: str, weights: str,
            block: str, gelu: str = "tanh", keep_gelu_grad: str = "none") -> dict:
    batch = per_chip * tpu_topology.parse_accelerator(accelerator).chips
    own, other = ("depth_single_blocks", "depth") if block == "single" else ("depth", "depth_single_blocks")
    run = lambda **cfg: seconds(accelerator, model, batch, res, txt, weights, remat_policy=policy,  # noqa: E731
                                keep_gelu_grad=keep_gelu_grad, **cfg)
    t0 = time.perf_counter()
    with gelu_as(gelu):
        unrolled = [run(scan_layers=False, **{own: n, other: 1}) for n in (1, 2)]
        # none of the other kind: a 1-block loop may be unrolled whole, and XLA may then merge that block's
        # remat with its forward pass (prevent_cse is off in loops)
        scanned = [run(scan_layers=True, scan_group=g, **{own: 4, other: 0}) for g in (1, 2)]
    return {"unrolled_seconds": unrolled, "scanned_seconds": scanned,
            "block_unrolled_ms": (unrolled[1] - unrolled[0]) * 1e3, "block_scanned_ms": (scanned[1] - scanned[0]) * 1e3,
            "scanned_by": "group",
            "compile_seconds": round(time.perf_counter() - t0, 1)}


def loop_cycles(accelerator: str, model: str, per_chip: int, res: int, txt: int, policy: str, weights: str,
                gelu: str = "tanh", keep_gelu_grad: str = "none", top: int = 0) -> dict:
    """Where libtpu's estimate puts one block's time, per kind of block: the scanned program of 2 double
    and 2 single blocks (one block per loop body) with each instruction's `estimated_cycles`, loop
    bodies counted once (`tpu_attention.cycle_breakdown(loops=True)`), summed per block and per kind of
    instruction. `top`: print the N costliest instructions of each block."""
    batch = per_chip * tpu_topology.parse_accelerator(accelerator).chips
    with gelu_as(gelu):
        fn, (state, x) = blocks_fwd_bwd(model, "splash", batch, res, txt, remat_policy=policy, keep_gelu_grad=keep_gelu_grad,
                                        scan_layers=True, depth=2, depth_single_blocks=2)
        _, compiled = tpu_topology.compile_for_topology(fn, (state, x), accelerator, (1, -1, 1),
                                                        in_shardings=block_shardings(state, x, weights))
    rows = cycle_breakdown(compiled.as_text(), loops=True)
    out = {}
    for block in ("double", "single"):
        mine = [r for r in rows if r["block"] == block]
        kinds = cycles_by_kind(mine)
        out[block] = {"cycles": sum(kinds.values()), "by_kind": kinds}
        for r in mine[:top]:
            print(f"  {block:6s} {r['cycles']:>10d} cycles  {r['kind']:<28.28s} {r['name']:<32.32s} {r['op_name'][-60:]}")
    return out


_BY = {"unroll": "", "group": ", 2 blocks per body written out"}  # how the body of 2 was made


def figures(accelerator: str, model: str, per_chip: int, policy: str, weights: str, block: str, row: dict,
            gelu: str = "tanh", keep_gelu_grad: str = "none") -> list[dict]:
    what = f"{accelerator}, one {model} {block} block fwd+bwd (dX), {per_chip}/chip, remat {policy}, {weights} weights"
    if keep_gelu_grad != "none":
        what += f", GELU derivative kept ({keep_gelu_grad})"
    if gelu != "tanh":
        what += f", GELU replaced by {gelu} (diagnostic)"
    return [{"figure": f"{what}: XLA est. from unrolled compiles (estimate)", "value": row["block_unrolled_ms"],
             "unit": "ms", "repeats": 1},
            {"figure": f"{what}: XLA est. from the scanned loop{_BY[row.get('scanned_by', 'unroll')]} (estimate)",
             "value": row["block_scanned_ms"],
             "unit": "ms", "repeats": 1}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerator", default="v6e-8")
    ap.add_argument("--examples-per-chip", type=int, default=8)
    ap.add_argument("--policy", default="save_attention")
    ap.add_argument("--weights", default="fsdp", choices=["fsdp", "replicated"])
    ap.add_argument("--blocks", nargs="+", default=["single"], choices=["single", "double"])
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--gelu", default="tanh", choices=["tanh", "identity"],
                    help="identity: a diagnostic, the MLP's GELU replaced by the identity (what GELU costs)")
    ap.add_argument("--keep-gelu-grad", default="none", choices=KEEP_GELU_GRAD,
                    help="FluxConfig.keep_gelu_grad: blocks that keep the GELU's derivative for the backward pass")
    ap.add_argument("--breakdown", type=int, default=None, metavar="N",
                    help="also compile 2 + 2 scanned blocks and record libtpu's cycles per block and kind of "
                         "instruction (`loop_cycles` in the row); print the N costliest instructions of each block")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny preset at 64² on v5p-8, 1 per chip")
    args = ap.parse_args(argv)
    if args.quick:
        args.accelerator, args.model, args.res, args.txt, args.examples_per_chip = "v5p-8", "tiny", 64, 16, 1
    jax.config.update("jax_enable_compilation_cache", False)
    for block in args.blocks:
        row = measure(args.accelerator, args.model, args.examples_per_chip, args.res, args.txt, args.policy,
                      args.weights, block, args.gelu, args.keep_gelu_grad)
        if args.breakdown is not None and block == args.blocks[0]:  # one program holds both kinds
            row["loop_cycles"] = loop_cycles(args.accelerator, args.model, args.examples_per_chip, args.res, args.txt,
                                             args.policy, args.weights, args.gelu, args.keep_gelu_grad, args.breakdown)
        append_record("tpu_layer_cost.jsonl", {
            "benchmark": "TPU block cost, unrolled vs scanned (compile-only)", "accelerator": args.accelerator,
            "model": args.model, "res": args.res, "txt": args.txt, "examples_per_chip": args.examples_per_chip,
            "policy": args.policy, "weights": args.weights, "block": block, "gelu": args.gelu,
            "keep_gelu_grad": args.keep_gelu_grad, "row": row,
            "figures": figures(args.accelerator, args.model, args.examples_per_chip, args.policy, args.weights, block, row,
                               args.gelu, args.keep_gelu_grad),
            **libtpu_env.compile_settings(tpu_topology.topology_devices(args.accelerator)[0].device_kind), "cpu": cpu_name(), "cores": os.cpu_count(),
            "device": "no TPU attached: libtpu compile-only on this CPU machine", "date": time.strftime("%Y-%m-%d")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
