"""The trainer's numerical promises, checked end to end through `launch.py`.

Three claims a user relies on without being able to see them:

1. **8 devices compute what 1 device computes.** The batch is split over a
   ('data',) mesh, but under `jax.jit` the step sees one global array, so the
   gradient and the BatchNorm statistics are over the global batch: the final
   state matches a 1-device run up to float32 reduction order. A trainable
   BatchNorm (`_blocks/15`) is in the comparison, and a run with per-device
   statistics (`bn_cross_device=False`) is shown to fail it, so the comparison
   can tell the two apart.
2. **A run SIGKILLed right after a checkpoint resumes to the same bits** as a
   run never interrupted: params, batch_stats, optimizer state, rng, step and
   data position. Dropout (Lite0's head) and crop/flip augmentation are on, so
   both random streams (the step rng folded with the step number, the data
   pipeline's per-position seeds) must come back from the checkpoint.
3. **A truncated newest checkpoint falls back to the one before it**, and the
   run still ends bitwise where the uninterrupted one did.

Each run is a subprocess: the device count (`XLA_FLAGS`) must be set before
JAX is imported, and a SIGKILL must hit a real process. A kill is made
deterministic by a wrapper that patches `Checkpointer.save` to wait for the
commit of step k and then SIGKILL its own process.

Setup: EfficientNet-Lite0 from its ImageNet weights on digits at 32 px, batch
16, 6 steps, checkpoints every 2; `_blocks/15` (with its three BatchNorms) and
`_fc` train, the rest is frozen. The runs share a persistent JAX compilation
cache: the same executables either way, minus the seconds it takes to compile
them again in every process (most of it Lite0's `jit(model.init)`).

The optimizer is SGD with momentum, not the quickstart's Adam. Adam's update
g / (sqrt(v) + eps) behaves like lr * sign(g) on an entry's first non-zero
gradients, so entries whose gradient is at the rounding-noise level (|g| of a
few 1e-8 here, thousands of them in block 15) move by +-lr depending on the
order of a float32 sum. Measured with Adam: after two steps the gradients of 8
and 1 device(s) agree to 4e-7, yet the parameters differ by 9e-3 (~lr). With
SGD a gradient difference stays a difference of the same size.

Measured on 2 CPU cores: 8 vs 1 device(s) differ by at most 1.3e-7 in params,
1.5e-5 in batch_stats (a variance of ~260, so 6e-8 relative) and 4.5e-6 in the
momentum (1e-5 of a tensor's largest entry); all within 0.2 of the tolerances
below. Per-device BatchNorm statistics differ by up to 1.9, ~6600 times the
tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
N = 2  # checkpoint every N steps
TOTAL = 3 * N
CONFIG = [
    "--config=configs/quickstart.py",
    "--config.data.image_size=32",
    "--config.batch_size=16",
    f"--config.total_steps={TOTAL}",
    "--config.data.augment=crop_flip",  # the data pipeline's random stream
    "--config.data.test_fraction=0.05",  # 90 eval images: evaluation is not what is tested here
    "--config.feature_cache=",  # train on images, through the frozen backbone, with augmentation
    f"--config.checkpoint.every={N}",
    "--config.checkpoint.keep_latest=2",
    # The last block (three trainable BatchNorms) and the head, whose dropout (0.2) is then active.
    '--config.partition=(("^_blocks/15/", "head"), ("^_fc/", "head"), (".*", "frozen"))',
    "--config.optim.head.optimizer=sgd",  # see the module docstring: not Adam
    "--config.optim.head.lr=0.01",
    "--config.optim.head.momentum=0.9",
]
# 8 vs 1 devices: float32 sums in another order differ in the last bits. Elementwise
# |a - b| <= ATOL + RTOL |b| for params and batch_stats; the momentum sums raw gradients,
# whose small entries are differences of large terms, so it is held to MOMENTUM_RTOL of
# each tensor's largest entry.
RTOL, ATOL = 1e-5, 1e-6
MOMENTUM_RTOL = 1e-4
# The 8-device runs save only at the end: checkpoint frequency does not change the
# numbers (the resume tests show that), and an 8-device save takes seconds on 2 cores.
EIGHT_DEVICES = ("--config.checkpoint.every=1000",)

# `python -c KILLER <step> launch.py ...`: launch.py, SIGKILLed once checkpoint <step> is committed.
KILLER = textwrap.dedent("""
    import os, runpy, signal, sys
    from xfer.training import checkpoint

    kill_at = int(sys.argv.pop(1))
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == kill_at:
            self.wait()  # committed: what a preemption just after a save leaves behind
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    checkpoint.Checkpointer.save = save_then_die
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@dataclasses.dataclass
class Run:
    output: str  # stdout + stderr
    returncode: int


