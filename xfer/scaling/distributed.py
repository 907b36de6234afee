"""Joining a multi-process JAX job: a TPU pod, several GPU hosts, or `xfer.scaling.multiprocess` on one machine.

`initialize()` must run before anything touches a JAX device (the process
count is fixed when JAX starts its backends), so launch.py calls it first. It
joins `jax.distributed` in two cases and does nothing otherwise:

  - **given**: `num_processes` > 1 (a flag, or `XFER_NUM_PROCESSES`, which
    `xfer.scaling.multiprocess` sets) with the coordinator's `host:port` and this
    process's id (flags, or `JAX_COORDINATOR_ADDRESS` and `XFER_PROCESS_ID`);
  - **detected**: a cluster environment JAX knows (Cloud TPU VMs and GKE, SLURM,
    Open MPI, Kubernetes) that runs more than one process; JAX then reads the
    coordinator, process count and id from it.

A single process, including a single-host TPU VM or a one-task SLURM job, stays
as it is: no coordinator service, no extra threads. `num_processes=1` turns
detection off. On CPU, cross-process collectives use gloo, JAX's default.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("xfer")

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX reads it too
NUM_PROCESSES_ENV = "XFER_NUM_PROCESSES"
PROCESS_ID_ENV = "XFER_PROCESS_ID"


class DistributedError(ValueError):
    """The flags or environment describe a multi-process job that cannot be joined."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the job this process belongs to, if it is one of several; arguments override the env."""
    import jax  # here, not above: xfer.scaling.multiprocess shares this module's names and never needs JAX

    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
    num_processes = _from_env(num_processes, NUM_PROCESSES_ENV)
    process_id = _from_env(process_id, PROCESS_ID_ENV)
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"num_processes={num_processes}; pass a positive process count")
    if num_processes == 1:
        return
    cluster = _detected_cluster()
    if num_processes is None and (cluster is None or cluster.get_process_count() < 2):
        return
    if cluster is None and (coordinator_address is None or process_id is None):
        raise DistributedError(
            f"num_processes={num_processes} needs the coordinator's host:port and this process's id "
            f"(--coordinator_address and --process_id, or {COORDINATOR_ENV} and {PROCESS_ID_ENV})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("joined a job of %d processes as process %d (%s)", jax.process_count(), jax.process_index(),
             f"detected: {cluster.__name__}" if cluster else f"coordinator {coordinator_address}")


def process_zero_agrees(ok: bool) -> bool:
    """Process 0's `ok` on every process: for what only process 0 checks (the workdir lock), so that a
    refusal stops the whole job instead of leaving the other processes waiting in a collective."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


def _from_env(value: int | None, name: str) -> int | None:
    if value is not None or not os.environ.get(name):
        return value
    try:
        return int(os.environ[name])
    except ValueError:
        raise DistributedError(f"{name}={os.environ[name]!r} is not an integer") from None


def _detected_cluster():
    """The cluster environment `jax.distributed.initialize()` would use, or None.

    JAX detects clusters only inside `initialize`, which would start a coordinator
    even for a single process; this asks its environment classes the same way
    first (a private API: JAX offers no public one).
    """
    from jax._src import clusters

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)
