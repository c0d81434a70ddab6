"""Test-wide set-up: 8 emulated CPU devices, fast-compile XLA flags and the persistent JAX compilation cache.

All must be in place before JAX is imported anywhere, which is why they live here.
"""
import os
import pathlib

from tests.xla_flags import xla_flags

_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# The slowest test files (a few minutes each on 2 cores, cold cache), longest first. `make test`
# hands whole files to 2 workers (--dist loadfile --no-loadscope-reorder) in collection order:
# starting these first keeps one of them from being the last file running while the other worker
# idles. (test_train_cli before test_multihost: its one-process run then loads the cached step.)
HEAVY_FIRST = [
    "tests/train/test_train_cli.py",
    "tests/train/test_train_step.py",
    "tests/test_fluxgen.py",
    "tests/models/test_flux.py",
    "tests/train/test_multihost.py",
    "tests/test_compile_topology.py",
    "tests/test_demo.py",
    "tests/test_tpu_topology.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole
