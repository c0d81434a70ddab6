"""Every shell command in README.md's fenced blocks is real: `fluxir` subcommands and options parse
with the CLI's own argparse parsers, `key=value` overrides name real config fields, `launch_tpu.sh`
commands and flags are in its usage, `make` targets exist. Nothing is executed."""
from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex
import subprocess

import pytest

from fluxir_jax import cli
from fluxir_jax import config as config_io
from fluxir_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def shell_commands(markdown: str) -> list[list[str]]:
    """The commands of the shell-fenced blocks, as argument lists (continuations joined, comments dropped)."""
    out, block, fence = [], None, None
    for line in markdown.splitlines():
        m = re.match(r"^\s*(`{3,})\s*(\S*)\s*$", line)
        if m and block is None:
            fence, block = m.group(2).lower(), []
        elif m and block is not None:
            if fence in SHELL_FENCES:
                out += _split_block(block)
            block = None
        elif block is not None:
            block.append(line)
    return out


def _split_block(lines: list[str]) -> list[list[str]]:
    text = "\n".join(line.strip().removeprefix("$ ") for line in lines).replace("\\\n", " ")
    return [words for cmd in text.splitlines() if (words := shlex.split(cmd, comments=True))]


def _override_configs():
    from fluxir_jax.data.degrade import DegradationConfig
    from fluxir_jax.data.degrade_folder import DegradeFolderConfig, split_overrides
    from fluxir_jax.fluxgen_config import GenConfig
    from fluxir_jax.restore import RestoreConfig
    from fluxir_jax.train_config import TrainConfig

    def degrade(overrides):
        own, deg = split_overrides(overrides)
        config_io.apply_overrides(DegradeFolderConfig(), own)
        config_io.apply_overrides(DegradationConfig(), deg)

    return {"train": lambda o: config_io.apply_overrides(TrainConfig(), o),
            "gen": lambda o: config_io.apply_overrides(GenConfig(), o),
            "restore": lambda o: config_io.apply_overrides(RestoreConfig(), o),
            "degrade": degrade}


def check_fluxir(argv: list[str], parser=None) -> None:
    """AssertionError naming the command unless `fluxir ARGV` parses and its overrides name real fields."""
    parser = parser or cli.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            if e.code == 0:  # --help, --version
                return
            raise AssertionError(f"fluxir {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}") from None
    assert getattr(args, "func", None), f"fluxir {shlex.join(argv)}: no subcommand"
    check = _override_configs().get(argv[0])
    overrides = [a for a in argv[1:] if OVERRIDE.match(a)]
    if check and overrides:
        try:
            check(overrides)
        except (UserError, ValueError, TypeError) as e:
            raise AssertionError(f"fluxir {shlex.join(argv)}: {e}") from None


def launch_usage() -> tuple[set[str], set[str]]:
    text = subprocess.run(["bash", str(ROOT / "launch_tpu.sh"), "--help"], capture_output=True, text=True,
                          check=True).stdout
    commands = set(re.findall(r"^  ([a-z]+)\b", text.split("Flags")[0], re.M))
    flags = set(re.findall(r"^\s+(?:-h, )?(--[a-z-]+)", text.split("Flags")[1], re.M))
    return commands, flags


def check_launch(argv: list[str], usage: tuple[set[str], set[str]]) -> list[str]:
    """Asserts the launch_tpu.sh command and flags exist; returns the user command after `--`."""
    commands, flags = usage
    own, inner = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    assert len(own) > 1 and own[1] in commands, f"{shlex.join(argv)}: unknown launch_tpu.sh command"
    for word in own[2:]:
        if word.startswith("-"):
            assert word.split("=")[0] in flags, f"{shlex.join(argv)}: launch_tpu.sh has no flag {word}"
    return inner


def _check_all(commands: list[list[str]]) -> int:
    parser, usage, checked = cli.build_parser(), None, 0
    make_targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for words in commands:
        prog = pathlib.PurePosixPath(words[0]).name
        if prog == "launch_tpu.sh":
            usage = usage or launch_usage()
            words = check_launch(words, usage)
            checked += 1
            prog = pathlib.PurePosixPath(words[0]).name if words else ""
        if prog == "fluxir":
            check_fluxir(words[1:], parser)
            checked += 1
        elif prog == "make":
            for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                assert target in make_targets, f"{shlex.join(words)}: no Makefile target {target}"
            checked += 1
    return checked


def test_readme_shell_commands_are_real():
    commands = shell_commands((ROOT / "README.md").read_text())
    n_fluxir = sum(1 for w in commands if "fluxir" in {pathlib.PurePosixPath(x).name for x in w})
    assert n_fluxir >= 15, "README.md should show a command for every job"
    assert _check_all(commands) >= n_fluxir


BAD = {
    "fluxir trian configs/train/tiny.yaml": "invalid choice",
    "fluxir restore --checkpoint c --adapter a --input i -o o --steps 8": "unrecognized arguments",
    "fluxir restore --checkpoint c --adapter a --input i -o o stepz=8": "stepz",
    "fluxir train configs/train/tiny.yaml optim.learning_rate=1e-4": "learning_rate",
    "fluxir degrade --input x -o y stage9.noise=1": "stage9",
    "./launch_tpu.sh create --accel v5p-8": "no flag --accel",
    "./launch_tpu.sh start": "unknown launch_tpu.sh command",
    "./launch_tpu.sh run -- fluxir train": "required",
    "make tests": "no Makefile target",
}


@pytest.mark.parametrize("command, message", BAD.items())
def test_a_wrong_command_fails(command, message):
    commands = shell_commands(f"text\n\n```bash\n{command}   # a comment\n```\n")
    assert commands == [shlex.split(command)]
    with pytest.raises(AssertionError, match=re.escape(message)):
        _check_all(commands)


def test_blocks_continuations_and_fences():
    md = ("```\nfluxir info \\\n    --model tiny   # note\n$ make test\n```\n"
          "```python\nfluxir not a shell command\n```\n```bash\nls -l\n```\n")
    assert shell_commands(md) == [["fluxir", "info", "--model", "tiny"], ["make", "test"], ["ls", "-l"]]
    assert _check_all(shell_commands(md)) == 2


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_section_links_resolve():
    text = (ROOT / "README.md").read_text()
    text_outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", text_outside_code, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and not [a for a in links if a not in slugs]
