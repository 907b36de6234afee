"""Preemption notices: a SIGTERM becomes one step at which every process saves and stops.

TPU VMs, SLURM and Kubernetes send SIGTERM some seconds before they kill a job.
The train loop asks `reached(step)` after every step; when it answers True the
loop saves a checkpoint and returns, and the same command run again resumes.

  - **One process**: `listen()` (called by launch.py, the owner of the process's
    signals) installs a handler that only sets a flag, so a second SIGTERM,
    even during the save, changes nothing; `reached` reads the flag.
  - **Several processes**: all must save the same step, or their checkpoints do
    not fit together. `jax.distributed` already catches SIGTERM and runs JAX's
    preemption sync protocol: a notice on any process makes all of them agree
    on the step after the furthest one. `reached` asks it; the answer is local
    (no collective per step), unlike an allgather of a flag after every step.
    A Python handler here would replace JAX's, so `listen` installs none.

Without `listen` (a `train.run` called from Python) a single process ignores
nothing and SIGTERM keeps its default meaning.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("xfer")

_signalled = threading.Event()


def listen() -> None:
    """Turns this single process's SIGTERM into a save-and-stop at the next step boundary."""
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, _on_sigterm)


def reached(step: int) -> bool:
    """True at the step where this process (and every other) should save and stop.

    Every process must call it after every step, with the same steps.
    """
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return _signalled.is_set()


def _on_sigterm(signum, frame) -> None:
    if not _signalled.is_set():
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
    _signalled.set()
