"""Will a run fit in memory? Answered from XLA's compiled programs before the workdir is touched.

Without this check, `--config.data.image_size=10000` allocates for 100 s and
then dies with a MemoryError traceback, its workdir already claimed. A compiled program
knows its own footprint: `memory_analysis()` gives the bytes of its
arguments, outputs and temporaries per device, so a step that cannot fit is
refused in the time it takes to compile it, which the run pays anyway (the
compiled programs are reused by the first step: JAX caches them).

On CPU every device is host memory: the programs of all local devices and the
host's own buffers (input batches, a feature cache) share it. On GPU/TPU each
device has its own memory and the host buffers stay on the host.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

_GiB = 2**30


class MemoryBudgetError(ValueError):
    """The run needs more memory than the machine has."""


@dataclasses.dataclass(frozen=True)
class Need:
    device_bytes: dict[str, int]  # program name -> bytes one device needs while it runs
    host_bytes: int  # host buffers of this process: input batches, the feature cache


def program_bytes(compiled) -> int:
    """Peak bytes one device holds while `compiled` runs: arguments, temporaries, un-aliased outputs."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend that does not report it
        return 0
    return (stats.argument_size_in_bytes + stats.temp_size_in_bytes
            + max(0, stats.output_size_in_bytes - stats.alias_size_in_bytes))


def check(need: Need, fix: str) -> None:
    """Raises MemoryBudgetError when `need` exceeds what this process's devices and host have."""
    devices = jax.local_devices()
    program, device_bytes = max(need.device_bytes.items(), key=lambda item: item[1])
    host_available = available_host_bytes()
    if devices[0].platform == "cpu":
        needed = device_bytes * len(devices) + need.host_bytes
        if needed > host_available:
            raise MemoryBudgetError(
                f"this run needs ~{needed / _GiB:.1f} GiB of memory ({program}: {device_bytes / _GiB:.1f} GiB on each "
                f"of {len(devices)} CPU device(s), XLA's estimate; host buffers {need.host_bytes / _GiB:.1f} GiB) "
                f"but {host_available / _GiB:.1f} GiB are available; {fix}")
        return
    device_available = _device_bytes(devices[0])
    if device_available is not None and device_bytes > device_available:
        raise MemoryBudgetError(
            f"{program} needs ~{device_bytes / _GiB:.1f} GiB on each {devices[0].platform} device (XLA's estimate) "
            f"but one has {device_available / _GiB:.1f} GiB; {fix}")
    if need.host_bytes > host_available:
        raise MemoryBudgetError(f"the host buffers (input batches, feature cache) need ~{need.host_bytes / _GiB:.1f} "
                                f"GiB but {host_available / _GiB:.1f} GiB are available; {fix}")


def available_host_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, capped by a cgroup (container) limit."""
    available = _meminfo_available()
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller: MemAvailable is the limit
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _device_bytes(device) -> int | None:
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
