"""Training from cached features equals training from images, and bad cut points fail early.

The runs are Lite0 at 32 px on digits: small enough for CI, and the same code
path as the quickstart (a linear probe with the cut found automatically), with
SGD instead of the quickstart's Adam (tests/numerics.py: the two runs' features
come from two XLA programs, and Adam would turn their rounding differences in a
gradient near 0 into +-lr steps).
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfer import models
from xfer.learning import optim, plan as freeze_plan
from xfer.training import feature_cache, train

import numerics
from configs import quickstart

# Cached vs uncached parameters: |cached - uncached| <= ATOL + RTOL |uncached|. Measured (AMD EPYC,
# 2 cores): bitwise equal, also under XLA_FLAGS --xla_cpu_max_isa=AVX, =SSE4_2 and
# --xla_cpu_enable_fast_math=true. With every cached feature (train and eval) moved by 1 ulp, as
# a CPU whose feature pass rounded otherwise would: 0.0094 of this tolerance (margin 107; 3e-8 of
# a kernel whose largest entry is 0.14).
RTOL, ATOL = 1e-4, 1e-6
# Eval predictions may differ only where the top two logits lie within MIN_MARGIN. The logits of the
# two runs measured equal; 1 ulp on every cached feature moved them by 9.5e-7 (MIN_MARGIN is 105
# times that). The smallest top-2 margin measured is 6.4e-4, so no example is excluded and the
# accuracies must be equal.
MIN_MARGIN = 1e-4


def _config(**overrides):
    config = quickstart.get_config()
    config.data.image_size = 32
    config.total_steps = 6
    config.batch_size = 32
    config.eval_every = 6
    config.log_every = 3
    config.checkpoint.every = 6
    config.optim.head.optimizer = "sgd"  # not Adam: see the module docstring
    config.optim.head.momentum = 0.9
    config.optim.head.lr = 0.1
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def cached_and_uncached(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, numerics.run_cached_and_uncached(_config, root)


def test_cached_training_equals_training_on_images(cached_and_uncached):
    root, summaries = cached_and_uncached
    numerics.assert_cached_equals_uncached(_config, root, summaries, RTOL, ATOL, MIN_MARGIN)
    assert sorted(p.name.split("-")[0] for p in (root / "cached" / "feature_cache").iterdir()) == ["eval", "train"]
    assert not (root / "uncached" / "feature_cache").exists()


def test_a_resumed_run_reuses_the_saved_cache(cached_and_uncached, caplog):
    root, _ = cached_and_uncached
    with caplog.at_level("INFO", logger="xfer"):
        train.run(_config(feature_cache="auto"), root / "cached")
    assert "feature cache: loaded" in caplog.text
    assert "feature cache: wrote" not in caplog.text


def _lite0_parts(rules, bn_policy=()):
    model = models.build("efficientnet_lite0", num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    optim_config = {group: optim.group_config(optimizer="sgd", lr=0.1) for _, group in rules if group != "frozen"}
    return model, shapes, freeze_plan.build(rules, bn_policy, optim_config, "efficientnet_lite0", shapes)


def test_auto_cuts_right_before_the_first_trained_module():
    model, shapes, plan = _lite0_parts((("^_blocks/1[45]/|^_conv_head/|^_bn1/|^_fc/", "top"), (".*", "frozen")))
    assert feature_cache.check_cut("auto", model, shapes, 32, plan) == "_blocks/13"
    assert feature_cache.check_cut("_blocks/10", model, shapes, 32, plan) == "_blocks/10"


@pytest.mark.parametrize("cut, message", [
    ("_blocks/15", "is not a frozen prefix: _blocks/14/_expand_conv runs before _blocks/15 and has trainable"),
    ("_blocks/99", "is not a module of the model"),
])
def test_a_cut_that_is_not_a_frozen_prefix_is_refused(cut, message):
    model, shapes, plan = _lite0_parts((("^_blocks/1[45]/|^_conv_head/|^_bn1/|^_fc/", "top"), (".*", "frozen")))
    with pytest.raises(feature_cache.FeatureCacheError, match=message):
        feature_cache.check_cut(cut, model, shapes, 32, plan)


def test_batch_statistics_before_the_cut_are_refused():
    model, shapes, plan = _lite0_parts((("^_fc/", "head"), (".*", "frozen")),
                                       bn_policy=(("^_bn0$", "stats_frozen"), (".*", "train")))
    assert plan.running_stats_layers == frozenset({"_bn0"})
    with pytest.raises(feature_cache.FeatureCacheError,
                       match="BatchNorm _blocks/0/_bn1 runs before _bn1 on batch statistics"):
        feature_cache.check_cut("_bn1", model, shapes, 32, plan)


@pytest.mark.parametrize("overrides, message", [
    ({"feature_cache": "_blocks/99"}, "is not a module of the model"),
    ({"feature_cache": "auto", "data.augment": "crop_flip"}, "needs un-augmented training images"),
])
def test_bad_cache_settings_fail_before_the_workdir_is_touched(tmp_path, overrides, message):
    with pytest.raises(feature_cache.FeatureCacheError, match=message):
        train.run(_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- writing and reading the cache folder ------------------------------------

KEY = {"split": "train", "cut": "_bn1", "dtype": "float32"}
COUNT, BATCH = 300, 64


def _batches(positions=range(COUNT)):
    """What `local_rows` yields: (features, labels, positions) a batch at a time; row i is all i."""
    positions = np.asarray(positions)
    for start in range(0, len(positions), BATCH):
        index = positions[start:start + BATCH]
        yield np.repeat(index[:, None] + 0.1, 64, axis=1).astype(np.float32), index % 10, index


def _folder(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "feature_cache").iterdir())


def test_rows_stream_to_disk_and_read_back_by_position(tmp_path):
    def rows():
        for batch_number, batch in enumerate(_batches()):
            if batch_number == 2:  # two batches on disk, nothing that reads as complete yet
                (written,) = (tmp_path / "feature_cache").glob("train-*.tmp/shard-00000-of-00001.features")
                assert written.stat().st_size == 2 * BATCH * 64 * 4
                assert [name.endswith(".tmp") for name in _folder(tmp_path)] == [True]
            yield batch

    features, labels = feature_cache.cached_features(tmp_path, KEY, COUNT, rows)
    assert len(features) == COUNT and not isinstance(features, np.ndarray)  # read row by row, not loaded
    np.testing.assert_array_equal(features[123], np.full(64, 123.1, np.float32))
    np.testing.assert_array_equal(labels, np.arange(COUNT) % 10)
    assert [name.endswith(".tmp") for name in _folder(tmp_path)] == [False]


def test_bfloat16_stores_half_the_bytes_and_reads_rounded_float32(tmp_path):
    features, _ = feature_cache.cached_features(tmp_path, {**KEY, "dtype": "bfloat16"}, COUNT, _batches)
    (shard,) = (tmp_path / "feature_cache").glob("train-*/*.features")
    assert shard.stat().st_size == COUNT * 64 * 2
    assert features[123].dtype == np.float32 and features[123][0] == 123.0  # 123.1 to bfloat16's 8 bits


def test_shards_of_several_processes_read_as_one_split(tmp_path):
    """Process p of 2 at 4 rows each writes blocks p, p + 2, ... of the pass (xfer.data.pipeline)."""
    folder = tmp_path / "train-x"
    folder.mkdir()
    blocks = np.arange(COUNT).reshape(-1, 4)
    for process in (0, 1):
        rows = _batches(blocks[process::2].ravel())
        feature_cache._write_shard(folder / f"shard-{process:05d}-of-00002", rows, COUNT // 2, "float32")
    features, labels = feature_cache.read(folder, COUNT)
    np.testing.assert_array_equal(np.stack([features[i][0] for i in range(COUNT)]),
                                  np.arange(COUNT, dtype=np.float32) + np.float32(0.1))
    np.testing.assert_array_equal(labels, np.arange(COUNT) % 10)
    (folder / "shard-00001-of-00002.npz").unlink()  # half the split
    with pytest.raises(feature_cache.FeatureCacheError, match="does not hold each of the split's 300 examples"):
        feature_cache.read(folder, COUNT)


def _write_fails_after_one_batch(monkeypatch, failure):
    """The second write of rows fails (a full disk: ENOSPC after a partial write, or a Ctrl-C)."""
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            real_write(fd, bytes(data)[:1000])
            raise failure
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_no_file(tmp_path, monkeypatch, failure):
    _write_fails_after_one_batch(monkeypatch, failure)
    with pytest.raises(type(failure)) as raised:
        feature_cache.cached_features(tmp_path, KEY, COUNT, _batches)
    assert _folder(tmp_path) == []  # the partial folder went with the error
    if isinstance(failure, OSError):
        assert raised.value.errno == errno.ENOSPC
        message = str(raised.value)
        assert str(tmp_path / "feature_cache" / "train-") in message and "No space left on device" in message
        assert "\n" not in message


def test_a_disk_without_room_for_the_shard_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(feature_cache.FeatureCacheWriteError) as raised:
        feature_cache.cached_features(tmp_path, KEY, COUNT, _batches)
    assert raised.value.errno == errno.ENOSPC
    assert "this process's shard needs 0.00 GiB, 0.00 GiB is free; free space there" in str(raised.value)
    assert _folder(tmp_path) == []


KILLED_MID_WRITE = """\
import os, signal, sys
from pathlib import Path
import numpy as np
from xfer.training import feature_cache

def rows():
    yield np.ones((64, 64), np.float32), np.zeros(64, np.int32), np.arange(64)
    os.kill(os.getpid(), signal.SIGKILL)  # mid-pass, a batch on disk

feature_cache.cached_features(Path(sys.argv[1]), {"split": "train", "cut": "_bn1", "dtype": "float32"}, 300, rows)
"""


def test_a_killed_write_leaves_nothing_that_reads_as_complete_and_the_rerun_starts_over(tmp_path):
    run = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], cwd=Path(__file__).parents[1],
                         capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    (left,) = _folder(tmp_path)
    assert left.endswith(".tmp") and list((tmp_path / "feature_cache" / left).glob("*.features"))

    def rows():
        stale = (tmp_path / "feature_cache" / left).iterdir()
        assert _folder(tmp_path) == [left] and all(f.stat().st_size == 0 for f in stale)  # emptied first
        yield from _batches()

    features, _ = feature_cache.cached_features(tmp_path, KEY, COUNT, rows)
    assert [name + ".tmp" for name in _folder(tmp_path)] == [left]
    np.testing.assert_array_equal(features[299], np.full(64, 299.1, np.float32))
