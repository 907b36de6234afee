"""torchvision's ConvNeXt (tiny, small, base) in Flax linen, NHWC, with torchvision's parameter names.

As `torchvision.models.convnext_tiny/small/base` build it. Paths mirror torchvision's modules:
`features/0/0/kernel` (the 4x4 stride-4 stem conv), `features/0/1/scale` (its LayerNorm2d),
`features/1/0/block/0/kernel` (a block's 7x7 depthwise conv), `features/1/0/block/2/scale` (its
LayerNorm), `features/1/0/block/3/kernel` and `block/5/kernel` (the 4x expansion and projection
Linears), `features/1/0/layer_scale`, `features/2/0/scale` + `features/2/1/kernel` (a downsampling
layer: LayerNorm2d, 2x2 stride-2 conv), `classifier/0/scale` (the final LayerNorm2d),
`classifier/2/kernel`; so torch's `model.features[3]` is the regex `^features/3/` here.

`features` alternates stages and downsampling layers: `0` stem, `1` stage 1, `2` downsampling,
`3` stage 2, `4` downsampling, `5` stage 3, `6` downsampling, `7` stage 4.

Details a port could get wrong and still load: every LayerNorm is torch's eps 1e-6 (Flax's
default is 1e-6 too, but torch's default is 1e-5) with a two-pass variance; GELU is torch's
exact (erf) form, not Flax's default tanh approximation; the final norm runs after the global
average, on a (N, 1, 1, C) map, as torchvision's `classifier/0` does.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from xfer.models.layers import conv_lowering, dropout
from xfer.models.registry import (IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile, register,
                                  weight_map_in)

# (channels, blocks) per stage, and torchvision's default stochastic depth rate of the last block.
CONFIGS = {
    "convnext_tiny": dict(stages=((96, 3), (192, 3), (384, 9), (768, 3)), stochastic_depth_prob=0.1),
    "convnext_small": dict(stages=((96, 3), (192, 3), (384, 27), (768, 3)), stochastic_depth_prob=0.4),
    "convnext_base": dict(stages=((128, 3), (256, 3), (512, 27), (1024, 3)), stochastic_depth_prob=0.5),
}

# For freeze presets (xfer.learning.presets). As for EfficientNet-B0, each child of `features` is a
# block (stem, the four stages, the three downsampling layers between them), and the final norm
# `classifier/0` is the last block (as ViT's `encoder/ln`): the head is only the Linear. So
# last_k:1 trains the final norm, last_k:2 adds stage 4, last_k:3 the downsampling layer before it.
HEAD = "^classifier/2/"


def blocks() -> tuple[str, ...]:
    """Regexes of the blocks in forward order: `features/0` .. `features/7`, then `classifier/0`."""
    return (*(f"^features/{index}/" for index in range(8)), "^classifier/0/")


# torch's trunc_normal_(std=0.02) truncates at +-2 in absolute units (100 std): a plain normal.
kernel_init = nn.initializers.normal(0.02)
# torch LayerNorm(eps=1e-6); two-pass variance, as torch computes it. Over the channels of NHWC
# maps it is torchvision's LayerNorm2d too (which permutes to channels-last to normalise).
layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False)


def stochastic_depth_fractions(stages) -> list[list[float]]:
    """Per stage, per block: the fraction of `stochastic_depth_prob` it drops with, as torchvision
    has it: block k of n (counted over all stages from 0) drops with p * k / (n - 1)."""
    total = sum(depth for _, depth in stages)
    fractions, index = [], 0
    for _, depth in stages:
        fractions.append([(index + i) / (total - 1.0) for i in range(depth)])
        index += depth
    return fractions


class Block(nn.Module):
    """torchvision's CNBlock `block` Sequential: `0` depthwise 7x7 conv (bias), `1` permute, `2`
    LayerNorm, `3` Linear to 4x, `4` GELU, `5` Linear back, `6` permute."""

    features: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x):
        c = self.features
        x = nn.Conv(c, (7, 7), padding=3, feature_group_count=c, kernel_init=kernel_init,
                    conv_general_dilated=conv_lowering(self.cpu_lowerings), name="0")(x)
        x = layer_norm(name="2")(x)
        x = nn.Dense(4 * c, kernel_init=kernel_init, name="3")(x)
        x = nn.gelu(x, approximate=False)  # torch nn.GELU(): the exact erf form
        return nn.Dense(c, kernel_init=kernel_init, name="5")(x)


class CNBlock(nn.Module):
    """`layer_scale * block(x)`, stochastic depth (torch's StochasticDepth(p, "row"): the whole
    branch dropped per example, survivors scaled by 1 / (1 - p); identity in eval), plus x."""

    features: int
    stochastic_depth: float  # this block's rate
    layer_scale: float = 1e-6
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale), (self.features,))
        out = Block(self.features, self.cpu_lowerings, name="block")(x) * scale
        out = dropout(out, self.stochastic_depth, train, broadcast_dims=(1, 2, 3))
        return out + x


class Stage(nn.Module):
    """A torch Sequential of CNBlocks: paths read `features/<s>/<i>/...`."""

    features: int
    stochastic_depths: tuple[float, ...]
    layer_scale: float = 1e-6
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, rate in enumerate(self.stochastic_depths):
            x = CNBlock(self.features, rate, self.layer_scale, self.cpu_lowerings, name=str(index))(x, train)
        return x


class Stem(nn.Module):
    """torchvision's Conv2dNormActivation stem: `0` 4x4 stride-4 conv (bias, no padding), `1` LayerNorm2d."""

    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (4, 4), strides=4, padding=0, kernel_init=kernel_init, name="0")(x)
        return layer_norm(name="1")(x)


