"""Per-example geometry (central crop, random crop, flip) on uint8 images, and per-batch normalisation.

Images stay uint8 until a whole batch is normalised in one vectorised step: 4x less memory in
flight than float32 per example, and the one place where pixels become what the model's
ModelInfo asks for, `(pixels / 255 - mean) / std`. The `check` command's ImageNet evaluation
calls the same `central_crop` and `normalise`, so a ported model is checked with the resize and
the scaling it is trained with.

Resizing is PIL's (no TensorFlow at run time; it antialiases when shrinking photos), bicubic as in
EfficientNet's ImageNet evaluation unless a config asks for bilinear (`INTERPOLATIONS`): torchvision's
`Resize` on a PIL image is PIL's bilinear, so a PyTorch recipe can be reproduced pixel for pixel.
Upscaling tiny images does not favour either filter: digits blown up from 8x8 to 224 px gave a
linear probe on frozen ImageNet EfficientNet-Lite0 features 0.964 test accuracy with bicubic and
with bilinear (measured with commit e26be72).
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

Example = dict[str, Any]
# config.data.interpolation -> PIL's filter.
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESAMPLING = INTERPOLATIONS["bicubic"]
# ImageNet's standard evaluation crop: the central 87.5% of the shorter side (256 px resized, 224 kept).
IMAGENET_EVAL_CROP = 0.875


def central_crop(image: np.ndarray, size: int, fraction: float = 1.0,
                 resample: Image.Resampling = RESAMPLING) -> np.ndarray:
    """The central square of `fraction` of `image`'s shorter side, resized to (size, size) with
    `resample` (bicubic unless given).

    `fraction` also selects one of two pixel conventions. They differ only in rounding, and each
    is the one its callers' figures were measured with (`check`'s printed probabilities, the
    training results):
    - 1 (training and evaluation here): the largest centred square, cut at fractional offsets
      and resized in one PIL call (`box=`); a square image is simply resized. Nothing is cropped
      away: tiny images like CIFAR and digits have no margin to spare.
    - below 1 (`IMAGENET_EVAL_CROP` for ImageNet weights): ImageNet's evaluation recipe, the
      shorter side resized to round(size / fraction) whole pixels, then the central size x size
      square at a whole-pixel offset.
    """
    height, width = image.shape[:2]
    if fraction == 1:
        if height == width == size:
            return image
        side = min(height, width)
        top, left = (height - side) / 2, (width - side) / 2
        resized = Image.fromarray(image).resize((size, size), resample,
                                                box=(left, top, left + side, top + side))
        return np.asarray(resized)
    scale = round(size / fraction) / min(height, width)
    resized_h, resized_w = round(height * scale), round(width * scale)
    resized = np.asarray(Image.fromarray(image).resize((resized_w, resized_h), resample))
    top, left = (resized_h - size) // 2, (resized_w - size) // 2
    return resized[top:top + size, left:left + size]


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 pixels (..., width, channels) -> float32 `(pixels / 255 - mean) / std`, per channel."""
    std = np.asarray(std, np.float32)
    scale = (1 / (255 * std)).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / std).astype(np.float32)
    out = images.astype(np.float32)
    # In place, on rows of width * channels values: broadcasting over a last axis of 3 is ~7x slower
    # (64 images at 96 px: 5.4 against 0.77 ms).
    rows = out.reshape(*out.shape[:-2], -1)
    width = out.shape[-2]
    rows *= np.tile(scale, width)
    rows += np.tile(offset, width)
    return out


class Prepare(grain.transforms.Map):
    """Eval-time preparation (and train-time with augment="none"): the central square at `size`."""

    def __init__(self, size: int, resample: Image.Resampling):
        self.size, self.resample = size, resample

    def map(self, example: Example) -> Example:
        return {"image": central_crop(example["image"], self.size, resample=self.resample), "label": example["label"]}


class CropFlip(grain.transforms.RandomMap):
    """Train-time augmentation: a random `size` crop of the central square at size*(1+margin), mirrored
    left-right with probability 1/2 if `flip`. The rng is grain's, seeded per (seed, position)."""

    def __init__(self, size: int, margin: float, flip: bool, resample: Image.Resampling):
        self.size = size
        self.enlarged = round(size * (1 + margin))
        self.flip = flip
        self.resample = resample

    def random_map(self, example: Example, rng: np.random.Generator) -> Example:
        image = central_crop(example["image"], self.enlarged, resample=self.resample)
        top, left = rng.integers(0, self.enlarged - self.size + 1, size=2)
        image = image[top:top + self.size, left:left + self.size]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": example["label"]}


class Normalise(grain.transforms.Map):
    """A batch of uint8 images to float32 model input (`normalise`); labels to int32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = mean, std

    def map(self, batch: Example) -> Example:
        return {**batch, "image": normalise(batch["image"], self.mean, self.std),
                "label": batch["label"].astype(np.int32)}


class Identity(grain.transforms.Map):
    """Examples that need no preparation (precomputed features)."""

    def map(self, example: Example) -> Example:
        return example


class LabelsToInt32(grain.transforms.Map):
    """The batch step for precomputed float32 features: only labels change dtype."""

    def map(self, batch: Example) -> Example:
        return {**batch, "label": batch["label"].astype(np.int32)}
