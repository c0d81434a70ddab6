"""Keep libtpu quiet on machines without TPU chips.

With `libtpu` installed (`make test` installs it so CI can compile for TPU topologies), JAX
loads it on every start, and on a machine with no TPU it prints a page of warnings about
`TPU_ACCELERATOR_TYPE` and `TPU_WORKER_HOSTNAMES` (it asks the cloud metadata server for them),
whether or not a TPU is ever used. On such machines we give libtpu harmless values for those
settings before JAX starts; they only describe the (absent) local TPU host, and compiling for a
TPU topology names its own topology. We also let several processes load libtpu at once. On a machine with TPU chips nothing is changed, and values
the user set are always kept.
"""
from __future__ import annotations

import glob
import os

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
