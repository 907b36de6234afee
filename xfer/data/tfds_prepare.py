"""A tfds dataset's first use: download it and write its ArrayRecord files, once per machine.

tfds already makes a preparation atomic: it writes into an `incomplete.*` sibling of
the dataset's directory and renames it into place when done, so a preparation that
fails or is killed never reads as prepared (`builder.is_prepared()`). It does not keep
processes apart: on a machine running several processes of one job, each would download
the dataset, and all but the first would fail at the rename. An exclusive `flock` on
`<data_dir>/.<dataset>-<version>.lock` makes the first process prepare while the others
wait, then find the dataset prepared. A lock rather than "process 0 prepares" because
each machine needs its own copy when data_dir is a local disk, and because a waiting
process whose preparer failed simply tries itself, where a wait on process 0 would hang.
The kernel drops the lock when its holder dies (kill -9 included), so the next holder
may delete the `incomplete.*` directories it finds: killed preparations, never live ones.

Whether preparing needs TensorFlow depends on the dataset: a builder that yields image
arrays (cifar10, mnist) encodes them with TensorFlow, one that yields image files does
not. So preparation is always tried, and a module of the `prepare` extra missing when
tfds reaches for it is the one-line error naming the extra; a finished download stays in
tfds's download directory, so the rerun does not fetch it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from xfer.data.errors import DataError

log = logging.getLogger("xfer")

# The modules of pyproject.toml's `prepare` extra: tfds's builders of its catalogue look up their
# checksums with importlib_resources, and its image features encode arrays with TensorFlow.
PREPARE_EXTRA = ("tensorflow", "importlib_resources")


def is_prepared(builder) -> bool:
    """`builder.is_prepared()`, without the warning tfds logs for a dataset directory not yet made."""
    return builder.data_path.is_dir() and builder.is_prepared()


def prepare(builder) -> None:
    """Downloads `builder`'s dataset and writes it as ArrayRecord, unless that is done already."""
    from tensorflow_datasets.core import constants

    name, root = builder.name, builder.data_dir_root
    if "://" in str(root):  # gs://... : no flock there, so no safe way to keep processes apart
        raise DataError(f"tfds dataset {name!r} is not prepared under {root}; xfer prepares datasets on first "
                        f"use only in a local data_dir: run `tfds build {name} --file_format=array_record "
                        f"--data_dir={root}` once")
    root = Path(root)
    with _lock(root / f".{builder.info.full_name.replace('/', '-')}.lock", name):
        if is_prepared(builder):  # by the process this one waited for
            return
        data_path = Path(builder.data_path)
        for leftover in data_path.parent.glob(f"{constants.INCOMPLETE_PREFIX}*_{data_path.name}"):
            shutil.rmtree(leftover)
        log.info("preparing tfds dataset %s in %s (first use; download: %s)", name, root,
                 builder.info.download_size)
        started = time.perf_counter()
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as error:  # tfds and the builder's own code raise any type; each means "not prepared"
            raise _failure(name, root, error) from error
        log.info("prepared tfds dataset %s in %s in %.0f s", name, data_path, time.perf_counter() - started)


@contextlib.contextmanager
def _lock(path: Path, name: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish preparing tfds dataset %s (it holds %s)", name, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            raise DataError(f"cannot lock {path} ({error.strerror}): its filesystem does not support flock; "
                            "use a local or NFSv4 directory as config.data.data_dir") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _failure(name: str, root: Path, error: Exception) -> DataError:
    """The one-line error for a failed preparation, from the exception tfds's wrappers started at."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    missing = (cause.name or "").partition(".")[0] if isinstance(cause, ModuleNotFoundError) else None
    if missing in PREPARE_EXTRA:
        return DataError(
            f"tfds dataset {name!r} is not prepared in ArrayRecord format under {root}, and preparing it "
            f"needs {missing}: pip install 'xfer[prepare]', then rerun (a finished download is kept), or run "
            f"`tfds build {name} --file_format=array_record --data_dir={root}` where it is installed")
    message = " ".join(str(cause).split()) or "no message"
    return DataError(f"preparing tfds dataset {name!r} under {root} failed ({type(cause).__name__}: {message}); "
                     "nothing of it reads as prepared, so the next run starts it again: fix the cause, then rerun")
