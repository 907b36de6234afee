"""torchvision's Inception v3 in Flax linen, NHWC, with torchvision's parameter names.

`torchvision.models.inception_v3` as its ImageNet weights (IMAGENET1K_V1, ported from Google's
TensorFlow release) build it. Paths mirror torchvision's modules: `Conv2d_1a_3x3/conv/kernel`,
`Mixed_6e/branch7x7_2/bn/scale`, `AuxLogits/conv0/conv/kernel`, `fc/bias`; so torch's
`model.Mixed_7c` is the regex `^Mixed_7c/` here.

What a port would get wrong without complaint, since the weights load either way:
- BatchNorm eps is 1e-3 (TensorFlow's), not torch's default 1e-5; momentum is torch's 0.1 (Flax's 0.9);
- the 3x3 average pools of the Mixed blocks pad by 1 and divide by 9 everywhere, borders included
  (torch's `count_include_pad=True`, Flax's `avg_pool` default), while the max pools and the
  auxiliary classifier's 5x5/3 average pool do not pad;
- `transform_input` (see `Inception3`): torchvision re-normalises the input for these weights.

The auxiliary classifier `AuxLogits` reads Mixed_6e's 17x17 maps and runs in training only, where
the model returns `(logits, aux_logits)` as torchvision's `InceptionOutputs`; `xfer.learning.loss`
adds its cross-entropy with weight `config.aux_loss_weight` (0.4 in torchvision's fine-tuning
tutorial). Evaluation returns the main logits alone. A feature cache (`config.feature_cache`) cuts at
Mixed_6e at the latest while AuxLogits is built: AuxLogits reads Mixed_6e's output, and the cut
check traces the training forward too (`xfer.training.feature_cache`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from xfer.models.layers import batch_norm, conv_lowering, max_pool
from xfer.models.registry import (IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile, register,
                                  weight_map_in)

# The smallest input side torchvision's Inception v3 takes (its weights' meta `min_size`): Mixed_7a's
# stride-2 3x3 conv needs Mixed_6e maps of at least 3x3.
MIN_SIZE = 75
# With the auxiliary classifier: its 5x5/3 average pool and unpadded 5x5 conv1 need Mixed_6e maps
# of at least 17x17, which only inputs of 299 px and more give (299 -> 149 -> 147 -> 73 -> 71 -> 35 -> 17).
AUX_MIN_SIZE = 299

# For freeze presets (xfer.learning.presets). The heads a new class count re-initialises: the main
# classifier and the auxiliary one (torchvision's tutorial replaces both).
HEAD = "^(?:fc|AuxLogits/fc)/"
MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c")


def blocks() -> tuple[str, ...]:
    """Regexes of the blocks in forward order, grouped as timm's `group_matcher` groups them: the
    stem's first three convs, its last two, each Mixed block, and the auxiliary classifier's convs
    where torchvision calls it, between Mixed_6e and Mixed_7a (its `fc` is a head). The auxiliary
    block holds no parameter when `aux_logits` is off; the block count (and so `last_k:K`) stays."""
    stem = ("^Conv2d_(?:1a|2a|2b)_3x3/", "^Conv2d_(?:3b_1x1|4a_3x3)/")
    mixed = tuple(f"^{name}/" for name in MIXED)
    return (*stem, *mixed[:8], "^AuxLogits/conv[01]/", *mixed[8:])


def trunc_normal(stddev: float):
    """torchvision's init of every conv and linear weight: `trunc_normal_(std=stddev, a=-2, b=2)`,
    a normal cut at +-2 in absolute value (not at +-2 standard deviations)."""
    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.truncated_normal(key, -2 / stddev, 2 / stddev, shape, dtype)
    return init


def _linear_bias_init(fan_in: int):
    """torch nn.Linear's default bias, U(+-1/sqrt(fan_in)): torchvision's init loop sets weights only."""
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(x, features: int, stddev: float, name: str):
    """torchvision's Linear layers here: weight trunc_normal_(std=stddev), bias nn.Linear's default."""
    return nn.Dense(features, kernel_init=trunc_normal(stddev), bias_init=_linear_bias_init(x.shape[-1]), name=name)(x)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: bias-free conv `conv`, BatchNorm `bn` (eps 1e-3), ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        (ph, pw), cpu = _pair(self.padding), self.cpu_lowerings
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, kernel_init=trunc_normal(0.1), conv_general_dilated=conv_lowering(cpu),
                    name="conv")(x)
        # torch BatchNorm2d(eps=0.001), momentum 0.1.
        return nn.relu(batch_norm(x, train, name="bn", momentum=0.9, epsilon=1e-3, cpu_lowerings=cpu))


def _avg_pool_3x3(x):
    """F.avg_pool2d(x, 3, stride=1, padding=1): zero padding counted, every window divided by 9."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 1x1 -> 5x5, 1x1 -> 3x3 -> 3x3, avg pool -> 1x1; concatenated."""

    pool_features: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, cpu_lowerings=self.cpu_lowerings)
        branch1x1 = conv(64, 1, name="branch1x1")(x, train)
        branch5x5 = conv(48, 1, name="branch5x5_1")(x, train)
        branch5x5 = conv(64, 5, padding=2, name="branch5x5_2")(branch5x5, train)
        branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl, train)
        branch_pool = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x), train)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: stride-2 3x3, 1x1 -> 3x3 -> stride-2 3x3, stride-2 3x3 max pool."""

    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, cpu_lowerings=self.cpu_lowerings)
        branch3x3 = conv(384, 3, stride=2, name="branch3x3")(x, train)
        branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = conv(96, 3, stride=2, name="branch3x3dbl_3")(branch3x3dbl, train)
        branch_pool = max_pool(x, 3, 2, 0, self.cpu_lowerings)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (1x7 and 7x1) of width `channels_7x7`."""

    channels_7x7: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, cpu_lowerings=self.cpu_lowerings)
        c7 = self.channels_7x7
        branch1x1 = conv(192, 1, name="branch1x1")(x, train)
        branch7x7 = conv(c7, 1, name="branch7x7_1")(x, train)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7, train)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7, train)
        branch7x7dbl = conv(c7, 1, name="branch7x7dbl_1")(x, train)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl, train)
        branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl, train)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl, train)
        branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl, train)
        branch_pool = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x), train)
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1 -> stride-2 3x3, 1x1 -> 1x7 -> 7x1 -> stride-2 3x3, stride-2 3x3 max pool."""

    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, cpu_lowerings=self.cpu_lowerings)
        branch3x3 = conv(192, 1, name="branch3x3_1")(x, train)
        branch3x3 = conv(320, 3, stride=2, name="branch3x3_2")(branch3x3, train)
        branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x, train)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3, train)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3, train)
        branch7x7x3 = conv(192, 3, stride=2, name="branch7x7x3_4")(branch7x7x3, train)
        branch_pool = max_pool(x, 3, 2, 0, self.cpu_lowerings)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 convs, each concatenated."""

    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv2d, cpu_lowerings=self.cpu_lowerings)
        branch1x1 = conv(320, 1, name="branch1x1")(x, train)
        branch3x3 = conv(384, 1, name="branch3x3_1")(x, train)
        branch3x3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3, train),
                                     conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3, train)],
                                    axis=-1)
        branch3x3dbl = conv(448, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = jnp.concatenate(
            [conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl, train),
             conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl, train)], axis=-1)
        branch_pool = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x), train)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionAux(nn.Module):
    """torchvision's InceptionAux on Mixed_6e's maps: 5x5/3 average pool (unpadded), 1x1 `conv0`,
    5x5 `conv1` (unpadded), global average, `fc`.

    torchvision sets `stddev` 0.01 on `conv1` and 0.001 on `fc` for its init loop, but the loop reads
    it from the nn.Conv2d/nn.Linear it initialises, and `conv1` is the BasicConv2d around one: its conv
    gets the default 0.1 (measured: std 0.100 of torchvision's `AuxLogits.conv1.conv.weight`), `fc` 0.001.
    """

    num_classes: int
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.avg_pool(x, (5, 5), strides=(3, 3))
        x = BasicConv2d(128, 1, cpu_lowerings=self.cpu_lowerings, name="conv0")(x, train)
        x = BasicConv2d(768, 5, cpu_lowerings=self.cpu_lowerings, name="conv1")(x, train)
        x = x.mean(axis=(1, 2))  # adaptive_avg_pool2d(x, (1, 1)) + flatten
        return _linear(x, self.num_classes, 0.001, "fc")


