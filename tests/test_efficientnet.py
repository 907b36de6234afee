"""The ported torchvision EfficientNet-B0 computes what torch computes, block by block, in eval and train mode.

As for ResNet (tests/test_resnet.py), a random-init `torchvision.models.efficientnet_b0` with
randomised running statistics proves the port: every weight travels through the same map as
the ImageNet file. TF-"SAME" padding (Lite0's) or Lite0's BatchNorm eps of 1e-3 would load the
same file without complaint; only these activation comparisons catch them (each was tried, at
61 px: "SAME" off by 4.4e-2 of a block's scale, eps 1e-3 by 1.5e-3).

Measured (torch 2.14, jaxlib CPU): the worst relative difference (max |flax - torch| /
max |torch|, per tensor) over the stem, every block, the head conv and the logits in eval mode
(float32) is 6.5e-7 at 64 px and 6.0e-7 at 61 px: torch_hooks.RTOL = 1e-4 leaves a ~150x
margin. Train mode (batch statistics) runs in float64, as ResNet-50's does: in float32 the
port was 1.6e-5 off torch (features.7.0), but torch's own float32 forward is 9e-6 off its
float64 one there, so a float32 comparison would test rounding, not the port. In float64 the
worst is 5.8e-8 over outputs and the 98 running statistics (these stay float32 variables).
"""

import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from xfer import models
from xfer.models import efficientnet
from xfer.weights import convert, weight_map

import torch_hooks
import test_presets  # the presets as test_presets reads them: trainable paths per setting
import torchvision_port

NAME = "efficientnet_b0"


def _compared_modules() -> list[str]:
    """The stem `features.0`, every MBConv `features.<s>.<i>` (the last of each is its stage's
    output), the head conv `features.8`, as torch names them."""
    blocks = [f"features.{s}.{i}" for s, configs in enumerate(efficientnet.stage_configs(), start=1)
              for i in range(len(configs))]
    return ["features.0", *blocks, "features.8"]


def _check_forward(images_nchw: np.ndarray, train: bool):
    """Every compared module and the logits match torch; returns Flax's state after the forward,
    torch's state dict after it, and the worst relative difference.

    Float64 images run both sides in float64 (torch's weights are exact in either). In train mode
    torch's Dropout and StochasticDepth stay in eval mode (identity) and the Flax model is built
    with both rates 0: only BatchNorm's batch statistics are compared.
    """
    torch_model, _, variables = torchvision_port.torch_and_flax(NAME)
    flax_model = models.build(NAME, dropout_rate=0.0, stochastic_depth_prob=0.0) if train else models.build(NAME)
    float64 = images_nchw.dtype == np.float64
    if train or float64:  # a copy: a training forward updates torch's running statistics
        torch_model = copy.deepcopy(torch_model).train(train).to(torch.float64 if float64 else torch.float32)
        for module in torch_model.modules():
            if isinstance(module, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
                module.eval()
    expected, expected_logits = torch_hooks.torch_outputs(torch_model, images_nchw, _compared_modules())
    with jax.enable_x64(float64):  # Flax promotes the float32 weights to the images' dtype
        logits, state = jax.jit(lambda v, x: flax_model.apply(v, x, train=train, capture_intermediates=True,
                                                              mutable=["batch_stats"] if train else False))(
            variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
    where = f"{NAME}@{images_nchw.shape[-1]}px {'train' if train else 'eval'} {images_nchw.dtype}"
    worst = max(torch_hooks.assert_layers_close(state["intermediates"], expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    return state, torchvision_port.state_dict(torch_model), worst


@pytest.mark.parametrize("size", [64, 61])  # 61: odd sizes at every stride-2 layer, where padding conventions part
def test_every_block_and_logits_match_torchvision_in_eval_mode(size):
    images = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    _, _, worst = _check_forward(images, train=False)
    print(f"{NAME}@{size} eval: max relative diff {worst:.2e}")


def test_train_mode_outputs_and_every_running_statistic_match_torchvision():
    """One training forward: batch-statistics outputs, and torch's running-stat update
    (momentum 0.1, unbiased variance) in every BatchNorm."""
    images = np.random.default_rng(1).standard_normal((4, 3, 64, 64))  # float64: see the module docstring
    state, torch_state, worst = _check_forward(images, train=True)
    stats_worst, compared = torch_hooks.assert_running_stats_close(state["batch_stats"], torch_state, NAME)
    worst = max(worst, stats_worst)
    print(f"{NAME} train: max relative diff {worst:.2e} over outputs and {compared} running statistics")


def test_stochastic_depth_rates_are_torchvisions_and_drop_per_rng():
    torch_model, _, variables = torchvision_port.torch_and_flax(NAME)
    model = models.build(NAME)
    rates = [model.stochastic_depth_prob * c.stochastic_depth for configs in efficientnet.stage_configs()
             for c in configs]
    assert rates == pytest.approx([m.p for m in torch_model.modules()
                                   if isinstance(m, torchvision.ops.StochasticDepth)], abs=1e-12)
    assert torch_model.classifier[0].p == model.dropout_rate
    images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3), dtype=np.float32))
    train = jax.jit(lambda seed: model.apply(variables, images, train=True, mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.key(seed)})[0])
    assert not np.allclose(train(0), train(1)), "dropout / stochastic depth ignored the rng"


def test_map_covers_every_torch_tensor_and_every_flax_variable():
    state_dict = torchvision_port.state_dict(torchvision.models.efficientnet_b0())
    shapes = torchvision_port.variable_shapes(models.build(NAME))
    _, report = convert.port(state_dict, weight_map(NAME), shapes, NAME)
    assert len(report.rows) == sum(not k.endswith(".num_batches_tracked") for k in state_dict)
    assert len(report.rows) == len(traverse_util.flatten_dict(shapes))
    torchvision_port.assert_paths_mirror_torch_keys(report)


def test_new_head_is_fresh():
    state_dict = torchvision_port.state_dict(torchvision.models.efficientnet_b0())
    fresh = torchvision_port.variable_shapes(models.build(NAME, num_classes=10))
    variables, report = convert.port(state_dict, weight_map(NAME), fresh, NAME)
    assert set(report.new_head) == {"params/classifier/1/kernel", "params/classifier/1/bias"}
    assert variables["params"]["classifier"]["1"]["kernel"] is fresh["params"]["classifier"]["1"]["kernel"]


def test_presets_build():
    trainable = functools.partial(test_presets.trainable, NAME)
    paths = test_presets.paths(NAME)
    assert trainable("linear_probe") == {"classifier/1/kernel", "classifier/1/bias"}
    # The last two blocks: stage 7 (one MBConv) and the head conv `features/8`.
    assert trainable("last_k:2") == {p for p in paths if re.match(r"classifier/|features/[78]/", p)}
    assert len(models.info(NAME).blocks) == 9
