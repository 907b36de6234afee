"""Several processes compute what one does, checkpoints move between process counts, SIGTERM saves.

Every run goes through `python -m xfer.scaling.multiprocess` (simulated CPU devices, 8 in all), so the
launcher is tested with it. Runs are EfficientNet-Lite0 on digits at 32 px, head only, with the
quickstart's feature cache, global batch 16, 6 steps, checkpoints at steps 3 and 6, and SGD with
momentum instead of the quickstart's Adam: a cross-process sum adds in another order than one
process's, and Adam's g / (sqrt(v) + eps) would turn a rounding-sized gradient near 0 into a +-lr
step (tests/numerics.py, tests/test_train_equivalence.py); with SGD it stays rounding-sized.
  one_process:   1 process x 8 devices, uninterrupted (module fixture).
  two_processes: 2 processes x 4 devices, uninterrupted (module fixture).
Resumes start from a copy of a finished run's workdir without its step-6 checkpoint, so they
continue from step 3 on the other process count. Every subprocess has a timeout, and a killed
launcher takes its processes with it (xfer.scaling.multiprocess), so nothing outlives a test.

Which data each process reads is checked on the pipeline itself, in-process: the 2-process
runs then show that those blocks, assembled, train exactly what one process trains.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

import compilation_cache
import numerics
from configs import quickstart
from xfer.training import checkpoint
from xfer import data as xdata
from xfer.scaling import distributed
from xfer.models import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
DEVICES = 8
TOTAL_STEPS = 6
ARGS = ("--config=configs/quickstart.py", "--config.data.image_size=32", "--config.batch_size=16",
        f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every=3", "--config.log_every=1",
        "--config.optim.head.optimizer=sgd", "--config.optim.head.momentum=0.9", "--config.optim.head.lr=0.1")
RUN_TIMEOUT = 300
# Cross-process reductions add in another order than one process's: not bitwise, this close.
# Measured (AMD EPYC, 2 cores), max |2 processes - 1 process| over the final variables: 1.5e-8
# (0.015 of ATOL), and 3e-8 (0.03) under XLA_FLAGS --xla_cpu_max_isa=AVX, =SSE4_2 or
# --xla_cpu_enable_fast_math=true (other code paths, as on other CPUs); 4 and 8
# processes gave the 2 processes' bits. The largest entry is 0.21: 3e-8 is 2 of its float32 ulps.
# Resumed on the other process count vs uninterrupted: at most 2.2e-8 (0.022).
ATOL = 1e-6
# Train losses (~2): measured at most 1.2e-7 apart (0.012 of LOSS_ATOL), 4.8e-7 (0.048) under
# --xla_cpu_max_isa=SSE4_2.
LOSS_ATOL = 1e-5
# Eval predictions may differ only where the top two logits lie within MIN_MARGIN: the two runs'
# logits measured 4.8e-7 apart, 9.5e-7 under --xla_cpu_max_isa=AVX or =SSE4_2 (MIN_MARGIN is 105
# times that). The smallest top-2 margin measured is 5.1e-3, so no example is excluded and the
# accuracies must be equal.
MIN_MARGIN = 1e-4
IMAGENET = ModelInfo("test", lambda num_classes=1000: None, 224, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """Runs share compiled programs, small ones too (Orbax compiles one per array it saves)."""
    with compilation_cache.shared(ENV, tmp_path_factory.mktemp("jax_cache")):
        yield


def command(processes: int, workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "xfer.scaling.multiprocess", "-n", str(processes),
            "--devices_per_process", str(DEVICES // processes), "--",
            "launch.py", *ARGS, *overrides, f"--workdir={workdir}"]


def launch(processes: int, workdir: Path, *overrides: str) -> str:
    """Runs to the end; returns the output (every line prefixed with its process's rank)."""
    result = subprocess.run(command(processes, workdir, *overrides), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout + result.stderr


def in_process_config():
    """The config launch.py builds from ARGS."""
    assert ARGS[0] == "--config=configs/quickstart.py"
    config = quickstart.get_config()
    for arg in ARGS[1:]:
        name, value = arg.removeprefix("--config.").split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a string
        config.update_from_flattened_dict({name: value})
    return config


def final_variables(workdir: Path) -> dict[str, np.ndarray]:
    variables = checkpoint.read_variables(workdir / "checkpoints", TOTAL_STEPS)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def train_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


def copy_to_step_3(finished: Path, workdir: Path) -> Path:
    """A copy of a finished run as it was after its step-3 checkpoint, to resume elsewhere."""
    shutil.copytree(finished, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(TOTAL_STEPS))
    (workdir / "summary.json").unlink()
    return workdir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one") / "run"
    launch(1, workdir)
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("two") / "run"
    return workdir, launch(2, workdir)


# --- the launcher and joining a job (no JAX devices) --------------------------------------------------

# Each process prints its rank and the coordinator it was given; rank 1 then fails, rank 0 would hang.
FAILING_RANK = """\
import os, sys, time
print(os.environ["XFER_PROCESS_ID"], os.environ["XFER_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)
if os.environ["XFER_PROCESS_ID"] == "1":
    sys.exit(3)
time.sleep(60)
"""


def test_launcher_prefixes_ranks_and_stops_everyone_when_one_process_fails():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "xfer.scaling.multiprocess", "-n", "2", "--", "-c", FAILING_RANK],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 30  # rank 0 was killed, not waited for
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[:3] for line in lines] == [["[0]", "0", "2"], ["[1]", "1", "2"]]
    assert len({line.split()[3] for line in lines}) == 1 and lines[0].split()[3].startswith("127.0.0.1:")
    assert "process 1 exited with 3" in result.stderr