class Inception3(nn.Module):
    """Inception v3. Input: NHWC images normalised with ImageNet mean/std (the registry's), at least
    75x75 px, and 299x299 when the auxiliary classifier runs.

    `transform_input`: Google trained these weights on pixels scaled to [-1, 1], (x - 0.5) / 0.5.
    torchvision keeps ImageNet's mean/std in its transforms for every model, and turns them into
    that with `x * std / 0.5 + (mean - 0.5) / 0.5` per channel, i.e. ((x * std + mean) - 0.5) / 0.5;
    its builder switches it on with the ImageNet weights, so it is on here by default. Off, the
    first conv sees the ImageNet-normalised input itself (torchvision's `Inception3` default, for
    training from scratch).

    `aux_logits`: with it (torchvision's default, and how its ImageNet weights were saved) training
    returns `(logits, aux_logits)`, evaluation `logits` alone. `AuxLogits` runs only then, and at
    init, so its parameters exist from the start.
    """

    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = True
    dropout_rate: float = 0.5  # torchvision's nn.Dropout(p=0.5) before `fc`
    # XLA:CPU's faster forms of a few ops (xfer.models.layers.use_cpu_lowerings); None: on the CPU backend.
    cpu_lowerings: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        with_aux = self.aux_logits and (train or self.is_initializing())
        _check_size(x.shape[1:3], with_aux)
        if self.transform_input:
            x = _transform_input(x)
        cpu = self.cpu_lowerings
        conv = functools.partial(BasicConv2d, cpu_lowerings=cpu)
        x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x, train)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x, train)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x, train)
        x = max_pool(x, 3, 2, 0, cpu)  # maxpool1
        x = conv(80, 1, name="Conv2d_3b_1x1")(x, train)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x, train)
        x = max_pool(x, 3, 2, 0, cpu)  # maxpool2
        x = InceptionA(32, cpu, name="Mixed_5b")(x, train)
        x = InceptionA(64, cpu, name="Mixed_5c")(x, train)
        x = InceptionA(64, cpu, name="Mixed_5d")(x, train)
        x = InceptionB(cpu, name="Mixed_6a")(x, train)
        x = InceptionC(128, cpu, name="Mixed_6b")(x, train)
        x = InceptionC(160, cpu, name="Mixed_6c")(x, train)
        x = InceptionC(160, cpu, name="Mixed_6d")(x, train)
        x = InceptionC(192, cpu, name="Mixed_6e")(x, train)
        aux = InceptionAux(self.num_classes, cpu, name="AuxLogits")(x, train) if with_aux else None
        x = InceptionD(cpu, name="Mixed_7a")(x, train)
        x = InceptionE(cpu, name="Mixed_7b")(x, train)
        x = InceptionE(cpu, name="Mixed_7c")(x, train)
        x = x.mean(axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)
        logits = _linear(x, self.num_classes, 0.1, "fc")
        return (logits, aux) if train and self.aux_logits else logits


