"""The train step's run-level knobs (xfer.training.step.StepOptions): EMA, gradient accumulation, bfloat16.

Each knob is checked for what it promises, on the smallest model that shows it:
  - `ema_decay`: the state's average equals a hand-computed EMA of the parameter and BatchNorm
    trajectory, a frozen parameter's average is the parameter bit for bit, evaluation uses the
    average, and a run SIGKILLed after a checkpoint resumes to the bits of the uninterrupted run
    (subprocesses, tests/test_train_equivalence.py's setup).
  - `grad_accum_steps`: k micro-batches give one k-times-larger batch's step (VGG16 without
    dropout), class weights combine exactly, each micro-batch mixes with its own key, and a
    training BatchNorm updates its running statistics once per micro-batch.
  - `compute_dtype="bfloat16"` (EfficientNet-Lite0 with BatchNorm on running statistics, VGG16's
    classic recipe): every convolution and matmul of the step runs in bfloat16 while parameters,
    optimizer state and statistics stay float32, the first loss agrees with float32's, and the
    run trains as float32's does.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from test_train_equivalence import N, assert_resumes_like, launch, read_state, saved_steps
from xfer import models
from xfer.learning import loss as loss_lib, optim, plan as freeze_plan
from xfer.learning.loss import Loss
from xfer.models import layers
from xfer.training import mesh as mesh_lib, step as step_lib, validate
from xfer.weights.initialise import initial_variables

MESH = mesh_lib.data_mesh()
CLASSES = 3


class _Tiny(nn.Module):
    """flatten -> Dense `body` -> BatchNorm `bn` -> ReLU -> Dense `head`; `batch_norm=False` drops the BatchNorm."""

    batch_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(5, name="body")(x.reshape(x.shape[0], -1))
        if self.batch_norm:
            x = layers.batch_norm(x, train, name="bn", momentum=0.9, epsilon=1e-5)
        return nn.Dense(CLASSES, name="head")(nn.relu(x))


def _tiny_parts(model, rules, options=step_lib.StepOptions(), loss=Loss(), lr=0.5):
    """(numpy variables, plan, jitted train step, optimizer) of `model` on 4x4x3 inputs, SGD at `lr`."""
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3))))
    groups = {group for _, group in rules if group != "frozen"}
    plan = freeze_plan.build(rules, (), {g: optim.group_config(optimizer="sgd", lr=lr) for g in groups},
                             "tiny", variables)
    tx = plan.optimizer(100)
    return variables, plan, step_lib.make_train_step(model, tx, plan, MESH, loss=loss, options=options), tx


def _batch(seed: int, size: int = 8, classes: int = CLASSES, side: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(size, side, side, 3)).astype(np.float32),
            "label": rng.integers(0, classes, size).astype(np.int32)}


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --- EMA ------------------------------------------------------------------------------------------

def test_the_ema_is_the_hand_computed_average_and_a_frozen_parameter_s_is_the_parameter():
    decay = 0.75
    options = step_lib.StepOptions(ema_decay=decay)
    variables, _, train_step, tx = _tiny_parts(_Tiny(), (("^body/", "frozen"), (".*", "head")), options)
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0, options=options), MESH)
    trajectory = [jax.device_get({"params": state.params, "batch_stats": state.batch_stats})]
    for seed in range(3):
        state, metrics = train_step(state, mesh_lib.global_batch(_batch(seed), MESH))
        assert metrics["finite"]
        trajectory.append(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))

    # timm's ModelEmaV2 in float64: starts at the initial variables, then d * ema + (1 - d) * variables.
    expected = jax.tree.map(lambda v: np.asarray(v, np.float64), trajectory[0])
    for variables_t in trajectory[1:]:
        expected = jax.tree.map(lambda e, v: decay * e + (1 - decay) * v, expected, variables_t)
    got, final = _flat(state.ema), _flat(trajectory[-1])
    assert got.keys() == _flat(expected).keys() and len(got) == 8  # body, bn (scale, bias, mean, var), head
    for path, want in _flat(expected).items():
        # float32 steps of the same recurrence: measured at most 3.4e-8 from the float64 one (29x margin).
        np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=1e-6, err_msg=path)
        if "body" not in path:  # what trained (head, bn's parameters and statistics) is averaged, not copied
            assert np.abs(got[path] - final[path]).max() > 1e-3, path
    for name in ("kernel", "bias"):  # frozen: selected, never computed
        assert np.array_equal(state.ema["params"]["body"][name], trajectory[0]["params"]["body"][name])


def test_evaluation_uses_the_eval_variables_which_wise_ft_can_replace():
    model = _Tiny()
    variables, _, train_step, tx = _tiny_parts(model, (("^body/", "frozen"), (".*", "head")))
    batch = mesh_lib.global_batch({**_batch(0), "mask": np.ones(8, np.float32)}, MESH)
    for options in (step_lib.StepOptions(ema_decay=0.9), step_lib.StepOptions()):
        eval_step = step_lib.make_eval_step(model, MESH, options=options)
        state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0, options=options), MESH)
        assert bool(state.ema) == bool(options.ema_decay)
        # Eval variables whose head predicts class 2 whatever the input.
        variables_2 = step_lib.eval_variables(state)
        head = {"kernel": jnp.zeros_like(variables_2["params"]["head"]["kernel"]), "bias": jnp.asarray([0., 0., 9.])}
        params_2 = {**variables_2["params"], "head": head}
        state_2 = step_lib.with_eval_variables(state, {**variables_2, "params": params_2})
        assert np.array_equal(step_lib.eval_variables(state_2)["params"]["head"]["bias"], [0, 0, 9])
        raw = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
        assert not np.all(np.argmax(raw, -1) == 2)  # the state's own variables predict other classes too
        assert np.array_equal(eval_step(state_2, batch)["prediction"], np.full(8, 2))
        if options.ema_decay:  # only the average was replaced: training goes on from the raw parameters
            assert np.array_equal(state_2.params["head"]["bias"], state.params["head"]["bias"])


def test_a_run_with_an_ema_resumed_after_sigkill_ends_bitwise_as_the_uninterrupted_one(tmp_path):
    """tests/test_train_equivalence.py's Lite0 run (trainable BatchNorm, dropout, augmentation), with an EMA."""
    ema = "--config.ema_decay=0.9"
    reference, resumed = tmp_path / "reference", tmp_path / "killed"
    launch(reference, ema)
    launch(resumed, ema, kill_after_save=N)
    assert saved_steps(resumed) == [N]
    assert f"resumed from step {N} " in launch(resumed, ema).output
    assert_resumes_like(resumed, reference)  # the whole state, the EMA included, and the eval on it
    state = read_state(reference)
    stats, params = _flat(state["ema"]["batch_stats"]), _flat(state["ema"]["params"])
    assert not np.array_equal(params["['_fc']['kernel']"], _flat(state["params"])["['_fc']['kernel']"])
    assert not np.array_equal(stats["['_blocks']['15']['_bn0']['var']"],
                              _flat(state["batch_stats"])["['_blocks']['15']['_bn0']['var']"])


