"""The CPU lowerings (xfer.models.layers.use_cpu_lowerings) give lax's values and gradients, op by op
and in whole models, with the same parameters."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xfer import models
from xfer.models import efficientnet_lite, layers, resnet, vgg

# A VGG (torchvision's layer kinds, smaller widths) where every CPU lowering is in play: at 32 px
# its last convs see 2x2 maps (im2col) and classifier/0 a 1x1 map (PooledDense's fold); at 50 px
# max pools drop odd edges (25 -> 12, 3 -> 1) and the last convs see 3x3 maps (lax's conv).
SMALL_VGG = vgg.VGG((8, "M", 16, "M", 16, "M", 16, 16, "M", 16, 16, "M"), batch_norm=True, num_classes=10,
                    dropout_rate=0.0)
# Lite0 at 40 px: depthwise convs at strides 1 and 2, with even and odd TF-"SAME" paddings (5 -> 3).
LITE0 = efficientnet_lite.EfficientNetLite(num_classes=10, dropout_rate=0.0, drop_connect_rate=0.0)
# A one-block-per-stage ResNet-50: 1x1 convs at strides 1 and 2 (downsample), the 3x3/2 stem pool and
# BatchNorm everywhere; at 36 px the pool makes an odd map (18 -> 9), so the strided layers after it see odd
# maps (9 -> 5 -> 3 -> 2), and layer4's 3x3 conv a 2x2 map (im2col).
SMALL_RESNET = resnet.ResNet("bottleneck", (1, 1, 1, 1), num_classes=10)
# In float64 the two ways' logits, running statistics and gradients differ by at most this much of
# the largest magnitude of their kind. Measured: <= 1.8e-15 (VGG), <= 8.3e-14 (Lite0), <= 9.4e-15
# (ResNet), <= 4.6e-16 (BatchNorm alone); 1e-11 leaves a margin of 120x for other CPUs' rounding, and a
# wrong lowering is off by O(1) (the max-pool gradient this test caught, vgg@50: 0.28 of the largest
# parameter gradient).
LOWERINGS_RTOL = 1e-11


def lax_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("hw,stride,padding",
                         [(2, 1, "SAME"), (1, 1, ((1, 1), (1, 1))), (2, 2, "SAME"), (1, 1, "VALID")])
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

    np.testing.assert_array_equal(layers.max_pool_2x2(x), lax_pool(x))
    want = jax.vjp(lax_pool, x)[1](upstream)[0]
    got = jax.vjp(layers.max_pool_2x2, x)[1](upstream)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (2, 25, 25, 16)])
def test_max_pool_2x2_gradient_is_lax_gradient_where_xla_recomputes_the_input(shape):
    """In one jitted program XLA:CPU recomputes a BatchNorm + ReLU before the pool inside the
    backward's fusion, rounded differently from the forward's copy: a gradient that compared the
    input with the forward's maximum lost 1 and 15 elements here (float64, where ties are absent)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a, scale = rng.standard_normal(shape), rng.standard_normal(shape[-1])
        upstream = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

        @jax.jit
        def pool_gradients(a, scale, upstream):
            x = jax.nn.relu((a - a.mean((0, 1, 2))) * jax.lax.rsqrt(a.var((0, 1, 2)) + 1e-5) * scale + 0.1)
            return [jax.vjp(pool, x)[1](upstream)[0] for pool in (layers.max_pool_2x2, lax_pool)]

        got, want = pool_gradients(a, scale, upstream)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, 6), (5, 2, 7), (3, 2, 8)])
def test_depthwise_conv_is_lax_conv_forward_and_backward(kernel, stride, hw):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    # TF-"SAME" padding (asymmetric at stride 2), as EfficientNet's blocks.
    _assert_conv_matches_lax(x, w, (stride, stride), "SAME", feature_group_count=6)


@pytest.mark.parametrize("hw,stride,padding",
                         [(6, 1, "SAME"), (7, 2, "SAME"), (7, 2, ((0, 0), (0, 0))), (5, 1, "VALID")])
def test_pointwise_conv_is_lax_conv_forward_and_backward(hw, stride, padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, hw, hw, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, 5, 4)), jnp.float32)
    _assert_conv_matches_lax(x, w, (stride, stride), padding, feature_group_count=1)