def _transform_input(x):
    """torchvision's `Inception3._transform_input`, its constants computed as it computes them (in
    Python floats, then rounded once to the input's dtype)."""
    scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], x.dtype)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], x.dtype)
    return x * scale + shift


def _check_size(size: tuple[int, int], with_aux: bool) -> None:
    """A one-line error for an input too small, instead of a shape error deep inside a conv."""
    minimum = AUX_MIN_SIZE if with_aux else MIN_SIZE
    if min(size) < minimum:
        fix = (f"use images of at least {AUX_MIN_SIZE} px, or build it with aux_logits=False "
               f"(config.model.aux_logits=False; then {MIN_SIZE} px suffice)" if with_aux
               else f"use images of at least {MIN_SIZE} px")
        raise ValueError(f"inception_v3{' with its auxiliary classifier' if with_aux else ''} needs images of at "
                         f"least {minimum}x{minimum} px, got {size[0]}x{size[1]}; {fix}")


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's Inception_V3_Weights.IMAGENET1K_V1 (ported from TensorFlow): evaluated at a 299 crop of
# a 342 resize, ImageNet mean/std (turned into [-1, 1] scaling by `transform_input`).
# Registered without AuxLogits: any config runs it (from 75 px, with no loss field to add), and the
# port skips the file's AuxLogits tensors. The tutorial's recipe opts in with config.model.aux_logits=True
# and config.aux_loss_weight (configs/inception_cifar.py); torchvision's class default stays the module's.
register(ModelInfo("inception_v3", functools.partial(Inception3, aux_logits=False), 299, IMAGENET_MEAN,
                   IMAGENET_STD, head=HEAD,
                   blocks=blocks(), weight_map=weight_map_in("xfer.weights.inception"),
                   imagenet=TorchvisionFile("inception_v3_google-0cc3c7bd.pth")))
