"""Per-layer learning rates: layer_decay by the registry's blocks, lr_mults by regex, read back from
one optimizer step on EfficientNet-Lite0's parameter shapes; and schedule offsets for carried-over state.

SGD updates are compared with rtol 1e-6: a multiplier is one float32 multiplication after the
optimizer's own; Adam's with rtol 1e-5, against its first step written out.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xfer import models
from xfer.learning import optim, partition, plan
from xfer.learning.optim import OptimConfigError
from xfer.learning.partition import FROZEN

MODEL = "efficientnet_lite0"
INFO = models.info(MODEL)
RTOL = 1e-6


@functools.cache
def lite0_shapes():
    model = models.build(MODEL, num_classes=10)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def filled(tree, value=1.0):
    return jax.tree.map(lambda leaf: np.full(leaf.shape, value, leaf.dtype), tree)


def by_path(tree) -> dict:
    return {partition.path_str(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def depth(path: str) -> int:
    """Written from the registry's contract, not from plan.py: head 0, last block 1, first block 9."""
    if re.search(INFO.head, path):
        return 0
    (index,) = [index for index, regex in enumerate(INFO.blocks) if re.search(regex, path)]
    return len(INFO.blocks) - index


def lite0_plan(rules, optim_config, setting=None):
    return plan.build(setting or rules, (), optim_config, MODEL, lite0_shapes())


def one_update(freeze, grads_value=1.0, total_steps=10):
    params = filled(lite0_shapes()["params"])
    tx = freeze.optimizer(total_steps)
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(filled(params, grads_value), state, params)  # one compile, not one per op
    return by_path(updates), state


def test_layer_decay_gives_block_i_from_the_head_lr_times_decay_to_the_i():
    freeze = lite0_plan(((".*", "all"),), {"all": optim.group_config(optimizer="sgd", lr=0.1, layer_decay=0.5)})
    updates, _ = one_update(freeze)
    assert {depth(path) for path in updates} == set(range(len(INFO.blocks) + 1))
    for path, update in updates.items():
        np.testing.assert_allclose(update, -0.1 * 0.5 ** depth(path), rtol=RTOL, err_msg=path)


def test_layer_decay_under_a_preset_counts_depth_over_the_whole_model():
    config = {"head": optim.group_config(optimizer="sgd", lr=0.1),
              "backbone": optim.group_config(optimizer="sgd", lr=0.01, layer_decay=0.8)}
    updates, _ = one_update(lite0_plan(None, config, setting="last_k:2"))
    for path, update in updates.items():
        expected = {0: -0.1, 1: -0.01 * 0.8, 2: -0.01 * 0.8 ** 2}.get(depth(path), 0.0)
        np.testing.assert_allclose(update, expected, rtol=RTOL, err_msg=path)


def test_interleaved_groups_each_scale_their_own_leaves():
    # Biases and the rest alternate in flatten order: each group's transform sees the other's leaves as
    # optax.MaskedNode, and must pair its multipliers with its own leaves.
    config = {"biases": optim.group_config(optimizer="sgd", lr=0.1, layer_decay=0.5),
              "weights": optim.group_config(optimizer="sgd", lr=0.2, layer_decay=0.9)}
    updates, _ = one_update(lite0_plan((("/bias$", "biases"), (".*", "weights")), config))
    for path, update in updates.items():
        lr, decay = (0.1, 0.5) if path.endswith("/bias") else (0.2, 0.9)
        np.testing.assert_allclose(update, -lr * decay ** depth(path), rtol=RTOL, err_msg=path)


def test_adam_update_is_scaled_and_its_state_keeps_its_structure():
    rules = (("^(?:_conv_stem|_bn0)/", FROZEN), (".*", "all"))
    plain = lite0_plan(rules, {"all": optim.group_config(optimizer="adam", lr=1e-3)})
    decayed = lite0_plan(rules, {"all": optim.group_config(optimizer="adam", lr=1e-3, layer_decay=0.7)})
    updates, state = one_update(decayed, grads_value=0.3)
    assert jax.tree.structure(state) == jax.tree.structure(jax.eval_shape(plain.optimizer(10).init,
                                                                          lite0_shapes()["params"]))
    # Adam's bias-corrected first step is -lr g / (sqrt(g²) + eps): a handful of float32 roundings, hence 1e-5.
    adam_first_step = -1e-3 * 0.3 / (0.3 + 1e-8)
    for path, update in updates.items():
        if not re.search(rules[0][0], path):
            np.testing.assert_allclose(update, adam_first_step * 0.7 ** depth(path), rtol=1e-5, err_msg=path)
    # Frozen leaves: zero update, and no moment in the optimizer state.
    frozen = [path for path in updates if re.search(rules[0][0], path)]
    assert frozen and all(np.all(updates[path] == 0) for path in frozen)
    trainable_sizes = sum(leaf.size for path, leaf in by_path(lite0_shapes()["params"]).items() if path not in frozen)
    moments = jax.tree.leaves(state.inner_states["all"])
    assert sum(leaf.size for leaf in moments if leaf.ndim) == 2 * trainable_sizes
    assert jax.tree.leaves(state.inner_states[FROZEN]) == []


