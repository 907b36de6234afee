"""torchvision VGG (with and without BatchNorm) -> xfer.models.vgg."""

from __future__ import annotations

from xfer.models import vgg as model
from xfer.weights.convert import WeightMap, batchnorm, conv, dense, flatten, nchw_flatten_to_nhwc


def weight_map(name: str) -> WeightMap:
    cfg, batch_norm = model.CONFIGS[name[:5]], name.endswith("_bn")
    layers = []
    for index, kind, _ in model.feature_layers(cfg, batch_norm):
        if kind == "conv":
            layers.append(conv(f"features.{index}", f"features/{index}"))
        elif kind == "bn":
            layers.append(batchnorm(f"features.{index}", f"features/{index}"))
    layers += [
        # torch flattens the pooled (512, 7, 7) map channel-first; we flatten (7, 7, 512).
        dense("classifier.0", "classifier/0", nchw_flatten_to_nhwc(512, 7, 7), "transpose + NCHW->NHWC rows"),
        dense("classifier.3", "classifier/3"),
        dense("classifier.6", "classifier/6"),
    ]
    return WeightMap(flatten(layers), head=model.HEAD)