def launch(workdir: Path, *overrides: str, devices: int = 1, kill_after_save: int | None = None,
           config: Sequence[str] = CONFIG) -> Run:
    """`launch.py` with `config` + `overrides` in a fresh process on `devices` CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_compilation_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    prefix = [sys.executable] if kill_after_save is None else [sys.executable, "-c", KILLER, str(kill_after_save)]
    command = [*prefix, "launch.py", *config, *overrides, f"--workdir={workdir}"]
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    killed = "" if kill_after_save is None else f", killed after step {kill_after_save}"
    print(f"{workdir.name} ({devices} device(s){killed}): {time.perf_counter() - start:.1f} s wall, "
          f"{_children_cpu_seconds() - cpu_start:.1f} s CPU")
    run = Run(done.stdout + done.stderr, done.returncode)
    expected = 0 if kill_after_save is None else -signal.SIGKILL
    assert run.returncode == expected, f"exit {run.returncode}, expected {expected}:\n{run.output[-3000:]}"
    return run


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def read_state(workdir: Path, step: int = TOTAL) -> dict:
    """The whole TrainState of checkpoint `step` as numpy arrays, whatever devices wrote it."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy))


def read_data_state(workdir: Path, step: int = TOTAL) -> dict:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(step) / "data_state")


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    got, want = leaves(actual), leaves(expected)
    assert got.keys() == want.keys()
    differ = [key for key in want if not np.array_equal(got[key], want[key])]
    assert not differ, f"{len(differ)} of {len(want)} state entries differ, e.g. {differ[:5]}"


def max_abs_difference(actual: dict, expected: dict) -> tuple[float, str]:
    got, want = leaves(actual), leaves(expected)
    return max((float(np.max(np.abs(got[k] - want[k]), initial=0)), k) for k in want)


def tolerance_used(actual: dict, expected: dict, rtol: float, atol: float,
                   relative_to_max: bool = False) -> tuple[float, str]:
    """Largest |a - b| / (atol + rtol |b|) over all entries (<= 1: allclose), and where.

    `relative_to_max`: rtol times the tensor's largest |b| instead of each |b|.
    """
    got, want = leaves(actual), leaves(expected)
    assert got.keys() == want.keys()
    worst = (0.0, "")
    for key, b in want.items():
        if not b.size:
            continue
        scale = np.max(np.abs(b)) if relative_to_max else np.abs(b)
        allowed = np.maximum(atol + rtol * scale, np.finfo(np.float32).tiny)  # 0 allowed: only equality passes
        ratio = np.abs(got[key] - b) / allowed
        worst = max(worst, (float(np.max(np.where(np.isnan(ratio), np.inf, ratio))), key))
    return worst


