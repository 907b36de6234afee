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
`_fc` train, the rest is frozen. The optimizer is SGD with momentum, not the
quickstart's Adam: Adam's update g / (|g| + eps) magnifies a gradient
difference by up to lr / eps near g = 0, and Lite0 has gradients whose exact
value is 0 but whose computed value is rounding noise (~1e-8) of a sign that
depends on summation order. With Adam, 8 vs 1 devices differ by ~lr in such
entries after two steps although the gradients agree to ~1e-7; with SGD the
difference stays at the rounding level. (Resume is bitwise with either.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
    f"--config.checkpoint.every={N}",
    "--config.checkpoint.keep_latest=2",
    # The last block (three trainable BatchNorms) and the head, whose dropout (0.2) is then active.
    '--config.partition=(("^_blocks/15/", "head"), ("^_fc/", "head"), (".*", "frozen"))',
    "--config.optim.head.optimizer=sgd",  # see the module docstring: not Adam
    "--config.optim.head.lr=0.05",
    "--config.optim.head.momentum=0.9",
]
# rtol/atol for 8 vs 1 devices: float32 sums in another order differ in the last bits.
RTOL, ATOL = 1e-5, 1e-6

# `python -c KILLER <step> launch.py ...`: launch.py, SIGKILLed once checkpoint <step> is committed.
KILLER = textwrap.dedent("""
    import os, runpy, signal, sys
    from xfer import checkpoint

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

WALL_TIMES: dict[str, float] = {}


@dataclasses.dataclass
class Run:
    output: str  # stdout + stderr
    returncode: int


def launch(workdir: Path, *overrides: str, devices: int = 1, kill_after_save: int | None = None) -> Run:
    """`launch.py` with CONFIG + `overrides` in a fresh process on `devices` CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    prefix = [sys.executable] if kill_after_save is None else [sys.executable, "-c", KILLER, str(kill_after_save)]
    command = [*prefix, "launch.py", *CONFIG, *overrides, f"--workdir={workdir}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    label = f"{workdir.name}{'' if kill_after_save is None else f' (killed after {kill_after_save})'}"
    WALL_TIMES[label] = time.perf_counter() - start
    print(f"{label}: {WALL_TIMES[label]:.1f} s")
    run = Run(done.stdout + done.stderr, done.returncode)
    expected = 0 if kill_after_save is None else -signal.SIGKILL
    assert run.returncode == expected, f"exit {run.returncode}, expected {expected}:\n{run.output[-3000:]}"
    return run


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


def assert_resumes_like(workdir: Path, reference: Path) -> None:
    """`workdir` ended where the uninterrupted `reference` run did: state, data position, eval."""
    assert_bitwise_equal(read_state(workdir), read_state(reference))
    assert read_data_state(workdir) == read_data_state(reference) == {"next_index": TOTAL}
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary == json.loads((reference / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 1-device run every test compares against."""
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    run = launch(workdir)
    assert "on 1 cpu device(s)" in run.output
    return workdir


def test_eight_devices_match_one_including_batchnorm_statistics(reference, tmp_path):
    eight = launch(tmp_path / "eight_devices", devices=8)
    assert "on 8 cpu device(s)" in eight.output
    one, many = read_state(reference), read_state(tmp_path / "eight_devices")

    # The comparison covers trainable BatchNorm: block 15's statistics moved during
    # the last N steps, a frozen block's did not.
    before = read_state(reference, TOTAL - N)["batch_stats"]["_blocks"]
    assert not np.array_equal(before["15"]["_bn0"]["var"], one["batch_stats"]["_blocks"]["15"]["_bn0"]["var"])
    assert np.array_equal(before["14"]["_bn0"]["var"], one["batch_stats"]["_blocks"]["14"]["_bn0"]["var"])

    for collection in ("params", "batch_stats", "opt_state"):
        got, want = leaves(many[collection]), leaves(one[collection])
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=f"{collection}{key}")
    print("8 vs 1 device(s): max |difference| %.3g at %s" % max_abs_difference(many, one))
    assert many["step"] == one["step"] == TOTAL
    np.testing.assert_array_equal(many["rng"], one["rng"])


def test_per_device_batchnorm_statistics_would_fail_the_comparison(reference, tmp_path):
    """What the test above rules out: torch-DDP-style BatchNorm over each device's 2 examples."""
    launch(tmp_path / "per_device_bn", "--config.bn_cross_device=False", devices=8)
    stats = read_state(tmp_path / "per_device_bn")["batch_stats"]
    difference, where = max_abs_difference(stats, read_state(reference)["batch_stats"])
    print(f"per-device BatchNorm vs 1 device: max |difference| {difference:.3g} at {where}")
    assert "'15'" in where
    with pytest.raises(AssertionError):
        for key, want in leaves(read_state(reference)["batch_stats"]).items():
            np.testing.assert_allclose(leaves(stats)[key], want, rtol=RTOL, atol=ATOL)


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_an_uninterrupted_run(reference, tmp_path):
    workdir = tmp_path / "killed"
    launch(workdir, kill_after_save=N)
    assert saved_steps(workdir) == [N]
    resumed = launch(workdir)
    assert f"resumed from step {N} " in resumed.output
    assert_resumes_like(workdir, reference)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    workdir = tmp_path / "truncated"
    launch(workdir, kill_after_save=2 * N)
    assert saved_steps(workdir) == [N, 2 * N]
    # Cut the largest array-data file of step 2N in half, as a full disk or a torn copy would.
    files = [p for p in (workdir / "checkpoints" / str(2 * N) / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    assert len(data) > 1_000_000  # the frozen backbone's weights, not a small metadata file
    largest.write_bytes(data[: len(data) // 2])

    resumed = launch(workdir)
    assert f"checkpoint step {2 * N} in" in resumed.output and "unreadable" in resumed.output
    assert f"resumed from step {N} " in resumed.output
    assert_resumes_like(workdir, reference)
