"""timm's VisionTransformer in Flax linen, NHWC, with timm's parameter names: DINOv2 and the CLIP image tower.

Paths mirror timm's modules with '/' for '.': timm's `blocks.3.attn.qkv` is
`blocks/3/attn/qkv`, so `^blocks/(10|11)/` selects the last two blocks, and a
file from the Hugging Face hub (a timm state dict) maps one to one
(`xfer.weights.timm_vit`). Beside torchvision's ViT (`xfer.models.vit`, whose
attention math this module shares) timm's adds what these checkpoints need:

- layer scale: `ls1/gamma`, `ls2/gamma` multiply each residual branch by a
  learned per-channel vector (DINOv2; timm's `init_values`);
- `norm_pre`, a LayerNorm between the position embedding and the blocks
  (CLIP's `ln_pre`), and then no bias in the patch embedding (timm's `pre_norm`);
- quick_gelu, x * sigmoid(1.702 x), the activation OpenAI's CLIP was trained
  with (timm's `*_clip_quickgelu_*` models; its `vit_base_patch16_clip_224`
  uses exact GELU on the same file, which timm's notes say does not give the
  original results);
- LayerNorm eps per model: timm's 1e-6 (DINOv2), 1e-5 for CLIP.

Pooling is timm's default for these models, 'token': the class token of the
final-normed sequence feeds the head. (DINOv2's own linear evaluation
concatenates it with the mean of the patch tokens; timm's model, and so this
one, does not.) The pooling is a parameter-free module, `pool`, whose output is
exactly the head's input, so a frozen backbone's feature cache
(`xfer.training.feature_cache`, cut 'auto') stores one embed_dim vector an
image, not the whole token sequence.

As in `xfer.models.vit`, the position embedding fixes the input size: build
the model with `image_size`, and loading a checkpoint of another grid
resamples its position embedding as timm does.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from xfer.models.layers import dropout
from xfer.models.registry import IMAGENET_MEAN, IMAGENET_STD, HubFile, ModelInfo, register, weight_map_in
from xfer.models.vit import attend, check_input_size, layer_norm

# timm's constructor arguments of each named model (timm's `vit_small_patch14_dinov2`,
# `vit_base_patch14_dinov2`, `vit_base_patch16_clip_quickgelu_224`).
CONFIGS = {
    "dinov2_vits14": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5),
    "dinov2_vitb14": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
    "clip_vitb16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True, norm_eps=1e-5,
                        act="quick_gelu"),
}

# OpenAI CLIP's normalisation constants (timm's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# For freeze presets (xfer.learning.presets): the classification head.
HEAD = "^head/"


def blocks(depth: int) -> tuple[str, ...]:
    """Regexes of the blocks in forward order, as timm's `group_matcher` groups them: the embedding
    (patch projection, class token, position embedding, `norm_pre`), each block, the final norm."""
    return ("^(?:patch_embed/|cls_token$|pos_embed$|norm_pre/)",
            *(f"^blocks/{index}/" for index in range(depth)), "^norm/")


# timm's initialisation (`init_weights_vit_timm`), so a `scratch` baseline starts where timm's would:
# Linear layers trunc_normal(std=0.02) truncated at +-2 absolute, i.e. +-100 std: a plain normal.
linear_init = nn.initializers.normal(0.02)
# The patch projection keeps torch's Conv2d default, U(+-1/sqrt(fan_in)).
patch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
pos_embed_init = nn.initializers.normal(0.02)
cls_token_init = nn.initializers.normal(1e-6)


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (timm's `quick_gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch's nn.GELU(): exact, erf
    "quick_gelu": quick_gelu,
}


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a patch_size-strided Conv `proj`, patches flattened row by row to (N, L, C)."""

    patch_size: int
    embed_dim: int
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.embed_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    use_bias=self.bias, kernel_init=patch_init, name="proj")(x)
        return x.reshape(x.shape[0], -1, self.embed_dim)


class Attention(nn.Module):
    """timm's Attention: fused `qkv` Dense (query, key, value), `attn_drop` on the attention weights,
    `proj`, `proj_drop`."""

    num_heads: int
    attention_dropout_rate: float = 0.0
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"embed_dim={width} is not divisible by num_heads={self.num_heads}")
        qkv = nn.Dense(3 * width, kernel_init=linear_init, name="qkv")(x)
        attended = attend(qkv, self.num_heads, self.attention_dropout_rate, train)
        return dropout(nn.Dense(width, kernel_init=linear_init, name="proj")(attended), self.dropout_rate, train)


class Mlp(nn.Module):
    """timm's Mlp: `fc1`, activation, dropout, `fc2`, dropout."""

    hidden_dim: int
    act: str = "gelu"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        x = ACTIVATIONS[self.act](nn.Dense(self.hidden_dim, kernel_init=linear_init, name="fc1")(x))
        x = dropout(x, self.dropout_rate, train)
        return dropout(nn.Dense(width, kernel_init=linear_init, name="fc2")(x), self.dropout_rate, train)


class LayerScale(nn.Module):
    """timm's LayerScale: x * gamma, gamma a per-channel vector initialised to `init_values`."""

    init_values: float

    @nn.compact
    def __call__(self, x):
        return x * self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))


