"""The XLA:CPU fast paths in xfer.models.layers give lax's values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfer.models import layers


@pytest.mark.parametrize("hw,stride,padding", [(2, 1, "SAME"), (1, 1, ((1, 1), (1, 1))), (2, 2, "SAME"), (1, 1, "VALID")])
def test_small_map_conv_is_lax_conv_forward_and_backward(hw, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, hw, hw, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 5, 4)) if padding != "VALID" else rng.standard_normal((1, 1, 5, 4)),
                    jnp.float32)
    _assert_conv_matches_lax(x, w, (stride, stride), padding, feature_group_count=1)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (2, 5, 7, 3)])  # even, and odd edges torch drops
def test_max_pool_2x2_gradient_is_lax_gradient_ties_included(shape):
    rng = np.random.default_rng(1)
    # Values from {0, 1, 2}: most windows hold ties, where the first maximum (row-major) takes the gradient.
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)
    upstream = jnp.asarray(rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)

    def lax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(layers.max_pool_2x2(x), lax_pool(x))
    want = jax.vjp(lax_pool, x)[1](upstream)[0]
    got = jax.vjp(layers.max_pool_2x2, x)[1](upstream)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, 6), (5, 2, 7), (3, 2, 8)])
def test_depthwise_conv_is_lax_conv_forward_and_backward(kernel, stride, hw):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    # TF-"SAME" padding (asymmetric at stride 2), as EfficientNet's blocks.
    _assert_conv_matches_lax(x, w, (stride, stride), "SAME", feature_group_count=6)


def _assert_conv_matches_lax(x, w, strides, padding, feature_group_count):
    """layers.conv_general_dilated's output and its gradients for x and w equal lax's."""
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, w):  # a weighted sum, so every output element has its own gradient
        y = conv(x, w, strides, padding, dimension_numbers=numbers, feature_group_count=feature_group_count)
        return jnp.sum(y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)), y

    (_, want), want_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(jax.lax.conv_general_dilated, x, w)
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(layers.conv_general_dilated, x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)