def assert_resumes_like(workdir: Path, reference: Path) -> None:
    """`workdir` ended where the uninterrupted `reference` run did: state, data position, eval."""
    assert_bitwise_equal(read_state(workdir), read_state(reference))
    assert read_data_state(workdir) == read_data_state(reference) == {"next_index": TOTAL}
    evaluations = [{k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k.startswith("eval")}
                   for run in (workdir, reference)]
    assert evaluations[0] == evaluations[1] and "eval_accuracy" in evaluations[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The directory of this module's workdirs (and of their shared compilation cache)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """The uninterrupted 1-device run every test compares against."""
    run = launch(runs / "reference")
    assert "on 1 cpu device(s)" in run.output
    return runs / "reference"


def test_eight_devices_match_one_including_batchnorm_statistics(runs, reference):
    eight = launch(runs / "eight_devices", *EIGHT_DEVICES, devices=8)
    assert "on 8 cpu device(s)" in eight.output
    one, many = read_state(reference), read_state(runs / "eight_devices")

    # The comparison covers trainable BatchNorm: block 15's statistics moved during
    # the last N steps, a frozen block's did not.
    before = read_state(reference, TOTAL - N)["batch_stats"]["_blocks"]
    after = one["batch_stats"]["_blocks"]
    assert not np.array_equal(before["15"]["_bn0"]["var"], after["15"]["_bn0"]["var"])
    assert np.array_equal(before["14"]["_bn0"]["var"], after["14"]["_bn0"]["var"])

    for collection, tolerance in [("params", dict(rtol=RTOL, atol=ATOL)),
                                  ("batch_stats", dict(rtol=RTOL, atol=ATOL)),
                                  ("opt_state", dict(rtol=MOMENTUM_RTOL, atol=0, relative_to_max=True))]:
        used, where = tolerance_used(many[collection], one[collection], **tolerance)
        print(f"8 vs 1 device(s), {collection}: max |difference| %.3g at %s; " % max_abs_difference(
            many[collection], one[collection]) + f"{used:.3g} of the tolerance at {where}")
        assert used <= 1, f"{collection}{where} differs by {used:.3g} times the tolerance"
    assert many["step"] == one["step"] == TOTAL
    np.testing.assert_array_equal(many["rng"], one["rng"])
    assert read_data_state(runs / "eight_devices") == read_data_state(reference)


def test_per_device_batchnorm_statistics_would_fail_that_comparison(runs, reference):
    """What the test above rules out: torch-DDP-style BatchNorm over each device's 2 examples."""
    launch(runs / "per_device_bn", *EIGHT_DEVICES, "--config.bn_cross_device=False", devices=8)
    per_device, one = read_state(runs / "per_device_bn"), read_state(reference)
    used, where = tolerance_used(per_device["batch_stats"], one["batch_stats"], RTOL, ATOL)
    print(f"per-device BatchNorm vs 1 device: batch_stats {used:.3g}x the tolerance at {where}; "
          "max |difference| %.3g at %s" % max_abs_difference(per_device, one))
    assert where.startswith("['_blocks']['15']") and used > 1000


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_an_uninterrupted_run(runs, reference):
    workdir = runs / "killed_after_N"
    launch(workdir, kill_after_save=N)
    assert saved_steps(workdir) == [N]
    resumed = launch(workdir)
    assert f"resumed from step {N} " in resumed.output
    assert_resumes_like(workdir, reference)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(runs, reference):
    workdir = runs / "truncated_2N"
    launch(workdir, kill_after_save=2 * N)
    assert saved_steps(workdir) == [N, 2 * N]
    # Cut the largest array-data file of step 2N in half, as a full disk or a torn copy would.
    files = [p for p in (workdir / "checkpoints" / str(2 * N) / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    assert len(data) > 1_000_000  # the frozen backbone's weights, not a small metadata file
    largest.write_bytes(data[: len(data) // 2])

    resumed = launch(workdir)
    warning = next(line for line in resumed.output.splitlines() if "unreadable" in line)
    print(warning[-300:])
    assert f"checkpoint step {2 * N} in" in warning
    assert f"resumed from step {N} " in resumed.output
    assert saved_steps(workdir) == [2 * N, TOTAL]  # step 2N deleted, then written again
    assert_resumes_like(workdir, reference)
