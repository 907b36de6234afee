"""Ctrl-C and SIGTERM as a user meets them: through `launch.py` in a subprocess, judged by exit code
and output (xfer.scaling.preemption).

  - before the first step a Ctrl-C stops at once: one line, exit 130, no traceback;
  - once training runs it saves at the next step and exits 130 (SIGTERM: 0), and the same
    command resumes from there; a second Ctrl-C stops at once, without saving;
  - during the feature-cache pass either signal stops within a batch and writes no cache.

A signal is sent at a known moment by a wrapper that patches `preemption.reached` (or an import,
or `preemption.listen`) to signal its own process there and then waits until the signal was acted
on. Runs are the quickstart at 32 px with batch 16 (~10-30 s each on 2 CPU cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compilation_cache

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--config=configs/quickstart.py", "--config.data.image_size=32", "--config.batch_size=16",
        "--config.total_steps=6", "--config.checkpoint.every=100", "--config.log_every=1")
# JAX probes its backends as on a user's machine (its notes are checked).
ENV = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}

# `python -c SIGNALLER WHEN SIGNALS launch.py ...`: launch.py, which sends itself SIGNALS (comma-separated
# numbers) WHEN: "import" (as xfer.training.train is first imported, before preemption.listen), "listen" (right
# after it: before the first step), "batch:B" (at the end of feature-pass batch B) or "step:S" (step S).
# Of several processes only rank $SIGNALLED_RANK (default 0) signals itself, then holds $SIGNAL_HOLD
# seconds (default 0) before its boundary; rank $SLOW_SHARD_RANK (if set) waits 6 s before it opens
# each later feature-cache shard. At exit it prints how many feature-pass boundaries it passed.
SIGNALLER = textwrap.dedent("""
    import atexit, os, runpy, sys, time
    from xfer.scaling import preemption

    when, signals = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    del sys.argv[1:3]
    stops_at_once = when in ("import", "listen") or signals.count(2) > 1  # before the first step; 2 Ctrl-Cs

    def send():
        if os.environ.get("XFER_PROCESS_ID", "0") != os.environ.get("SIGNALLED_RANK", "0"):
            return
        for signum in signals:
            os.kill(os.getpid(), signum)
        if "XFER_PROCESS_ID" in os.environ and not stops_at_once:
            time.sleep(float(os.environ.get("SIGNAL_HOLD", 0)))  # the others agree while this one is here
            return  # several processes: JAX's preemption sync protocol picks the boundary
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (stops_at_once or not preemption._notice.is_set()):
            time.sleep(0.01)  # a stop at once ends the process in here; a stop at a boundary sets the notice

    if when == "import":
        class SignalOnImport:
            def find_spec(self, name, path=None, target=None):
                if name == "xfer.training.train":
                    send()
        sys.meta_path.insert(0, SignalOnImport())
    elif when == "listen":
        listen = preemption.listen
        def listen_then_signal():
            listen()
            send()
        preemption.listen = listen_then_signal
    else:
        kind, at = when.split(":")
        reached, batches = preemption.reached, [0]
        def reached_after_signal(step=None):
            if step is None:  # the feature pass's boundaries pass no step
                batches[0] += 1
            if batches[0] == 1 and os.environ.get("XFER_PROCESS_ID") == os.environ.get("SLOW_SHARD_RANK"):
                cache = sys.modules["xfer.training.feature_cache"]  # imported by now; the next shard is slow
                write = cache._write_shard
                cache._write_shard = lambda *args: (time.sleep(6), write(*args))[1]
            if (kind == "step" and step == int(at)) or (kind == "batch" and step is None and batches[0] == int(at)):
                send()
            return reached(step)
        preemption.reached = reached_after_signal
        atexit.register(lambda: print(f"feature-pass boundaries: {batches[0]}"))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.fixture(scope="module", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """The runs share compiled programs."""
    with compilation_cache.shared(ENV, tmp_path_factory.mktemp("jax_cache")):
        yield


def launch(workdir: Path, when: str | None = None, *signals: int) -> subprocess.CompletedProcess:
    prefix = [] if when is None else ["-c", SIGNALLER, when, ",".join(str(s) for s in signals)]
    return subprocess.run([sys.executable, *prefix, "launch.py", *ARGS, f"--workdir={workdir}"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)


def assert_no_traceback(run: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr[-3000:]


def assert_one_line(run: subprocess.CompletedProcess, expected: int, line: str) -> None:
    assert run.returncode == expected, run.stderr[-3000:]
    assert_no_traceback(run)
    assert run.stderr.splitlines()[-1] == line, run.stderr[-3000:]


def saved_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.parametrize("when", ["import", "listen"])
def test_ctrl_c_before_the_first_step_stops_at_once_in_one_line(tmp_path, when):
    run = launch(tmp_path / "run", when, signal.SIGINT)
    assert_one_line(run, 130, "Ctrl-C: stopped before the first step; nothing to save")
    assert saved_steps(tmp_path / "run") == []


def test_ctrl_c_saves_at_the_next_step_exits_130_and_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    run = launch(workdir, "step:2", signal.SIGINT)
    assert run.returncode == 130, run.stderr[-3000:]
    assert_no_traceback(run)
    assert "Ctrl-C: stopping at the next step boundary" in run.stderr
    assert "preempted at step 2; saved" in run.stderr
    assert "Unable to initialize backend" not in run.stderr  # JAX's probe of uninstalled plugins
    assert saved_steps(workdir) == [2]

    resumed = launch(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step 2 of {workdir}" in resumed.stderr
    assert "feature cache: loaded" in resumed.stderr  # the interrupted run had finished its pass
    assert (workdir / "summary.json").exists() and saved_steps(workdir) == [2, 6]


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    run = launch(tmp_path / "run", "step:2", signal.SIGINT, signal.SIGINT)
    assert_one_line(run, 130, "Ctrl-C again: stopped at once, without saving; the same command resumes "
                              "from the last checkpoint")
    assert "preempted at step" not in run.stderr
    assert saved_steps(tmp_path / "run") == []


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_the_feature_pass_stops_at_that_batch_and_writes_no_cache(tmp_path, signum, exit_code):
    workdir = tmp_path / "run"
    run = launch(workdir, "batch:3", signum)
    assert run.returncode == exit_code, run.stderr[-3000:]
    assert_no_traceback(run)
    assert "preempted during the feature-cache pass; rerun to resume" in run.stderr
    assert "feature-pass boundaries: 3" in run.stdout  # no batch after the signalled one
    assert list(workdir.glob("feature_cache/*")) == []  # neither a cache nor a partial file
    assert saved_steps(workdir) == []


def test_only_missing_plugin_notes_are_dropped_from_the_backend_probe():
    code = textwrap.dedent("""
        import logging
        from xfer import cli
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        cli.quiet_backend_probe()
        probe = logging.getLogger("jax._src.xla_bridge")
        probe.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
                   "cannot open shared object file: No such file or directory")
        probe.info("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process 7")
        probe.warning("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        "Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process 7",
        "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed."]


TRAIN_BATCHES = 90  # the quickstart's 1437 training digits in batches of 16: batch 91 is the eval pass's first


@pytest.mark.parametrize("signalled, at, slow", [("1", 3, None), ("0", TRAIN_BATCHES + 1, "1")],
                         ids=["notice from process 1", "process 0 stops before process 1 opens its eval shard"])
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_feature_batch(tmp_path, signalled, at, slow):
    """A notice on one process alone reaches the other (JAX's preemption sync protocol), and both stop
    the feature pass at the same batch, though they counted the steps of no training yet. The
    signalled process holds 3 s at its boundary, so that the protocol agrees on a boundary of the
    feature pass however loaded the machine (without it a run once stopped at training step 1).

    The forward pass has no collective, so process 0 may stop while process 1 has not yet opened its
    shard (a loaded CI run failed there with ENOENT): the second case holds process 0 at the eval
    pass's first boundary and process 1 6 s before it opens its eval shard."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "xfer.scaling.multiprocess", "-n", "2", "--devices_per_process", "1", "--",
               "-c", SIGNALLER, f"batch:{at}", str(int(signal.SIGTERM)), "launch.py", *ARGS, f"--workdir={workdir}"]
    env = {**ENV, "SIGNALLED_RANK": signalled, "SIGNAL_HOLD": "3", **({"SLOW_SHARD_RANK": slow} if slow else {})}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    assert_no_traceback(run)
    assert "[0] " in run.stderr and "preempted during the feature-cache pass; rerun to resume" in run.stderr
    stops = sorted(line.split()[0] + line.split()[-1] for line in run.stdout.splitlines()
                   if "feature-pass boundaries" in line)
    assert len(stops) == 2 and stops[0][3:] == stops[1][3:], run.stdout  # [0]N and [1]N: the same N
    # After the signal. How many batches later depends on how fast JAX's coordination service carries
    # the notice under the machine's load (91 boundaries, into the eval pass, seen on a loaded 2-core
    # CI run): a time, not a claim. The claim is that the pass stopped and left no checkpoint.
    assert int(stops[0][3:]) >= at, run.stdout
    # A pass that finished keeps its cache (the train pass, when the stop lands in the eval pass);
    # the stopped pass leaves nothing, not even its folder.
    left = sorted(p.name.split("-")[0] for p in workdir.glob("feature_cache/*"))
    assert left == (["train"] if int(stops[0][3:]) > TRAIN_BATCHES else []), left
    assert saved_steps(workdir) == []


# Each process waits for a Ctrl-C, then takes a while (rank 1 longer) to stop at its boundary and exits 130.
STOPS_ON_CTRL_C = """\
import os, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
print("ready", flush=True)
signal.sigwait({signal.SIGINT})
time.sleep(0.5 + int(os.environ["XFER_PROCESS_ID"]))
print("stopped", flush=True)
sys.exit(130)
"""


def test_the_launcher_forwards_ctrl_c_and_waits_for_every_process_to_stop():
    launcher = subprocess.Popen([sys.executable, "-m", "xfer.scaling.multiprocess", "-n", "2", "--",
                                 "-c", STOPS_ON_CTRL_C],
                                cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(line.split()[1] for line in ready) == ["ready", "ready"], ready
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 130, err
    assert sorted(out.split()) == ["[0]", "[1]", "stopped", "stopped"]  # neither was killed early
    assert "stopping the others" not in err
