"""Stopping cleanly: a preemption notice (SIGTERM) or a Ctrl-C becomes one boundary at which every
process stops, after the train loop saved a checkpoint there.

TPU VMs, SLURM and Kubernetes send SIGTERM some seconds before they kill a job; a person at a
terminal presses Ctrl-C (SIGINT). Work that can stop asks at its boundaries, and the same command
run again resumes:

  - the train loop calls `reached(step)` after every step; True: save a checkpoint and return;
  - the feature-cache pass (xfer.training.feature_cache) calls `raise_if_reached()` after every batch;
    it has nothing worth saving, so it raises `Preempted` and nothing is written.

An entry point (launch.py, `python -m xfer.experiments.sweep`) owns its process's signals:

  - `stop_on_interrupt()`, first thing: from then on a Ctrl-C ends the process at once with one
    line on stderr and exit code 130, where Python would print a KeyboardInterrupt traceback.
  - `listen()`, once the job is joined (xfer.scaling.distributed), makes a stop wait for a boundary:
      - SIGTERM: stop at the next boundary; further SIGTERMs change nothing. Exit code 0.
      - Ctrl-C: the same once the first boundary was reached; before it there is nothing to save,
        so (on one process) it still stops at once. `exit_code()` is then 130, not 0.
      - a second Ctrl-C stops at once, without saving; the run resumes from its last checkpoint.

A watcher thread sees a signal as it arrives (`signal.set_wakeup_fd`), not when the main thread
next runs Python code, which can be a minute later during an XLA compilation: the line that says
what will happen appears at once, and a second Ctrl-C is never delayed. A stop at once removes
what `scratch` blocks are writing (a feature cache's temporary file, a conversion's staging folder).

  - **One process**: a stop request is a flag; `reached` reads it.
  - **Several processes**: all must stop at the same boundary, or their checkpoints do not fit
    together. `jax.distributed` catches SIGTERM itself and runs JAX's preemption sync protocol: a
    notice on any process makes all of them agree on the boundary after the furthest one, and
    `reached` asks it (the answer is local, no collective per step). A Python SIGTERM handler
    would replace JAX's, so `listen` installs none, and a Ctrl-C becomes a SIGTERM to this process.
    A Ctrl-C never stops one process alone there: the others would wait for it in a collective.
    The protocol's counter starts at 0 and agrees on "furthest + 1", so it must count something
    that only increases over the whole process and that no process has passed yet: `reached`
    and `raise_if_reached` count their own calls (boundaries), not steps, which restart at N+1 on
    resume and do not exist during the feature pass. Every process must make the same calls.

Without `listen` (a `train.run` called from Python) a single process changes nothing and SIGTERM
and Ctrl-C keep their default meanings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("xfer")

INTERRUPTED = 130  # exit code after a Ctrl-C: the shell's 128 + SIGINT
TERMINATED = 128 + signal.SIGTERM

BEFORE_FIRST_STEP = "stopped before the first step; nothing to save"
STOPPED_AT_ONCE = "stopped at once, without saving; the same command resumes from the last checkpoint"


class Preempted(Exception):
    """A stop was asked for during work with nothing to save (the feature-cache pass); rerun to resume."""


_lock = threading.Lock()
_notice = threading.Event()  # one process: a stop at the next boundary was asked for
_interrupts = 0  # Ctrl-Cs seen
_boundaries = 0  # calls of reached / raise_if_reached: the preemption sync protocol's counter
_listening = False
_several = False  # listen() found several processes
_terminate_at_once = False  # stop_on_interrupt(terminate=True): SIGTERM also stops at once
_message = BEFORE_FIRST_STEP
_watcher: threading.Thread | None = None
_wakeup: socket.socket | None = None  # kept referenced: the signal machinery writes into its descriptor
_scratch: set[Path] = set()


def stop_on_interrupt(message: str = BEFORE_FIRST_STEP, terminate: bool = False) -> None:
    """From now on a Ctrl-C (with `terminate`, also a SIGTERM) ends this process at once: what
    `scratch` blocks are writing is removed, "Ctrl-C: <message>" (or "SIGTERM: ...") goes to
    stderr, and the exit code is 130 (143).

    JAX-free and cheap, so an entry point calls it before its slow imports. Main thread only.
    """
    global _message, _terminate_at_once
    _message, _terminate_at_once = message, terminate
    _start_watcher()
    signal.signal(signal.SIGINT, _noted)
    if terminate:
        signal.signal(signal.SIGTERM, _noted)


def listen() -> None:
    """Turns SIGTERM and Ctrl-C into a stop at the next boundary (see the module docstring).

    Call it from the main thread once the job is joined: it asks JAX for the process count.
    """
    import jax

    global _listening, _several, _terminate_at_once
    _start_watcher()
    _several = jax.process_count() > 1
    _terminate_at_once = False
    signal.signal(signal.SIGINT, _noted)
    if not _several:
        signal.signal(signal.SIGTERM, _noted)
    _listening = True


def reached(step: int | None = None) -> bool:
    """True at the boundary where this process (and every other) should save and stop.

    Every process must call it after every step, with the same steps (`step` itself is not
    needed: boundaries are counted, see the module docstring).
    """
    global _boundaries
    import jax

    with _lock:
        _boundaries += 1
        boundary = _boundaries
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(boundary)
    return _notice.is_set()


def raise_if_reached() -> None:
    """Raises `Preempted` at the boundary where every process should stop, for work that has
    nothing to save (each process must call it at the same points, like `reached`)."""
    if reached():
        raise Preempted("a stop was asked for (SIGTERM or Ctrl-C)")


def exit_code() -> int:
    """The exit code of a run that stopped at a boundary: 130 after a Ctrl-C, else 0."""
    return INTERRUPTED if _interrupts else 0


@contextlib.contextmanager
def scratch(path: Path) -> Iterator[Path]:
    """A block that writes `path` (a file or a folder) which must not outlive it: removed when the
    block ends, however it ends, and by a stop at once while the block runs. A block that
    succeeds has renamed it into place (or leaves it for removal)."""
    path = Path(path)
    with _lock:
        _scratch.add(path)
    try:
        yield path
    finally:
        _remove(path)
        with _lock:
            _scratch.discard(path)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A short block a stop at once waits for: the rename that puts a `scratch` file in place, so
    that a stop cannot remove a folder that is being renamed into its final name."""
    with _lock:
        yield


