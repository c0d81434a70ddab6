"""The `fluxir` console script: registered subcommands, uniform option names, exit codes."""
import argparse
import configparser
import pathlib
import subprocess
import sys

import pytest

from fluxir_jax import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_registered_subcommands_in_order():
    out = subprocess.run([sys.executable, "-m", "fluxir_jax.cli", "--help"], capture_output=True, text=True, check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(cli.HELP_ORDER), out


def test_every_entry_point_is_ordered_and_loads():
    """setup.cfg's fluxir.commands group and cli.HELP_ORDER name the same commands; each loads."""
    cfg = configparser.ConfigParser()
    cfg.read(pathlib.Path(__file__).resolve().parents[1] / "setup.cfg")
    group = cfg["options.entry_points"][cli.COMMAND_GROUP]
    declared = {line.split("=")[0].strip() for line in group.splitlines() if line.strip()}
    assert declared == set(cli.HELP_ORDER)
    assert [ep.name for ep in cli.command_entry_points()] == list(cli.HELP_ORDER)
    assert set(_subparsers(cli.build_parser())) == declared


def test_output_and_input_options_are_uniform():
    """Every subcommand that writes a file or folder takes -o/--out; input folders are --input."""
    for name, p in _subparsers(cli.build_parser()).items():
        flags = {s for a in p._actions for s in a.option_strings}
        outs = [a for a in p._actions if a.dest == "out"]
        if outs:
            assert {"-o", "--out"} <= set(outs[0].option_strings), name
        assert not flags & {"--output", "--out-dir", "--output-dir", "--dst", "--in", "--input-dir", "--src"}, name
    for name in ("convert", "encode-prompts", "degrade", "convert-iqa", "export-adapter"):
        p = _subparsers(cli.build_parser())[name]
        assert any(a.dest == "out" for a in p._actions), name
    assert any("--input" in a.option_strings for a in _subparsers(cli.build_parser())["degrade"]._actions)


def test_info_prints_parameter_counts(capsys):
    assert cli.main(["info", "--model", "flux-dev"]) == 0
    out = capsys.readouterr().out
    assert "flux-dev" in out and "11901.4 M params" in out


def test_unknown_preset_is_exit_2(capsys):
    assert cli.main(["info", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown model preset" in err


@pytest.mark.parametrize("argv", [["export-adapter", "CKPT", "-o", "x.safetensors"],
                                  ["export-adapter", "CKPT", "--out", "x.safetensors"]])
def test_short_and_long_out_parse_the_same(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.out == "x.safetensors"


def test_no_command_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fluxir") and "a command is required" in err


def test_version(capsys):
    import fluxir_jax

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fluxir-jax {fluxir_jax.__version__}"


def test_every_subcommand_and_option_has_help():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    missing = [name for name in action.choices if not helps.get(name)]
    for name, p in action.choices.items():
        missing += [f"{name} {a.option_strings or a.dest}" for a in p._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


def test_sizes_below_a_gib_are_mib():
    from fluxir_jax.fileio import format_size

    assert format_size(5 * 2**20) == "5.0 MiB" and format_size(2**30 - 2**20) == "1023.0 MiB"
    assert format_size(2**30) == "1.00 GiB" and format_size(23.8 * 2**30) == "23.80 GiB"


@pytest.mark.parametrize("argv", [
    ["train", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1", "--compile-only", "C.yaml", "steps=3", "mesh.fsdp=2"],
    ["train", "C.yaml", "steps=3", "--coordinator", "h:1", "--num-processes=2", "mesh.fsdp=2", "--process-id", "1", "--compile-only"],
])
def test_train_flags_may_follow_the_config(argv):
    """Flags before or after CONFIG parse the same; the rest are the overrides, in order."""
    from fluxir_jax import train_loop

    args = cli.build_parser().parse_args(argv)
    train_loop._split_flags(args)
    assert (args.config, args.overrides) == ("C.yaml", ["steps=3", "mesh.fsdp=2"])
    assert (args.coordinator, args.num_processes, args.process_id, args.compile_only) == ("h:1", 2, 1, True)


def test_train_unknown_flag_after_the_config_is_exit_2(capsys):
    assert cli.main(["train", "configs/train/tiny.yaml", "steps=3", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown flag --bogus" in err
