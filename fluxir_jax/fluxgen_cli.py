"""`fluxir gen CONFIG [key=value ...]`, `fluxir gen select OUT ...` and `fluxir gen ... --topology NAME`.

The command line of FluxGen: generation and selection live in `fluxgen` / `fluxgen_select`, the
TPU compile-only record in `fluxgen_topology`.
"""
from __future__ import annotations

import argparse
import sys

from fluxir_jax import fluxgen, fluxgen_topology
from fluxir_jax import fluxgen_select as fs
from fluxir_jax.errors import UserError
from fluxir_jax.fluxgen_config import load_config


def run(args: argparse.Namespace) -> int:
    if args.config == "select":
        if not args.rest or "=" in args.rest[0]:
            raise UserError("usage: fluxir gen select OUT [key=value ...]")
        summary = fluxgen.run_select(args.rest[0], args.rest[1:])
    else:
        cfg = load_config(args.config, args.rest)
        if args.topology:
            return fluxgen_topology.run(cfg, args.topology)
        summary = fluxgen.run_gen(cfg)
        if "process" in summary:
            print(f"fluxir gen: process {summary['process']} of {summary['processes']} done; "
                  f"run `fluxir gen select {cfg.out}` once every process has finished", file=sys.stderr)
            return 0
    print(fs.format_summary(summary))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gen", help="FluxGen: generate, score, select and degrade training pairs",
        description="fluxir gen CONFIG [key=value ...]: generate images from the empty prompt, score them, keep the "
                    "best and degrade them into LQ/HQ pairs (configs/gen/*.yaml documents every key). "
                    "fluxir gen select OUT [key=value ...]: re-run selection and pairs/ from OUT/pool/ with new "
                    "settings, without generating.")
    p.add_argument("config", help="gen config YAML (configs/gen/...), or `select` followed by OUT")
    p.add_argument("rest", nargs="*", metavar="key=value",
                   help="config overrides (e.g. count=64 select.percentile=10); after `select`: OUT then overrides")
    p.add_argument("--topology", metavar="NAME",
                   help="generate nothing: compile the sample + decode program for this Cloud TPU slice (v5p-8, v6e-8, "
                        "...) from abstract shapes, print the memory/FLOP record and write OUT/compile.json (docs/tpu.md)")
    p.set_defaults(func=run)
