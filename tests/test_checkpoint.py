"""A run resumes from its newest good checkpoint and never loses its best one.

Small pytrees on the 1-device CPU mesh the trainer uses; one subprocess is
SIGKILLed in the middle of an async save to prove saves are atomic.
"""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xfer.training import checkpoint
from xfer import cli
from xfer.training.checkpoint import digest

REPO = pathlib.Path(__file__).resolve().parents[1]

MESH = Mesh(jax.devices(), ("data",))
REPLICATED = NamedSharding(MESH, P())
CONFIG = {"model": {"name": "vgg11"}, "optim": {"lr": 0.1, "momentum": 0.9}}


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array


def make_state(seed: int) -> State:
    """A state whose every leaf depends on `seed`, with momentum already accumulated."""
    rng = jax.random.key(seed)
    params = {
        # Random, so the kernel's data file is the largest file in a checkpoint.
        "features": {"0": {"kernel": jax.random.normal(rng, (3, 3, 64, 64)), "bias": jnp.full((64,), seed, jnp.float32)}},
        "classifier": {"kernel": jnp.full((64, 2), seed, jnp.float32)},
    }
    tx = optax.sgd(0.1, momentum=0.9)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    state = State(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        batch_stats={"bn": {"mean": jnp.full((4,), seed / 10, jnp.float32)}},
        opt_state=opt_state,
        rng=jax.random.fold_in(rng, 1),
    )
    return jax.device_put(state, REPLICATED)


def assert_state_equal(actual: State, expected: State):
    def leaves(state):
        state = state.replace(rng=jax.random.key_data(state.rng))
        return jax.tree_util.tree_leaves_with_path(state)

    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    assert jax.dtypes.issubdtype(actual.rng.dtype, jax.dtypes.prng_key)
    for (path, got), (_, want) in zip(leaves(actual), leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def save_steps(directory, steps_and_accuracies, **options):
    with checkpoint.Checkpointer(directory, **options) as ckpt:
        for step, accuracy in steps_and_accuracies:
            metrics = None if accuracy is None else {"eval_accuracy": accuracy, "eval_loss": 1 - accuracy}
            assert ckpt.save(step, make_state(step), {"position": step}, CONFIG, metrics)


def step_dirs(directory) -> list[int]:
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def test_the_chrono_comes_back_verified_and_is_empty_for_a_save_without_one(tmp_path):
    chrono = {"train_seconds": 12.5, "timed_steps": 9, "wall_seconds": 40.25, "attempts": 2}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), {"position": 1}, CONFIG)
        ckpt.save(2, make_state(2), {"position": 2}, CONFIG, chrono=chrono)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(make_state(0)).chrono == chrono
    (tmp_path / "2" / "chrono" / "metadata").write_text('{"train_seconds": 0.0}')  # tampered with: step 1
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(make_state(0))[::3] == (1, {})


def test_round_trip_restores_every_leaf_with_the_template_sharding(tmp_path):
    saved = make_state(7)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, saved, {"position": 7, "epoch": [1, 2]}, CONFIG, {"eval_accuracy": jnp.float32(0.5)})
        assert not ckpt.save(7, saved, {"position": 7}, CONFIG)  # already saved: a no-op
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 7
        step, state, data_state, _ = ckpt.restore(make_state(0))
    assert step == 7
    assert data_state == {"position": 7, "epoch": [1, 2]}
    assert_state_equal(state, saved)
    assert isinstance(state.opt_state[0], optax.TraceState)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding == REPLICATED
    config = (tmp_path / "7" / "config" / "metadata").read_text()
    assert '"momentum": 0.9' in config


def test_restore_onto_abstract_template(tmp_path):
    save_steps(tmp_path, [(3, 0.5)])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=REPLICATED), make_state(0)
    )
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        step, state, _, _ = ckpt.restore(abstract)
    assert step == 3
    assert_state_equal(state, make_state(3))
    assert state.params["classifier"]["kernel"].sharding == REPLICATED


def test_keeps_latest_k_and_best_n_together(tmp_path):
    # Best is step 2; steps 5 and 6 are unranked (e.g. saved on preemption).
    history = [(1, 0.3), (2, 0.9), (3, 0.5), (4, 0.6), (5, None), (6, None)]
    save_steps(tmp_path, history, keep_latest=2, keep_best=1)
    assert step_dirs(tmp_path) == [2, 5, 6]
    with checkpoint.Checkpointer(tmp_path, keep_latest=2, keep_best=1) as ckpt:
        assert ckpt.best_step() == 2
        # The best survives a restart: its metrics are on disk, not only in memory.
        ckpt.save(7, make_state(7), {}, CONFIG, {"eval_accuracy": 0.1, "eval_loss": 0.9})
    assert step_dirs(tmp_path) == [2, 6, 7]


