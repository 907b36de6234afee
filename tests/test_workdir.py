"""One writer per workdir, and a workdir's config.json read or refused with its fix.

The lock is tested against real processes: one that holds it while another
asks, and one SIGKILLed while holding it (the kernel must release a dead
process's lock, and the next run must say it took it over). One end-to-end
check runs two launch.py on one workdir, the fault this lock exists for.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xfer.training import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
# Holds the lock of argv[1] until its stdin closes (or it is killed).
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from xfer.training import workdir
    with workdir.lock(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.read()
""")


def hold(workdir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirError,
                           match=rf"workdir {tmp_path} is in use by another run \(pid {holder.pid} on .*\); wait"):
            with workdir_lib.lock(tmp_path):
                pass
    finally:
        holder.communicate("")
    with workdir_lib.lock(tmp_path):  # released at the holder's exit
        pass


def test_the_lock_of_a_killed_run_is_taken_over_with_a_line_saying_so(tmp_path, caplog):
    holder = hold(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="xfer"), workdir_lib.lock(tmp_path):
        assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
    assert f"the run that held it (pid {holder.pid} on" in caplog.text and "taking it over" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xfer"), workdir_lib.lock(tmp_path):  # released cleanly
        pass
    assert caplog.text == ""


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(workdir_lib.WorkdirError, match=r"workdir .*/file/run cannot be written \(Not a directory"):
        with workdir_lib.lock(tmp_path / "file" / "run"):
            pass


def test_every_process_of_a_job_stops_when_process_zero_is_refused(tmp_path):
    """A process that takes no lock learns process 0's outcome through `agree`."""
    with pytest.raises(workdir_lib.WorkdirError, match="process 0 could not lock workdir"):
        with workdir_lib.lock(tmp_path, is_writer=False, agree=lambda ok: False):
            pass
    with workdir_lib.lock(tmp_path, is_writer=False, agree=lambda ok: True):
        assert not (tmp_path / workdir_lib.LOCK_FILE).exists()  # only process 0 writes the lock


def test_a_check_while_process_zero_claims_sees_no_foreign_run(tmp_path):
    """Every process of a job checks the workdir again once it is locked, while process 0 may be
    writing config.json (a 2-process run once failed there, seeing only its temporary file)."""
    (tmp_path / workdir_lib.LOCK_FILE).touch()
    (tmp_path / workdir_lib.CLAIMING_FILE).write_text("{")
    assert workdir_lib.check(tmp_path, {"seed": 0}) is False
    (tmp_path / "other").touch()
    with pytest.raises(workdir_lib.WorkdirError, match="not empty and holds no xfer run"):
        workdir_lib.check(tmp_path, {"seed": 0})
    workdir_lib.claim(tmp_path, {"seed": 0})
    assert workdir_lib.saved_config(tmp_path) == {"seed": 0} and not (tmp_path / workdir_lib.CLAIMING_FILE).exists()


def test_damaged_config_json_names_the_file_and_the_checkpoint_copy(tmp_path):
    (tmp_path / workdir_lib.CONFIG_FILE).write_text('{"a\x01')
    with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is damaged \(Invalid control character.*\); "
                                                       r"no checkpoint holds a copy of it, so pass a new --workdir"):
        workdir_lib.check(tmp_path, {"a": 1})
    for step in (10, 20):
        (tmp_path / "checkpoints" / str(step) / "config").mkdir(parents=True)
        (tmp_path / "checkpoints" / str(step) / "config" / "metadata").write_text('{"a": 1}')
    copy = tmp_path / "checkpoints" / "20" / "config" / "metadata"
    with pytest.raises(workdir_lib.WorkdirError) as error:
        workdir_lib.check(tmp_path, {"a": 1})
    assert f"restore it from the checkpoint's copy (cp {copy} {tmp_path / 'config.json'})" in str(error.value)
    (tmp_path / workdir_lib.CONFIG_FILE).write_text(copy.read_text())  # the fix it names
    assert workdir_lib.check(tmp_path, {"a": 1}) is True
    (tmp_path / workdir_lib.CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(workdir_lib.WorkdirError, match=r"damaged \(it holds a list, not a config\)"):
        workdir_lib.check(tmp_path, {"a": 1})


def test_two_launches_on_one_workdir_one_refused_the_other_unharmed(tmp_path):
    """The second launch is refused while the first trains; the first then stops (SIGTERM) on its own terms."""
    workdir = tmp_path / "run"
    args = [sys.executable, "launch.py", "--config=configs/quickstart.py", "--config.init=scratch",
            "--config.data.image_size=32", "--config.batch_size=16", "--config.total_steps=100000",
            "--config.feature_cache=", "--config.log_every=1", f"--workdir={workdir}"]
    first = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock_file = workdir / workdir_lib.LOCK_FILE
        deadline = time.monotonic() + 300
        while not (lock_file.exists() and lock_file.read_text()) and first.poll() is None:
            assert time.monotonic() < deadline, "the first launch never took the lock"
            time.sleep(0.05)
        second = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)
        first_log = first.communicate(timeout=300)[1]
    assert first.returncode == 0 and "preempted at step" in first_log, first_log[-3000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: workdir {workdir} is in use by another run (pid {first.pid} on {os.uname().nodename}); "
        "wait for it to finish, stop it, or pass another --workdir")
    steps = [row["step"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if row["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and steps  # one writer: every step once
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert lock_file.read_text() == ""  # released when the run ended
