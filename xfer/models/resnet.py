"""torchvision's ResNet-18/34/50/101/152 in Flax linen, NHWC, with torchvision's parameter names.

This is torchvision's "v1.5": a Bottleneck strides in its 3x3 `conv2`, not
in its first 1x1 `conv1` as the paper's v1 does. The two have identically
shaped weights, so a v1 port would load torchvision's files without a
single error and still compute something else (and lose ~0.5% top-1);
only an activation-level comparison tells them apart.

Paths mirror torchvision's modules: `conv1/kernel`, `layer3/1/bn2/scale`,
`layer2/0/downsample/0/kernel`, `fc/bias`; so torch's `model.layer4` is the
regex `^layer4/` here.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xfer.models.layers import batch_norm, conv_lowering, max_pool
from xfer.models.registry import (EIGEN_CONVOLUTIONS, IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile,
                                  register, weight_map_in)

STEM_CHANNELS = 64
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)

# torchvision's initialisation, so a `scratch` baseline starts where torch's would:
# kaiming_normal_(mode="fan_out") for convs; nn.Linear's default U(±1/sqrt(fan_in)) for fc.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# For freeze presets (xfer.learning.presets).
HEAD = "^fc/"


def blocks() -> tuple[str, ...]:
    """Regexes of the blocks in forward order: the stem, then the stages `layer1`..`layer4`."""
    return ("^(?:conv1|bn1)/", *(f"^layer{index}/" for index in range(1, len(STAGE_PLANES) + 1)))


def _dense_bias_init(fan_in: int):
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv(features: int, kernel: int, stride: int, cpu_lowerings: bool | None, name: str) -> nn.Conv:
    """torchvision's bias-free conv (padding kernel // 2), lowered as `layers.conv_lowering` chooses."""
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=kernel // 2, use_bias=False,
                   kernel_init=conv_init, conv_general_dilated=conv_lowering(cpu_lowerings), name=name)


def _batch_norm(x, train: bool, name: str, cpu_lowerings: bool | None):
    # torch BatchNorm2d(momentum=0.1, eps=1e-5).
    return batch_norm(x, train, name=name, momentum=0.9, epsilon=1e-5, cpu_lowerings=cpu_lowerings)


class BlockSpec(NamedTuple):
    planes: int  # width of the block's 3x3 conv; it outputs planes * expansion channels
    stride: int
    downsample: bool  # the shortcut needs a strided 1x1 conv + BN to match the output shape


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first one strides."""

    expansion = 1
    convs = 2
    spec: BlockSpec
    cpu_lowerings: bool | None = None  # xfer.models.layers.use_cpu_lowerings

    @nn.compact
    def __call__(self, x, train: bool = False):
        spec, shortcut, cpu = self.spec, x, self.cpu_lowerings
        x = nn.relu(_batch_norm(_conv(spec.planes, 3, spec.stride, cpu, "conv1")(x), train, "bn1", cpu))
        x = _batch_norm(_conv(spec.planes, 3, 1, cpu, "conv2")(x), train, "bn2", cpu)
        if spec.downsample:
            shortcut = Downsample(spec.planes * self.expansion, spec.stride, cpu, name="downsample")(shortcut, train)
        return nn.relu(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152); v1.5: the 3x3 strides."""

    expansion = 4
    convs = 3
    spec: BlockSpec
    cpu_lowerings: bool | None = None  # xfer.models.layers.use_cpu_lowerings

    @nn.compact
    def __call__(self, x, train: bool = False):
        spec, shortcut, cpu = self.spec, x, self.cpu_lowerings
        x = nn.relu(_batch_norm(_conv(spec.planes, 1, 1, cpu, "conv1")(x), train, "bn1", cpu))
        x = nn.relu(_batch_norm(_conv(spec.planes, 3, spec.stride, cpu, "conv2")(x), train, "bn2", cpu))
        x = _batch_norm(_conv(spec.planes * self.expansion, 1, 1, cpu, "conv3")(x), train, "bn3", cpu)
        if spec.downsample:
            shortcut = Downsample(spec.planes * self.expansion, spec.stride, cpu, name="downsample")(shortcut, train)
        return nn.relu(x + shortcut)


class Downsample(nn.Module):
    """torch's `downsample` Sequential: children `0` (1x1 conv) and `1` (BN)."""

    channels: int
    stride: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cpu = self.cpu_lowerings
        return _batch_norm(_conv(self.channels, 1, self.stride, cpu, "0")(x), train, "1", cpu)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# torchvision's depths: (block kind, blocks per stage).
CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def stage_specs(block: str, stage_sizes: Sequence[int]) -> list[tuple[BlockSpec, ...]]:
    """One tuple per `layer<k>`, one spec per block in it, as torchvision's `_make_layer` builds them.

    A stage's first block strides and changes width; it needs a downsample
    shortcut whenever either happens (ResNet-50's layer1 too: 64 -> 256).
    """
    expansion, channels, stages = BLOCKS[block].expansion, STEM_CHANNELS, []
    for planes, stride, size in zip(STAGE_PLANES, STAGE_STRIDES, stage_sizes):
        specs = []
        for index in range(size):
            block_stride = stride if index == 0 else 1
            specs.append(BlockSpec(planes, block_stride, block_stride != 1 or channels != planes * expansion))
            channels = planes * expansion
        stages.append(tuple(specs))
    return stages


class Stage(nn.Module):
    """The container that makes block paths read `layer<k>/<i>/...`, as torch's Sequential does."""

    block: str
    specs: tuple[BlockSpec, ...]
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for index, spec in enumerate(self.specs):
            x = BLOCKS[self.block](spec, self.cpu_lowerings, name=str(index))(x, train)
        return x


class ResNet(nn.Module):
    """Input: NHWC images normalised with ImageNet mean/std, any size >= 32."""

    block: str  # a key of BLOCKS
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cpu = self.cpu_lowerings
        x = nn.relu(_batch_norm(_conv(STEM_CHANNELS, 7, 2, cpu, "conv1")(x), train, "bn1", cpu))
        # torch pads max-pooling with -inf; so does Flax's max_pool (its reduce_window's init value).
        x = max_pool(x, 3, 2, 1, cpu)
        for index, specs in enumerate(stage_specs(self.block, self.stage_sizes), start=1):
            x = Stage(self.block, specs, cpu, name=f"layer{index}")(x, train)
        x = x.mean(axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten: no flatten-order question
        return nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=_dense_bias_init(x.shape[-1]),
                        name="fc")(x)


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's published ImageNet weights.
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
}



register(*(ModelInfo(name, functools.partial(ResNet, *CONFIGS[name]), 224, IMAGENET_MEAN, IMAGENET_STD,
                     head=HEAD, blocks=blocks(), weight_map=weight_map_in("xfer.weights.resnet", name),
                     imagenet=TorchvisionFile(IMAGENET_FILES[name]),
                     cpu_xla_flags=EIGEN_CONVOLUTIONS)
           for name in CONFIGS))
