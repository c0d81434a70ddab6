"""The `fluxir` console script."""
import subprocess
import sys

from fluxir_jax import cli


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fluxir_jax.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("info", "convert", "compare", "encode-prompts", "export-adapter", "degrade", "eval", "convert-iqa", "gen", "train", "restore"):
        assert name in out


def test_info_prints_parameter_counts(capsys):
    assert cli.main(["info", "--model", "flux-dev"]) == 0
    out = capsys.readouterr().out
    assert "flux-dev" in out and "11901.4 M params" in out


def test_unknown_preset_is_exit_2(capsys):
    assert cli.main(["info", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown model preset" in err
