"""Ported torchvision VGGs compute what torch computes, layer by layer.

Random-init torchvision models are enough to prove the port: every weight
travels through the same map as the ImageNet files, and random weights
exercise every element of every kernel (pretrained files cannot be
downloaded here).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from xfer import models
from xfer.models import vgg
from xfer.weights import convert, weight_map

import torch_hooks
import torchvision_port


@pytest.mark.parametrize("name", ["vgg16", "vgg11_bn"])
def test_every_layer_and_logits_match_torchvision(name):
    torch_model, flax_model, variables = torchvision_port.torch_and_flax(name)
    modules = [f"features.{i}" for i, kind, _ in vgg.feature_layers(vgg.CONFIGS[name[:5]], name.endswith("_bn"))
               if kind != "pool"]
    rng = np.random.default_rng(0)
    for size in (32, 224):
        images = rng.standard_normal((2, 3, size, size), dtype=np.float32)
        expected, expected_logits = torch_hooks.torch_outputs(torch_model, images, modules)
        logits, state = flax_model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)),
                                         capture_intermediates=True)
        torch_hooks.assert_layers_close(state["intermediates"], expected, f"{name}@{size}")
        torch_hooks.assert_close(logits, expected_logits, f"{name}@{size} logits")


def test_classifier_rows_follow_torch_flatten_order():
    """A torch kernel row (c, h, w) must land on the NHWC flatten row (h, w, c)."""
    channels, height, width, out = 3, 2, 2, 5
    w = np.arange(out * channels * height * width, dtype=np.float32).reshape(out, -1)
    ported = convert.nchw_flatten_to_nhwc(channels, height, width)(w)
    for c in range(channels):
        for h in range(height):
            for x in range(width):
                np.testing.assert_array_equal(ported[(h * width + x) * channels + c],
                                              w[:, (c * height + h) * width + x])


def test_new_head_is_fresh_and_the_rest_is_ported():
    torch.manual_seed(0)
    state_dict = {k: v.numpy() for k, v in torchvision.models.vgg11().state_dict().items()}
    model = models.build("vgg11", num_classes=10)
    fresh = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    variables, report = convert.port(state_dict, weight_map("vgg11"), fresh, "vgg11")
    assert set(report.new_head) == {"params/classifier/6/bias", "params/classifier/6/kernel"}
    head = variables["params"]["classifier"]["6"]
    np.testing.assert_array_equal(head["kernel"], fresh["params"]["classifier"]["6"]["kernel"])
    assert head["kernel"].shape == (4096, 10)
    np.testing.assert_array_equal(variables["params"]["features"]["0"]["kernel"],
                                  state_dict["features.0.weight"].transpose(2, 3, 1, 0))


def test_wrong_architecture_lists_mismatches_with_shapes():
    state_dict = {k: v.numpy() for k, v in torchvision.models.vgg11_bn().state_dict().items()}
    fresh = models.build("vgg11").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(convert.WeightMismatchError) as e:
        convert.port(state_dict, weight_map("vgg11"), fresh, "vgg11")
    message = str(e.value)
    assert "\n" not in message
    assert "checkpoint does not fit vgg11" in message
    assert "missing features.3.weight (for params/features/3/kernel)" in message
    assert "features.8.weight (256,128,3,3) -> params/features/8/kernel needs (3,3,256,256)" in message


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg17'.*vgg16"):
        models.build("vgg17")


def test_train_mode_outputs_and_running_statistics_match_torchvision():
    """One training forward: batch-statistics outputs, and torch's running-stat update
    (momentum convention, unbiased variance) — where ported BatchNorm usually drifts."""
    torch_model, flax_model, variables = torchvision_port.torch_and_flax("vgg11_bn")
    torch_model = copy.deepcopy(torch_model).train()  # the shared model stays in eval mode
    for module in torch_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected_logits = torch_model(torch.from_numpy(images)).numpy()
    flax_model = flax_model.clone(dropout_rate=0.0)
    logits, updated = flax_model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=True,
                                       mutable=["batch_stats"])
    torch_hooks.assert_close(logits, expected_logits, "train-mode logits")
    torch_state = torch_model.state_dict()
    for index, kind, _ in vgg.feature_layers(vgg.CONFIGS["vgg11"], batch_norm=True):
        if kind == "bn":
            ours = updated["batch_stats"]["features"][str(index)]
            for ours_key, torch_key in (("mean", "running_mean"), ("var", "running_var")):
                torch_hooks.assert_close(ours[ours_key], torch_state[f"features.{index}.{torch_key}"].numpy(),
                                         f"features.{index}.{torch_key}")
