"""torchvision's EfficientNet-B0 in Flax linen, NHWC, with torchvision's parameter names.

The full EfficientNet-B0 (SiLU, squeeze-excitation), as `torchvision.models.efficientnet_b0`
builds it, next to the edge variant `efficientnet_lite`. Paths mirror torchvision's modules:
`features/0/0/kernel` (stem conv), `features/2/1/block/2/fc1/kernel` (a squeeze-excitation),
`features/8/1/scale` (head conv's BatchNorm), `classifier/1/kernel`; so torch's
`model.features[3]` is the regex `^features/3/` here.

Where it differs from Lite0 beyond SiLU and squeeze-excitation, a port would still load
without complaint and compute something else:
- torch's symmetric padding, (k - 1) // 2 on every side, not TF's "SAME" (whose extra
  row/column on a stride-2 layer goes bottom/right);
- B0's BatchNorm is torch's default, eps 1e-5 and momentum 0.1 (Flax's 0.9): torchvision
  gives eps 1e-3 / momentum 0.01 only to B5-B7 and eps 1e-3 to the V2 models.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn

from xfer.models.efficientnet_lite import HEAD_CHANNELS, STAGES, STEM_CHANNELS, conv_init, dense_init
from xfer.models.layers import batch_norm, conv_lowering, dropout
from xfer.models.registry import (IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile, register,
                                  weight_map_in)

# For freeze presets (xfer.learning.presets). Blocks are counted in stages, as for Lite0: the stem
# `features/0`, the seven MBConv stages `features/1`..`features/7`, the 1x1 head conv `features/8`.
HEAD = "^classifier/"


def blocks() -> tuple[str, ...]:
    """Regexes of the blocks in forward order: `features/0` (stem) .. `features/8` (head conv)."""
    return tuple(f"^features/{index}/" for index in range(len(STAGES) + 2))


class BlockConfig(NamedTuple):
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    stochastic_depth: float  # the fraction of `stochastic_depth_prob` this block drops with


def stage_configs() -> list[tuple[BlockConfig, ...]]:
    """One tuple per stage `features/<1..7>`, one config per block, as torchvision builds them:
    a stage's first block strides and widens; block k of 16 drops its branch with p * k / 16."""
    total = sum(repeats for repeats, *_ in STAGES)
    stages, channels, index = [], STEM_CHANNELS, 0
    for repeats, kernel, stride, expand, out in STAGES:
        stage = []
        for repeat in range(repeats):
            stage.append(BlockConfig(channels, out, kernel, stride if repeat == 0 else 1, expand, index / total))
            channels, index = out, index + 1
        stages.append(tuple(stage))
    return stages


def _batch_norm(x, train: bool, name: str, cpu_lowerings: bool | None):
    # torch BatchNorm2d(momentum=0.1, eps=1e-5): torchvision's efficientnet_b0 keeps the defaults.
    return batch_norm(x, train, name=name, momentum=0.9, epsilon=1e-5, cpu_lowerings=cpu_lowerings)


class ConvNormActivation(nn.Module):
    """torchvision's Conv2dNormActivation: children `0` (bias-free conv, padding (k - 1) // 2),
    `1` (BatchNorm), then SiLU unless `activation` is False. A depthwise conv when `groups` is its
    width: on CPU it runs as shifted multiply-adds (`layers.conv_general_dilated`)."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    activation: bool = True
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size
        x = nn.Conv(self.features, (k, k), strides=self.stride, padding=(k - 1) // 2, feature_group_count=self.groups,
                    use_bias=False, kernel_init=conv_init, conv_general_dilated=conv_lowering(self.cpu_lowerings),
                    name="0")(x)
        x = _batch_norm(x, train, "1", self.cpu_lowerings)
        return nn.silu(x) if self.activation else x


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: global average, 1x1 conv `fc1`, SiLU, 1x1 conv `fc2`,
    sigmoid, times the input."""

    squeeze_channels: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x):
        conv = conv_lowering(self.cpu_lowerings)
        scale = x.mean(axis=(1, 2), keepdims=True)
        scale = nn.silu(nn.Conv(self.squeeze_channels, (1, 1), kernel_init=conv_init, conv_general_dilated=conv,
                                name="fc1")(scale))
        scale = nn.Conv(x.shape[-1], (1, 1), kernel_init=conv_init, conv_general_dilated=conv, name="fc2")(scale)
        return x * nn.sigmoid(scale)