def test_lr_mults_first_match_wins_and_multiplies_with_layer_decay():
    spec = optim.group_config(optimizer="sgd", lr=0.1, layer_decay=0.5,
                              lr_mults=(("^_blocks/(?:0)/", 3.0), ("^_blocks/", 2.0), ("/bias$", 7.0)))
    freeze = lite0_plan(((".*", "all"),), {"all": spec})
    updates, _ = one_update(freeze)
    expected = {}
    for path in updates:
        factor = 3.0 if path.startswith("_blocks/0/") else 2.0 if path.startswith("_blocks/") else (
            7.0 if path.endswith("/bias") else 1.0)
        expected[path] = factor * 0.5 ** depth(path)
        np.testing.assert_allclose(updates[path], -0.1 * expected[path], rtol=RTOL, err_msg=path)
    assert freeze.lr_scales == {path: multiplier for path, multiplier in expected.items() if multiplier != 1}
    assert "_fc/kernel" not in freeze.lr_scales  # the head's kernel: no rule, depth 0


def test_lr_mults_alone_work_on_a_model_without_blocks():
    params = {"features": {"kernel": jnp.ones((3, 4))}, "classifier": {"kernel": jnp.ones((4, 2))}}
    spec = optim.group_config(optimizer="sgd", lr=0.1, lr_mults=(("^features/", 0.1),))
    freeze = plan.build(((".*", "all"),), (), {"all": spec}, "convnet", {"params": params})
    assert freeze.lr_scales == {"features/kernel": 0.1}
    tx = freeze.optimizer(10)
    updates, _ = tx.update(filled(params), tx.init(params), params)
    np.testing.assert_allclose(updates["features"]["kernel"], -0.01, rtol=RTOL)
    np.testing.assert_allclose(updates["classifier"]["kernel"], -0.1, rtol=RTOL)
    assert [(row.block, row.multiplier, row.paths) for row in freeze.lr_blocks] == [
        ("-", 0.1, ("features/kernel",)), ("-", 1.0, ("classifier/kernel",))]


def test_groups_without_multipliers_compile_to_the_plain_transform():
    params = filled(lite0_shapes()["params"])
    plain = lite0_plan(((".*", "all"),), {"all": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)})
    unit = lite0_plan(((".*", "all"),), {"all": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9,
                                                                   layer_decay=1.0, lr_mults=((".*", 1.0),))})
    assert plain.lr_blocks == () and plain.lr_scales == {} and unit.lr_scales == {}
    jaxprs = [str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
              for tx in (plain.optimizer(10), unit.optimizer(10))]
    assert jaxprs[0] == jaxprs[1]


def test_lr_table_lists_each_blocks_effective_learning_rate():
    config = {"head": optim.group_config(optimizer="sgd", lr=0.1),
              "backbone": optim.group_config(optimizer="sgd", lr=0.01, layer_decay=0.5)}
    assert lite0_plan(None, config | {"backbone": optim.group_config(optimizer="sgd", lr=0.01)},
                      setting="full").lr_table() == ""
    table = lite0_plan(None, config, setting="full").lr_table()
    lines = table.splitlines()
    assert lines[0].split() == ["group", "block", "tensors", "parameters", "multiplier", "peak", "lr"]
    rows = [line.split() for line in lines[1:]]
    # Only the group that sets layer_decay, its blocks in forward order; the head is in the 'head' group.
    assert [row[:2] for row in rows] == [["backbone", regex] for regex in INFO.blocks]
    assert [row[4:] for row in rows] == [[f"{0.5 ** i:.4g}", f"{0.01 * 0.5 ** i:.4g}"]
                                         for i in range(len(INFO.blocks), 0, -1)]
    stem = [leaf for path, leaf in by_path(lite0_shapes()["params"]).items() if re.search(INFO.blocks[0], path)]
    assert rows[0][2:4] == [str(len(stem)), f"{sum(leaf.size for leaf in stem):,}"]


