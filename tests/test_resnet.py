"""Ported torchvision ResNets compute what torch computes, block by block, in eval and train mode.

Random-init torchvision models are enough to prove the port: every weight
travels through the same map as the ImageNet files, and random weights with
randomised running statistics exercise every element of every tensor. A
ResNet v1 (stride in the Bottleneck's conv1), a TF-"SAME"-padded stem or a
flipped BatchNorm momentum loads the same files without complaint; only
these activation and running-statistic comparisons catch them (each was
tried: layer2.0 off by 0.27, conv1 by 1.33, bn1.running_mean by 0.88).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from xfer import models
from xfer.models import resnet
from xfer.weights import convert, weight_map

import torch_hooks
import torchvision_port


def _compared_modules(name: str) -> list[str]:
    """The stem's conv1 and bn1, then every block `layer<k>.<i>`, as torch names them."""
    _, stage_sizes = resnet.CONFIGS[name]
    return ["conv1", "bn1"] + [f"layer{k}.{i}" for k, size in enumerate(stage_sizes, start=1) for i in range(size)]


def _check_forward(name: str, images_nchw: np.ndarray, train: bool):
    """Every compared module and the logits match torch.

    Float64 images run both sides in float64 (torch's weights are exact in
    either). Returns Flax's variable state after the forward, torch's state
    dict after it, and the worst relative difference.
    """
    torch_model, flax_model, variables = torchvision_port.torch_and_flax(name)
    float64 = images_nchw.dtype == np.float64
    if train or float64:  # a copy: a training forward updates torch's running statistics
        torch_model = copy.deepcopy(torch_model).train(train).to(torch.float64 if float64 else torch.float32)
    expected, expected_logits = torch_hooks.torch_outputs(torch_model, images_nchw, _compared_modules(name))
    with jax.enable_x64(float64):  # Flax promotes the float32 weights to the images' dtype
        logits, state = flax_model.apply(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), train=train,
                                         mutable=["batch_stats"] if train else False, capture_intermediates=True)
    where = f"{name}@{images_nchw.shape[-1]}px {'train' if train else 'eval'} {images_nchw.dtype}"
    worst = max(torch_hooks.assert_layers_close(state["intermediates"], expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    return state, torchvision_port.state_dict(torch_model), worst


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet18", 224), ("resnet50", 97)])
def test_every_block_and_logits_match_torchvision_in_eval_mode(name, size):
    images = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    _, _, worst = _check_forward(name, images, train=False)
    print(f"{name}@{size} eval: max relative diff {worst:.2e}")


# ResNet-50 runs in float64: batch statistics in 16 random-init blocks amplify float32 rounding
# until torch's own float32 layer4 is 9e-5 (of its scale) away from its float64 result, so a
# float32 comparison there would test rounding luck, not the port. (Outputs then agree to ~1e-13;
# running statistics to ~1e-7, as they stay float32 variables.)
@pytest.mark.parametrize("name, dtype", [("resnet18", np.float32), ("resnet50", np.float64)])
def test_train_mode_outputs_and_every_running_statistic_match_torchvision(name, dtype):
    """One training forward: batch-statistics outputs, and torch's running-stat update
    (momentum convention, unbiased variance) in every BatchNorm."""
    images = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(dtype)
    state, torch_state, worst = _check_forward(name, images, train=True)
    stats_worst, compared = torch_hooks.assert_running_stats_close(state["batch_stats"], torch_state, name)
    worst = max(worst, stats_worst)
    print(f"{name} train {images.dtype}: max relative diff {worst:.2e} over outputs and {compared} running statistics")


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152"])
def test_other_depths_port_strictly(name):
    """Every torchvision tensor has exactly one Flax variable of the right shape (no forward)."""
    state_dict = torchvision_port.state_dict(getattr(torchvision.models, name)())
    _, report = convert.port(state_dict, weight_map(name), torchvision_port.variable_shapes(models.build(name)), name)
    assert len(report.rows) == sum(not k.endswith(".num_batches_tracked") for k in state_dict)


def test_new_head_is_fresh_and_the_rest_is_ported():
    torch.manual_seed(0)
    state_dict = torchvision_port.state_dict(torchvision.models.resnet18())
    # Shape placeholders stand in for a real initialisation (which costs seconds here):
    # the fresh head must come back as the very objects that went in.
    fresh = torchvision_port.variable_shapes(models.build("resnet18", num_classes=10))
    variables, report = convert.port(state_dict, weight_map("resnet18"), fresh, "resnet18")
    assert set(report.new_head) == {"params/fc/bias", "params/fc/kernel"}
    assert variables["params"]["fc"]["kernel"] is fresh["params"]["fc"]["kernel"]
    assert variables["params"]["fc"]["bias"] is fresh["params"]["fc"]["bias"]
    assert fresh["params"]["fc"]["kernel"].shape == (512, 10)
    flat = traverse_util.flatten_dict(variables, sep="/")
    for source, _, target, _, _ in report.rows:  # convs are the only 4-D tensors; fc is the new head
        torch_value = state_dict[source]
        expected = torch_value.transpose(2, 3, 1, 0) if torch_value.ndim == 4 else torch_value
        np.testing.assert_array_equal(flat[target], expected, err_msg=f"{source} -> {target}")
    assert len(report.rows) + 2 == len(flat)


def test_wrong_depth_lists_mismatches_by_key():
    state_dict = torchvision_port.state_dict(torchvision.models.resnet34())
    with pytest.raises(convert.WeightMismatchError) as e:
        convert.port(state_dict, weight_map("resnet18"), torchvision_port.variable_shapes(models.build("resnet18")),
                     "resnet18")
    message = str(e.value)
    assert "checkpoint does not fit resnet18" in message
    # resnet34's extra blocks (layer1.2, ...) are named, with shapes; nothing resnet18 has is missing.
    assert "unused layer1.2.bn1.bias (64,)" in message
    assert "missing" not in message