class Block(nn.Module):
    """timm's pre-norm Block: x + drop_path(ls1(attn(norm1(x)))), then x + drop_path(ls2(mlp(norm2(x)))).

    Stochastic depth (timm's DropPath) drops a sample's whole branch: a dropout whose mask is
    shared over the tokens and channels of each sample.
    """

    num_heads: int
    mlp_dim: int
    init_values: float | None = None  # None: no layer scale
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = Attention(self.num_heads, self.attention_dropout_rate, self.dropout_rate, name="attn")(
            layer_norm(epsilon=self.norm_eps, name="norm1")(x), train)
        x = x + dropout(self._scaled(y, "ls1"), self.drop_path_rate, train, broadcast_dims=(1, 2))
        y = Mlp(self.mlp_dim, self.act, self.dropout_rate, name="mlp")(
            layer_norm(epsilon=self.norm_eps, name="norm2")(x), train)
        return x + dropout(self._scaled(y, "ls2"), self.drop_path_rate, train, broadcast_dims=(1, 2))

    def _scaled(self, y, name: str):
        return y if self.init_values is None else LayerScale(self.init_values, name=name)(y)


class Blocks(nn.Module):
    """timm's `blocks` Sequential, so block i sits at `blocks/<i>`; block i of n drops its branches with
    drop_path_rate * i / (n - 1), timm's linear stochastic depth rule."""

    depth: int
    num_heads: int
    mlp_dim: int
    init_values: float | None = None
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.depth):
            rate = self.drop_path_rate * i / (self.depth - 1) if self.depth > 1 else 0.0
            x = Block(self.num_heads, self.mlp_dim, self.init_values, self.act, self.norm_eps, self.dropout_rate,
                      self.attention_dropout_rate, rate, name=str(i))(x, train)
        return x


class Pool(nn.Module):
    """timm's 'token' pooling: the class token. A module of its own only so that its output, the
    head's input, is a cut point for the feature cache (it has no parameters)."""

    @nn.compact
    def __call__(self, x):
        return x[:, 0]


class VisionTransformer(nn.Module):
    """Input: NHWC images of exactly image_size x image_size, normalised with the registered mean/std.

    Field names follow timm's constructor where xfer has no name of its own: `image_size` is timm's
    `img_size`, `dropout_rate` its `proj_drop_rate`, `attention_dropout_rate` its `attn_drop_rate`,
    `head_dropout_rate` its `drop_rate`. Every rate defaults to 0, as in timm.
    """

    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float | None = None  # layer scale's initial value; None: no layer scale
    pre_norm: bool = False  # a LayerNorm `norm_pre` before the blocks, and no patch-embedding bias
    norm_eps: float = 1e-6
    act: str = "gelu"  # or "quick_gelu"
    num_classes: int = 1000
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input_size(self.image_size, self.patch_size, x.shape[1:3])
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        x = PatchEmbed(self.patch_size, self.embed_dim, bias=not self.pre_norm, name="patch_embed")(x)
        batch = x.shape[0]
        cls_token = self.param("cls_token", cls_token_init, (1, 1, self.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.embed_dim)), x], axis=1)
        x = x + self.param("pos_embed", pos_embed_init, (1, *x.shape[1:]))  # one entry per token, class first
        if self.pre_norm:
            x = layer_norm(epsilon=self.norm_eps, name="norm_pre")(x)
        x = Blocks(self.depth, self.num_heads, int(self.embed_dim * self.mlp_ratio), self.init_values, self.act,
                   self.norm_eps, self.dropout_rate, self.attention_dropout_rate, self.drop_path_rate,
                   name="blocks")(x, train)
        x = Pool(name="pool")(layer_norm(epsilon=self.norm_eps, name="norm")(x))
        x = dropout(x, self.head_dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=linear_init, name="head")(x)


# --- registration (xfer.models.registry) ------------------------------------

# The input size registered for all three: 224 px. DINOv2 was pretrained at 224 px and only its short
# last phase at 518 (hence the files' 37 x 37 position grid); its linear probes and fine-tunes at 224 (a
# 16 x 16 grid, the position embedding resampled on loading) are the common setting, and 257 tokens an
# image instead of 1370 cost over 5x less. CLIP's image tower was trained at 224.
INPUT_SIZE = 224

# The Hugging Face hub files (timm state dicts) and what they were trained on.
HUB_FILES = {
    "dinov2_vits14": ("timm/vit_small_patch14_dinov2.lvd142m", "LVD-142M"),
    "dinov2_vitb14": ("timm/vit_base_patch14_dinov2.lvd142m", "LVD-142M"),
    "clip_vitb16": ("timm/vit_base_patch16_clip_224.openai", "WIT-400M"),
}
NORMALISATION = {"dinov2_vits14": (IMAGENET_MEAN, IMAGENET_STD), "dinov2_vitb14": (IMAGENET_MEAN, IMAGENET_STD),
                 "clip_vitb16": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}

register(*(ModelInfo(name, functools.partial(VisionTransformer, **CONFIGS[name]), INPUT_SIZE, *NORMALISATION[name],
                     head=HEAD, blocks=blocks(CONFIGS[name]["depth"]),
                     weight_map=weight_map_in("xfer.weights.timm_vit", name),
                     imagenet=HubFile(HUB_FILES[name][0], "model.safetensors"), pretrained_on=HUB_FILES[name][1])
           for name in CONFIGS))
