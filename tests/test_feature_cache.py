"""Training from cached features equals training from images, and bad cut points fail early.

The runs are Lite0 at 32 px on digits: small enough for CI, and the same code
path as the quickstart (a linear probe with the cut found automatically), with
SGD instead of the quickstart's Adam (tests/numerics.py: the two runs' features
come from two XLA programs, and Adam would turn their rounding differences in a
gradient near 0 into +-lr steps).
"""

import errno
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfer import models
from xfer.learning import optim, plan as freeze_plan
from xfer.training import checkpoint, feature_cache, train

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
    summaries = {name: train.run(_config(feature_cache=cut), root / name)
                 for name, cut in (("cached", "auto"), ("uncached", ""))}
    params = {name: checkpoint.read_variables(root / name / "checkpoints")["params"] for name in summaries}
    return root, summaries, params


def test_cached_training_equals_training_on_images(cached_and_uncached):
    root, summaries, params = cached_and_uncached
    used, where = numerics.tolerance_used(params["cached"], params["uncached"], RTOL, ATOL)
    print(f"cached vs uncached params: {used:.3g} of the tolerance at {where}")
    assert used <= 1, f"{where} differs by {used:.3g} times the tolerance"
    runs = ("cached", "uncached")
    logits, labels = numerics.cached_eval_logits(_config(feature_cache="auto"), [root / run for run in runs])
    numerics.assert_same_accuracy(tuple(summaries[run]["eval_accuracy"] for run in runs), logits, labels,
                                  MIN_MARGIN)
    assert len(list((root / "cached" / "feature_cache").glob("*.npz"))) == 2  # train and eval
    assert not (root / "uncached" / "feature_cache").exists()


def test_a_resumed_run_reuses_the_saved_cache(cached_and_uncached, caplog):
    root, _, _ = cached_and_uncached
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


# --- writing the cache file -------------------------------------------------

KEY = {"split": "train", "cut": "_bn1"}


def _arrays():
    return np.ones((300, 64), np.float32), np.zeros((300,), np.int32)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_no_file(tmp_path, monkeypatch, failure):
    """A full disk (simulated: np.savez writes part of the file, then fails) or a Ctrl-C mid-write."""
    def savez_then_fail(file, **arrays):
        Path(file).write_bytes(b"\0" * 50_000)
        raise failure

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(type(failure)) as raised:
        feature_cache.cached_features(tmp_path, KEY, _arrays)
    assert list((tmp_path / "feature_cache").iterdir()) == []  # the partial file went with the error
    if isinstance(failure, OSError):
        assert raised.value.errno == errno.ENOSPC
        message = str(raised.value)
        assert str(tmp_path / "feature_cache" / "train-") in message and "No space left on device" in message
        assert "\n" not in message


def test_a_partial_file_a_killed_run_left_is_removed_before_the_pass(tmp_path):
    feature_cache.cached_features(tmp_path / "first", KEY, _arrays)
    name = next((tmp_path / "first" / "feature_cache").glob("*.npz")).name
    stale = tmp_path / "run" / "feature_cache" / f"{name}.tmp.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 50_000)  # what a SIGKILL mid-write leaves

    def build():
        assert not stale.exists()  # its space is free before the pass starts
        return _arrays()

    features, _ = feature_cache.cached_features(tmp_path / "run", KEY, build)
    assert [p.name for p in stale.parent.iterdir()] == [name]
    np.testing.assert_array_equal(np.load(stale.parent / name)["features"], features)