@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_train_is_autodiffs_batch_norm_forward_and_backward(groups):
    """Values and gradients of (y, mean, var), with a cotangent for each (the running averages'
    mean and var have none in training, but the closed-form gradient must not assume it)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x, scale, bias = (jnp.asarray(rng.standard_normal(shape)) for shape in ((groups, 40, 6), (6,), (6,)))
        cotangents = tuple(jnp.asarray(rng.standard_normal(shape))
                           for shape in ((groups, 40, 6), (groups, 6), (groups, 6)))
        results = []
        for normalise in (layers.batch_norm_train, layers._batch_norm_train_lax):
            outputs, vjp = jax.vjp(lambda x, scale, bias: normalise(x, scale, bias, 1e-3), x, scale, bias)
            results.append((outputs, vjp(cotangents)))
    for got, want in zip(*(jax.tree.leaves(result) for result in results)):
        np.testing.assert_allclose(got, want, rtol=LOWERINGS_RTOL, atol=LOWERINGS_RTOL * float(np.abs(want).max()))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (2, 5, 6, 2)])  # even and odd maps
def test_overlapping_max_pool_gradient_is_lax_gradient_ties_included(shape):
    """ResNet's 3x3/2 pool, padded by 1. Values from {0, 1, 2} put ties in most windows; integer
    upstream gradients make the sums where windows overlap exact, so both ways agree exactly."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    upstream = jnp.asarray(rng.integers(-50, 50, pool(x).shape), jnp.float32)
    lowered = functools.partial(layers.max_pool, window=3, stride=2, padding=1, cpu_lowerings=True)

    np.testing.assert_array_equal(lowered(x), pool(x))
    np.testing.assert_array_equal(jax.vjp(lowered, x)[1](upstream)[0], jax.vjp(pool, x)[1](upstream)[0])


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


def test_cpu_lowerings_default_to_the_cpu_backend_and_pick_the_conv():
    on_cpu = jax.default_backend() == "cpu"
    assert layers.use_cpu_lowerings(None) is on_cpu
    assert layers.use_cpu_lowerings(False) is False and layers.use_cpu_lowerings(True) is True
    assert layers.conv_lowering(True) is layers.conv_general_dilated
    assert layers.conv_lowering(False) is jax.lax.conv_general_dilated
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(SMALL_VGG.init, jax.random.key(0), images)
    traced = {setting: str(jax.make_jaxpr(SMALL_VGG.clone(cpu_lowerings=setting).apply)(variables, images))
              for setting in (None, True, False)}
    assert traced[None] == traced[on_cpu] != traced[not on_cpu]


@pytest.mark.parametrize("name", ["vgg16", "vgg11_bn", "efficientnet_lite0", "resnet50"])
def test_cpu_lowerings_keep_the_variables(name):
    """So one ported checkpoint loads into either; `build` passes the field on, as from a config."""
    shapes = [jax.eval_shape(models.build(name, cpu_lowerings=setting).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3))) for setting in (True, False)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])


@pytest.mark.parametrize("model, size", [(SMALL_VGG, 32), (SMALL_VGG, 50), (LITE0, 40), (SMALL_RESNET, 36)],
                         ids=["vgg@32", "vgg@50", "lite0@40", "resnet@36"])
def test_models_compute_the_same_with_and_without_cpu_lowerings(model, size):
    """One jitted training forward and backward: logits, running statistics, gradients of the
    parameters and of the images, each kind compared at its largest magnitude (a conv bias before a
    train-mode BatchNorm has a gradient of zero plus rounding, no scale of its own)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        images = jnp.asarray(rng.standard_normal((2, size, size, 3)))
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), jax.jit(model.init)(jax.random.key(0), images))
        weights = jnp.asarray(rng.standard_normal((2, 10)))  # every logit its own gradient

        def run(cpu_lowerings):
            def loss(params, images):
                logits, state = model.clone(cpu_lowerings=cpu_lowerings).apply(
                    {**variables, "params": params}, images, train=True, mutable=["batch_stats"])
                return jnp.sum(logits * weights), (logits, state["batch_stats"])

            (_, (logits, stats)), (param_grads, image_grads) = jax.jit(jax.value_and_grad(
                loss, argnums=(0, 1), has_aux=True))(variables["params"], images)
            return {"logits": logits, "running statistics": stats, "parameter gradients": param_grads,
                    "image gradients": image_grads}

        got, want = run(True), run(False)
    for kind in want:
        scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want[kind]))
        worst, where = max((float(np.abs(g - w).max()) / scale, jax.tree_util.keystr(path)) for (path, g), w
                           in zip(jax.tree_util.tree_leaves_with_path(got[kind]), jax.tree.leaves(want[kind])))
        print(f"{kind}: differ by {worst:.2g} of the largest magnitude, at {where or 'the array'}")
        assert worst <= LOWERINGS_RTOL, f"{kind} {where}: differ by {worst:.3g} of the largest magnitude"