class Block(nn.Module):
    """torchvision's MBConv `block` Sequential: [1x1 expand,] depthwise kxk, squeeze-excitation,
    1x1 project; numbered as torch numbers them (stage 1, expand ratio 1, has no expand conv)."""

    config: BlockConfig
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, cpu, layer = self.config, self.cpu_lowerings, 0
        hidden = cfg.in_channels * cfg.expand_ratio
        if hidden != cfg.in_channels:
            x = ConvNormActivation(hidden, cpu_lowerings=cpu, name=str(layer))(x, train)
            layer += 1
        x = ConvNormActivation(hidden, cfg.kernel_size, cfg.stride, groups=hidden, cpu_lowerings=cpu,
                               name=str(layer))(x, train)
        x = SqueezeExcitation(max(1, cfg.in_channels // 4), cpu, name=str(layer + 1))(x)
        return ConvNormActivation(cfg.out_channels, activation=False, cpu_lowerings=cpu,
                                  name=str(layer + 2))(x, train)


class MBConv(nn.Module):
    """Inverted residual: `block`, then stochastic depth (torch's StochasticDepth(p, "row"): the
    whole branch dropped per example, survivors scaled by 1 / (1 - p)) and the identity skip
    where shapes allow."""

    config: BlockConfig
    stochastic_depth_prob: float
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        out = Block(cfg, self.cpu_lowerings, name="block")(x, train)
        if cfg.stride == 1 and cfg.in_channels == cfg.out_channels:
            out = dropout(out, self.stochastic_depth_prob * cfg.stochastic_depth, train, broadcast_dims=(1, 2, 3))
            out = out + x
        return out


class Stage(nn.Module):
    """A torch Sequential of blocks: paths read `features/<s>/<i>/...`."""

    configs: tuple[BlockConfig, ...]
    stochastic_depth_prob: float
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, config in enumerate(self.configs):
            x = MBConv(config, self.stochastic_depth_prob, self.cpu_lowerings, name=str(index))(x, train)
        return x


class Features(nn.Module):
    """torchvision's `features` Sequential: stem `0`, stages `1`..`7`, head conv `8`."""

    stochastic_depth_prob: float
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cpu = self.cpu_lowerings
        x = ConvNormActivation(STEM_CHANNELS, 3, 2, cpu_lowerings=cpu, name="0")(x, train)
        for index, configs in enumerate(stage_configs(), start=1):
            x = Stage(configs, self.stochastic_depth_prob, cpu, name=str(index))(x, train)
        return ConvNormActivation(HEAD_CHANNELS, cpu_lowerings=cpu, name=str(len(STAGES) + 1))(x, train)


class Classifier(nn.Module):
    """torchvision's `classifier` Sequential: `0` Dropout, `1` Linear."""

    num_classes: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = dropout(x, self.dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=dense_init, name="1")(x)  # bias: zeros, as torchvision's


class EfficientNet(nn.Module):
    """EfficientNet-B0. Input: NHWC images normalised with ImageNet mean/std, any size >= 32."""

    num_classes: int = 1000
    dropout_rate: float = 0.2
    stochastic_depth_prob: float = 0.2  # block k of 16 drops with this * k / 16; identity in eval
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Features(self.stochastic_depth_prob, self.cpu_lowerings, name="features")(x, train)
        x = x.mean(axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
        return Classifier(self.num_classes, self.dropout_rate, name="classifier")(x, train)


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's EfficientNet_B0_Weights.IMAGENET1K_V1 (ported from timm): evaluated at a 224 crop
# of a 256 bicubic resize, ImageNet mean/std.
register(ModelInfo("efficientnet_b0", EfficientNet, 224, IMAGENET_MEAN, IMAGENET_STD, head=HEAD, blocks=blocks(),
                   weight_map=weight_map_in("xfer.weights.efficientnet"),
                   imagenet=TorchvisionFile("efficientnet_b0_rwightman-7f5810bc.pth")))
