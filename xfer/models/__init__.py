"""The model registry: `build(name, num_classes=...)` and each model's input contract.

Every model takes NHWC float images already normalised by its `ModelInfo`
(`(pixels_in_0_1 - mean) / std`) and is called as `model.apply(variables, x,
train=...)`; in training BatchNorm statistics are `mutable=['batch_stats']`
and dropout wants a `'dropout'` rng.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn

from xfer.models import efficientnet_lite, resnet, vgg, vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TF scaling (x - 127) / 128 on 0..255 pixels, in [0, 1] pixel units.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What data pipelines and weight loaders need to know about a model."""

    name: str
    make: Callable[..., nn.Module]  # (num_classes, **overrides) -> module
    input_size: int  # the resolution its ImageNet weights were trained at
    mean: tuple[float, float, float]  # in units of pixels scaled to [0, 1]
    std: tuple[float, float, float]
    # For freeze presets (xfer.learning.presets): regexes over parameter paths of the classification head and
    # of the blocks in forward order; together they take every parameter exactly once. A model
    # without them takes only explicit partition rules.
    head: str | None = None
    blocks: tuple[str, ...] = ()


def _vgg_info(name: str, batch_norm: bool) -> ModelInfo:
    make = functools.partial(vgg.VGG, vgg.CONFIGS[name[:5]], batch_norm)
    return ModelInfo(name, lambda num_classes=1000, **kw: make(num_classes=num_classes, **kw),
                     224, IMAGENET_MEAN, IMAGENET_STD,
                     head=vgg.HEAD, blocks=vgg.blocks(vgg.CONFIGS[name[:5]], batch_norm))


MODELS: dict[str, ModelInfo] = {
    **{n: _vgg_info(n, False) for n in vgg.CONFIGS},
    **{f"{n}_bn": _vgg_info(f"{n}_bn", True) for n in vgg.CONFIGS},
    "efficientnet_lite0": ModelInfo("efficientnet_lite0", efficientnet_lite.EfficientNetLite, 224,
                                    LITE_MEAN, LITE_STD,
                                    head=efficientnet_lite.HEAD, blocks=efficientnet_lite.blocks()),
    **{n: ModelInfo(n, functools.partial(resnet.ResNet, *resnet.CONFIGS[n]), 224, IMAGENET_MEAN, IMAGENET_STD,
                    head=resnet.HEAD, blocks=resnet.blocks()) for n in resnet.CONFIGS},
    **{n: ModelInfo(n, functools.partial(vit.VisionTransformer, **vit.CONFIGS[n]), 224, IMAGENET_MEAN,
                    IMAGENET_STD, head=vit.HEAD, blocks=vit.blocks(vit.CONFIGS[n]["num_layers"]))
       for n in vit.CONFIGS},
}


def info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}") from None


def build(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    """A fresh, uninitialised Flax module; `overrides` are its dataclass fields (e.g. dropout_rate)."""
    return info(name).make(num_classes=num_classes, **overrides)