def test_best_by_minimum(tmp_path):
    history = [(1, 0.3), (2, 0.9), (3, 0.5), (4, 0.6)]
    save_steps(tmp_path, history, keep_latest=1, keep_best=2, best_metric="eval_loss", best_mode="min")
    assert step_dirs(tmp_path) == [2, 4]  # lowest losses 0.1 (step 2), 0.4 (step 4); 4 is also latest


def test_bad_metrics_and_non_json_states_fail_at_save(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="lack best_metric 'eval_accuracy'"):
            ckpt.save(1, make_state(1), {}, CONFIG, {"eval/accuracy": 0.5})
        with pytest.raises(TypeError, match="data_state for step 1 is not JSON-serialisable"):
            ckpt.save(1, make_state(1), {"iterator": b"\x00"}, CONFIG)
        assert ckpt.latest_step() is None


def test_damaged_latest_falls_back_to_previous_step(tmp_path, caplog):
    save_steps(tmp_path, [(1, 0.5), (2, 0.6)])
    biggest = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="xfer"), checkpoint.Checkpointer(tmp_path) as ckpt:
        step, state, data_state, _ = ckpt.restore(make_state(0))
        assert (step, data_state) == (1, {"position": 1})
        assert_state_equal(state, make_state(1))
        # The damaged step is gone, so the resumed run can write step 2 again.
        assert ckpt.latest_step() == 1
        assert ckpt.save(2, make_state(2), {"position": 2}, CONFIG)
    assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    save_steps(tmp_path, [(1, 0.5), (2, 0.6)])
    for step in (1, 2):
        (tmp_path / str(step) / "data_state" / "metadata").write_text('{"posit')
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"no readable checkpoint in .*steps 2, 1 unreadable") as info:
            ckpt.restore(make_state(0))
        assert ckpt.latest_step() == 2  # nothing deleted when nothing could be restored
    assert isinstance(info.value, cli.USER_ERRORS)  # launch.py: one `error:` line, exit code 2
    assert "\n" not in str(info.value) and "move " in str(info.value)


def test_emptied_state_metadata_everywhere_is_one_clear_error(tmp_path):
    save_steps(tmp_path, [(1, 0.5), (2, 0.6)])
    for step in (1, 2):
        (tmp_path / str(step) / "state" / "_METADATA").write_text("")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=r"steps 2, 1 unreadable; step 2: JSONDecodeError"):
            ckpt.restore(make_state(0))


