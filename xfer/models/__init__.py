"""The models: `build(name, num_classes=...)` and each model's registry entry, `info(name)`.

Every model takes NHWC float images already normalised by its `ModelInfo`
(`(pixels_in_0_1 - mean) / std`) and is called as `model.apply(variables, x,
train=...)`; in training BatchNorm statistics are `mutable=['batch_stats']`
and dropout wants a `'dropout'` rng.

Each family module registers its models when imported (`xfer.models.registry`);
importing this package imports them all.
"""

from xfer.models.registry import (IMAGENET_1K, IMAGENET_MEAN, IMAGENET_STD, MODELS, HubFile, ModelInfo, PipFile,
                                  TorchvisionFile, build, info, register)
from xfer.models import convnext, efficientnet, efficientnet_lite, inception, resnet, timm_vit, vgg, vit  # noqa: F401  (each registers its models)

__all__ = ["IMAGENET_1K", "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "HubFile", "ModelInfo", "PipFile",
           "TorchvisionFile", "build", "info", "register"]
