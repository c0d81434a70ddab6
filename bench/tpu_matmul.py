"""How close to peak does libtpu's cost model put flux-dev's matmuls, by tokens per chip? Compiled
for TPU slices on this CPU machine (libtpu's compiler, compile-only devices): an upper bound on
what the `--topology` estimates can show for a per-chip micro-batch.

    .venv/bin/python bench/tpu_matmul.py                          # v5p-8 and v6e-8, 1/2/4/8 examples per chip
    .venv/bin/python bench/tpu_matmul.py --accelerators v6e-8 --examples 2 4
    .venv/bin/python bench/tpu_matmul.py --quick                  # one shape, one size, v6e-8 (smoke)

Every matmul of a flux-dev block with weights ([tokens, in] x [in, out], bf16, weights whole on
the chip, one chip's share: no FSDP gathers), for 512^2 examples (1024 image + 512 text tokens
each; a double block runs its image and text streams' matmuls apart, a single block all 1536). Per shape: XLA's FLOPs and bytes accessed and libtpu's optimal_seconds; the figure is the
block's matmul FLOPs at peak over the sum of their optimal_seconds (% of peak, FLOP-weighted),
per kind of block. A training step's MFU estimate cannot pass this figure times model / analytic
FLOPs (remat recompute) while its matmuls run at this size. Estimates from the compiler: no TPU ran.
Appends to bench/results/tpu_matmul.jsonl.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import append_record, cpu_name  # noqa: E402
from fluxir_jax import tpu_topology  # noqa: E402

IMG, TXT = 1024, 512  # tokens per 512^2 example: 64 x 64 latent in 2 x 2 patches; T5 text
H = 3072  # flux-dev hidden size; MLP 4 x
_STREAM = [(H, 3 * H), (H, H), (H, 4 * H), (4 * H, H)]  # qkv, proj, mlp in, mlp out of one stream
# (tokens per example, in, out) of every matmul with weights, per block
SHAPES = {
    "double": [(t, k, n) for t in (IMG, TXT) for k, n in _STREAM],
    "single": [(IMG + TXT, H, 3 * H + 4 * H), (IMG + TXT, H + 4 * H, H)],  # linear1, linear2
}


def measure(accelerator: str, tokens: int, k: int, n: int) -> dict:
    """libtpu's figures for one [tokens, k] x [k, n] bf16 matmul on one chip of the slice."""
    sds = jax.ShapeDtypeStruct
    _, compiled = tpu_topology.compile_for_topology(lambda a, b: a @ b, (sds((tokens, k), jnp.bfloat16),
                                                                        sds((k, n), jnp.bfloat16)),
                                                    accelerator, (1, -1, 1))
    d = tpu_topology.cost_details(compiled, accelerator)
    peak = tpu_topology.parse_accelerator(accelerator).peak_bf16_flops
    flops = 2.0 * tokens * k * n
    return {"tokens": tokens, "k": k, "n": n, "flops": flops, "xla_flops": d["flops"], "xla_bytes": d["bytes"],
            "io_bytes": 2.0 * (tokens * k + k * n + tokens * n), "seconds": d["seconds"],
            "of_peak": None if not d["seconds"] else flops / peak / d["seconds"]}


def block_of_peak(rows: list[dict], block: str, examples: int, peak: float) -> float | None:
    """FLOP-weighted share of peak of a block's matmuls at `examples` per chip (None: a shape is missing
    or has no time)."""
    by_shape = {(r["tokens"], r["k"], r["n"]): r for r in rows}
    mine = [by_shape.get((t * examples, k, n)) for t, k, n in SHAPES[block]]
    if any(r is None or r["seconds"] is None for r in mine):
        return None
    return sum(r["flops"] for r in mine) / peak / sum(r["seconds"] for r in mine)


def figures(accelerator: str, rows: list[dict], peak: float, examples: list[int]) -> list[dict]:
    out = []
    for e in examples:
        for block in SHAPES:
            share = block_of_peak(rows, block, e, peak)
            if share is not None:
                out.append({"figure": f"{accelerator}, flux-dev {block} block matmuls, {e} x 512² per chip: "
                                      "share of peak (libtpu estimate)",
                            "value": round(100 * share, 1), "unit": "%", "repeats": 1})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerators", nargs="+", default=["v5p-8", "v6e-8"])
    ap.add_argument("--examples", nargs="+", type=int, default=[1, 2, 4, 8], help="512^2 examples per chip")
    ap.add_argument("--quick", action="store_true", help="smoke run: the single block's shapes, 1 example, v6e-8")
    args = ap.parse_args(argv)
    blocks = list(SHAPES)
    if args.quick:
        args.accelerators, args.examples, blocks = ["v6e-8"], [1], ["single"]
    jax.config.update("jax_enable_compilation_cache", False)
    for accelerator in args.accelerators:
        t0 = time.perf_counter()
        shapes = sorted({(t * e, k, n) for e in args.examples for b in blocks for t, k, n in SHAPES[b]})
        rows = [measure(accelerator, *shape) for shape in shapes]
        for r in rows:
            print(f"{accelerator} {r['tokens']} x {r['k']} x {r['n']}: {r['seconds']} s, "
                  f"bytes / io {r['xla_bytes'] / r['io_bytes']:.2f}, of peak {r['of_peak']}", flush=True)
        peak = tpu_topology.parse_accelerator(accelerator).peak_bf16_flops
        append_record("tpu_matmul.jsonl", {
            "benchmark": "TPU matmul share of peak (compile-only)", "accelerator": accelerator, "rows": rows,
            "figures": figures(accelerator, rows, peak, args.examples), "compile_seconds": round(time.perf_counter() - t0, 1),
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "device": "no TPU attached: libtpu compile-only on this CPU machine", "date": time.strftime("%Y-%m-%d")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
