"""Small pieces several model families share, kept bit-compatible with torch."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i averages torch's window [floor(i*n/m), ceil((i+1)*n/m))."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """torch's AdaptiveAvgPool2d on NHWC input, for any input size.

    Written as two small matrix products over H and W, so it is exact for
    every input/output pair (upsampling 1x1 -> 7x7 included) and costs
    nothing when input and output sizes agree.
    """
    (h_out, w_out), (h_in, w_in) = output_size, x.shape[1:3]
    if (h_in, w_in) == (h_out, w_out):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h_in, h_out), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w_in, w_out), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x)


def use_cpu_lowerings(setting: bool | None) -> bool:
    """What a model's `cpu_lowerings` field means: `setting`, or where it is None (the default),
    whether JAX's default backend is the CPU when the model is traced.

    The CPU lowerings are this module's `conv_general_dilated` and `max_pool_2x2` and VGG's
    `PooledDense` fold. Each computes what lax's and flax's standard ops compute, with the same
    parameters, so one checkpoint loads either way (tests/test_layers.py runs both ways on CPU, op
    by op and in VGG and EfficientNet-Lite0, forward and backward). They exist because XLA:CPU
    runs the standard forms far below its speed elsewhere (bench/README.md): VGG16's full train
    step at 32 px is 4.4x faster with them (11.1 -> 48.8 img/s), its 224 px step needs 12.8 ->
    8.0 GB of temporaries (bench/classic_recipe.py --compile-only), EfficientNet-Lite0's full step
    takes 2931 -> 1984 ms. Nobody measured them on GPU or TPU, whose compilers lower the standard
    ops their own way, so there the models use those.
    """
    return jax.default_backend() == "cpu" if setting is None else setting


def conv_lowering(cpu_lowerings: bool | None):
    """What a model passes as `nn.Conv(conv_general_dilated=...)`: see `use_cpu_lowerings`."""
    return conv_general_dilated if use_cpu_lowerings(cpu_lowerings) else jax.lax.conv_general_dilated


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated`, with two 2-D NHWC x HWIO cases computed another way (same result).

    A CPU lowering (`use_cpu_lowerings`). Both cases run far below XLA:CPU's speed for other
    convolutions (bench/README.md):
    - an input spatially smaller than the kernel window (VGG16's three 3x3 convs on 2x2 maps at
      32 px input): XLA's algebraic simplifier swaps the operands into a form XLA:CPU runs at
      ~0.3 GFLOP/s, 3.5 s for one 64x2x2x512 conv that takes 20 ms as im2col + one matmul;
    - a depthwise convolution (one kernel per channel: EfficientNet's blocks): XLA computes its
      kernel gradient as a dense grouped convolution (96 channels: 96x the forward's FLOPs), while
      kh * kw shifted multiply-adds are elementwise work that XLA fuses, forward and backward.
    """
    kh, kw, kernel_in, kernel_out = rhs.shape if rhs.ndim == 4 else (0, 0, 0, 0)
    plain_2d = (lhs.ndim == 4 and not kwargs
                and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
                and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    depthwise = plain_2d and kernel_in == 1 and feature_group_count == lhs.shape[3] == kernel_out
    small_map = plain_2d and feature_group_count == 1 and lhs.shape[1] * lhs.shape[2] < kh * kw
    if not (depthwise or small_map):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    n, h, w, c = lhs.shape
    (sh, sw) = window_strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    taps = [((i, j), x[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :])
            for i in range(kh) for j in range(kw)]  # (kh, kw) order, as HWIO
    if depthwise:
        return sum(tap * rhs[i, j, 0] for (i, j), tap in taps)
    columns = jnp.concatenate([tap for _, tap in taps], axis=-1)
    out = jnp.dot(columns.reshape(n * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, -1), precision=precision)
    return out.reshape(n, oh, ow, kernel_out)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` (torch's MaxPool2d(2, 2): odd edges dropped), NHWC.

    A CPU lowering (`use_cpu_lowerings`). Same values and gradient (each window's first maximum
    takes it, as in lax and torch), but the gradient is built from elementwise ops: XLA:CPU expands
    lax's select-and-scatter into index iotas, an argmax reduce-window and a scatter, ~3.5x slower
    and 4 int32 index arrays the size of the input (VGG16 at 224 px, full fine-tuning: 12.8 -> 8.0
    GB of temporaries).
    """
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _max_pool_2x2_fwd(x):
    return max_pool_2x2(x), x


def _max_pool_2x2_bwd(x, g):
    """Finds each window's first maximum by comparing its four inputs with each other, never with
    the forward's output: in one jitted program XLA:CPU may recompute the input (a BatchNorm + ReLU,
    say) inside the backward's fusion and round it differently from the copy the forward's max
    read, and then `x == max` misses (15 of 20000 elements of a float64 2x25x25x16 input,
    tests/test_layers.py)."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    windows = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c)
    values = [windows[:, :, i, :, j] for i in range(2) for j in range(2)]  # torch's scan order
    grads = []
    for k, value in enumerate(values):  # the first maximum: above every earlier value, not below a later one
        first_max = functools.reduce(jnp.logical_and, [value > v for v in values[:k]]
                                     + [value >= v for v in values[k + 1:]])
        grads.append(jnp.where(first_max, g, jnp.zeros_like(g)))
    rows = [jnp.stack(grads[2 * i:2 * i + 2], axis=3) for i in range(2)]
    grad = jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c)
    return (jnp.pad(grad, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


# BatchNorm and Dropout take their train/eval mode at *call* time in every model, never in
# the constructor: that lets `xfer.training.step` switch frozen parts of any model to inference mode
# (flax.linen.intercept_methods) without each model plumbing a policy through its modules.

class BatchNorm(nn.Module):
    """torch's BatchNorm arithmetic in Flax's variable layout (`scale`, `bias`; `mean`, `var`).

    It differs from `flax.linen.BatchNorm` where ports break: the running
    variance is updated with the *unbiased* batch variance (n / (n - 1)), as
    torch does, so running statistics after a training step match torch's.
    `momentum` is Flax's convention: torch's `momentum=m` is `1 - m` here.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool, groups: int = 1) -> jnp.ndarray:
        """`groups` > 1 normalises each of that many equal slices of the batch with its own
        statistics (per-device BatchNorm, as torch DDP without SyncBatchNorm); running
        averages then take the mean over groups."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if use_running_average:
            return (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias
        grouped = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
        axes = tuple(range(1, grouped.ndim - 1))
        mean = grouped.mean(axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axes, keepdims=True)  # two passes: no cancellation
        if not self.is_initializing():
            count = grouped[0].size // features
            unbiased = var.mean(0).reshape(features) * count / max(count - 1, 1)
            batch_mean = mean.mean(0).reshape(features)
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * batch_mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        y = (grouped - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.reshape(x.shape)


def batch_norm(x: jnp.ndarray, train: bool, *, name: str, momentum: float, epsilon: float) -> jnp.ndarray:
    return BatchNorm(momentum=momentum, epsilon=epsilon, name=name)(x, use_running_average=not train)


def dropout(x: jnp.ndarray, rate: float, train: bool, broadcast_dims: tuple[int, ...] = ()) -> jnp.ndarray:
    return nn.Dropout(rate, broadcast_dims=broadcast_dims)(x, deterministic=not train)
