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

    The CPU lowerings are this module's `conv_general_dilated` (im2col of small maps, 1x1 convs as
    matmuls, `depthwise_conv`), `max_pool_2x2`, `overlapping_max_pool` and `batch_norm_train`, and
    VGG's `PooledDense` fold. Each computes what lax's and flax's standard ops compute, with the
    same parameters, so one checkpoint loads either way (tests/test_layers.py runs both ways on
    CPU, op by op and in VGG, EfficientNet-Lite0 and ResNet, forward and backward). They exist
    because XLA:CPU runs the standard forms far below its speed elsewhere (bench/README.md):
    VGG16's full train step at 32 px is 4.4x faster with them (11.1 -> 48.8 img/s), its 224 px
    step needs 12.8 -> 8.0 GB of temporaries (bench/classic_recipe.py --compile-only),
    ResNet-50's full step at 96 px is 1.31x faster (0.73x -> 0.95x torch's, bench/full_finetune.py).
    Nobody measured them on GPU or TPU, whose compilers lower the standard ops their own way, so
    there the models use those.
    """
    return jax.default_backend() == "cpu" if setting is None else setting


def conv_lowering(cpu_lowerings: bool | None):
    """What a model passes as `nn.Conv(conv_general_dilated=...)`: see `use_cpu_lowerings`."""
    return conv_general_dilated if use_cpu_lowerings(cpu_lowerings) else jax.lax.conv_general_dilated


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated`, with three 2-D NHWC x HWIO cases computed another way (same result).

    A CPU lowering (`use_cpu_lowerings`). Each case runs far below XLA:CPU's speed for other
    convolutions (bench/README.md):
    - an input spatially smaller than the kernel window (VGG16's three 3x3 convs on 2x2 maps at
      32 px input): XLA's algebraic simplifier swaps the operands into a form XLA:CPU runs at
      ~0.3 GFLOP/s, 3.5 s for one 64x2x2x512 conv that takes 20 ms as im2col + one matmul;
    - a 1x1 convolution (ResNet's bottlenecks, EfficientNet's expand and project convs): XLA
      computes its kernel gradient as a convolution over transposed copies of input and output
      gradient (batch as the feature dimension), and those transposes took ~40% of ResNet-50's
      step; as one matmul, every gradient is a matmul of the arrays as they lie;
    - a depthwise convolution (one kernel per channel: EfficientNet's blocks): XLA computes its
      kernel gradient as a dense grouped convolution (96 channels: 96x the forward's FLOPs), while
      kh * kw shifted multiply-adds are elementwise work (`depthwise_conv`).
    """
    kh, kw, kernel_in, kernel_out = rhs.shape if rhs.ndim == 4 else (0, 0, 0, 0)
    plain_2d = (lhs.ndim == 4 and not kwargs
                and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
                and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    depthwise = plain_2d and kernel_in == 1 and feature_group_count == lhs.shape[3] == kernel_out
    small_map = plain_2d and feature_group_count == 1 and lhs.shape[1] * lhs.shape[2] < kh * kw
    pointwise = plain_2d and feature_group_count == 1 and (kh, kw) == (1, 1) and _unpadded(padding)
    if not (depthwise or small_map or pointwise):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    padding = tuple((int(low), int(high)) for low, high in padding)
    strides = tuple(int(stride) for stride in window_strides)
    if depthwise:
        return depthwise_conv(lhs, rhs, strides, padding)
    taps = _taps(jnp.pad(lhs, ((0, 0), *padding, (0, 0))), (kh, kw), strides)
    n, oh, ow, c = taps[0].shape
    columns = jnp.concatenate(taps, axis=-1)
    out = jnp.dot(columns.reshape(n * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, -1), precision=precision)
    return out.reshape(n, oh, ow, kernel_out)


def _taps(padded: jnp.ndarray, kernel: tuple[int, int], strides: tuple[int, int]) -> list[jnp.ndarray]:
    """The input each kernel tap sees, in (kh, kw) order as HWIO: strided slices of the padded input."""
    (kh, kw), (sh, sw) = kernel, strides
    oh, ow = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    return [padded[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
    """lax's depthwise convolution (NHWC x HW1C, explicit padding) as kh * kw shifted multiply-adds.

    Its gradient is written out (`_depthwise_conv_bwd`): autodiff of the multiply-adds made one
    padded full-size array per tap for the input gradient and one reduction per tap for the
    kernel gradient, and XLA fused the layers before (BatchNorm, ReLU6) into each of them, so
    EfficientNet-Lite0 recomputed them 9 or 25 times per block.
    """
    return _depthwise_conv_fwd(x, kernel, strides, padding)[0]


def _depthwise_conv_fwd(x, kernel, strides, padding):
    taps = _taps(jnp.pad(x, ((0, 0), *padding, (0, 0))), kernel.shape[:2], strides)
    return sum(tap * kernel[i, j, 0] for (i, j), tap in zip(np.ndindex(kernel.shape[:2]), taps)), (x, kernel)


def _depthwise_conv_bwd(strides, padding, residuals, g):
    """Input gradient: the output gradient spread back to stride (interior padding), padded by
    the kernel, then kh * kw shifted multiply-adds with the kernel flipped: one fused loop.
    Kernel gradient: per tap, the channel sums of input tap x output gradient (`_channel_sums`).
    Both read `g` and the padded input kh * kw times, so they are materialised first
    (`optimization_barrier`): XLA must not fuse the layers that produce them into every tap."""
    x, kernel = residuals
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    (top, bottom), (left, right) = padding
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    hp, wp = padded.shape[1:3]
    (oh, ow), zero = g.shape[1:3], jnp.zeros((), g.dtype)
    g, padded = jax.lax.optimization_barrier((g, padded))
    spread = jax.lax.pad(g, zero, ((0, 0, 0), (kh - 1, hp - (oh - 1) * sh - 1, sh - 1),
                                   (kw - 1, wp - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
    dpadded = sum(spread[:, kh - 1 - i:kh - 1 - i + hp, kw - 1 - j:kw - 1 - j + wp] * kernel[i, j, 0]
                  for i, j in np.ndindex(kh, kw))
    dx = dpadded[:, top:hp - bottom, left:wp - right]
    flat = lambda a: a.reshape(1, -1, a.shape[-1])  # noqa: E731  (one group for _channel_sums)
    dkernel = jnp.stack([_channel_sums(flat(tap * g))[0] for tap in _taps(padded, (kh, kw), strides)])
    return dx, dkernel.reshape(kernel.shape)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def _unpadded(padding) -> bool:
    """Whether a 1x1 kernel's padding adds nothing: "SAME" and "VALID" never do for it."""
    return isinstance(padding, str) or not any(p for pair in padding for p in pair)


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


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int, cpu_lowerings: bool | None = None):
    """`nn.max_pool(x, (window,) * 2, (stride,) * 2, ((padding, padding),) * 2)` (torch's MaxPool2d:
    padded with -inf), NHWC; with the CPU lowerings its gradient is `overlapping_max_pool`'s."""
    if use_cpu_lowerings(cpu_lowerings):
        return overlapping_max_pool(x, (window, window), (stride, stride), ((padding, padding),) * 2)
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def overlapping_max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
    """`nn.max_pool` with explicit -inf padding, windows that may overlap (ResNet's 3x3, stride 2).

    A CPU lowering (`use_cpu_lowerings`), as `max_pool_2x2` for windows that may overlap: same
    values and gradient (each window's first maximum takes it), but the gradient is elementwise
    work instead of XLA:CPU's expansion of select-and-scatter (index iotas, an argmax
    reduce-window and a scatter: ResNet-50's stem pool, 4 int32 index arrays of its padded input).
    """
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _overlapping_max_pool_fwd(x, window, strides, padding):
    return overlapping_max_pool(x, window, strides, padding), x


def _overlapping_max_pool_bwd(window, strides, padding, x, g):
    """Per window position (tap), where the tap holds its window's first maximum (compared with the
    window's other inputs, never with the output: see `_max_pool_2x2_bwd`) it takes `g`; each tap's
    share is spread back to its input position as `depthwise_conv`'s gradient does."""
    (kh, kw), (sh, sw) = window, strides
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    (hp, wp), (oh, ow), zero = padded.shape[1:3], g.shape[1:3], jnp.zeros((), g.dtype)
    values = _taps(padded, window, strides)  # row-major: torch's and lax's scan order
    dpadded = 0
    for k, (value, (i, j)) in enumerate(zip(values, np.ndindex(kh, kw))):
        first_max = functools.reduce(jnp.logical_and, [value > v for v in values[:k]]
                                     + [value >= v for v in values[k + 1:]])
        share = jnp.where(first_max, g, zero)
        dpadded = dpadded + jax.lax.pad(share, zero, ((0, 0, 0), (i, hp - i - (oh - 1) * sh - 1, sh - 1),
                                                      (j, wp - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
    (top, bottom), (left, right) = padding
    return (dpadded[:, top:hp - bottom, left:wp - right],)


overlapping_max_pool.defvjp(_overlapping_max_pool_fwd, _overlapping_max_pool_bwd)


# BatchNorm and Dropout take their train/eval mode at *call* time in every model, never in
# the constructor: that lets `xfer.training.step` switch frozen parts of any model to inference mode
# (flax.linen.intercept_methods) without each model plumbing a policy through its modules.

class BatchNorm(nn.Module):
    """torch's BatchNorm arithmetic in Flax's variable layout (`scale`, `bias`; `mean`, `var`).

    It differs from `flax.linen.BatchNorm` where ports break: the running
    variance is updated with the *unbiased* batch variance (n / (n - 1)), as
    torch does, so running statistics after a training step match torch's.
    `momentum` is Flax's convention: torch's `momentum=m` is `1 - m` here.
    In training mode with the CPU lowerings (`use_cpu_lowerings`) the batch
    statistics and their gradient come from `batch_norm_train`.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    cpu_lowerings: bool | None = None

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
        grouped = x.reshape(groups, -1, features)  # (group, examples x positions, channel)
        normalise = batch_norm_train if use_cpu_lowerings(self.cpu_lowerings) else _batch_norm_train_lax
        y, mean, var = normalise(grouped, scale, bias, self.epsilon)
        if not self.is_initializing():
            count = grouped.shape[1]
            unbiased = var.mean(0) * count / max(count - 1, 1)
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean.mean(0)
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        return y.reshape(x.shape)


def _batch_norm_train_lax(x, scale, bias, epsilon):
    """(y, mean, var) of (group, n, channel) `x`, normalised per group and channel; autodiff's gradient."""
    mean = x.mean(1, keepdims=True)
    var = jnp.square(x - mean).mean(1, keepdims=True)  # two passes: no cancellation
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean[:, 0], var[:, 0]


def _channel_sums(x: jnp.ndarray) -> jnp.ndarray:
    """(group, n, channel) -> (group, channel) sums over n, as a matrix-vector product.

    XLA:CPU emits a reduction over the major dimensions of an array as nested loops that ran
    a BatchNorm layer's forward and backward (32x24x24x256) ~3.5x slower than the same
    sums as products with a vector of ones, which go to its matmul (bench/README.md).
    """
    return jnp.einsum("n,gnc->gc", jnp.ones(x.shape[1], x.dtype), x)  # ones first: no transposed copy of x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
    """`_batch_norm_train_lax`'s values and gradient, with two channel sums forward and two
    backward (`_channel_sums`).

    A CPU lowering (`use_cpu_lowerings`). Autodiff of the standard form makes five full
    reductions of the backward, each recomputing the normalised input in its own fused loop;
    the closed-form gradient needs the sums of `dy` and `dy * x_hat` only.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    n = x.shape[1]
    mean = _channel_sums(x) / n
    centred = x - mean[:, None]
    var = _channel_sums(jnp.square(centred)) / n  # two passes: no cancellation
    rstd = jax.lax.rsqrt(var + epsilon)
    y = centred * (rstd * scale)[:, None] + bias
    return (y, mean, var), (centred, rstd, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    """The gradient of y = x_hat * scale + bias, x_hat = (x - mean) * rstd, through the batch
    statistics; `mean` and `var` are outputs too (for the running averages), so their
    cotangents (zero in training) add d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n."""
    centred, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    n = centred.shape[1]
    x_hat = centred * rstd[:, None]
    sum_dy, sum_dy_x_hat = _channel_sums(dy), _channel_sums(dy * x_hat)
    dx = ((scale * rstd)[:, None] * (dy - (sum_dy / n)[:, None] - x_hat * (sum_dy_x_hat / n)[:, None])
          + (dmean / n)[:, None] + centred * (2 * dvar / n)[:, None])
    return dx, sum_dy_x_hat.sum(0), sum_dy.sum(0)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm(x: jnp.ndarray, train: bool, *, name: str, momentum: float, epsilon: float,
               cpu_lowerings: bool | None = None) -> jnp.ndarray:
    return BatchNorm(momentum=momentum, epsilon=epsilon, cpu_lowerings=cpu_lowerings, name=name)(
        x, use_running_average=not train)


def dropout(x: jnp.ndarray, rate: float, train: bool, broadcast_dims: tuple[int, ...] = ()) -> jnp.ndarray:
    return nn.Dropout(rate, broadcast_dims=broadcast_dims)(x, deterministic=not train)
