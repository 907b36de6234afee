"""torchvision EfficientNet-B0 -> xfer.models.efficientnet (the same names, '.' for '/')."""

from __future__ import annotations

from xfer.models import efficientnet as model
from xfer.weights.convert import Entry, WeightMap, batchnorm, conv, dense, flatten


def _conv_norm(name: str) -> list[list[Entry]]:
    """A Conv2dNormActivation: `0` bias-free conv, `1` BatchNorm."""
    target = name.replace(".", "/")
    return [conv(f"{name}.0", f"{target}/0", bias=False), batchnorm(f"{name}.1", f"{target}/1")]


def _block(name: str, config: model.BlockConfig) -> list[list[Entry]]:
    """MBConv `name`'s `block`: [expand,] depthwise, squeeze-excitation, project."""
    layers, layer = [], 0
    if config.expand_ratio != 1:  # stage 1 has no expand conv
        layers += _conv_norm(f"{name}.block.0")
        layer = 1
    # torch's depthwise (C, 1, k, k) is Flax's grouped (k, k, 1, C): the plain conv transform.
    layers += _conv_norm(f"{name}.block.{layer}")
    se = f"{name}.block.{layer + 1}"
    layers += [conv(f"{se}.fc1", f"{se.replace('.', '/')}/fc1"), conv(f"{se}.fc2", f"{se.replace('.', '/')}/fc2")]
    return layers + _conv_norm(f"{name}.block.{layer + 2}")


def weight_map() -> WeightMap:
    layers = _conv_norm("features.0")
    stages = model.stage_configs()
    for stage, configs in enumerate(stages, start=1):
        for index, config in enumerate(configs):
            layers += _block(f"features.{stage}.{index}", config)
    layers += _conv_norm(f"features.{len(stages) + 1}")
    layers.append(dense("classifier.1", "classifier/1"))
    return WeightMap(flatten(layers), head=model.HEAD)