def test_lr_table_shortens_long_block_regexes():
    model = models.build("vit_b_16", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    config = {"all": optim.group_config(optimizer="sgd", lr=0.1, layer_decay=0.9)}
    lines = plan.build(((".*", "all"),), (), config, "vit_b_16", shapes).lr_table().splitlines()
    assert len(models.info("vit_b_16").blocks[0]) > 40 and len(lines) == 1 + 15  # 14 blocks and the head
    assert lines[1].split()[1] == models.info("vit_b_16").blocks[0][:37] + "..."
    assert lines[-1].split()[1:] == ["head", "2", "7,690", "1", "0.1"]


def tiny_info(**fields) -> models.ModelInfo:
    return models.ModelInfo(name="tiny", make=lambda num_classes: nn.Dense(num_classes), input_size=8,
                            mean=(0.5,) * 3, std=(0.5,) * 3, **fields)


@pytest.mark.parametrize("model_name, info", [("tiny", tiny_info(head="^classifier/")), ("tiny", tiny_info()),
                                              ("convnet", None)])
def test_layer_decay_on_a_model_without_blocks_fails_when_the_plan_is_built(monkeypatch, model_name, info):
    if info is not None:
        monkeypatch.setitem(models.MODELS, model_name, info)
    params = {"classifier": {"kernel": jnp.zeros((4, 2))}}
    config = {"head": optim.group_config(optimizer="sgd", lr=0.1, layer_decay=0.8)}
    message = (f"config.optim.head.layer_decay needs the model's blocks, but {model_name} declares none "
               r"\(xfer.models.ModelInfo.blocks\); set it to 0 and scale parts with config.optim.head.lr_mults")
    with pytest.raises(OptimConfigError, match=message):
        plan.build(((".*", "head"),), (), config, model_name, {"params": params})


@pytest.mark.parametrize("fields, message", [
    ({"layer_decay": 1.5}, r"layer_decay=1.5; it must be 0 \(off\) or a number in \(0, 1\]"),
    ({"layer_decay": -0.5}, r"layer_decay=-0.5; it must be 0 \(off\) or a number in \(0, 1\]"),
    ({"layer_decay": float("nan")}, r"layer_decay=nan"),
    ({"layer_decay": True}, r"layer_decay=True"),
    ({"lr_mults": (("^_blocks/", 0.0),)}, r"lr_mults\[0\]'s multiplier=0.0; it must be a finite number > 0"),
    ({"lr_mults": (("^_fc/", 1.0), ("^_blocks/", -2.0))}, r"lr_mults\[1\]'s multiplier=-2.0"),
    ({"lr_mults": (("^_blocks/", float("inf")),)}, r"lr_mults\[0\]'s multiplier=inf"),
    ({"lr_mults": (("^_blocks/", "0.1"),)}, r"lr_mults\[0\]'s multiplier='0.1'"),
    ({"lr_mults": (("^_blocks/",),)}, r"lr_mults\[0\]=\('\^_blocks/',\) is not a \(regex, multiplier\) pair"),
    ({"lr_mults": ("^_blocks/:0.1",)}, r"is not a \(regex, multiplier\) pair"),
    ({"lr_mults": "^_blocks/"}, r"lr_mults='\^_blocks/'; write a tuple of \(regex, multiplier\) pairs"),
    ({"lr_mults": (("(_blocks", 0.1),)}, r"lr_mults\[0\] has an invalid regex '\(_blocks'"),
    ({"lr_mults": (("^_block/", 0.1),)},
     r"lr_mults regex '\^_block/' matches no parameter of group 'all'; closest paths: _blocks/"),
    # A regex that matches only parameters of another group is as dead as one that matches nothing.
    ({"lr_mults": (("^_fc/", 0.1),)}, r"lr_mults regex '\^_fc/' matches no parameter of group 'all'"),
])
def test_bad_multipliers_fail_when_the_plan_is_built(fields, message):
    config = {"all": optim.group_config(optimizer="sgd", lr=0.1, **fields)}
    with pytest.raises(OptimConfigError, match=message):
        lite0_plan((("^_fc/", "head"), (".*", "all")), config | {"head": optim.group_config(optimizer="sgd", lr=0.1)})


def test_optim_build_without_the_plans_scales_refuses_multipliers():
    labels = {"classifier": {"kernel": "head"}}
    config = {"head": optim.group_config(optimizer="sgd", lr=0.1, lr_mults=((".*", 0.5),))}
    with pytest.raises(OptimConfigError, match=r"config.optim.head sets layer_decay or lr_mults, which need the "
                                               r"model: build the optimizer with xfer.learning.plan"):
        optim.build(config, labels, 10)
    with pytest.raises(OptimConfigError, match="lr_scales names nope/kernel, which is no trainable parameter"):
        optim.build(config, labels, 10, lr_scales={"nope/kernel": 0.5})


def sgd_steps(tx, params, state, steps):
    """Updates of `steps` SGD steps with gradient 1, and the state after them."""
    updates = []
    for _ in range(steps):
        update, state = tx.update(filled(params), state, params)
        updates.append(float(update["w"][0]))
    return updates, state


def test_schedule_offset_restarts_a_carried_over_groups_schedule():
    params = {"w": jnp.ones((2,)), "b": jnp.ones((2,))}
    labels = {"w": "cosine", "b": "constant"}
    config = {"cosine": optim.group_config(optimizer="sgd", lr=0.1, schedule="cosine"),
              "constant": optim.group_config(optimizer="sgd", lr=0.1)}
    earlier = optim.build(config, labels, total_steps=20)
    _, carried = sgd_steps(earlier, params, earlier.init(params), 5)
    assert int(jax.tree.leaves(carried.inner_states["cosine"])[0]) == 5  # the state's update count
    fresh = optim.build(config, labels, total_steps=10)
    restarted = optim.build(config, labels, total_steps=10, schedule_offsets={"cosine": 5, "constant": 5})
    expected, _ = sgd_steps(fresh, params, fresh.init(params), 3)
    got, _ = sgd_steps(restarted, params, carried, 3)
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    assert got[0] == pytest.approx(-0.1)  # schedule step 0, while the count is 5
    assert got[1] == pytest.approx(-0.1 * optax.cosine_decay_schedule(1.0, 10)(1))
    # Through the plan, with a JAX scalar as offset (a state's count); constant rates ignore offsets.
    freeze = plan.build((("^w$", "cosine"), (".*", "constant")), (), config, "convnet", {"params": params})
    again, _ = sgd_steps(freeze.optimizer(10, schedule_offsets={"cosine": jnp.asarray(5)}), params, carried, 3)
    np.testing.assert_allclose(again, expected, rtol=RTOL)


@pytest.mark.parametrize("offsets, message", [
    ({"head": 5}, r"schedule_offsets names group 'head', which trains in no optimizer here \(trained groups: all\)"),
    ({"all": -1}, r"schedule_offsets\['all'\]=-1; it must be a whole number >= 0"),
    ({"all": 2.5}, r"schedule_offsets\['all'\]=2.5; it must be a whole number >= 0"),
])
def test_bad_schedule_offsets_name_the_problem(offsets, message):
    config = {"all": optim.group_config(optimizer="sgd", lr=0.1, schedule="cosine")}
    with pytest.raises(OptimConfigError, match=message):
        optim.build(config, {"w": "all"}, 10, schedule_offsets=offsets)


def test_a_plan_whose_groups_are_renamed_keeps_each_parameters_multiplier():
    # xfer.learning.phases gives newly unfrozen blocks their own group (`backbone.phase3`) by new labels.
    config = {"head": optim.group_config(optimizer="sgd", lr=0.1),
              "backbone": optim.group_config(optimizer="sgd", lr=0.01, layer_decay=0.5)}
    freeze = lite0_plan(None, config, setting="full")
    late = INFO.blocks[-1]
    labels = jax.tree_util.tree_map_with_path(
        lambda key_path, group: "backbone.late" if re.search(late, partition.path_str(key_path)) else group,
        freeze.labels)
    renamed = dataclasses.replace(freeze, labels=labels, optim_specs={**config, "backbone.late": config["backbone"]})
    updates, _ = one_update(renamed)
    for path, update in updates.items():
        np.testing.assert_allclose(update, -(0.1 if depth(path) == 0 else 0.01 * 0.5 ** depth(path)), rtol=RTOL,
                                   err_msg=path)
    rows = [line.split() for line in renamed.lr_table().splitlines()[1:]]
    assert [row[:2] for row in rows] == [["backbone", regex] for regex in INFO.blocks[:-1]] + [["backbone.late", late]]