class Downsample(nn.Module):
    """Between stages: `0` LayerNorm2d, `1` 2x2 stride-2 conv (bias)."""

    features: int

    @nn.compact
    def __call__(self, x):
        x = layer_norm(name="0")(x)
        return nn.Conv(self.features, (2, 2), strides=2, padding=0, kernel_init=kernel_init, name="1")(x)


class Features(nn.Module):
    """torchvision's `features` Sequential: stem `0`, then stages and downsampling layers alternating."""

    stages: tuple[tuple[int, int], ...]
    stochastic_depth_prob: float
    layer_scale: float = 1e-6
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Stem(self.stages[0][0], name="0")(x)
        index = 1
        for stage, ((channels, _), fractions) in enumerate(zip(self.stages, stochastic_depth_fractions(self.stages))):
            rates = tuple(self.stochastic_depth_prob * f for f in fractions)
            x = Stage(channels, rates, self.layer_scale, self.cpu_lowerings, name=str(index))(x, train)
            index += 1
            if stage + 1 < len(self.stages):
                x = Downsample(self.stages[stage + 1][0], name=str(index))(x)
                index += 1
        return x


class Classifier(nn.Module):
    """torchvision's `classifier` Sequential: `0` LayerNorm2d (on the pooled (N, 1, 1, C) map),
    `1` Flatten, `2` Linear."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = layer_norm(name="0")(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, kernel_init=kernel_init, name="2")(x)  # bias: zeros, as torchvision's


class ConvNeXt(nn.Module):
    """ConvNeXt. Input: NHWC images normalised with ImageNet mean/std, any size >= 32."""

    stages: tuple[tuple[int, int], ...] = CONFIGS["convnext_tiny"]["stages"]
    num_classes: int = 1000
    stochastic_depth_prob: float = 0.1  # block k of n drops with this * k / (n - 1); identity in eval
    layer_scale: float = 1e-6  # the initial value of every block's layer_scale
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Features(self.stages, self.stochastic_depth_prob, self.layer_scale, self.cpu_lowerings,
                     name="features")(x, train)
        x = jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1)
        return Classifier(self.num_classes, name="classifier")(x)


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's ConvNeXt_*_Weights.IMAGENET1K_V1: evaluated at a 224 crop (of a 236 / 230 / 232
# bilinear resize for tiny / small / base), ImageNet mean/std.
IMAGENET_FILES = {
    "convnext_tiny": "convnext_tiny-983f1562.pth",
    "convnext_small": "convnext_small-0c510722.pth",
    "convnext_base": "convnext_base-6075fbad.pth",
}

register(*(ModelInfo(name, functools.partial(ConvNeXt, **CONFIGS[name]), 224, IMAGENET_MEAN, IMAGENET_STD,
                     head=HEAD, blocks=blocks(), weight_map=weight_map_in("xfer.weights.convnext", name),
                     imagenet=TorchvisionFile(IMAGENET_FILES[name]))
           for name in CONFIGS))
