"""torchvision's VGG in Flax linen, NHWC, with torchvision's parameter names.

Layer indices follow `torchvision.models.vgg`: `features/<i>` counts every
module of torch's `features` Sequential (ReLU and MaxPool included), and the
classifier's Linear layers are `classifier/0`, `classifier/3`, `classifier/6`.
So torch's `model.features[10]` is the regex `^features/10/` here.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from xfer.models.layers import adaptive_avg_pool, batch_norm, dropout

# torchvision's `cfgs`: channel counts, "M" for a 2x2 max-pool.
CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

# torchvision's initialisation, so a `scratch` baseline starts where torch's would.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.01)


def feature_layers(cfg: Sequence, batch_norm: bool):
    """Yields (torch index, kind, channels) for each conv, bn and pool in `features`."""
    index = 0
    for v in cfg:
        if v == "M":
            yield index, "pool", None
            index += 1
            continue
        yield index, "conv", v
        if batch_norm:
            yield index + 1, "bn", v
        index += 3 if batch_norm else 2  # conv, [bn,] relu


class Features(nn.Module):
    cfg: Sequence
    batch_norm: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, kind, channels in feature_layers(self.cfg, self.batch_norm):
            if kind == "pool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            elif kind == "conv":
                x = nn.Conv(channels, (3, 3), padding=1, kernel_init=conv_init, name=str(index))(x)
                if not self.batch_norm:
                    x = nn.relu(x)
            else:  # torch BatchNorm2d(momentum=0.1, eps=1e-5)
                x = batch_norm(x, train, name=str(index), momentum=0.9, epsilon=1e-5)
                x = nn.relu(x)
        return x


class Classifier(nn.Module):
    num_classes: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, width in ((0, 4096), (3, 4096)):
            x = nn.Dense(width, kernel_init=linear_init, name=str(index))(x)
            x = nn.relu(x)
            x = dropout(x, self.dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=linear_init, name="6")(x)


class VGG(nn.Module):
    """Input: NHWC images normalised with ImageNet mean/std, any size >= 32."""

    cfg: Sequence
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Features(self.cfg, self.batch_norm, name="features")(x, train)
        x = adaptive_avg_pool(x, (7, 7))
        x = x.reshape(x.shape[0], -1)  # (H, W, C) order: the port permutes classifier/0 to match
        return Classifier(self.num_classes, self.dropout_rate, name="classifier")(x, train)
