"""XLA flags of the test processes and of the `fluxir` subprocesses the tests start.

Compiling dominates the tests' CPU time on a 2-core machine. LLVM without its optimisation
passes compiles the CPU programs in ~40% less CPU time (the tiny train step, 8 devices, cold
cache: 157 -> 98 CPU s compile-only; 152 -> 93 CPU s for compile + 30 steps, whose steps ran no
slower). TPU compiles (libtpu, compile-only devices) do not read these flags: the tiny v5p-8
record is identical with and without them. Runs compared bit for bit must use the same flags,
so every test process takes its XLA_FLAGS from `xla_flags`.
"""
from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int, base: str = "") -> str:
    """`base` (e.g. the caller's $XLA_FLAGS) + the fast-compile flags + `devices` emulated CPU devices."""
    return f"{base} {FAST_COMPILE} --xla_force_host_platform_device_count={devices}".strip()