def test_empty_directory_restore_names_the_directory(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(make_state(0))


def test_read_variables_ignores_the_optimizer(tmp_path):
    save_steps(tmp_path, [(1, 0.9), (2, 0.4), (3, 0.5)], keep_best=1)
    for which, step in (("latest", 3), ("best", 1), (2, 2)):
        variables = checkpoint.read_variables(tmp_path, which)
        assert set(variables) == {"params", "batch_stats"}
        expected = make_state(step)
        for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves((expected.batch_stats, expected.params))):
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, np.asarray(want))
    with pytest.raises(ValueError, match="not one of"):
        checkpoint.read_variables(tmp_path, 9)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax.numpy as jnp
    from xfer.training import checkpoint
    from xfer import cli
    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, {"params": {"w": jnp.ones((4,))}}, {"position": 1}, {})
    ckpt.wait()
    # 256 MB: the background write takes long enough to be caught half done.
    large = {"params": {"w": jnp.ones((4,)), "big": jnp.ones((64, 1024, 1024), jnp.float32)}}
    ckpt.save(2, large, {"position": 2}, {})
    while set(os.listdir(directory)) == {"1"}:  # until step 2's write has begun on disk
        time.sleep(0.001)
    print("saving 2", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_during_async_save_keeps_previous_step(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        cwd=REPO,  # so the child imports this xfer
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "saving 2" in child.stdout
    # Killed mid-write: besides step 1 there is only the uncommitted temporary of step 2.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0] == "1" and "2" not in left, left
    template = {"params": {"w": jnp.zeros((4,))}}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        step, state, data_state, _ = ckpt.restore(template)
        assert (step, data_state) == (1, {"position": 1})
        np.testing.assert_array_equal(state["params"]["w"], np.ones(4))
        assert ckpt.save(2, {"params": {"w": jnp.full((4,), 2.0)}}, {"position": 2}, {})
    # The half-written step 2 was a temporary directory, removed when the directory was reopened.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# --- Damage Orbax does not notice: every checkpoint carries a digest of what it holds. ---


def noisy_state(seed: int) -> dict:
    """Random bits do not compress, so zstd stores them raw and damaged bytes decode without error."""
    return {
        "params": {"noise": jax.random.bits(jax.random.key(seed), (256, 1024), jnp.uint32),
                   "bias": jnp.full((8,), seed, jnp.float32)},
        "step": jnp.asarray(seed, jnp.int32),
    }


def damage_middle(directory: pathlib.Path) -> pathlib.Path:
    """4 KiB of random bytes over the middle of the largest data file under `directory`."""
    biggest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.seek(biggest.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    return biggest


def test_damaged_bytes_that_decode_are_caught_by_the_digest(tmp_path, caplog):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, noisy_state(step), {"position": step}, CONFIG)
    damage_middle(tmp_path / "2" / "state" / "ocdbt.process_0" / "d")
    # Orbax alone reads the damage back as values, without an error:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, noisy_state(0))
    raw = ocp.StandardCheckpointer().restore(tmp_path / "2" / "state", abstract)
    assert np.sum(np.asarray(raw["params"]["noise"]) != np.asarray(noisy_state(2)["params"]["noise"])) > 100
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*/2 is damaged: 1 of 2 entries do not "
                                                         r"match .*\(params/noise differs\); read another"):
        checkpoint.read_variables(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="xfer"), checkpoint.Checkpointer(tmp_path) as ckpt:
        step, state, data_state, _ = ckpt.restore(noisy_state(0))
        assert (step, data_state) == (1, {"position": 1})
        assert ckpt.latest_step() == 1  # the damaged step is deleted like a truncated one
    np.testing.assert_array_equal(state["params"]["noise"], noisy_state(1)["params"]["noise"])
    assert "checkpoint step 2" in caplog.text and "params/noise differs" in caplog.text


def test_json_items_and_the_digest_itself_are_covered(tmp_path):
    save_steps(tmp_path, [(1, 0.5), (2, 0.6), (3, 0.7)])
    (tmp_path / "3" / "data_state" / "metadata").write_text('{"position": 33}')  # valid JSON, wrong value
    (tmp_path / "2" / "digest" / "metadata").write_text("")  # the digest unreadable
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        step, _, data_state, _ = ckpt.restore(make_state(0))
    assert (step, data_state) == (1, {"position": 1})
    save_steps(tmp_path / "again", [(1, 0.5), (2, 0.6)])
    (tmp_path / "again" / "2" / "digest").rename(tmp_path / "again" / "digest-moved")  # the digest gone
    with checkpoint.Checkpointer(tmp_path / "again") as ckpt:
        assert ckpt.restore(make_state(0))[0] == 1


def test_checkpoints_from_before_the_digest_restore_unverified(tmp_path, caplog):
    """The layout the previous Checkpointer wrote: state, data_state and config, no digest."""
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(make_state(4)),
                                                data_state=ocp.args.JsonSave({"position": 4}),
                                                config=ocp.args.JsonSave(CONFIG)))
    with caplog.at_level(logging.WARNING, logger="xfer"):
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            step, state, data_state, _ = ckpt.restore(make_state(0))
        variables = checkpoint.read_variables(tmp_path)
    assert (step, data_state) == (4, {"position": 4})
    assert_state_equal(state, make_state(4))
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"], np.full((64, 2), 4.0))
    assert caplog.text.count("has no digest") == 2 and "unverified" in caplog.text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool", "uint32", "float16"])
