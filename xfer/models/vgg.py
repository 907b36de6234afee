"""torchvision's VGG in Flax linen, NHWC, with torchvision's parameter names.

Layer indices follow `torchvision.models.vgg`: `features/<i>` counts every
module of torch's `features` Sequential (ReLU and MaxPool included), and the
classifier's Linear layers are `classifier/0`, `classifier/3`, `classifier/6`.
So torch's `model.features[10]` is the regex `^features/10/` here.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xfer.models.layers import adaptive_avg_pool, batch_norm, conv_lowering, dropout, max_pool_2x2, use_cpu_lowerings
from xfer.models.registry import (EIGEN_CONVOLUTIONS, IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile,
                                  register, weight_map_in)

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

# For freeze presets (xfer.learning.presets): a linear probe trains only the last Linear, so `classifier/0`
# and `classifier/3` count as blocks and `last_k:2` trains the whole classifier, torchvision's
# "features frozen" recipe.
HEAD = "^classifier/6/"


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


def blocks(cfg: Sequence, batch_norm: bool) -> tuple[str, ...]:
    """Regexes of the blocks in forward order: each conv stage of `features` (the convs and
    BatchNorms between two max-pools), then the classifier's hidden Linears."""
    stages, current = [], []
    for index, kind, _ in feature_layers(cfg, batch_norm):
        if kind == "pool":
            stages.append(current)
            current = []
        else:
            current.append(str(index))
    return (*(f"^features/(?:{'|'.join(stage)})/" for stage in stages), "^classifier/0/", "^classifier/3/")


class Features(nn.Module):
    cfg: Sequence
    batch_norm: bool
    cpu_lowerings: bool | None = None  # xfer.models.layers.use_cpu_lowerings

    @nn.compact
    def __call__(self, x, train: bool = False):
        cpu = use_cpu_lowerings(self.cpu_lowerings)
        for index, kind, channels in feature_layers(self.cfg, self.batch_norm):
            if kind == "pool":
                x = max_pool_2x2(x) if cpu else nn.max_pool(x, (2, 2), strides=(2, 2))
            elif kind == "conv":
                x = nn.Conv(channels, (3, 3), padding=1, kernel_init=conv_init, name=str(index),
                            conv_general_dilated=conv_lowering(cpu))(x)
                if not self.batch_norm:
                    x = nn.relu(x)
            else:  # torch BatchNorm2d(momentum=0.1, eps=1e-5)
                x = batch_norm(x, train, name=str(index), momentum=0.9, epsilon=1e-5, cpu_lowerings=cpu)
                x = nn.relu(x)
        return x


class PooledDense(nn.Module):
    """torch's `AdaptiveAvgPool2d(7)`, flatten and `Linear`, with nn.Dense's parameters over the
    (H, W, C)-order flatten (the port permutes torch's (C, H, W) rows of classifier/0 to match).

    A 1x1 map (32 px input) is the pool's 49 copies of one vector, so the layer is that vector
    times the sum of the kernel's 49 row blocks: 49x fewer multiply-adds, forward and for the
    kernel's gradient (then a broadcast, which XLA fuses into the optimizer update). VGG16's
    train step at 32 px on CPU: 1.3x faster (bench/README.md). This fold is a CPU lowering
    (`xfer.models.layers.use_cpu_lowerings`): without it the layer is the pool, flatten and dense.
    """

    features: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        kernel = self.param("kernel", linear_init, (7 * 7 * c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if (h, w) == (1, 1) and use_cpu_lowerings(self.cpu_lowerings):
            # The row-block sum as a dot with ones: XLA:CPU's reduce over the short outer axis
            # (`kernel.reshape(49, c, -1).sum(0)`) is ~40x slower, and the dot's gradient is a broadcast.
            ones = jnp.ones((1, 7 * 7), kernel.dtype)
            kernel = jnp.dot(ones, kernel.reshape(7 * 7, -1), precision=jax.lax.Precision.HIGHEST)
            return jnp.dot(x.reshape(n, c), kernel.reshape(c, self.features)) + bias
        return jnp.dot(adaptive_avg_pool(x, (7, 7)).reshape(n, -1), kernel) + bias


class Classifier(nn.Module):
    """torchvision's avgpool + classifier; takes the NHWC feature map."""

    num_classes: int
    dropout_rate: float
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = PooledDense(4096, self.cpu_lowerings, name="0")(x)
        x = dropout(nn.relu(x), self.dropout_rate, train)
        x = nn.Dense(4096, kernel_init=linear_init, name="3")(x)
        x = dropout(nn.relu(x), self.dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=linear_init, name="6")(x)


class VGG(nn.Module):
    """Input: NHWC images normalised with ImageNet mean/std, any size >= 32."""

    cfg: Sequence
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Features(self.cfg, self.batch_norm, self.cpu_lowerings, name="features")(x, train)
        return Classifier(self.num_classes, self.dropout_rate, self.cpu_lowerings, name="classifier")(x, train)


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's published ImageNet weights.
IMAGENET_FILES = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}



def _info(name: str) -> ModelInfo:
    cfg, with_bn = CONFIGS[name[:5]], name.endswith("_bn")
    return ModelInfo(name, functools.partial(VGG, cfg, with_bn), 224, IMAGENET_MEAN, IMAGENET_STD,
                     head=HEAD, blocks=blocks(cfg, with_bn), weight_map=weight_map_in("xfer.weights.vgg", name),
                     imagenet=TorchvisionFile(IMAGENET_FILES[name]),
                     cpu_xla_flags=EIGEN_CONVOLUTIONS)


register(*(_info(name + suffix) for name in CONFIGS for suffix in ("", "_bn")))
