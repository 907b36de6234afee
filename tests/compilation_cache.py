"""Subprocesses of one test module share JAX's compiled programs through a persistent cache.

Every launch.py subprocess compiles the same steps again otherwise (most of a short run's time);
small programs count too (Orbax compiles one per array it saves).
"""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def shared(env: dict, directory: Path):
    """Sets the cache variables in `env` (the subprocesses' environment) while the block runs."""
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(directory), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(cache)
    try:
        yield
    finally:
        for name in cache:
            del env[name]
