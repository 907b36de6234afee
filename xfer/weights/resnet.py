"""torchvision ResNet-18/34/50/101/152 -> xfer.models.resnet."""

from __future__ import annotations

from xfer.models import resnet as model
from xfer.weights.convert import Entry, WeightMap, batchnorm, conv, dense, flatten


def _block(source: str, target: str, spec: model.BlockSpec, convs: int) -> list[list[Entry]]:
    layers = []
    for i in range(1, convs + 1):
        layers += [conv(f"{source}.conv{i}", f"{target}/conv{i}", bias=False),
                   batchnorm(f"{source}.bn{i}", f"{target}/bn{i}")]
    if spec.downsample:
        layers += [conv(f"{source}.downsample.0", f"{target}/downsample/0", bias=False),
                   batchnorm(f"{source}.downsample.1", f"{target}/downsample/1")]
    return layers


def weight_map(name: str) -> WeightMap:
    block, stage_sizes = model.CONFIGS[name]
    layers = [conv("conv1", "conv1", bias=False), batchnorm("bn1", "bn1")]
    for stage, specs in enumerate(model.stage_specs(block, stage_sizes), start=1):
        for index, spec in enumerate(specs):
            layers += _block(f"layer{stage}.{index}", f"layer{stage}/{index}", spec, model.BLOCKS[block].convs)
    layers.append(dense("fc", "fc"))
    return WeightMap(flatten(layers), head=model.HEAD)
