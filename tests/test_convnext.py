"""The ported torchvision ConvNeXt computes what torch computes, block by block, in eval mode.

A random-init `torchvision.models.convnext_tiny` proves the port: every weight travels through
the same map as the ImageNet file. Its layer_scale starts at 1e-6, which would make every block
all but the identity and hide the block branch (conv, LayerNorm, Linears, GELU); so layer_scale
and every LayerNorm's weight and bias are randomised before the comparison.

Measured (torch and jaxlib on CPU, float32): the worst relative difference (max |flax - torch| /
max |torch|, per tensor) over the stem, every block, every stage and downsampling layer, the
final norm and the logits is 1.9e-6 at 64 px and 1.4e-6 at 61 px (the test prints it): torch_hooks.RTOL = 1e-4 leaves a
~50x margin. (A Flax-default tanh GELU or LayerNorm eps 1e-5 would load the same file; only these
activation comparisons catch them.)
"""

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
from xfer.models import convnext
from xfer.weights import convert, weight_map

import torch_hooks
import test_presets  # the presets as test_presets reads them: trainable paths per setting
import torchvision_port

NAME = "convnext_tiny"


@functools.lru_cache(maxsize=None)
def _torch_and_flax():
    """(torch convnext_tiny in eval mode with random layer_scale and LayerNorm affines, xfer model,
    ported variables)."""
    torch.manual_seed(0)
    torch_model = torchvision.models.convnext_tiny(weights=None).eval()
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, torchvision.models.convnext.CNBlock):
                module.layer_scale.uniform_(-1.0, 1.0)
    flax_model = models.build(NAME)
    variables, report = convert.port(torchvision_port.state_dict(torch_model), weight_map(NAME),
                                     torchvision_port.variable_shapes(flax_model), NAME)
    assert report.new_head == ()
    return torch_model, flax_model, variables


def _compared_modules() -> list[str]:
    """Every child of `features` (stem, stages, downsampling layers), every CNBlock, the final
    norm `classifier.0`, as torch names them."""
    names, index = ["features.0"], 1
    stages = convnext.CONFIGS[NAME]["stages"]
    for stage, (_, depth) in enumerate(stages):
        names += [f"features.{index}.{block}" for block in range(depth)] + [f"features.{index}"]
        index += 1
        if stage + 1 < len(stages):
            names.append(f"features.{index}")
            index += 1
    return names + ["classifier.0"]


@pytest.mark.parametrize("size", [64, 61])  # 61: odd sizes, which the stride-4 stem and stride-2 convs floor
def test_every_block_and_logits_match_torchvision_in_eval_mode(size):
    torch_model, flax_model, variables = _torch_and_flax()
    images = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    expected, expected_logits = torch_hooks.torch_outputs(torch_model, images, _compared_modules())
    logits, state = jax.jit(lambda v, x: flax_model.apply(v, x, capture_intermediates=True,
                                                          mutable=["intermediates"]))(
        variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    where = f"{NAME}@{size}px eval"
    worst = max(torch_hooks.assert_layers_close(state["intermediates"], expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    print(f"{NAME}@{size} eval: max relative diff {worst:.2e}")


def test_stochastic_depth_rates_are_torchvisions_and_drop_per_rng():
    torch_model, model, variables = _torch_and_flax()
    rates = [model.stochastic_depth_prob * f for fractions in convnext.stochastic_depth_fractions(model.stages)
             for f in fractions]
    assert rates == pytest.approx([m.p for m in torch_model.modules()
                                   if isinstance(m, torchvision.ops.StochasticDepth)], abs=1e-12)
    assert rates[-1] == pytest.approx(0.1)
    # 8 images: rates sum to 0.9 per image, so a batch of 2 keeps every branch with probability ~0.17.
    images = jnp.asarray(np.random.default_rng(2).standard_normal((8, 32, 32, 3), dtype=np.float32))
    train = jax.jit(lambda seed: model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)}))
    assert not np.allclose(train(0), train(1)), "stochastic depth ignored the rng"
    np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))


def test_map_covers_every_torch_tensor_and_every_flax_variable():
    state_dict = torchvision_port.state_dict(torchvision.models.convnext_tiny())
    shapes = torchvision_port.variable_shapes(models.build(NAME))
    _, report = convert.port(state_dict, weight_map(NAME), shapes, NAME)
    assert len(report.rows) == len(state_dict)
    assert len(report.rows) == len(traverse_util.flatten_dict(shapes))
    torchvision_port.assert_paths_mirror_torch_keys(report, direct=("layer_scale",))


def test_new_head_is_fresh():
    state_dict = torchvision_port.state_dict(torchvision.models.convnext_tiny())
    fresh = torchvision_port.variable_shapes(models.build(NAME, num_classes=10))
    variables, report = convert.port(state_dict, weight_map(NAME), fresh, NAME)
    assert set(report.new_head) == {"params/classifier/2/kernel", "params/classifier/2/bias"}
    assert variables["params"]["classifier"]["2"]["kernel"] is fresh["params"]["classifier"]["2"]["kernel"]


def test_presets_build():
    trainable = functools.partial(test_presets.trainable, NAME)
    paths = test_presets.paths(NAME)
    assert trainable("linear_probe") == {"classifier/2/kernel", "classifier/2/bias"}
    # The last two blocks: the final norm `classifier/0` and stage 4 `features/7`.
    assert trainable("last_k:2") == {p for p in paths if re.match(r"classifier/|features/7/", p)}
    assert len(models.info(NAME).blocks) == 9
    # Every LayerNorm: the stem's, each block's, each downsampling layer's and the final one.
    norms = {p for p in paths if re.search(r"(features/0/1|block/2|features/[246]/0|classifier/0)/(scale|bias)$", p)}
    assert len(norms) == 2 * (1 + 18 + 3 + 1)
    assert trainable("norm_only") == norms | {"classifier/2/kernel", "classifier/2/bias"}


@pytest.mark.parametrize("name", ["convnext_small", "convnext_base"])
def test_small_and_base_have_torchvisions_parameters(name):
    """Shapes only (eval_shape): the same parameter count as torchvision's, and the map fits."""
    torch_model = getattr(torchvision.models, name)(weights=None)
    shapes = torchvision_port.variable_shapes(models.build(name))
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == sum(p.numel() for p in torch_model.parameters())
    state_dict = {k: np.zeros(v.shape, np.float32) for k, v in torch_model.state_dict().items()}
    _, report = convert.port(state_dict, weight_map(name), shapes, name)
    assert len(report.rows) == len(state_dict) == len(flat)
