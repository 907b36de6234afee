"""The evaluation-time image pipeline that ImageNet weights were validated with.

A ported checkpoint is only as good as the input it is fed: the same resize,
crop and scaling as at training time, or top-1 quietly drops. Kept in numpy
and PIL so the `check` command and the tests share it without a data stack.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from xfer.models import ModelInfo

# The standard ImageNet evaluation crop: resize the shorter side to size / 0.875
# (256 for 224), then take the central size x size square.
CROP_FRACTION = 0.875


def center_crop_resize(image_uint8: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 RGB -> (size, size, 3) uint8: bicubic shorter-side resize, then a centre crop."""
    if image_uint8.dtype != np.uint8 or image_uint8.ndim != 3 or image_uint8.shape[-1] != 3:
        raise ValueError(f"expected an HWC uint8 RGB image, got {image_uint8.dtype} {image_uint8.shape}; "
                         "convert it first (e.g. PIL's .convert('RGB') and np.asarray)")
    height, width = image_uint8.shape[:2]
    short = round(size / CROP_FRACTION)
    scale = short / min(height, width)
    resized_w, resized_h = round(width * scale), round(height * scale)
    resized = Image.fromarray(image_uint8).resize((resized_w, resized_h), Image.BICUBIC)
    top, left = (resized_h - size) // 2, (resized_w - size) // 2
    return np.asarray(resized)[top:top + size, left:left + size]


def normalise(image: np.ndarray, info: ModelInfo) -> np.ndarray:
    """uint8 pixels (any leading shape, channels last) -> float32 model input, by `info`'s mean/std."""
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    return (np.asarray(image, np.float32) / 255.0 - mean) / std
