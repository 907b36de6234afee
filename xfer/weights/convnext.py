"""torchvision ConvNeXt (tiny / small / base) -> xfer.models.convnext (the same names, '.' for '/')."""

from __future__ import annotations

import numpy as np

from xfer.models import convnext as model
from xfer.weights.convert import Entry, WeightMap, conv, dense, flatten, layernorm


def layer_scale_to_vector(w: np.ndarray) -> np.ndarray:
    """torch's CNBlock layer_scale (C, 1, 1), broadcast over NCHW maps -> (C,) over NHWC channels."""
    if w.ndim != 3 or w.shape[1:] != (1, 1):
        raise ValueError(f"a layer_scale is (C, 1, 1), not {w.shape}")
    return w.reshape(w.shape[0])


def _block(name: str) -> list[list[Entry]]:
    """CNBlock `name`: depthwise conv `block.0` (torch (C, 1, 7, 7) is Flax's grouped (7, 7, 1, C):
    the plain conv transform), LayerNorm `block.2`, Linears `block.3` and `block.5`, layer_scale."""
    target = name.replace(".", "/")
    return [conv(f"{name}.block.0", f"{target}/block/0"), layernorm(f"{name}.block.2", f"{target}/block/2"),
            dense(f"{name}.block.3", f"{target}/block/3"), dense(f"{name}.block.5", f"{target}/block/5"),
            [Entry(f"{name}.layer_scale", f"params/{target}/layer_scale", "(C,1,1)->(C,)", layer_scale_to_vector)]]


def weight_map(name: str) -> WeightMap:
    stages = model.CONFIGS[name]["stages"]
    layers = [conv("features.0.0", "features/0/0"), layernorm("features.0.1", "features/0/1")]
    index = 1
    for stage, (_, depth) in enumerate(stages):
        for block in range(depth):
            layers += _block(f"features.{index}.{block}")
        index += 1
        if stage + 1 < len(stages):  # downsampling: LayerNorm2d, 2x2 stride-2 conv
            layers += [layernorm(f"features.{index}.0", f"features/{index}/0"),
                       conv(f"features.{index}.1", f"features/{index}/1")]
            index += 1
    layers += [layernorm("classifier.0", "classifier/0"), dense("classifier.2", "classifier/2")]
    return WeightMap(flatten(layers), head=model.HEAD)
