"""VGG16 variants with xfer's exact parameter tree, for experiments (bench/experiments.py).

`VGGVariant` computes what `xfer.models.vgg.VGG` computes (same module and parameter names, so the
same variables, labels and optimizer state fit), with knobs for how it is computed:
  conv        'lax': `lax.conv_general_dilated` (flax's default); 'small_im2col': convolutions whose
              input is spatially smaller than the kernel window as im2col + one matmul;
              'im2col': every convolution as im2col + one matmul.
  dtype       compute dtype of `features` (bfloat16 casts the frozen feature extractor's compute;
              parameters stay float32).
  fold        'none': adaptive 7x7 pool, flatten, nn.Dense (xfer before bench/README.md's change);
              '1x1': `xfer.models.vgg.PooledDense`, which at a 1x1 feature map (32 px input) multiplies
              the 512 channels by the sum of classifier/0's 49 row blocks (same function and gradients).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from xfer.models import vgg
from xfer.models.layers import adaptive_avg_pool, dropout, max_pool_2x2


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, only_small=False, **kwargs):
    """`lax.conv_general_dilated` for NHWC x HWIO, stride s, explicit padding, as im2col + matmul.

    With `only_small`, only where the input is spatially smaller than the kernel window (what XLA's
    CPU compiler swaps into a slow form), else plain lax.
    """
    kh, kw = rhs.shape[:2]
    simple = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
              and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
              and not kwargs)
    small = lhs.shape[1] * lhs.shape[2] < kh * kw
    if not simple or (only_small and not small):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    n, h, w, c = lhs.shape
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    cols = jnp.concatenate([x[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    out = jnp.dot(cols.reshape(n * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, -1), precision=precision)
    return out.reshape(n, oh, ow, -1)


def small_im2col_conv(*args, **kwargs):
    return im2col_conv(*args, only_small=True, **kwargs)


CONVS = {"lax": None, "small_im2col": small_im2col_conv, "im2col": im2col_conv}


@jax.custom_jvp
def relu_from_output(x):
    """ReLU whose derivative reads its output, not its input, as torch's in-place ReLU does:
    the backward pass then keeps only the ReLU outputs (which the next conv keeps anyway)."""
    return jnp.maximum(x, 0)


@relu_from_output.defjvp
def _relu_jvp(primals, tangents):
    y = relu_from_output(primals[0])
    return y, jnp.where(y > 0, tangents[0], jnp.zeros_like(tangents[0]))


class Features(nn.Module):
    cfg: Sequence
    conv: str = "lax"
    dtype: Any = jnp.float32
    relu: str = "nn"
    pool: str = "lax"

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for index, kind, channels in vgg.feature_layers(self.cfg, False):
            if kind == "pool":
                x = max_pool_2x2(x) if self.pool == "custom" else nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nn.Conv(channels, (3, 3), padding=1, kernel_init=vgg.conv_init, name=str(index),
                            dtype=self.dtype, conv_general_dilated=CONVS[self.conv])(x)
                x = relu_from_output(x) if self.relu == "output" else nn.relu(x)
        return x.astype(jnp.float32)


class Classifier(nn.Module):
    num_classes: int
    dropout_rate: float
    fold: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.fold == "1x1":
            x = vgg.PooledDense(4096, name="0")(x)
        else:
            x = adaptive_avg_pool(x, (7, 7))
            x = nn.Dense(4096, kernel_init=vgg.linear_init, name="0")(x.reshape(x.shape[0], -1))
        x = dropout(nn.relu(x), self.dropout_rate, train)
        x = nn.Dense(4096, kernel_init=vgg.linear_init, name="3")(x)
        x = dropout(nn.relu(x), self.dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=vgg.linear_init, name="6")(x)


class VGGVariant(nn.Module):
    cfg: Sequence = vgg.CONFIGS["vgg16"]
    num_classes: int = 10
    dropout_rate: float = 0.5
    conv: str = "lax"
    dtype: Any = jnp.float32
    fold: str = "none"
    relu: str = "nn"
    pool: str = "lax"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Features(self.cfg, self.conv, self.dtype, self.relu, self.pool, name="features")(x)
        return Classifier(self.num_classes, self.dropout_rate, self.fold, name="classifier")(x, train)
