"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when a run spans processes.

How the processes of a job find each other, first match wins:

1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or the environment
   variables `FLUXIR_COORDINATOR`, `FLUXIR_NUM_PROCESSES`, `FLUXIR_PROCESS_ID`; flags win) for
   clusters JAX does not detect, and for several processes on one machine;
2. detected: a cluster JAX recognises (`DETECTED_CLUSTERS`: Cloud TPU pods and multi-slice
   jobs, GKE TPU, SLURM, Open MPI) whose job has more than one process: `jax.distributed.initialize()` with no
   arguments. On a Cloud TPU pod nothing needs to be given;
3. otherwise one process: `jax.distributed` is not used.

`FLUXIR_DISTRIBUTED=off` skips the detection (2). On CPU the processes exchange collectives
through gloo (`jax_cpu_collectives_implementation`). This must run before anything touches
the JAX backends (`jax.devices()`, any array), which is why commands call it first.
"""
from __future__ import annotations

import argparse
import os

from fluxir_jax.errors import UserError

ENV_COORDINATOR = "FLUXIR_COORDINATOR"
ENV_NUM_PROCESSES = "FLUXIR_NUM_PROCESSES"
ENV_PROCESS_ID = "FLUXIR_PROCESS_ID"
ENV_DISTRIBUTED = "FLUXIR_DISTRIBUTED"
# JAX cluster detectors we trust to run on any machine (environment variables, or the TPU
# metadata only on a TPU VM); Kubernetes is left out: a single pod would query the API server
DETECTED_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")


def add_args(p: argparse.ArgumentParser) -> None:
    """The multi-host flags of a command that runs device programs."""
    g = p.add_argument_group("multi-host", "one process per host, all with the same command; not needed on "
                             "Cloud TPU pods (detected). (docs/multihost.md)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator service (or ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"number of processes in the job (or ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's index in [0, N) (or ${ENV_PROCESS_ID})")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}={value!r} is not an integer") from None


def explicit_settings(args=None) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from flags / environment; None when none is given."""
    coord = getattr(args, "coordinator", None) or os.environ.get(ENV_COORDINATOR) or None
    n = getattr(args, "num_processes", None)
    n = _int_env(ENV_NUM_PROCESSES) if n is None else n
    i = getattr(args, "process_id", None)
    i = _int_env(ENV_PROCESS_ID) if i is None else i
    given = {"--coordinator": coord, "--num-processes": n, "--process-id": i}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"multi-host: {', '.join(missing)} missing (give --coordinator, --num-processes and "
                        f"--process-id together, or ${ENV_COORDINATOR} / ${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID})")
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator {coord!r}: expected HOST:PORT")
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--process-id {i} must be in [0, --num-processes {n})")
    return coord, n, i


def detected_process_count() -> int:
    """Processes in the job of a cluster JAX auto-detects (1 when none is detected).

    Uses JAX's own cluster detection (the one `jax.distributed.initialize()` runs), which on a
    Cloud TPU VM reads the TPU metadata and elsewhere only environment variables.
    """
    if os.environ.get(ENV_DISTRIBUTED, "").lower() in ("off", "0", "false", "no"):
        return 1
    try:
        from jax._src import clusters
    except ImportError:  # a JAX without the (private) module: no detection
        return 1
    for env in clusters.ClusterEnv._cluster_types:
        if env.name not in DETECTED_CLUSTERS:
            continue
        try:
            if env.is_env_present():
                return int(env.get_process_count())
        except Exception as e:  # noqa: BLE001  (a half-configured cluster: say which)
            raise UserError(f"multi-host: detecting the {env.name} cluster failed ({e}); give --coordinator, "
                            f"--num-processes and --process-id, or set {ENV_DISTRIBUTED}=off") from None
    return 1


def initialize(args=None, log=None) -> bool:
    """Start `jax.distributed` if this run spans processes (see the module docstring); True if it did."""
    import jax

    if jax.distributed.is_initialized():
        return True
    explicit = explicit_settings(args)
    if explicit is None and detected_process_count() <= 1:
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit is None:
        jax.distributed.initialize()
    else:
        coord, n, i = explicit
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=i)
    if log is not None:
        log(f"multi-host: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} devices")
    return True


# ----------------------------------------------------------------------------- host-side sync
# Through the coordination service (no device collective): a process that reaches a device
# collective long before the others (e.g. it compiled faster) fails on CPU after gloo's fixed
# 30 s, so the train loop waits here first (after compiling, before saving, before the end).


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process has reached the barrier `name` (each name used once); no-op alone."""
    import jax

    if jax.process_count() > 1:
        _client().wait_at_barrier(f"fluxir/{name}", int(timeout_s * 1000))


def any_process(flag: bool, name: str, previous: str | None = None) -> bool:
    """True on every process if `flag` is True on any (e.g. a SIGTERM seen by one host).

    `name` is unique per call; `previous` (the name of the last call) is cleaned up.
    """
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    client, me = _client(), jax.process_index()
    client.key_value_set(f"fluxir/{name}/{me}", "1" if flag else "0")
    barrier(name)
    if previous is not None:  # every process has read it before reaching this barrier
        client.key_value_delete(f"fluxir/{previous}/{me}")
    return any(v == "1" for _, v in client.key_value_dir_get(f"fluxir/{name}/"))


def orbax_uses_coordination_barriers() -> None:
    """Orbax syncs processes through the coordination service instead of device collectives."""
    import sys

    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
