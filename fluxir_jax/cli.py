"""`fluxir` command line.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. A `UserError` ends the command with its one-line
message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fluxir_jax.errors import UserError

# (module exposing register(subparsers), or None with a placeholder help text)
_COMMANDS: list[tuple[str, str, str | None]] = [
    ("info", "fluxir_jax.info", None),
    ("init", "fluxir_jax.init_checkpoint", None),
    ("convert", "convert.cli", None),
    ("compare", "convert.compare", None),
    ("encode-prompts", "convert.text", None),
    ("export-adapter", "fluxir_jax.models.adapter_io", None),
    ("degrade", "fluxir_jax.data.degrade_folder", None),
    ("eval", "fluxir_jax.iqa.eval_cli", None),
    ("convert-iqa", "convert.iqa", None),
    ("gen", "fluxir_jax.fluxgen", None),
    ("train", None, "train the FluxIR adapter (later issue)"),
    ("restore", "fluxir_jax.restore_folder", None),
]


def _placeholder(name: str, text: str):
    def run(args) -> int:
        print(f"fluxir {name}: not available yet; {text}", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxir", description="FluxGen + FluxIR image restoration on FLUX.1 (JAX/Flax).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, text in _COMMANDS:
        if module is not None:
            importlib.import_module(module).register(sub)
        else:
            p = sub.add_parser(name, help=text, description=text)
            p.set_defaults(func=_placeholder(name, text))
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
