"""timm VisionTransformer state dicts (the Hugging Face hub's timm/ files) -> xfer.models.timm_vit.

The map is one to one, timm's module names with '/' for '.'. A model built for
another `image_size` than the checkpoint's grid (DINOv2's files hold a 37 x 37
grid, for 518 px; the registered models take 224 px, 16 x 16) gets its
`pos_embed` as timm's `checkpoint_filter_fn` rewrites it: the class-token entry
kept, the patch grid resampled by `resample_abs_pos_embed`'s defaults, torch's
bicubic `F.interpolate` with `align_corners=False` and `antialias=True`.

Antialiased bicubic is not the bicubic of torchvision's ViT recipe
(`xfer.weights.vit`, align_corners=True): torch computes it like PIL, with
Keys' cubic at a = -0.5 (not -0.75), stretched by the scale factor when
shrinking so that every input sample contributes, and each output's weights
renormalised to sum to 1 at the edges (not clamped indices). It is written out
here as a small matrix per axis, computed in float64.

DINOv2's files carry no head (timm's num_classes=0): the map's head entries
are optional, and a model with a head gets it freshly initialised. CLIP's
file carries timm's 768 -> 512 image projection as `head` (a zero bias).
"""

from __future__ import annotations

import functools

import numpy as np

from xfer.models import timm_vit as model
from xfer.weights.convert import Entry, WeightMap, conv, copy, dense, flatten, layernorm
from xfer.weights.vit import resample_grid

# Models whose published files are backbones without a head (timm's DINOv2: num_classes=0).
HEADLESS = ("dinov2_vits14", "dinov2_vitb14")

# PIL's and torch's antialiased bicubic kernel parameter (`HelperInterpCubic::aa_filter`).
_ANTIALIAS_CUBIC_A = -0.5
_CUBIC_SUPPORT = 2.0  # the cubic kernel is nonzero on |x| < 2


def _cubic(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5."""
    a, x = _ANTIALIAS_CUBIC_A, abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


@functools.lru_cache(maxsize=None)
def antialiased_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of torch's 1-D bicubic resampling with `align_corners=False` and
    `antialias=True` (`_upsample_bicubic2d_aa`).

    Output i is centred on input position scale * (i + 0.5), scale = size_in / size_out, in units
    of input pixels. When shrinking (scale > 1) the kernel is stretched by `scale`; samples beyond
    the edge are left out and the remaining weights rescaled to sum to 1.
    """
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = _CUBIC_SUPPORT * stretch
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)  # torch truncates toward zero, then clamps at 0
        stop = min(int(center + support + 0.5), size_in)
        weights = np.array([_cubic((j - center + 0.5) / stretch) for j in range(first, stop)])
        matrix[i, first:stop] = weights / weights.sum()
    return matrix


def resample_pos_embed(pos_embed: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """As timm's `resample_abs_pos_embed` (the class-token entry kept, the patch grid resampled with
    torch's antialiased bicubic), in float64: timm computes in float32, up to ~3e-6 of the largest
    value apart."""
    return resample_grid(pos_embed, target_shape, antialiased_bicubic_matrix)


def _block(index: int, layer_scale: bool) -> list[list[Entry]]:
    """One block's entries in timm's module order: norm1, attn (fused qkv, proj), ls1, norm2, mlp, ls2."""
    source, target = f"blocks.{index}", f"blocks/{index}"

    def scale(n: int) -> list[list[Entry]]:
        return [[Entry(f"{source}.ls{n}.gamma", f"params/{target}/ls{n}/gamma", "copy", copy)]] if layer_scale else []

    return [
        layernorm(f"{source}.norm1", f"{target}/norm1"),
        dense(f"{source}.attn.qkv", f"{target}/attn/qkv"),  # fused (3*dim, dim): query, key, value
        dense(f"{source}.attn.proj", f"{target}/attn/proj"),
        *scale(1),
        layernorm(f"{source}.norm2", f"{target}/norm2"),
        dense(f"{source}.mlp.fc1", f"{target}/mlp/fc1"),
        dense(f"{source}.mlp.fc2", f"{target}/mlp/fc2"),
        *scale(2),
    ]


def weight_map(name: str) -> WeightMap:
    config = model.CONFIGS[name]
    pre_norm = config.get("pre_norm", False)
    layers = [
        conv("patch_embed.proj", "patch_embed/proj", bias=not pre_norm),
        [Entry("cls_token", "params/cls_token", "copy", copy),
         Entry("pos_embed", "params/pos_embed", "copy", copy,
               resize=resample_pos_embed, resize_name="antialiased bicubic resample of the patch grid")],
    ]
    if pre_norm:
        layers.append(layernorm("norm_pre", "norm_pre"))
    for index in range(config["depth"]):
        layers += _block(index, config.get("init_values") is not None)
    layers += [layernorm("norm", "norm"), dense("head", "head")]
    return WeightMap(flatten(layers), head=model.HEAD, head_optional=name in HEADLESS)
