"""Per-group optimizers: frozen parameters get no updates, no state, no decay, no clipping,
and — checked on compiled FLOPs — no gradient computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xfer.learning import optim, partition
from xfer.learning.optim import OptimConfigError
from xfer.learning.partition import FROZEN

RULES = (("^features/", FROZEN), (".*", "head"))


def conv_params(seed=0):
    """Three 3x3 convs (features/0, /1, /2) and a Linear head (classifier)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    conv = lambda key, cin, cout: {"kernel": 0.1 * jax.random.normal(key, (3, 3, cin, cout)),  # noqa: E731
                                   "bias": jnp.zeros(cout)}
    return {
        "features": {"0": conv(keys[0], 3, 16), "1": conv(keys[1], 16, 32), "2": conv(keys[2], 32, 32)},
        "classifier": {"kernel": 0.1 * jax.random.normal(keys[3], (32, 10)), "bias": jnp.zeros(10)},
    }


def forward(params, images):
    x = images
    for index in ("0", "1", "2"):
        layer = params["features"][index]
        x = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + layer["bias"])
    return x.mean(axis=(1, 2)) @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def loss_fn(params, images, targets):
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, images), targets).mean()


def ones_like(params, scale=1.0):
    return jax.tree.map(lambda leaf: jnp.full_like(leaf, scale), params)


