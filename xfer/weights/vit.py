"""torchvision VisionTransformer -> xfer.models.vit, position embedding resampled to the model's grid.

A model built for another `image_size` than the checkpoint's has a position
grid of another size. Its `encoder/pos_embedding` is filled the way
torchvision's `interpolate_embeddings` rewrites a state dict (and big_vision
resizes at load time): the class-token entry kept, the patch grid resampled by
torch's bicubic interpolation with `align_corners=True`. That is written out
here as a small matrix per axis, because `jax.image.resize`'s 'cubic' is
another interpolant (Keys a=-0.5, half-pixel centres; torch uses a=-0.75 and,
here, aligned corners) and would not reproduce torchvision's fine-tuned models.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from xfer.models import vit as model
from xfer.weights.convert import Entry, WeightMap, conv, copy, dense, flatten, layernorm, transpose

# torch's bicubic kernel parameter (`upsample_bicubic2d`), Keys' cubic convolution `a`.
_TORCH_CUBIC_A = -0.75


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of the samples at offsets -1, 0, 1, 2 from a point `t` in [0, 1] past sample 0."""
    a = _TORCH_CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of torch's 1-D bicubic resampling with `align_corners=True`.

    Output i samples input position i * (size_in - 1) / (size_out - 1), so
    the end points coincide; samples beyond the edge repeat the edge value,
    as torch clamps its indices.
    """
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        position = i * scale
        index = min(math.floor(position), size_in - 1)
        t = min(max(position - index, 0.0), 1.0)
        for offset, weight in zip(range(-1, 3), _cubic_weights(t)):
            matrix[i, min(max(index + offset, 0), size_in - 1)] += weight
    return matrix


def _grid_side(shape: tuple[int, ...]) -> int:
    """g for a (1, 1 + g*g, hidden) position embedding: class token first, then a g x g grid."""
    side = math.isqrt(shape[1] - 1) if len(shape) == 3 and shape[1] > 1 else 0
    if len(shape) != 3 or shape[0] != 1 or side * side != shape[1] - 1:
        raise ValueError(f"{tuple(shape)} is not a (1, 1 + g*g, hidden) position embedding")
    return side


def resample_grid(pos_embedding: np.ndarray, target_shape: tuple[int, ...], matrix) -> np.ndarray:
    """(1, 1 + g*g, hidden) -> `target_shape` (1, 1 + G*G, hidden): the class-token entry kept, the
    g x g patch grid resampled to G x G by `matrix(g, G)` along each axis, in float64, returned in
    the input's dtype."""
    side_in, side_out = _grid_side(pos_embedding.shape), _grid_side(target_shape)
    if pos_embedding.shape[2] != target_shape[2]:
        raise ValueError(f"hidden size {pos_embedding.shape[2]} differs from the model's {target_shape[2]}")
    resample = matrix(side_in, side_out)
    grid = pos_embedding[0, 1:].reshape(side_in, side_in, -1).astype(np.float64)
    resampled = np.einsum("yh,xw,hwc->yxc", resample, resample, grid).reshape(1, side_out * side_out, -1)
    return np.concatenate([pos_embedding[:, :1], resampled.astype(pos_embedding.dtype)], axis=1)


def interpolate_pos_embedding(pos_embedding: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """As torchvision's `interpolate_embeddings`: the patch grid resampled by torch's bicubic
    interpolation with `align_corners=True`."""
    return resample_grid(pos_embedding, target_shape, bicubic_matrix)


def _encoder_block(index: int) -> list[list[Entry]]:
    source, target = f"encoder.layers.encoder_layer_{index}", f"encoder/layers/encoder_layer_{index}"
    attention, attention_target = f"{source}.self_attention", f"params/{target}/self_attention/in_proj"
    return [
        layernorm(f"{source}.ln_1", f"{target}/ln_1"),
        # torch's fused (3*hidden, hidden) query/key/value projection is one Dense here, too.
        [Entry(f"{attention}.in_proj_weight", f"{attention_target}/kernel", "transpose", transpose),
         Entry(f"{attention}.in_proj_bias", f"{attention_target}/bias", "copy", copy)],
        dense(f"{attention}.out_proj", f"{target}/self_attention/out_proj"),
        layernorm(f"{source}.ln_2", f"{target}/ln_2"),
        dense(f"{source}.mlp.0", f"{target}/mlp/0"),
        dense(f"{source}.mlp.3", f"{target}/mlp/3"),
    ]


def weight_map(name: str) -> WeightMap:
    layers = [
        conv("conv_proj", "conv_proj"),
        [Entry("class_token", "params/class_token", "copy", copy),
         Entry("encoder.pos_embedding", "params/encoder/pos_embedding", "copy", copy,
               resize=interpolate_pos_embedding, resize_name="bicubic resample of the patch grid")],
    ]
    for index in range(model.CONFIGS[name]["num_layers"]):
        layers += _encoder_block(index)
    layers += [layernorm("encoder.ln", "encoder/ln"), dense("heads.head", "heads/head")]
    # torchvision's published ViT files were saved before MLPBlock became an MLP Sequential.
    legacy_names = ((r"\.mlp\.linear_1\.", ".mlp.0."), (r"\.mlp\.linear_2\.", ".mlp.3."))
    return WeightMap(flatten(layers), head=model.HEAD, legacy_names=legacy_names)
