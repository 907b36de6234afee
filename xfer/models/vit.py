"""torchvision's VisionTransformer in Flax linen, NHWC, with torchvision's parameter names.

Paths mirror torchvision's modules with '/' for '.': torch's
`encoder.layers.encoder_layer_3.mlp[0]` is `encoder/layers/encoder_layer_3/mlp/0`,
so `^encoder/layers/encoder_layer_(10|11)/` selects the last two blocks.
Attention keeps torch's fused input projection: `self_attention/in_proj` is one
Dense of width 3 * hidden_dim whose outputs are query, key and value in that
order (torch's `in_proj_weight`, `in_proj_bias`); `self_attention/out_proj` is
torch's `out_proj`. One fused kernel keeps the name map one-to-one and a freeze
regex on `self_attention/` covering all of attention.

The position embedding (`encoder/pos_embedding`) holds one entry per patch of
an `image_size` image plus one for the class token, so a model serves one
resolution, as torchvision's does. To fine-tune at another, build the model
with that `image_size`: the weight loader then resamples the checkpoint's
position grid bicubically (`xfer.weights.vit`), as torchvision's
`interpolate_embeddings` and big_vision do.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from xfer.models.layers import dropout
from xfer.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, TorchvisionFile, register, weight_map_in

# torchvision's constructor arguments for each named model.
CONFIGS = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
}

# For freeze presets (xfer.learning.presets): the classification head.
HEAD = "^heads/"


def blocks(num_layers: int) -> tuple[str, ...]:
    """Regexes of the blocks in forward order: the patch and position embedding, each encoder
    layer, the final LayerNorm."""
    return ("^(?:conv_proj/|class_token$|encoder/pos_embedding$)",
            *(f"^encoder/layers/encoder_layer_{index}/" for index in range(num_layers)), "^encoder/ln/")


# torchvision's initialisation, so a `scratch` baseline starts where torch's would.
# conv_proj: trunc_normal(std=sqrt(1/fan_in)) truncated at +-2 absolute, i.e. ~50 std: a plain normal.
patch_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
xavier_init = nn.initializers.xavier_uniform()
# torch's default Linear init, U(+-1/sqrt(fan_in)); MultiheadAttention keeps it for out_proj.
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
mlp_bias_init = nn.initializers.normal(1e-6)
pos_embedding_init = nn.initializers.normal(0.02)  # "from BERT"

# torch LayerNorm(eps=1e-6); two-pass variance, as torch computes it.
layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False)


def attend(qkv, num_heads: int, attention_dropout_rate: float, train: bool):
    """Multi-head scaled dot-product attention of a fused (batch, length, 3 * width) projection
    whose last axis holds query, key and value in that order, as torch's `in_proj` and timm's
    `qkv` both lay them out; returns (batch, length, width), heads concatenated.

    Called inside a module's compact method: the attention weights' dropout is that module's
    `Dropout_0` (torch's `dropout` on the weights, timm's `attn_drop`).
    """
    batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = width // num_heads
    query, key, value = (t.reshape(batch, length, num_heads, head_dim) for t in jnp.split(qkv, 3, -1))
    logits = jnp.einsum("nqhd,nkhd->nhqk", query * head_dim**-0.5, key)
    weights = dropout(nn.softmax(logits, axis=-1), attention_dropout_rate, train)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, value).reshape(batch, length, width)


class SelfAttention(nn.Module):
    """torch's MultiheadAttention(batch_first=True) used as self-attention.

    `attention_dropout_rate` drops attention weights, as torch's `dropout` does.
    """

    num_heads: int
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden_dim={width} is not divisible by num_heads={self.num_heads}")
        qkv = nn.Dense(3 * width, kernel_init=xavier_init, bias_init=nn.initializers.zeros, name="in_proj")(x)
        attended = attend(qkv, self.num_heads, self.attention_dropout_rate, train)
        return nn.Dense(width, kernel_init=torch_linear_init, bias_init=nn.initializers.zeros,
                        name="out_proj")(attended)


class MLPBlock(nn.Module):
    """torchvision's MLPBlock: Linear `0`, exact (erf) GELU, dropout, Linear `3`, dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, kernel_init=xavier_init, bias_init=mlp_bias_init, name="0")(x)
        x = dropout(nn.gelu(x, approximate=False), self.dropout_rate, train)
        x = nn.Dense(width, kernel_init=xavier_init, bias_init=mlp_bias_init, name="3")(x)
        return dropout(x, self.dropout_rate, train)


class EncoderBlock(nn.Module):
    """Pre-norm residual block: x + attention(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x = layer_norm(name="ln_1")(inputs)
        x = SelfAttention(self.num_heads, self.attention_dropout_rate, name="self_attention")(x, train)
        x = dropout(x, self.dropout_rate, train) + inputs
        y = layer_norm(name="ln_2")(x)
        return x + MLPBlock(self.mlp_dim, self.dropout_rate, name="mlp")(y, train)


class EncoderLayers(nn.Module):
    """torch's `encoder.layers` Sequential, so blocks sit at `encoder/layers/encoder_layer_<i>`."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                             name=f"encoder_layer_{i}")(x, train)
        return x


class Encoder(EncoderLayers):
    """Adds `pos_embedding` to the (class token + patches) sequence, runs the blocks (`layers`, with
    this module's settings), then `ln`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        pos_embedding = self.param("pos_embedding", pos_embedding_init, (1, *x.shape[1:]))
        x = dropout(x + pos_embedding, self.dropout_rate, train)
        x = EncoderLayers(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                          self.attention_dropout_rate, name="layers")(x, train)
        return layer_norm(name="ln")(x)


class Heads(nn.Module):
    """torch's `heads` Sequential holding one Linear, `head` (zero-initialised, as torchvision does)."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


class VisionTransformer(nn.Module):
    """Input: NHWC images of exactly image_size x image_size, normalised with ImageNet mean/std.

    Defaults are ViT-B/16's; dropout rates default to 0, as in torchvision.
    """

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int = 1000
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input_size(self.image_size, self.patch_size, x.shape[1:3])
        x = nn.Conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    kernel_init=patch_init, name="conv_proj")(x)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.hidden_dim)  # patches row by row, as torch flattens (H, W)
        class_token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim))
        x = jnp.concatenate([jnp.broadcast_to(class_token, (batch, 1, self.hidden_dim)), x], axis=1)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                    self.attention_dropout_rate, name="encoder")(x, train)
        return Heads(self.num_classes, name="heads")(x[:, 0])


def check_input_size(image_size: int, patch_size: int, height_width) -> None:
    """A ViT's position embedding fixes its input: `height_width` must be `image_size` square, a
    whole number of patches."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    if tuple(height_width) != (image_size, image_size):
        raise ValueError(
            f"this ViT takes {image_size}x{image_size} images (its position embedding has one "
            f"entry per {patch_size}x{patch_size} patch of them) but got "
            f"{height_width[0]}x{height_width[1]}; for square images of another size, build it with "
            "that image_size: loading pretrained weights then resamples the position embedding")


# --- registration (xfer.models.registry) ------------------------------------

# torchvision's published ImageNet weights.
IMAGENET_FILES = {"vit_b_16": "vit_b_16-c867db91.pth"}



register(*(ModelInfo(name, functools.partial(VisionTransformer, **CONFIGS[name]), 224, IMAGENET_MEAN, IMAGENET_STD,
                     head=HEAD, blocks=blocks(CONFIGS[name]["num_layers"]),
                     weight_map=weight_map_in("xfer.weights.vit", name), imagenet=TorchvisionFile(IMAGENET_FILES[name]))
           for name in CONFIGS))
