"""XLA settings chosen per model family before the backend starts, so the default run is the fast one.

XLA reads XLA_FLAGS once, when the first backend starts (not when jax is
imported), and aborts the process on a flag it does not know. So a model's
`ModelInfo.cpu_xla_flags` are set only on jaxlib releases where each flag was
verified to exist, and never when XLA_FLAGS is already set: the user's flags
win, whole (`XLA_FLAGS= python launch.py ...` runs XLA's own defaults). The
`--xla_cpu_*` flags change only the CPU backend, so they are harmless where a
GPU or TPU runs the model.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Iterable, MutableMapping

log = logging.getLogger("xfer")

# flag -> the jaxlib releases (major.minor) it was checked on. Its gain is measured per model family
# where the family asks for it (xfer/models/*.py registrations, bench/README.md).
VERIFIED = {
    "--xla_cpu_experimental_ynn_fusion_type=": ("0.10",),
}


def choose(wanted: Iterable[str], environ: MutableMapping[str, str] = os.environ,
           jaxlib_version: str | None = None) -> str | None:
    """XLA_FLAGS to set for a model that asks for `wanted`, or None to leave XLA_FLAGS as it is."""
    wanted = tuple(wanted)
    if not wanted or "XLA_FLAGS" in environ:
        return None
    release = ".".join((jaxlib_version or metadata.version("jaxlib")).split(".")[:2])
    known = [flag for flag in wanted if release in VERIFIED.get(flag, ())]
    return " ".join(known) or None


def apply(wanted: Iterable[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets XLA_FLAGS by `choose` and logs what was chosen; call before anything touches a device."""
    wanted = tuple(wanted)
    chosen = choose(wanted, environ)
    if chosen:
        environ["XLA_FLAGS"] = chosen
        log.info("XLA flags for this model: %s (set XLA_FLAGS yourself to choose others)", chosen)
    elif wanted and "XLA_FLAGS" in environ:
        log.info("XLA flags: yours (XLA_FLAGS=%r); this model's defaults would be %s",
                 environ["XLA_FLAGS"], " ".join(wanted))
    elif wanted:
        log.info("XLA flags: none; %s is not verified on this jaxlib (%s)", " ".join(wanted),
                 metadata.version("jaxlib"))