# --- gradient accumulation --------------------------------------------------------------------------

def test_micro_batches_with_class_weights_give_the_whole_batch_s_step():
    """A model without BatchNorm: 4 micro-batches of 2 are the batch of 8, the class-weighted mean included."""
    loss = Loss(CLASSES, class_weights=(1.0, 4.0, 0.5))
    rules = ((".*", "head"),)
    ends = {}
    for k in (1, 4):
        options = step_lib.StepOptions(grad_accum_steps=k)
        variables, _, train_step, tx = _tiny_parts(_Tiny(batch_norm=False), rules, options, loss)
        state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0), MESH)
        state, metrics = train_step(state, mesh_lib.global_batch(_batch(1), MESH))
        ends[k] = jax.device_get((state.params, metrics))
    (whole, whole_metrics), (accumulated, accumulated_metrics) = ends[1], ends[4]
    # Sums in another order: measured 3.0e-8 apart in the parameters (33x margin), the metrics equal. The
    # plain mean of the micro-batches' weighted means is another number, far outside the tolerance.
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(accumulated_metrics[name], whole_metrics[name], rtol=1e-6, atol=1e-6)
    for path, want in _flat(whole).items():
        np.testing.assert_allclose(_flat(accumulated)[path], want, rtol=1e-6, atol=1e-6, err_msg=path)
    model, batch = _Tiny(batch_norm=False), _batch(1)
    micro_means = [loss(model.apply({"params": variables["params"]}, batch["image"][i::4]), batch["label"][i::4])
                   for i in range(4)]
    assert abs(np.mean(micro_means) - whole_metrics["loss"]) > 1e-3, (micro_means, whole_metrics["loss"])