# launch.py, in which rank 1 meets a user error once it joined the job (where a workdir error would).
FAILING_AFTER_JOINING = """\
import os, runpy, sys
from xfer.scaling import preemption
from xfer.training.workdir import WorkdirError
listen = preemption.listen
def listen_or_fail():
    if os.environ["XFER_PROCESS_ID"] == "1":
        raise WorkdirError("a user error on process 1 alone")
    listen()
preemption.listen = listen_or_fail
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_user_error_on_one_process_ends_the_job_at_once(tmp_path):
    """The failing process exits without JAX's exit handler, which waits up to 5 minutes for the
    others (blocked in a collective, waiting for it); the launcher then stops them. Here the job
    ends 8 s after it started; through JAX's exit handler, 57 s to over 90 s (the timeout below)."""
    launcher = [sys.executable, "-m", "xfer.scaling.multiprocess", "-n", "2", "--devices_per_process", "1", "--"]
    workdir = tmp_path / "run"
    result = subprocess.run([*launcher, "-c", FAILING_AFTER_JOINING, "launch.py", *ARGS, f"--workdir={workdir}"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=45)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "[1] error: a user error on process 1 alone" in result.stderr
    assert "process 1 exited with 2" in result.stderr


def test_joining_needs_the_coordinator_and_process_id_unless_a_cluster_says_them(monkeypatch):
    monkeypatch.setattr(distributed, "_detected_cluster", lambda: None)
    for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    distributed.initialize()  # one process, nothing detected: nothing to join
    distributed.initialize(num_processes=1)
    with pytest.raises(distributed.DistributedError, match="num_processes=2 needs .*--coordinator_address"):
        distributed.initialize(num_processes=2)
    monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "two")
    with pytest.raises(distributed.DistributedError, match="XFER_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


# --- which data each process reads (in-process, no devices) -------------------------------------------

def _digits(process_index: int, process_count: int):
    config = {"source": "digits", "image_size": 8, "augment": "crop_flip", "num_threads": 0}
    return xdata.build(config, IMAGENET, 8, 0, process_index=process_index, process_count=process_count)


def test_each_process_reads_its_own_block_of_every_global_batch():
    single = _digits(0, 1).train
    shards = [_digits(p, 2).train for p in (0, 1)]
    for _ in range(3):
        whole = next(single)
        blocks = [next(shard) for shard in shards]
        for key in ("image", "label"):  # augmented images too: their randomness follows the position
            np.testing.assert_array_equal(np.concatenate([block[key] for block in blocks]), whole[key])
        # Different examples, not only different augmentations of the same ones.
        assert not np.array_equal(blocks[0]["image"], blocks[1]["image"])
    assert shards[0].get_state() == shards[1].get_state() == single.get_state() == {"next_index": 3}


def test_data_position_resumes_on_another_process_count():
    single, shards = _digits(0, 1).train, [_digits(p, 2).train for p in (0, 1)]
    for iterator in (single, *shards):
        for _ in range(2):
            next(iterator)
    resumed_single, resumed_shards = _digits(0, 1).train, [_digits(p, 2).train for p in (0, 1)]
    resumed_single.set_state(shards[0].get_state())  # 2 processes' checkpoint, 1 process
    for shard in resumed_shards:
        shard.set_state(single.get_state())  # and the other way round
    whole = next(single)
    np.testing.assert_array_equal(next(resumed_single)["image"], whole["image"])
    np.testing.assert_array_equal(np.concatenate([next(s)["image"] for s in resumed_shards]), whole["image"])


# --- end to end ----------------------------------------------------------------------------------------

def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    workdir, output = two_processes
    assert "joined a job of 2 processes as process 0" in output
    assert "on 8 cpu device(s), 2 process(es)" in output
    # Process 0 alone logs progress and writes files; the other logs warnings only.
    assert re.search(r"^\[0\] .*step 6/6", output, re.M) and not re.search(r"^\[1\] .*step \d/6", output, re.M)
    diff = max_diff(final_variables(one_process), final_variables(workdir))
    print(f"max |2 processes - 1 process| over the final variables: {diff:.3g}")
    assert diff <= ATOL
    rows = [train_rows(w) for w in (one_process, workdir)]
    assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]]
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(*rows, strict=True))
    print(f"max |2 processes - 1 process| over the train losses: {loss_diff:.3g}")
    assert loss_diff <= LOSS_ATOL
    summaries = [json.loads((w / "summary.json").read_text()) for w in (one_process, workdir)]
    logits, labels = numerics.cached_eval_logits(in_process_config(), [one_process, workdir])
    numerics.assert_same_accuracy(tuple(s["eval_accuracy"] for s in summaries), logits, labels, MIN_MARGIN)


