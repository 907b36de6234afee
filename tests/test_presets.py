"""Freeze presets select the right parameters in every model family, and refuse what does not fit.

Parameter trees come from `jax.eval_shape` of `model.init` (shapes only, no compile), so every
registered model can be checked in seconds. Each expectation is written independently of
xfer/learning/presets.py, as a regex over torchvision-style paths.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from xfer import models
from xfer.learning import norms, optim, partition, presets
from xfer.learning import plan as freeze_plan
from xfer.learning.partition import PartitionError

SIZES = {"vit_b_16": 224,  # ViT's position embedding fixes its input size; the rest take 32 px
         "inception_v3": 299,  # built with its auxiliary classifier (OVERRIDES), which needs 299 px
         "dinov2_vits14": 224, "dinov2_vitb14": 224, "clip_vitb16": 224}  # timm's ViTs, as ViT


# Optional parts switched on, so every block regex has parameters to take (Inception's AuxLogits block
# is empty as registered; tests/test_inception.py checks the presets that way too).
OVERRIDES = {"inception_v3": {"aux_logits": True}}


@functools.lru_cache(maxsize=None)
def variable_shapes(model_name: str):
    size = SIZES.get(model_name, 32)
    model = models.build(model_name, num_classes=10, **OVERRIDES.get(model_name, {}))
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def param_shapes(model_name: str):
    return variable_shapes(model_name)["params"]


def expand(setting: str, model_name: str):
    return presets.expand(presets.parse(setting), model_name, param_shapes(model_name))


def paths(model_name: str) -> list[str]:
    return [partition.path_str(key_path)
            for key_path, _ in jax.tree_util.tree_flatten_with_path(param_shapes(model_name))[0]]


def trainable(model_name: str, preset: str) -> set[str]:
    rules = expand(preset, model_name)
    labels = partition.labels(param_shapes(model_name), rules)
    return {path for path, group in zip(paths(model_name), jax.tree.leaves(labels)) if group != partition.FROZEN}


def matching(model_name: str, regex: str) -> set[str]:
    return {path for path in paths(model_name) if re.search(regex, path)}


# (model, head, norm layers' scale and bias, the last block, the last three blocks)
FAMILIES = {
    "vgg16": (r"^classifier/6/", None, r"^classifier/3/", r"^classifier/(0|3)/|^features/(24|26|28)/"),
    "efficientnet_lite0": (r"^_fc/", r"_bn[012]/(scale|bias)$", r"^(_conv_head|_bn1)/",
                           r"^(_conv_head|_bn1)/|^_blocks/(11|12|13|14|15)/"),
    "efficientnet_b0": (r"^classifier/1/", r"/(1|bn)/(scale|bias)$", r"^features/8/", r"^features/[678]/"),
    "resnet50": (r"^fc/", r"(bn[123]|downsample/1)/(scale|bias)$", r"^layer4/", r"^layer[234]/"),
    "convnext_tiny": (r"^classifier/2/", r"(features/0/1|/block/2|features/[246]/0|classifier/0)/(scale|bias)$",
                      r"^classifier/0/", r"^classifier/0/|^features/[67]/"),
    "vit_b_16": (r"^heads/", r"(ln|ln_1|ln_2)/(scale|bias)$", r"^encoder/ln/",
                 r"^encoder/ln/|^encoder/layers/encoder_layer_(10|11)/"),
    "dinov2_vits14": (r"^head/", r"(norm|norm1|norm2)/(scale|bias)$", r"^norm/", r"^norm/|^blocks/(10|11)/"),
    "clip_vitb16": (r"^head/", r"(norm_pre|norm|norm1|norm2)/(scale|bias)$", r"^norm/", r"^norm/|^blocks/(10|11)/"),
    "inception_v3": (r"^(fc|AuxLogits/fc)/", r"/bn/(scale|bias)$", r"^Mixed_7c/", r"^Mixed_7[abc]/"),
}


@pytest.mark.parametrize("model_name", FAMILIES)
def test_presets_select_the_right_parameters(model_name):
    head, norms, last_block, last_three = FAMILIES[model_name]
    everything = set(paths(model_name))
    assert trainable(model_name, "linear_probe") == matching(model_name, head)
    assert trainable(model_name, "last_k:1") == matching(model_name, f"{head}|{last_block}")
    assert trainable(model_name, "last_k:3") == matching(model_name, f"{head}|{last_three}")
    assert trainable(model_name, "full") == everything
    assert trainable(model_name, "scratch") == everything
    assert trainable(model_name, "bias_only") == matching(model_name, f"{head}|/bias$")
    if norms:  # BatchNorm (Lite0, ResNet) and LayerNorm (ViT), found from their parameters
        assert trainable(model_name, "norm_only") == matching(model_name, f"{head}|{norms}")
        assert matching(model_name, norms)
    else:
        with pytest.raises(PartitionError, match="norm_only' finds no normalisation layer in vgg16"):
            expand("norm_only", model_name)


@pytest.mark.parametrize("model_name, blocks", [("vgg16", 7), ("vgg11_bn", 7), ("efficientnet_lite0", 9),
                                                ("efficientnet_b0", 9), ("resnet18", 5), ("resnet50", 5),
                                                ("vit_b_16", 14), ("convnext_tiny", 9), ("inception_v3", 14),
                                                ("dinov2_vits14", 14), ("clip_vitb16", 14)])
def test_last_k_counts_blocks_up_to_all_of_them(model_name, blocks):
    assert len(models.info(model_name).blocks) == blocks
    assert trainable(model_name, f"last_k:{blocks}") == set(paths(model_name))
    assert trainable(model_name, f"last_k:{blocks - 1}") < set(paths(model_name))


@pytest.mark.parametrize("model_name", sorted(models.MODELS))
def test_every_registered_model_has_head_and_blocks_taking_each_parameter_once(model_name):
    info = models.info(model_name)
    regexes = [info.head, *info.blocks]
    for path in paths(model_name):
        assert sum(bool(re.search(regex, path)) for regex in regexes) == 1, path
    for regex in regexes:
        assert matching(model_name, regex), regex


def plan(setting, bn_policy=(), optim_config=None, model_name="resnet18"):
    optim_config = optim_config or {"head": optim.group_config(optimizer="sgd", lr=0.1),
                                    "backbone": optim.group_config(optimizer="sgd", lr=0.01)}
    return freeze_plan.build(setting, bn_policy, optim_config, model_name, variable_shapes(model_name))


def test_scratch_overrides_init_and_the_rest_keep_it():
    assert plan("scratch").init_override == "scratch"
    assert plan("full").init_override is None
    rules = (("^fc/", "head"), (".*", "frozen"))
    assert plan(rules, optim_config={"head": optim.group_config(optimizer="sgd", lr=0.1)}).init_override is None


def test_scratch_trains_batchnorm_statistics_whatever_the_policy_the_rest_keep_it():
    pretrained_statistics = ((".*", "stats_frozen"),)
    assert presets.bn_rules(presets.parse("scratch"), pretrained_statistics) == ()
    assert presets.bn_rules(presets.parse("full"), pretrained_statistics) == pretrained_statistics
    assert plan("scratch", pretrained_statistics).running_stats_layers == frozenset()
    assert plan("full", pretrained_statistics).running_stats_layers == frozenset(
        norms.batch_norm_paths(variable_shapes("resnet18")["batch_stats"]))
    rules = ((".*", "head"),)
    assert plan(rules, pretrained_statistics, {"head": optim.group_config(optimizer="sgd", lr=0.1)}
                ).running_stats_layers == plan("full", pretrained_statistics).running_stats_layers


def test_a_preset_given_as_a_command_line_override_of_a_rules_field_counts():
    # `--config.partition=last_k:2` on a config whose partition holds rules arrives as a 1-tuple.
    assert presets.parse(("last_k:2",)) == presets.Preset("last_k", 2)
    assert presets.parse(("^fc/:head",)) is None


@pytest.mark.parametrize("setting, message", [
    ("linear", r"unknown partition preset 'linear'; the presets are linear_probe, last_k:K, full, "
               r"bias_only, norm_only, scratch"),
    ("last_k:x", r"'last_k:x' needs a whole number of blocks: write last_k:K"),
    ("last_k", r"'last_k' needs a whole number of blocks"),
    ("last_k:0", r"'last_k:0' is out of range: resnet18 has 5 blocks .* K must be in 1\.\.5"),
    ("last_k:6", r"'last_k:6' is out of range: resnet18 has 5 blocks"),
])
def test_bad_presets_are_one_line_errors_naming_the_choices(setting, message):
    with pytest.raises(PartitionError, match=message) as error:
        expand(setting, "resnet18")
    assert "\n" not in str(error.value)


def test_presets_drop_unused_optimizer_specs_explicit_rules_do_not():
    config = ml_collections.ConfigDict({
        "head": optim.group_config(optimizer="adam", lr=1e-2),
        "backbone": optim.group_config(optimizer="adam", lr=1e-3),
    })
    probe = plan("linear_probe", optim_config=config)
    assert list(probe.optim_specs) == ["head"]
    probe.optimizer(total_steps=10)
    explicit = (("^fc/", "head"), (".*", "frozen"))
    with pytest.raises(optim.OptimConfigError, match="config.optim.backbone is used by no partition rule"):
        plan(explicit, optim_config=config)


def test_the_plan_counts_the_trainable_parameters():
    fc = param_shapes("resnet18")["fc"]
    assert plan("linear_probe").trainable_parameters == fc["kernel"].size + fc["bias"].size == 512 * 10 + 10
