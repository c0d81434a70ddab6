"""Shared pieces of the training tests: a small real-photo pair dataset and tiny train configs."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "train" / "tiny.yaml"


def write_pairs(path: pathlib.Path, n: int = 8) -> pathlib.Path:
    """A dataset of `n` degraded scikit-image photo tiles (64..96 px HQ, x4 LQ)."""
    from fluxir_jax.data.dataset import DatasetWriter
    from tests.data.pairs_fixture import degraded_pairs

    if not (path / "dataset_info.json").is_file():
        with DatasetWriter(path, shard_size=8) as w:
            for ex in degraded_pairs(n):
                w.add(ex)
    return path


def cli_env(devices: int = 8) -> dict:
    """Environment for `fluxir` subprocesses: `devices` CPU devices, the tests' XLA flags and compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fluxir(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fluxir_jax.cli", *map(str, args)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_fluxir(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxir_jax.cli", *map(str, args)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