def test_each_micro_batch_mixes_with_its_own_key():
    """k=2 with mixup: micro-batch i (examples i, i+2, ...) is mixed with the step's key, i, then the mixing
    stream folded in; the step is the average of the two micro-batch steps done by hand."""
    step_index, lr = 5, 0.5
    loss = Loss(CLASSES, mixup_alpha=0.4)
    options = step_lib.StepOptions(grad_accum_steps=2)
    model = _Tiny(batch_norm=False)
    variables, _, train_step, tx = _tiny_parts(model, ((".*", "head"),), options, loss, lr=lr)
    batch = _batch(2)
    state = step_lib.create_state(variables, tx, seed=0).replace(step=jnp.int32(step_index))
    state, metrics = train_step(mesh_lib.replicate(state, MESH), mesh_lib.global_batch(batch, MESH))

    step_key = jax.random.fold_in(jax.random.PRNGKey(0), step_index)
    grads, losses, lams = [], [], []
    for i in range(2):
        key = jax.random.fold_in(jax.random.fold_in(step_key, i), step_lib._MIX_STREAM)
        images, targets = loss.mix(key, jnp.asarray(batch["image"][i::2]), jnp.asarray(batch["label"][i::2]))
        lams.append(float(loss_lib.draw(key, loss.mixup_alpha, 0.0)[1]))

        def micro_loss(params):
            return loss(model.apply({"params": params}, images), None, targets)
        value, grad = jax.value_and_grad(micro_loss)(variables["params"])
        losses.append(float(value))
        grads.append(grad)
    assert abs(lams[0] - lams[1]) > 1e-3  # two draws, not one
    expected = jax.tree.map(lambda p, g0, g1: p - lr * (g0 + g1) / 2, variables["params"], *grads)
    # Measured 3.0e-8 apart in the parameters (33x margin), the loss equal; lam was 0.016 and 0.55.
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6, atol=1e-6)
    for path, want in _flat(expected).items():
        np.testing.assert_allclose(_flat(state.params)[path], want, rtol=1e-6, atol=1e-6, err_msg=path)


def test_a_training_batch_norm_normalises_each_micro_batch_and_updates_its_statistics_k_times():
    options = step_lib.StepOptions(grad_accum_steps=2)
    variables, _, train_step, tx = _tiny_parts(_Tiny(), (("^body/", "frozen"), (".*", "head")), options)
    batch = _batch(3)
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0), MESH)
    state, _ = train_step(state, mesh_lib.global_batch(batch, MESH))

    body = variables["params"]["body"]
    hidden = batch["image"].reshape(8, -1).astype(np.float64) @ body["kernel"] + body["bias"]
    mean, var = (np.asarray(variables["batch_stats"]["bn"][k], np.float64) for k in ("mean", "var"))
    for i in range(2):  # torch's update: momentum 0.1 (Flax 0.9), the unbiased variance
        micro = hidden[i::2]
        mean = 0.9 * mean + 0.1 * micro.mean(0)
        var = 0.9 * var + 0.1 * micro.var(0, ddof=1)
    # Measured at most 1.2e-7 from the float64 updates (8x margin); one update over all 8 examples would be
    # 0.07 (mean) and 0.04 (variance) off.
    np.testing.assert_allclose(state.batch_stats["bn"]["mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.batch_stats["bn"]["var"], var, rtol=1e-6, atol=1e-6)


# --- real networks: accumulation and bfloat16 --------------------------------------------------------

BATCH, SIZE = 8, 32


def _network(name: str, rules, bn_policy=(), init: str = "scratch"):
    """(model, numpy variables, plan, optimizer, one fixed batch) of `name` at 32 px without dropout, its
    groups trained by SGD with momentum."""
    fields = {"drop_connect_rate": 0.0} if name == "efficientnet_lite0" else {}
    model = models.build(name, num_classes=10, dropout_rate=0.0, **fields)
    variables = jax.device_get(initial_variables(model, name, init, SIZE, seed=0, head_zero_init=False))
    group = optim.group_config(optimizer="sgd", lr=0.01, momentum=0.9)
    plan = freeze_plan.build(rules, bn_policy, {g: group for _, g in rules if g != "frozen"}, name, variables)
    batch = mesh_lib.global_batch(_batch(4, BATCH, classes=10, side=SIZE), MESH)
    return model, variables, plan, plan.optimizer(100), batch


def _run(network, options, steps: int):
    """(the parameters after each step, per-step metrics, the final state, the step's StableHLO), as numpy."""
    model, variables, plan, tx, batch = network
    train_step = step_lib.make_train_step(model, tx, plan, MESH, options=options)
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0, options=options), MESH)
    text = train_step.lower(state, batch).as_text()
    params, history = [], []
    for _ in range(steps):
        state, metrics = train_step(state, batch)
        params.append(jax.device_get(state.params))
        history.append(jax.device_get(metrics))
    return params, history, jax.device_get(state), text


