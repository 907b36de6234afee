"""A run's workdir: whose it is, who writes it now, and nothing of another run overwritten.

A workdir belongs to one config: `config.json`, written when the run claims the
directory, is compared with the config of every later start, so the same
command resumes and any other config is refused with the differing keys named.

One process writes a workdir at a time. Two launches on one workdir would
both write checkpoints, metrics and events: the second one's start-up clean-up
deletes the first one's save in progress. `lock` holds an exclusive `flock` on
`<workdir>/.lock` for the run's lifetime; the kernel releases it when the
process ends, however it ends (kill -9 included), so a lock can never outlive
its holder. The holder's pid and host are written into the file, which lets
the next start say that an earlier run ended without releasing it. On several
processes (a pod) process 0 takes the lock for all of them, and every process
learns the outcome, so a refused job stops everywhere.

Used by `xfer.training.train` (a run) and `xfer.experiments.sweep` (a sweep directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

log = logging.getLogger("xfer")

CONFIG_FILE = "config.json"
CLAIMING_FILE = CONFIG_FILE + ".tmp"  # `claim` writes it, then renames it to CONFIG_FILE
LOCK_FILE = ".lock"


class WorkdirError(ValueError):
    """The workdir holds something this run must not overwrite, or cannot be written."""


def config_as_json(config) -> dict:
    """The config as plain JSON data: what is saved, and compared on resume.

    The `sweep`, `arms`, `search` and `final` fields (the grid or protocol of an ablation config,
    xfer.experiments.sweep and .protocol) are left out: they say which runs exist, not what this run
    is, so a run launched alone and the same run inside a sweep share their workdir.
    """
    grid_fields = ("sweep", "arms", "search", "final")
    return {k: v for k, v in json.loads(config.to_json_best_effort(sort_keys=True)).items() if k not in grid_fields}


def check(workdir: Path, config_json: dict) -> bool:
    """Refuses a workdir that holds another run; True if it holds this config's run (a resume).

    Reads only: called before any work or write.
    """
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is a file; pass a directory path")
    saved = saved_config(workdir)
    if saved is not None:
        changed = sorted(_diff_keys(saved, config_json))
        if changed:
            raise WorkdirError(
                f"workdir {workdir} holds a run of a different config (differs in: {', '.join(changed)}); "
                "pass a new --workdir, or the same config to resume that run")
        return True
    # The lock and `claim`'s temporary file change nothing: another process of the job may check
    # while process 0 claims.
    if workdir.is_dir() and any(path.name not in (LOCK_FILE, CLAIMING_FILE) for path in workdir.iterdir()):
        raise WorkdirError(f"workdir {workdir} is not empty and holds no xfer run ({CONFIG_FILE} missing); "
                           "pass a new or empty --workdir")
    return False


def saved_config(workdir: Path) -> dict | None:
    """The config a run saved in `workdir`, or None if none did; a damaged file is an error naming its fix."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise WorkdirError(f"{path} is damaged ({error}); {_config_copy_hint(workdir)}") from None
    if not isinstance(saved, dict):
        raise WorkdirError(f"{path} is damaged (it holds a {type(saved).__name__}, not a config); "
                           f"{_config_copy_hint(workdir)}")
    return saved


def _config_copy_hint(workdir: Path) -> str:
    """How to repair config.json: every checkpoint keeps a copy of the config (xfer.training.checkpoint)."""
    steps = sorted((int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()), reverse=True)
    copies = [workdir / "checkpoints" / str(step) / "config" / "metadata" for step in steps]
    copy = next((path for path in copies if path.is_file()), None)
    if copy is None:
        return "no checkpoint holds a copy of it, so pass a new --workdir"
    return f"restore it from the checkpoint's copy (cp {copy} {workdir / CONFIG_FILE}), or pass a new --workdir"


def _diff_keys(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in set(a) | set(b)
                for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


def claim(workdir: Path, config_json: dict) -> None:
    """Writes `config.json` once (atomically); the workdir is then this config's. Process 0 only."""
    if (workdir / CONFIG_FILE).exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / CLAIMING_FILE
    tmp.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, workdir / CONFIG_FILE)


@contextlib.contextmanager
def lock(workdir: Path, is_writer: bool = True, agree=None) -> Iterator[None]:
    """Holds `workdir`'s exclusive lock while the block runs; refuses a workdir another process holds.

    Creates the workdir (an empty directory changes nothing `check` decides)
    and so also finds a workdir that cannot be written, before any work is done
    in it. `is_writer`: whether this process takes the lock (process 0 of a
    job); `agree(ok) -> ok` makes every process of a job see process 0's
    outcome (`xfer.scaling.distributed.agree`); None for a single process.
    """
    held, problem = None, None
    if is_writer:
        try:
            held = _acquire(workdir)
        except WorkdirError as error:
            problem = error
    if agree is not None and not agree(problem is None):
        problem = problem or WorkdirError(f"process 0 could not lock workdir {workdir}; see its error")
    if problem is not None:
        if held is not None:
            _release(held)
        raise problem
    try:
        yield
    finally:
        if held is not None:
            _release(held)


def _acquire(workdir: Path) -> int:
    """The open, flock-ed lock file's descriptor, its content now this process's pid and host."""
    path = workdir / LOCK_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirError(f"workdir {workdir} cannot be written ({error.strerror}: {error.filename}); "
                           "fix its permissions or pass another --workdir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise WorkdirError(f"workdir {workdir} is in use by another run ({holder or 'unknown process'}); "
                               "wait for it to finish, stop it, or pass another --workdir") from None
        raise WorkdirError(f"cannot lock workdir {workdir} ({error.strerror}); its filesystem does not "
                           "support flock: use a local or NFSv4 directory as --workdir") from None
    previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
    if previous:
        log.warning("workdir %s: the run that held it (%s) ended without releasing it; taking it over",
                    workdir, previous)
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    return fd


def _release(fd: int) -> None:
    """Empties the lock file (an empty file reads as "released cleanly") and unlocks it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor releases the flock
