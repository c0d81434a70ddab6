"""launch_tpu.sh against a fake `gcloud` on PATH that records each call's arguments."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_tpu.sh"
SEP = "\x1f"  # between arguments
END = "\x1e"  # after each call (arguments may hold newlines)


@pytest.fixture
def fake(tmp_path):
    """(run, calls): run the script with a fake gcloud first on PATH; calls() lists the recorded argv's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bindir / "gcloud"
    gcloud.write_text(f'#!/usr/bin/env bash\nfor a in "$@"; do printf "%s{SEP}" "$a"; done >> "$GCLOUD_LOG"\nprintf "{END}" >> "$GCLOUD_LOG"\n')
    gcloud.chmod(0o755)
    base_env = {k: v for k, v in os.environ.items() if k not in
                ("NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "NUM_SLICES")}
    base_env.update(PATH=f"{bindir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))

    def run(*args, env=None):
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**base_env, **(env or {})},
                              cwd=tmp_path, timeout=60)

    def calls():
        if not log.exists():
            return []
        return [call.split(SEP)[:-1] for call in log.read_text().split(END)[:-1]]

    return run, calls


LOC = ("--name", "fx", "--zone", "us-east5-a")


def test_create_on_demand_and_spot(fake):
    run, calls = fake
    r = run("create", *LOC, "--accelerator-type", "v5p-32")
    assert r.returncode == 0, r.stderr
    r = run("create", *LOC, "--project", "proj", "--accelerator-type", "v6e-8", "--runtime-version", "rt-1", "--spot")
    assert r.returncode == 0, r.stderr
    on_demand, spot = calls()
    assert on_demand == ["compute", "tpus", "queued-resources", "create", "fx", "--zone=us-east5-a",
                         "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--node-id=fx"]
    assert spot[:4] == ["compute", "tpus", "queued-resources", "create"]
    assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v6e-8", "--runtime-version=rt-1", "--spot"} <= set(spot)


def test_create_multislice_from_environment(fake):
    run, calls = fake
    env = dict(NAME="ms", ZONE="europe-west4-a", ACCELERATOR_TYPE="v6e-64", NUM_SLICES="2", SPOT="1")
    assert run("create", env=env).returncode == 0
    (call,) = calls()
    assert "--node-count=2" in call and "--node-prefix=ms" in call and "--spot" in call
    assert "--zone=europe-west4-a" in call and "--accelerator-type=v6e-64" in call
    assert not any(a.startswith("--node-id") for a in call)


def test_setup_copies_and_installs_on_every_worker(fake, tmp_path):
    run, calls = fake
    r = run("setup", *LOC)
    assert r.returncode == 0, r.stderr
    scp, ssh = calls()
    assert scp[:4] == ["compute", "tpus", "queued-resources", "scp"]
    archive = pathlib.Path(scp[4])
    assert archive.exists() and archive.stat().st_size > 0
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True).stdout
    assert "./launch_tpu.sh" in listing and "./fluxir_jax/models/flux.py" in listing
    assert "./.venv/" not in listing and "./.git/" not in listing
    assert {"--worker=all", "--node=all", "--zone=us-east5-a"} <= set(scp)
    assert ssh[:5] == ["compute", "tpus", "queued-resources", "ssh", "fx"]
    assert {"--worker=all", "--node=all", "--zone=us-east5-a"} <= set(ssh)
    command = next(a for a in ssh if a.startswith("--command="))
    assert "'.[tpu]'" in command and "constraints.txt" in command


def test_run_detaches_in_tmux_on_all_workers_with_per_worker_logs(fake):
    run, calls = fake
    r = run("run", *LOC, "--env", "LIBTPU_INIT_ARGS=--xla_x=1 --xla_y=2", "--", "fluxir", "train", "my config.yaml", "steps=5")
    assert r.returncode == 0, r.stderr
    (ssh,) = calls()
    assert ssh[:5] == ["compute", "tpus", "queued-resources", "ssh", "fx"]
    assert "--worker=all" in ssh and "--node=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
    assert "tmux new-session -d -s fluxir" in command
    assert 'logs/run-$(hostname).log' in command
    assert "exec fluxir train my\\ config.yaml steps=5" in command
    assert "export LIBTPU_INIT_ARGS=--xla_x=1\\ --xla_y=2" in command


def test_run_launcher_script_is_valid_bash(fake, tmp_path):
    """The heredoc'd launcher, as the worker's shell would write it, parses and keeps the quoting."""
    run, calls = fake
    run("run", *LOC, "--", "echo", "a b", "$HOME")
    command = next(a for a in calls()[0] if a.startswith("--command="))[len("--command="):]
    script = command.split("<<'FLUXIR_EOF'\n", 1)[1].split("\nFLUXIR_EOF\n", 1)[0]
    path = tmp_path / "launch.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "exec echo a\\ b \\$HOME" in script


@pytest.mark.parametrize("sub, extra, expect", [
    ("delete", (), ["delete", "fx", "--zone=us-east5-a", "--force", "--quiet"]),
    ("status", (), ["describe", "fx", "--zone=us-east5-a"]),
    ("stop", (), ["ssh", "fx", "--zone=us-east5-a", "--node=all", "--worker=all", "--command=tmux kill-session -t fluxir 2>/dev/null || true"]),
    ("logs", ("--worker", "2", "--lines", "7"), ["ssh", "fx", "--zone=us-east5-a", "--node=all", "--worker=2",
                                                 "--command=tail -v -n 7 ~/fluxir-jax/logs/run-*.log"]),
    ("ssh", ("--", "ls", "-l"), ["ssh", "fx", "--zone=us-east5-a", "--node=0", "--worker=0", "--command=ls -l"]),
])
def test_other_commands(fake, sub, extra, expect):
    run, calls = fake
    r = run(sub, *LOC, *extra)
    assert r.returncode == 0, r.stderr
    assert calls() == [["compute", "tpus", "queued-resources", *expect]]


@pytest.mark.parametrize("sub", ["create", "setup", "run", "logs", "ssh", "stop", "delete", "status"])
def test_dry_run_prints_and_runs_nothing(fake, tmp_path, sub):
    run, calls = fake
    r = run(sub, *LOC, "--accelerator-type", "v5p-8", "--dry-run", "--", "fluxir", "train", "c.yaml")
    assert r.returncode == 0, r.stderr
    assert calls() == []
    assert "gcloud compute tpus queued-resources" in r.stdout
    assert not list(tmp_path.glob("fluxir-jax-*.tgz"))  # setup's archive is not written either


@pytest.mark.parametrize("args, what", [
    ((), "missing COMMAND"),
    (("launch",), "unknown command"),
    (("create", "--zone", "z", "--accelerator-type", "v5p-8"), "needs --name"),
    (("create", "--name", "n", "--accelerator-type", "v5p-8"), "needs --zone"),
    (("create", "--name", "n", "--zone", "z"), "needs --accelerator-type"),
    (("create", "--name", "n", "--zone", "z", "--accelerator-type", "tpu-9"), "needs --runtime-version"),
    (("run", "--name", "n", "--zone", "z"), "run needs the command"),
    (("status", "--name"), "--name needs a value"),
    (("status", "--name", "n", "--zone", "z", "--bogus"), "unknown argument"),
])
def test_missing_arguments_exit_2_with_usage(fake, args, what):
    run, calls = fake
    r = run(*args)
    assert r.returncode == 2
    assert what in r.stderr and "Usage:" in r.stderr
    assert calls() == []
