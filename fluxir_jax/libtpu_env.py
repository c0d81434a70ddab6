"""Keep libtpu quiet on machines without TPU chips.

With `libtpu` installed (`make test` installs it so CI can compile for TPU topologies), JAX
loads it on every start, and on a machine with no TPU it prints a page of warnings about
`TPU_ACCELERATOR_TYPE` and `TPU_WORKER_HOSTNAMES` (it asks the cloud metadata server for them),
whether or not a TPU is ever used. On such machines we give libtpu harmless values for those
settings before JAX starts; they only describe the (absent) local TPU host, and compiling for a
TPU topology names its own topology. We also let several processes load libtpu at once. On a machine
with TPU chips nothing of this is changed, and values the user set are always kept.

On every machine, `LIBTPU_FLAGS` are added to `LIBTPU_INIT_ARGS` (read when libtpu starts, at the
first TPU compile) unless the user's `LIBTPU_INIT_ARGS` names them: then the user's value wins.
Options that depend on the TPU generation go with each compile instead (`compiler_options`).
"""
from __future__ import annotations

import glob
import os
import re

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor

QUIET_DEFAULTS = {
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_SKIP_MDS_QUERY": "1",
    # libtpu takes /tmp/libtpu_lockfile even for compile-only topologies; with no TPU to share,
    # several processes (parallel tests, two compile-only jobs) may load it at once.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def has_tpu_chips() -> bool:
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_tpu() -> None:
    """Set the QUIET_DEFAULTS that are unset, unless this machine has TPU chips."""
    if has_tpu_chips():
        return
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


# libtpu flags set unless LIBTPU_INIT_ARGS names them. FSDP matmuls compile to an all-gather (or a
# reduce-scatter) beside the matmul instead of a windowed einsum: a "collective matmul" loop that
# multiplies one weight shard per step and adds each partial product into the whole output. libtpu's
# cost model (libtpu 0.0.42.1) counts that loop's body once, like any loop, so `--topology` would
# leave most of those matmuls' FLOPs and time out of its estimate (a flux-dev single block on v6e-8,
# 8 per chip, FSDP: 6 such loops of 4 steps); without them every FLOP is seen, and libtpu estimates
# the block faster (13.4 ms against 15.7 ms counted with the loops once; docs/tpu.md). Whether a real
# chip agrees is not measured: `LIBTPU_INIT_ARGS=--xla_tpu_enable_windowed_einsum_for_all_gather=true`
# (and `..._for_reduce_scatter=true`) brings XLA's choice back.
LIBTPU_FLAGS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
}


def _named_flags(args: str) -> set[str]:
    """Flag names in a LIBTPU_INIT_ARGS string (`--name=value`, `--name`, `--noname`)."""
    names = set()
    for token in args.split():
        m = re.match(r"-{1,2}([\w.]+)", token)
        if m:
            name = m.group(1)
            names.add(name)
            if name.startswith("no"):
                names.add(name[2:])
    return names


def default_libtpu_flags() -> None:
    """Add the LIBTPU_FLAGS that LIBTPU_INIT_ARGS does not name."""
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    named = _named_flags(args)
    extra = [f"--{k}={v}" for k, v in LIBTPU_FLAGS.items() if k not in named]
    if extra:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([args, *extra]).strip()


# Scoped VMEM (KiB) that XLA's TPU fusions may use, per TPU generation (device_kind), passed with each
# compile of the train step and the gen / restore programs (`compiler_options`). libtpu's default is
# below the chip's VMEM; a larger limit lets a fusion work on larger tiles and read HBM fewer times.
# Set where it was measured: v6e and v5e (128 MiB of VMEM per core), 96 MiB as MaxText runs dense models.
# In libtpu's estimate one flux-dev double + single block pair, fwd+bwd at 8 per chip on v6e-8, goes
# from 27.04 to 23.89 ms of XLA's work for the same FLOPs; on v5e a flux-dev MLP forward goes from 10.2
# to 9.4 ms (docs/tpu.md). v5p (64 MiB of VMEM) showed no change at 48 MiB and keeps libtpu's default,
# as does v4 (16 MiB). `LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=N` sets it for every chip and
# then wins.
SCOPED_VMEM_KIB = {"TPU v6 lite": 98304, "TPU v5 lite": 98304}


def compiler_options(device_kind: str) -> dict[str, str]:
    """Per-compile XLA options for programs that run on `device_kind` chips ({} off TPU, or where
    the user's LIBTPU_INIT_ARGS names the flag)."""
    kib = SCOPED_VMEM_KIB.get(device_kind)
    if kib is None or "xla_tpu_scoped_vmem_limit_kib" in _named_flags(os.environ.get("LIBTPU_INIT_ARGS", "")):
        return {}
    return {"xla_tpu_scoped_vmem_limit_kib": str(kib)}


def mesh_compiler_options(mesh) -> dict[str, str]:
    """`compiler_options` for the chips of a jax Mesh."""
    return compiler_options(mesh.devices.flat[0].device_kind)


def compile_settings(device_kind: str) -> dict:
    """What a record of a TPU compile names about the compiler's settings."""
    return {"libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""), "compiler_options": compiler_options(device_kind)}