def test_any_one_changed_element_changes_the_digest(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5)) * 50
    base = (values > 0) if dtype == "bool" else values.astype(jnp.dtype(dtype))
    want = digest.arrays({"x": base})["x"]
    for position in np.ndindex(base.shape):
        changed = base.copy()
        changed[position] = not changed[position] if dtype == "bool" else changed[position] + 1
        assert digest.arrays({"x": changed})["x"] != want, position
    swapped = base.copy().reshape(-1)
    i, j = next((i, j) for i in range(base.size) for j in range(i) if swapped[i] != swapped[j])
    swapped[[i, j]] = swapped[[j, i]]
    assert digest.arrays({"x": swapped.reshape(base.shape)})["x"] != want
    # On device as on the host, scalars too.
    assert digest.arrays({"x": jnp.asarray(base)})["x"] == want
    scalar = {"s": np.float32(1.5)}
    assert digest.arrays(scalar) == digest.arrays({"s": jnp.float32(1.5)})


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from xfer.training.checkpoint import digest
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(0)
    host = {"f32": rng.standard_normal((8, 6, 4)).astype(np.float32),
            "bf16": rng.standard_normal((8, 6, 4)).astype(jnp.bfloat16),
            "i8": rng.integers(-100, 100, (8, 6, 4)).astype(np.int8),
            "flag": rng.random((8, 6, 4)) > 0.5}
    want = digest.arrays(host)
    for spec in (P(), P("a"), P("b"), P(None, "b"), P("a", "b"), P(("a", "b")), P(None, None, "b"),
                 P("b", None, None)):
        tree = {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in host.items()}
        assert digest.arrays(tree) == want, spec
    keys = jax.random.split(jax.random.key(0), 8)
    sharded = digest.arrays({"k": jax.device_put(keys, NamedSharding(mesh, P("a")))})["k"]
    on_host = digest.arrays({"k": np.asarray(jax.random.key_data(keys))})["k"]
    assert sharded == on_host
    print("same on", jax.device_count(), "devices")
    """
)


def test_digests_are_the_same_for_every_sharding():
    child = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "same on 8 devices" in child.stdout


# --- Failed saves: one error that names the step, the directory and the cause; nothing hangs. ---


def test_unwritable_directory_fails_the_save_at_once(tmp_path, monkeypatch):
    """What `chmod -R a-w` does for a non-root user (tests run as root, where it would not)."""
    save_steps(tmp_path, [(1, 0.5)])
    real_mkdir = os.mkdir

    def unwritable(path, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    started = time.monotonic()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        monkeypatch.setattr(os, "mkdir", unwritable)
        with pytest.raises(checkpoint.CheckpointError) as info:
            ckpt.save(2, make_state(2), {"position": 2}, CONFIG, {"eval_accuracy": 0.6})
    assert time.monotonic() - started < 60  # the directory was created asynchronously: Orbax waited 5 minutes
    assert str(info.value) == (
        f"saving checkpoint 2 in {tmp_path} failed: [Errno 13] Permission denied; make it writable and rerun "
        "to resume (or start over with another --workdir); checkpoint 1 is intact")
    assert step_dirs(tmp_path) == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def fail_background_json_writes(monkeypatch):
    """Every JSON item write in the background thread fails as on a full disk."""

    async def full_disk(self, item, directory):
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)


def test_failed_background_save_surfaces_at_the_next_save_and_is_cleaned_up(tmp_path, monkeypatch):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), {"position": 1}, CONFIG)
        ckpt.wait()
        with monkeypatch.context() as patch:
            fail_background_json_writes(patch)
            assert ckpt.save(2, make_state(2), {"position": 2}, CONFIG)  # started; fails in the background
            while ckpt._manager.is_saving_in_progress():
                time.sleep(0.01)
        # The next save reports step 2's failure before writing anything of step 3.
        with pytest.raises(checkpoint.CheckpointError, match=r"saving checkpoint 2 in .* failed: \[Errno 28\] "
                                                             r"No space left on device; free space there .*"
                                                             r"checkpoint 1 is intact"):
            ckpt.save(3, make_state(3), {"position": 3}, CONFIG)
        ckpt.wait()  # reported once: waiting and closing again do not raise it again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # the partial step 2 is removed


def test_check_reports_a_failed_background_save_without_blocking(tmp_path, monkeypatch):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.check()  # nothing saved yet
        fail_background_json_writes(monkeypatch)
        ckpt.save(5, make_state(5), {"position": 5}, CONFIG)
        deadline = time.monotonic() + 60
        with pytest.raises(checkpoint.CheckpointError, match="saving checkpoint 5 .* no earlier checkpoint was saved"):
            while time.monotonic() < deadline:
                ckpt.check()
                time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []


DISK_FULL = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from xfer.training import checkpoint
    def state(words):
        return {"params": {"w": jax.random.bits(jax.random.key(words), (words,), jnp.uint32)}}
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, state(256 * 1024), {"position": 1}, {})  # 1 MiB of incompressible bits
    ckpt.wait()
    try:
        ckpt.save(2, state(1024 * 1024), {"position": 2}, {})  # 4 MiB: more than the disk has left
        ckpt.wait()
    except checkpoint.CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
    ckpt.close()
    """
)


def test_full_disk_is_one_line_and_frees_the_partial_checkpoint(tmp_path):
    """A real ENOSPC from tensorstore on a 3 MB tmpfs (needs root to mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        child = subprocess.run(
            [sys.executable, "-c", DISK_FULL, str(disk / "checkpoints")], capture_output=True, text=True,
            timeout=300, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        left = sorted(p.name for p in (disk / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    lines = child.stderr.strip().splitlines()
    assert child.returncode == 0 and len(lines) == 1, child.stderr[-3000:]  # no Orbax or tensorstore tracebacks
    assert lines[0].startswith(f"error: saving checkpoint 2 in {disk / 'checkpoints'} failed: [Errno 28] No space "
                               "left on device; free space there"), lines[0]
    assert lines[0].endswith("checkpoint 1 is intact")
    assert left == ["1"]  # the partial step 2 no longer holds the disk
