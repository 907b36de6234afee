"""EfficientNet-Lite0 in lukemelas' EfficientNet-PyTorch naming -> xfer.models.efficientnet_lite."""

from __future__ import annotations

from xfer.models import efficientnet_lite as model
from xfer.weights.convert import Entry, WeightMap, batchnorm, conv, dense, flatten


def _block(index: int, config: model.BlockConfig) -> list[list[Entry]]:
    source, target = f"_blocks.{index}", f"_blocks/{index}"
    layers = []
    if config.expand_ratio != 1:  # block 0 (expand ratio 1) has no expansion conv
        layers += [conv(f"{source}._expand_conv", f"{target}/_expand_conv", bias=False),
                   batchnorm(f"{source}._bn0", f"{target}/_bn0")]
    return layers + [
        # torch's depthwise (C, 1, k, k) is Flax's grouped (k, k, 1, C): the plain conv transform.
        conv(f"{source}._depthwise_conv", f"{target}/_depthwise_conv", bias=False),
        batchnorm(f"{source}._bn1", f"{target}/_bn1"),
        conv(f"{source}._project_conv", f"{target}/_project_conv", bias=False),
        batchnorm(f"{source}._bn2", f"{target}/_bn2"),
    ]


def weight_map() -> WeightMap:
    layers = [conv("_conv_stem", "_conv_stem", bias=False), batchnorm("_bn0", "_bn0")]
    for index, config in enumerate(model.block_configs()):
        layers += _block(index, config)
    layers += [
        conv("_conv_head", "_conv_head", bias=False),
        batchnorm("_bn1", "_bn1"),
        dense("_fc", "_fc"),
    ]
    return WeightMap(flatten(layers), head=model.HEAD)
