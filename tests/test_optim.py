"""Per-group optimizers: frozen parameters get no updates, no state, no decay, no clipping,
and — checked on the library train step's compiled FLOPs — no gradient computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xfer.learning import optim, partition, plan
from xfer.learning.optim import OptimConfigError
from xfer.learning.partition import FROZEN
from xfer.training import feature_cache, mesh as mesh_lib, step

RULES = (("^features/", FROZEN), (".*", "head"))
IMAGES = jnp.zeros((8, 16, 16, 3))  # 8 divides any simulated device count a developer may set


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        for index, channels in enumerate((16, 32, 32)):
            x = nn.relu(nn.Conv(channels, (3, 3), name=str(index))(x))
        return x


class ConvNet(nn.Module):
    """Three 3x3 convs (features/0, /1, /2) and a Linear head (classifier), called as xfer's models are."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10, name="classifier")(Features(name="features")(x).mean(axis=(1, 2)))


def conv_params(seed=0):
    return ConvNet().init(jax.random.key(seed), IMAGES[:1])["params"]


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


SGD = {"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)}
SGD_CLIPPED = {"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9, clip_norm=1.0)}


def records_every_gradient_norm() -> optax.GradientTransformation:
    """Keeps the norm of all gradients in its state, as a metric over every gradient would."""
    return optax.GradientTransformation(lambda params: jnp.zeros(()),
                                        lambda grads, state, params=None: (grads, optax.tree.norm(grads)))


def compiled_mflops(program, *args) -> float:
    cost = program.lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / 1e6


def step_mflops(rules, optim_config, chained_before=None, cached_from=None) -> float:
    """MFLOPs XLA keeps for one step of `xfer.training.step.make_train_step` on ConvNet.

    `chained_before`: a transformation chained before the plan's optimizer, outside its partition.
    `cached_from`: the step on the cached output of this module (xfer.training.feature_cache), plus
    the feature pass that computes it.
    """
    model, mesh = ConvNet(), mesh_lib.data_mesh()
    variables = model.init(jax.random.key(0), IMAGES[:1])
    freeze = plan.build(rules, (), optim_config, "convnet", variables)
    tx = freeze.optimizer(10)
    if chained_before is not None:
        tx = optax.chain(chained_before, tx)
    state = mesh_lib.replicate(step.create_state(variables, tx, 0), mesh)
    batch = mesh_lib.global_batch({"image": np.asarray(IMAGES), "label": np.zeros(len(IMAGES), np.int32),
                                   "index": np.arange(len(IMAGES)), "mask": np.ones(len(IMAGES), np.float32)}, mesh)
    if cached_from is None:
        return compiled_mflops(step.make_train_step(model, tx, freeze, mesh), state, batch)
    features = feature_cache.make_feature_step(model, cached_from, mesh)
    cached = step.make_train_step(model, tx, freeze, mesh, inputs=feature_cache.inputs(cached_from, IMAGES.shape[1]))
    cached_batch = {**batch, "image": features(state.params, state.batch_stats, batch)[0]}
    return (compiled_mflops(features, state.params, state.batch_stats, batch)
            + compiled_mflops(cached, state, cached_batch))


def test_frozen_gradients_are_not_computed_even_when_something_reads_every_gradient():
    all_trainable = step_mflops(((".*", "head"),), SGD)
    frozen = step_mflops(RULES, SGD)
    frozen_group_clip = step_mflops(RULES, SGD_CLIPPED)
    # The least a frozen step can do: the prefix's forward pass, then a train step of the rest.
    prefix_forward_plus_rest = step_mflops(RULES, SGD, cached_from="features")
    frozen_outside_clip = step_mflops(RULES, SGD, chained_before=optax.clip_by_global_norm(1.0))
    frozen_all_grads_norm = step_mflops(RULES, SGD, chained_before=records_every_gradient_norm())
    print(f"MFLOPs a step: all trainable {all_trainable:.1f}, features frozen {frozen:.1f} (prefix forward + "
          f"rest {prefix_forward_plus_rest:.1f}, per-group clip {frozen_group_clip:.1f}, clip outside the "
          f"partition {frozen_outside_clip:.1f}, norm of every gradient {frozen_all_grads_norm:.1f})")

    assert frozen < 0.7 * all_trainable
    assert frozen_group_clip < 1.01 * frozen
    # The step's own metrics (trainable_grad_norm, the non-finite guard) add no frozen backward work.
    assert frozen < 1.01 * prefix_forward_plus_rest
    # The step differentiates only the trainable parameters (frozen gradients reach the optimizer as
    # zeros), so even a clip or a norm that reads every gradient brings no frozen backward pass back.
    assert frozen_outside_clip < 1.01 * frozen
    assert frozen_all_grads_norm < 1.01 * frozen
