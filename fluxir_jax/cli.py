"""`fluxir` command line.

Subcommands are the entry points of the `fluxir.commands` group (setup.cfg):
`NAME = module:register`, where `register(subparsers)` adds the subcommand's parser and sets
`func(args) -> int`. This module imports none of them by name, so the library does not depend
on the converter package that provides some of them. `--help` lists them in `HELP_ORDER`
(setuptools sorts entry points by name); commands not named there follow, sorted.

A `UserError` ends the command with its one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

from fluxir_jax.errors import UserError

COMMAND_GROUP = "fluxir.commands"
HELP_ORDER = ("info", "init", "convert", "compare", "encode-prompts", "degrade", "eval", "convert-iqa", "export-adapter", "train", "gen", "restore", "demo")


def command_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The registered subcommands in help order.

    Every installed distribution is read (not only the first of each name), so that a stale
    `fluxir_jax.egg-info` left in a source checkout, which Python finds before the installed
    metadata when run from that directory, cannot hide commands; the first declaration of a
    name wins.
    """
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == COMMAND_GROUP:
                seen.setdefault(ep.name, ep)
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    return sorted(seen.values(), key=lambda ep: (rank.get(ep.name, len(rank)), ep.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxir", description="FluxGen + FluxIR image restoration on FLUX.1 (JAX/Flax).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in command_entry_points():
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"fluxir {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fluxir {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
