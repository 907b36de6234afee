"""Runs one command as N cooperating JAX processes on this machine, the way a pod runs it on N hosts.

    python -m xfer.scaling.multiprocess -n 2 --devices_per_process 4 -- launch.py --config=... --workdir=...

Each process runs `python <command>` with a free coordinator port on 127.0.0.1
in `JAX_COORDINATOR_ADDRESS` and its rank in `XFER_NUM_PROCESSES` /
`XFER_PROCESS_ID`, which launch.py passes to `jax.distributed` (xfer.scaling.distributed).
`--devices_per_process K` gives each process K simulated CPU devices. It is
how the tests (and anyone without a pod) check that a multi-host run computes
what a single process does.

Every output line is prefixed with its process's rank. SIGTERM and SIGINT are
forwarded to every process, so a preemption drill works as on a pod; after a
Ctrl-C the processes stop together at a step boundary (xfer.scaling.preemption) and
exit 130, which is then their way of finishing, not a failure. If one process
fails the others are killed (they would otherwise wait forever in a
collective), and the exit code is the first non-zero one. The processes die
with this launcher, even if it is killed outright (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from xfer.scaling import distributed

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.1
_INTERRUPTED = 130  # a process's exit code after a Ctrl-C (xfer.scaling.preemption)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    address = f"127.0.0.1:{_free_port()}"
    children = [_start(args.command, address, rank, args.num_processes, args.devices_per_process)
                for rank in range(args.num_processes)]
    pipes = [threading.Thread(target=_prefix_lines, args=(stream, out, rank), daemon=True)
             for rank, child in enumerate(children)
             for stream, out in ((child.stdout, sys.stdout.buffer), (child.stderr, sys.stderr.buffer))]
    for pipe in pipes:
        pipe.start()

    interrupted = threading.Event()

    def forward(signum, frame):
        if signum == signal.SIGINT:
            interrupted.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        exit_code = _wait(children, interrupted)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _kill(children)
        for pipe in pipes:
            pipe.join()
    return exit_code


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m xfer.scaling.multiprocess", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num_processes", type=int, required=True, help="Processes to start.")
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="Simulated CPU devices per process (sets XLA_FLAGS and JAX_PLATFORMS=cpu).")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="After --: a Python script or -m module and its arguments.")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.error("no command; pass it after --, e.g. -- launch.py --config=... --workdir=...")
    if args.num_processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
        parser.error("-n and --devices_per_process must be positive")
    return args


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: Sequence[str], address: str, rank: int, num_processes: int,
           devices_per_process: int | None) -> subprocess.Popen:
    env = {**os.environ, distributed.COORDINATOR_ENV: address,
           distributed.NUM_PROCESSES_ENV: str(num_processes), distributed.PROCESS_ID_ENV: str(rank)}
    if devices_per_process is not None:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                                     f"--xla_force_host_platform_device_count={devices_per_process}"]).strip()
        env["JAX_PLATFORMS"] = "cpu"
    # Its own process group: a Ctrl-C in the terminal reaches the launcher only, which forwards it once.
    return subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            process_group=0, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the launcher dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prefix_lines(stream: IO[bytes], out: IO[bytes], rank: int) -> None:
    prefix = f"[{rank}] ".encode()
    for line in stream:
        out.write(prefix + line)
        out.flush()


def _wait(children: Sequence[subprocess.Popen], interrupted: threading.Event) -> int:
    """0 once every process exited 0 (or, after a Ctrl-C, 130 once every one exited 0 or 130); else
    the first other exit code, as soon as it occurs."""
    while True:
        finished = (0, _INTERRUPTED) if interrupted.is_set() else (0,)
        codes = [child.poll() for child in children]
        failed = next((code for code in codes if code is not None and code not in finished), None)
        if failed is not None:
            rank = codes.index(failed)
            print(f"[launcher] process {rank} exited with {failed}; stopping the others", file=sys.stderr)
            return failed if failed > 0 else 128 - failed  # killed by signal s: the shell's 128+s
        if all(code is not None for code in codes):
            return max(codes)
        time.sleep(_POLL_SECONDS)


def _kill(children: Sequence[subprocess.Popen]) -> None:
    """SIGKILL to what is left of each process's group (its data workers too), then reaps it."""
    for child in children:
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.wait()


if __name__ == "__main__":
    sys.exit(main())