def _start_watcher() -> None:
    global _watcher, _wakeup
    if _watcher is not None:
        return
    receive, _wakeup = socket.socketpair()
    _wakeup.setblocking(False)
    signal.set_wakeup_fd(_wakeup.fileno(), warn_on_full_buffer=False)
    _watcher = threading.Thread(target=_watch, args=(receive,), name="xfer-signals", daemon=True)
    _watcher.start()
    os.register_at_fork(after_in_child=_forget_in_child)


def _noted(signum, frame) -> None:
    """The Python-level handler: nothing to do in the main thread, the watcher has acted."""


def _watch(receive: socket.socket) -> None:
    while True:
        try:
            received = receive.recv(64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not received:
            return
        for signum in received:
            try:
                _on_signal(signum)
            except Exception:  # noqa: BLE001 -- this thread must live on: it is how Ctrl-C stops the process
                log.exception("handling signal %d", signum)


def _on_signal(signum: int) -> None:
    """Runs in the watcher thread as soon as a signal arrives."""
    global _interrupts
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            _exit_now(f"Ctrl-C again: {STOPPED_AT_ONCE}", INTERRUPTED)
        if not _listening or (not _several and _boundaries == 0):
            _exit_now(f"Ctrl-C: {_message}", INTERRUPTED)
        log.warning("Ctrl-C: stopping at the next step boundary, after saving a checkpoint there "
                    "(Ctrl-C again to stop at once, without saving)")
        if _several:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler: the notice reaches every process
        else:
            _notice.set()
    elif signum == signal.SIGTERM:
        if _terminate_at_once:
            _exit_now(f"SIGTERM: {_message}", TERMINATED)
        if not _notice.is_set():
            log.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
        _notice.set()


def _exit_now(message: str, code: int) -> None:
    _lock.acquire()  # never released: from here on nothing is renamed into place
    stderr = 2
    with contextlib.suppress(OSError):  # the writers losing their files as they are removed must not speak
        stderr = os.dup(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    for path in _scratch:
        _remove(path)
    with contextlib.suppress(OSError):  # a closed stderr must not keep the process alive
        os.write(stderr, (message + "\n").encode())
    os._exit(code)


def _remove(path: Path) -> None:
    """Removes `path` until it stays gone: a background writer (Orbax's save thread, at a stop at once)
    may still be creating files in it, so one pass can leave it half there."""
    for _ in range(20):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        time.sleep(0.05)
        if not path.exists() and not path.is_symlink():
            return


def _forget_in_child() -> None:
    """A forked child must not write its signals into this process's watcher."""
    global _watcher, _wakeup
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    _watcher = _wakeup = None
