"""Fine-tuning a ResNet with stages 1-3 frozen: BatchNorm is where this usually goes wrong.

Frozen stages must keep their parameters and running statistics bit for bit
(their BatchNorm layers run on running statistics), while stage 4's BatchNorm
trains on batch statistics and updates its running averages.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xfer import models
from xfer.learning import optim, plan as freeze_plan
from xfer.training import mesh as mesh_lib, step

RULES = (("^layer4/|^fc/", "top"), (".*", "frozen"))


def test_frozen_stages_are_bitwise_unchanged_and_stage_four_and_head_move():
    model = models.build("resnet18", num_classes=10)
    variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    plan = freeze_plan.build(RULES, (), {"top": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)},
                             "resnet18", variables)
    assert plan.bn_policies["layer3/1/bn2"] == "frozen" and plan.bn_policies["layer4/0/bn1"] == "train"
    tx = plan.optimizer(3)
    mesh = mesh_lib.data_mesh()
    state = mesh_lib.replicate(step.create_state(variables, tx, 0), mesh)
    train_step = step.make_train_step(model, tx, plan, mesh)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": rng.standard_normal((8, 32, 32, 3), dtype=np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, _ = train_step(state, mesh_lib.global_batch(batch, mesh))

    before = {**_flat("params", variables["params"]), **_flat("batch_stats", variables["batch_stats"])}
    after = {**_flat("params", jax.device_get(state.params)),
             **_flat("batch_stats", jax.device_get(state.batch_stats))}
    for path, value in before.items():
        trained = path.split("/")[1] in ("layer4", "fc")
        if trained:
            assert not np.array_equal(after[path], value), f"{path} did not move"
        else:
            assert np.array_equal(after[path], value), f"{path} changed although frozen"


def _flat(collection, tree):
    return {f"{collection}/{path}": np.asarray(v) for path, v in traverse_util.flatten_dict(tree, sep="/").items()}
