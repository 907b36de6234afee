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

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xfer import checkpoint

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


def test_round_trip_restores_every_leaf_with_the_template_sharding(tmp_path):
    saved = make_state(7)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, saved, {"position": 7, "epoch": [1, 2]}, CONFIG, {"eval_accuracy": jnp.float32(0.5)})
        assert not ckpt.save(7, saved, {"position": 7}, CONFIG)  # already saved: a no-op
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 7
        step, state, data_state = ckpt.restore(make_state(0))
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
        step, state, _ = ckpt.restore(abstract)
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
        step, state, data_state = ckpt.restore(make_state(0))
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
        with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*tried steps \[2, 1\]"):
            ckpt.restore(make_state(0))
        assert ckpt.latest_step() == 2  # nothing deleted when nothing could be restored


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
    from xfer import checkpoint
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
        cwd=pathlib.Path(checkpoint.__file__).parents[1],  # so the child imports this xfer
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "saving 2" in child.stdout
    # Killed mid-write: besides step 1 there is only the uncommitted temporary of step 2.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0] == "1" and "2" not in left, left
    template = {"params": {"w": jnp.zeros((4,))}}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        step, state, data_state = ckpt.restore(template)
        assert (step, data_state) == (1, {"position": 1})
        np.testing.assert_array_equal(state["params"]["w"], np.ones(4))
        assert ckpt.save(2, {"params": {"w": jnp.full((4,), 2.0)}}, {"position": 2}, {})
    # The half-written step 2 was a temporary directory, removed when the directory was reopened.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
