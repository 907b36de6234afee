"""How a checkpoint fails, said in one line: the error type, the OS cause, and Orbax's noise kept out.

A save that cannot be written (disk full, a read-only or unwritable directory)
or a checkpoint that cannot be read back is the files' or the disk's fault, not
the input's or the code's: `CheckpointError` carries one line that names the
cause and the fix. Orbax reports such a failure many times over before it
raises it (a traceback per writer thread, and tensorstore's "Event loop is
closed" for every write still in flight when Orbax gave up: ~1180 lines with
145 tracebacks on a full disk); `quiet_orbax` moves those reports to the
`xfer` logger at DEBUG, so the one line is what the user sees.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time

import orbax.checkpoint as ocp

log = logging.getLogger("xfer")


class CheckpointError(ValueError):
    """No checkpoint could be read back whole, a checkpoint is damaged, or one could not be written.

    The cause is the files or the disk, not the input or the code, and the
    message says what to do; a ValueError, so launch.py prints it as one
    `error:` line (xfer.cli.USER_ERRORS). The underlying error is its __cause__.
    """


# Errors a save hits because of the disk or the directory, by the text tensorstore puts in its messages.
_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
              errno.ENOTDIR, errno.EMFILE, errno.ENAMETOOLONG, errno.ESTALE)
# tensorstore raises ValueError("CODE: ..."); these codes mean the storage failed, not the caller.
_STORAGE_STATUS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS",
                   "NOT_FOUND", "ABORTED")


def os_reason(error: BaseException) -> tuple[int | None, str] | None:
    """(errno, '[Errno N] text') of the OS failure behind `error`, or None if it is not one."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        if isinstance(link, OSError) and link.errno:
            return link.errno, f"[Errno {link.errno}] {link.strerror or os.strerror(link.errno)}"
    for link in chain:
        message = str(link)
        for code in _OS_ERRORS:
            if os.strerror(code) in message:
                return code, f"[Errno {code}] {os.strerror(code)}"
    for link in chain:
        if isinstance(link, OSError) or str(link).startswith(_STORAGE_STATUS):
            return None, first_line(link)
    return None


def join_writers(manager: ocp.CheckpointManager, timeout_s: float) -> None:
    """Waits (bounded) for the failed save's other writer threads, so nothing writes into what is removed.

    Orbax stops waiting at the first failed future; the others are its private `_commit_futures`.
    """
    checkpointer = getattr(manager, "_checkpointer", None)
    futures = getattr(getattr(checkpointer, "_async_manager", None), "_commit_futures", None) or ()
    deadline = time.monotonic() + timeout_s
    for future in futures:
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # noqa: BLE001 - failed or timed out: either way it no longer matters
            pass


class _OrbaxNoise(logging.Filter):
    """Keeps Orbax's reports of failures xfer raises itself out of the output (DEBUG on `xfer`).

    Orbax logs every failed background write with its traceback from each thread
    that sees it, then raises it where xfer waits for the save; xfer turns that
    into one CheckpointError line. Orbax records with a traceback (it raises them
    on) and its "did not provide metrics" warning (an unranked save is by design)
    are dropped; every other Orbax record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if os.sep + "orbax" + os.sep not in record.pathname:
            return True
        noise = record.exc_info is not None or (
            record.levelno == logging.WARNING and "did not provide metrics" in str(record.msg)
        )
        if noise and record.exc_info is not None:
            log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
        return not noise


_orbax_noise = _OrbaxNoise()


def _unraisable_hook(unraisable) -> None:
    """Drops the reports of Orbax's abandoned I/O (else to the previous hook).

    When one write of a save fails, Orbax closes its asyncio loop while other
    tensorstore writes are in flight; each then finds the loop closed when it
    completes and reports that through sys.unraisablehook, a traceback per write
    (145 of them on a full disk). Likewise, when a damaged checkpoint fails to
    restore, the reads Orbax abandoned report their error when collected. The
    failure itself is raised, and reported once, by xfer.
    """
    value, trace = unraisable.exc_value, unraisable.exc_traceback
    frames = []
    while trace is not None:
        frames.append(trace.tb_frame.f_code.co_name)
        trace = trace.tb_next
    code = getattr(unraisable.object, "cr_code", None)
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed" and "call_soon_threadsafe" in frames:
        log.debug("tensorstore: a write completed after its event loop closed")
        return
    if code is not None and os.sep + "orbax" + os.sep in code.co_filename:
        log.debug("orbax: abandoned %s: %s", code.co_name, first_line(value))
        return
    _unraisable_hook.previous(unraisable)


def quiet_orbax() -> None:
    """Installs the filter and hook above (again, if something replaced the hook)."""
    absl_logger = logging.getLogger("absl")
    if _orbax_noise not in absl_logger.filters:
        absl_logger.addFilter(_orbax_noise)
    if sys.unraisablehook is not _unraisable_hook:
        _unraisable_hook.previous = sys.unraisablehook
        sys.unraisablehook = _unraisable_hook


def first_line(error: BaseException) -> str:
    """`Type: first line` of the root cause: tensorstore wraps it in pages of spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    first = lines[0][:300] if lines else ""
    return first if isinstance(error, CheckpointError) else f"{type(error).__name__}: {first}"