def update(tx, grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_frozen_parameters_get_zero_updates_and_hold_no_state():
    params = conv_params()
    labels = partition.labels(params, RULES)
    tx = optim.build({"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)}, labels, 10)
    state = tx.init(params)
    assert jax.tree.leaves(state.inner_states[FROZEN]) == []
    momentum_shapes = sorted(leaf.shape for leaf in jax.tree.leaves(state.inner_states["head"]))
    assert momentum_shapes == sorted(leaf.shape for leaf in jax.tree.leaves(params["classifier"]))

    updates = update(tx, ones_like(params), params)
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(updates["features"]))
    assert all(np.allclose(leaf, -0.1) for leaf in jax.tree.leaves(updates["classifier"]))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_reaches_trainable_parameters_only(optimizer):
    params = ones_like(conv_params())
    labels = partition.labels(params, RULES)
    spec = optim.group_config(optimizer=optimizer, lr=0.1, weight_decay=0.5)
    updates = update(optim.build({"head": spec}, labels, 10), ones_like(params, 0.0), params)
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(updates["features"]))
    assert all(np.all(leaf < 0) for leaf in jax.tree.leaves(updates["classifier"]))


def test_clipping_is_per_group():
    params = conv_params()
    labels = partition.labels(params, (("^features/", "backbone"), (".*", "head")))
    spec = optim.group_config(optimizer="sgd", lr=1.0, clip_norm=1.0)
    tx = optim.build({"backbone": spec, "head": spec}, labels, 10)
    grads = ones_like(params, 0.001)
    grads["classifier"] = ones_like(params["classifier"], 100.0)
    updates = update(tx, grads, params)
    assert np.isclose(np.sqrt(sum(np.sum(leaf**2) for leaf in jax.tree.leaves(updates["classifier"]))), 1.0)
    # The huge head gradient does not shrink the backbone's small one, as a global clip would.
    assert jax.tree.all(jax.tree.map(lambda u, g: np.allclose(u, -g), updates["features"], grads["features"]))


def test_trainable_grad_norm_never_reads_frozen_gradients():
    params = conv_params()
    labels = partition.labels(params, RULES)
    grads = ones_like(params, 2.0)
    grads["features"] = ones_like(params["features"], np.nan)
    head_size = sum(leaf.size for leaf in jax.tree.leaves(params["classifier"]))
    assert np.isclose(optim.trainable_grad_norm(grads, labels), 2.0 * np.sqrt(head_size))


def test_schedules_and_learning_rates_per_group():
    config = {
        "head": optim.group_config(optimizer="sgd", lr=0.1, schedule="cosine", warmup_steps=10),
        "backbone": optim.group_config(optimizer="adam", lr=1e-3),
    }
    schedules = optim.schedules(config, total_steps=110)
    assert optim.learning_rates(schedules, 0) == {"head": 0.0, "backbone": 1e-3}
    assert np.isclose(optim.learning_rates(schedules, 10)["head"], 0.1)
    assert np.isclose(optim.learning_rates(schedules, 60)["head"], 0.05)
    assert np.isclose(optim.learning_rates(schedules, 110)["head"], 0.0)
    linear = optim.schedules({"head": optim.group_config(optimizer="sgd", lr=0.1, schedule="linear")}, 100)
    assert np.isclose(optim.learning_rates(linear, 50)["head"], 0.05)


@pytest.mark.parametrize("config, message", [
    ({"head": {"optimizer": "sgd", "lr": 0.1, "momentun": 0.9}}, "unknown field 'momentun'; allowed fields: optimizer"),
    ({}, r"group\(s\) \['head'\] have no optimizer"),
    ({"head": {"optimizer": "sgd", "lr": 0.1}, "backbone": {"optimizer": "sgd", "lr": 0.1}},
     "config.optim.backbone is used by no partition rule"),
    ({"head": {"optimizer": "sgd", "lr": 0.1}, FROZEN: {"optimizer": "sgd", "lr": 0.1}}, "built in"),
    ({"head": {"optimizer": "lion", "lr": 0.1}}, "optimizer is 'lion'; use one of sgd, adam, adamw"),
    ({"head": {"optimizer": "adam", "lr": 0.1, "momentum": 0.9}}, "'sgd' only"),
    ({"head": {"optimizer": "sgd"}}, "has no 'lr'"),
    ({"head": {"optimizer": "sgd", "lr": 0.1, "schedule": "cosine", "warmup_steps": 10}}, "lower warmup_steps"),
])
def test_config_errors_name_the_problem(config, message):
    labels = partition.labels(conv_params(), RULES)
    with pytest.raises(OptimConfigError, match=message):
        optim.build(config, labels, total_steps=10)


def compiled_flops(tx, params, grad_metric=lambda grads: 0.0):
    """FLOPs XLA keeps for one training step: gradient, optimizer update, apply, a gradient metric."""
    def step(params, opt_state, images, targets):
        grads = jax.grad(loss_fn)(params, images, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grad_metric(grads)

    images, targets = jnp.zeros((4, 16, 16, 3)), jnp.zeros((4,), jnp.int32)
    cost = jax.jit(step).lower(params, tx.init(params), images, targets).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_frozen_gradients_are_not_computed_unless_something_reads_every_gradient():
    params = conv_params()
    frozen = partition.labels(params, RULES)
    all_trainable = partition.labels(params, ((".*", "head"),))
    sgd = {"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)}
    sgd_clipped = {"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9, clip_norm=1.0)}

    flops_all_trainable = compiled_flops(optim.build(sgd, all_trainable, 10), params)
    flops_frozen = compiled_flops(optim.build(sgd, frozen, 10), params)
    flops_frozen_group_clip = compiled_flops(optim.build(sgd_clipped, frozen, 10), params)
    flops_frozen_outside_clip = compiled_flops(
        optax.chain(optax.clip_by_global_norm(1.0), optim.build(sgd, frozen, 10)), params)
    flops_frozen_trainable_norm = compiled_flops(
        optim.build(sgd, frozen, 10), params, lambda grads: optim.trainable_grad_norm(grads, frozen))
    flops_frozen_all_grads_norm = compiled_flops(
        optim.build(sgd, frozen, 10), params,
        lambda grads: jnp.sqrt(sum(jnp.sum(grad**2) for grad in jax.tree.leaves(grads))))

    assert flops_frozen < 0.7 * flops_all_trainable
    assert flops_frozen_group_clip < 1.01 * flops_frozen
    assert flops_frozen_trainable_norm < 1.01 * flops_frozen
    # DESIGN.md's claim: a clip that reads every gradient brings the frozen backward pass back.
    assert flops_frozen_outside_clip > 1.3 * flops_frozen
    assert flops_frozen_all_grads_norm > 1.3 * flops_frozen