@pytest.mark.parametrize("written_by, resumed_by", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_process_count(one_process, two_processes, tmp_path, written_by,
                                                     resumed_by):
    finished = {1: one_process, 2: two_processes[0]}
    workdir = copy_to_step_3(finished[written_by], tmp_path / "run")
    output = launch(resumed_by, workdir)
    assert f"resumed from step 3 of {workdir}" in output
    resumed = final_variables(workdir)
    for reference in finished.values():
        diff = max_diff(resumed, final_variables(reference))
        print(f"written by {written_by}, resumed by {resumed_by} vs uninterrupted: max diff {diff:.3g}")
        assert diff <= ATOL


def test_sigterm_saves_at_the_next_step_and_the_rerun_ends_bitwise_identical(one_process, tmp_path):
    workdir = tmp_path / "run"
    # A checkpoint every step keeps each step slow enough for the signal to land mid-run; it
    # changes no number, so the result must still equal one_process's to the bit.
    overrides = ("--config.checkpoint.every=1",)
    launcher = subprocess.Popen(command(1, workdir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    lines, first_step = [], threading.Event()

    def read():
        for line in launcher.stdout:
            lines.append(line)
            if re.search(r"^\[0\] (?:\d\d:\d\d:\d\d )?step 1/", line):  # with or without the log's time
                first_step.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_step.wait(RUN_TIMEOUT), "".join(lines[-30:])
        signalled = time.monotonic()
        launcher.send_signal(signal.SIGTERM)  # forwarded to the process by xfer.scaling.multiprocess
        launcher.send_signal(signal.SIGTERM)  # a second one, at once: changes nothing
        returncode = launcher.wait(timeout=RUN_TIMEOUT)
        seconds_to_exit = time.monotonic() - signalled
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert returncode == 0, output[-5000:]
    preempted = re.search(r"preempted at step (\d+); saved", output)
    assert preempted, output[-5000:]
    step = int(preempted.group(1))
    print(f"SIGTERM after step 1: saved step {step}, exited 0 after {seconds_to_exit:.1f} s")
    assert 1 <= step <= 3  # step 1 was logged; its next step boundary, or the one after if the signal was slow
    assert max(row["step"] for row in train_rows(workdir)) == step  # no step trained after it
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == step
    assert not (workdir / "summary.json").exists()

    output = launch(1, workdir, *overrides)
    assert f"resumed from step {step} of {workdir}" in output
    resumed, uninterrupted = final_variables(workdir), final_variables(one_process)
    for path, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[path], value, err_msg=path)
