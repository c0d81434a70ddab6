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