def test_vgg16_accumulated_over_4_micro_batches_matches_the_whole_batch():
    """VGG16 (no BatchNorm), every parameter trained: 4 micro-batches of 2 against the batch of 8, 2 steps."""
    vgg16 = _network("vgg16", ((".*", "all"),))
    params, history, _, _ = _run(vgg16, step_lib.StepOptions(grad_accum_steps=4), 2)
    whole_params, whole_history, _, _ = _run(vgg16, step_lib.StepOptions(), 2)
    # Sums over 2 examples, then over 4 micro-batches, against sums over 8: after 2 steps measured at most
    # 1.5e-8 apart in the parameters (66x margin), the metrics equal.
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(history[1][name], whole_history[1][name], rtol=1e-6, atol=1e-6)
    for path, want in _flat(whole_params[1]).items():
        np.testing.assert_allclose(_flat(params[1])[path], want, rtol=1e-6, atol=1e-6, err_msg=path)


NETWORKS = {
    # ImageNet weights, everything trained, BatchNorm on running statistics: the layers that would turn
    # float32 if their statistics promoted the activations.
    "efficientnet_lite0": ((("^_fc/", "head"), (".*", "backbone")), ((".*", "stats_frozen"),), "imagenet"),
    "vgg16": ((("^features/", "frozen"), ("^classifier/", "classifier")), (), "scratch"),  # the classic recipe
}


@pytest.mark.parametrize("name", NETWORKS)
def test_bfloat16_computes_in_bfloat16_keeps_float32_state_agrees_at_step_0_and_trains(name):
    network = _network(name, *NETWORKS[name])
    steps = 6
    _, history, state, text = _run(network, step_lib.StepOptions(compute_dtype="bfloat16"), steps)
    _, float32_history, _, _ = _run(network, step_lib.StepOptions(), steps)
    ops = re.findall(r"stablehlo\.(convolution|dot_general)[^\n]*-> tensor<[^>]*x(\w+)>", text)
    assert len(ops) > 10 and {dtype for _, dtype in ops} == {"bf16"}, sorted(set(ops))
    floats = [leaf for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
              if np.issubdtype(leaf.dtype, np.floating)]
    assert floats and {leaf.dtype for leaf in floats} == {np.dtype(np.float32)}
    float32_losses = [float(m["loss"]) for m in float32_history]
    losses = [float(m["loss"]) for m in history]
    # Step 0 measured 5e-5 (Lite0) and 6e-6 (VGG16) of the loss apart: within bfloat16's own relative
    # precision, 2^-8, by 80x or more. Both train alike: after 6 steps on the same batch, measured
    # 2.58 -> 2.11 (float32 2.13) and 2.302 -> 2.029 (float32 2.028).
    np.testing.assert_allclose(losses[0], float32_losses[0], rtol=2**-8)
    assert losses[-1] < losses[0] - 0.15, losses
    np.testing.assert_allclose(losses[-1], float32_losses[-1], rtol=0.03)


# --- the config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"ema_decay": 1.0}, r"config.ema_decay=1.0; it must be a number in \[0, 1\) \(0: off, 0.999 is usual\)"),
    ({"ema_decay": -0.5}, r"config.ema_decay=-0.5; it must be a number in \[0, 1\)"),
    ({"grad_accum_steps": 0}, r"config.grad_accum_steps=0; it must be a whole number >= 1"),
    ({"grad_accum_steps": 3}, r"config.batch_size=64 does not split into config.grad_accum_steps=3 equal "
                              r"micro-batches; make the batch size a multiple of 3$"),
    ({"compute_dtype": "float16"}, r"config.compute_dtype='float16'; choose 'float32' or 'bfloat16'"),
])
def test_bad_step_options_are_one_line_errors(fields, message):
    config = quickstart.get_config()
    config.update(fields)
    with pytest.raises(ValueError, match=message) as error:
        validate.check(config)
    assert "\n" not in str(error.value)


def test_micro_batches_must_split_over_the_devices(monkeypatch):
    config = quickstart.get_config()  # batch 64
    config.grad_accum_steps = 16
    monkeypatch.setattr(validate.jax, "device_count", lambda: 8)
    with pytest.raises(ValueError, match=r"^config.batch_size=64 / grad_accum_steps=16 is 4 examples a micro-batch, "
                                         r"which does not split over the 8 devices; make the batch size a multiple "
                                         r"of 128$"):
        validate.check(config)
    config.grad_accum_steps = 8
    validate.check(config)
    assert step_lib.StepOptions.from_config(config) == step_lib.StepOptions(grad_accum_steps=8)
