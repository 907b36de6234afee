"""Training from cached features equals training from images, and bad cut points fail early.

The runs are Lite0 at 32 px on digits: small enough for CI, and the same code
path as the quickstart (a linear probe with the cut found automatically).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfer import checkpoint, feature_cache, models, norms, partition, train

from configs import quickstart


def _config(**overrides):
    config = quickstart.get_config()
    config.data.image_size = 32
    config.total_steps = 6
    config.batch_size = 32
    config.eval_every = 6
    config.log_every = 3
    config.checkpoint.every = 6
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
    for cached, uncached in zip(jax.tree.leaves(params["cached"]), jax.tree.leaves(params["uncached"])):
        np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-6)
    assert summaries["cached"]["eval_accuracy"] == summaries["uncached"]["eval_accuracy"]
    assert len(list((root / "cached" / "feature_cache").glob("*.npz"))) == 2  # train and eval
    assert not (root / "uncached" / "feature_cache").exists()


def test_a_resumed_run_reuses_the_saved_cache(cached_and_uncached, caplog):
    root, _, _ = cached_and_uncached
    with caplog.at_level("INFO", logger="xfer"):
        train.run(_config(feature_cache="auto"), root / "cached")
    assert "feature cache: loaded" in caplog.text
    assert "feature cache: wrote" not in caplog.text


def _lite0_parts(rules):
    model = models.build("efficientnet_lite0", num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    labels = partition.labels(shapes["params"], rules)
    policies = norms.policies(shapes["batch_stats"], (), labels)
    return model, shapes, labels, norms.running_statistics_layers(policies)


def test_auto_cuts_right_before_the_first_trained_module():
    model, shapes, labels, running = _lite0_parts((("^_blocks/1[45]/|^_conv_head/|^_bn1/|^_fc/", "top"),
                                                   (".*", "frozen")))
    assert feature_cache.check_cut("auto", model, shapes, 32, labels, running) == "_blocks/13"
    assert feature_cache.check_cut("_blocks/10", model, shapes, 32, labels, running) == "_blocks/10"


@pytest.mark.parametrize("cut, message", [
    ("_blocks/15", "is not a frozen prefix: _blocks/14/_expand_conv runs before _blocks/15 and has trainable"),
    ("_blocks/99", "is not a module of the model"),
])
def test_a_cut_that_is_not_a_frozen_prefix_is_refused(cut, message):
    model, shapes, labels, running = _lite0_parts((("^_blocks/1[45]/|^_conv_head/|^_bn1/|^_fc/", "top"),
                                                   (".*", "frozen")))
    with pytest.raises(feature_cache.FeatureCacheError, match=message):
        feature_cache.check_cut(cut, model, shapes, 32, labels, running)


def test_batch_statistics_before_the_cut_are_refused():
    model, shapes, labels, _ = _lite0_parts((("^_fc/", "head"), (".*", "frozen")))
    with pytest.raises(feature_cache.FeatureCacheError, match="BatchNorm _blocks/0/_bn1 runs before _bn1 on batch statistics"):
        feature_cache.check_cut("_bn1", model, shapes, 32, labels, frozenset({"_bn0"}))


@pytest.mark.parametrize("overrides, message", [
    ({"feature_cache": "_blocks/99"}, "is not a module of the model"),
    ({"feature_cache": "auto", "data.augment": "crop_flip"}, "needs un-augmented training images"),
])
def test_bad_cache_settings_fail_before_the_workdir_is_touched(tmp_path, overrides, message):
    with pytest.raises(feature_cache.FeatureCacheError, match=message):
        train.run(_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
