"""The loss-side recipe knobs: label smoothing, class weights, mixup and cutmix (xfer.learning.loss).

Each is checked against a hand computation in float64 numpy: the loss on known logits, scikit-learn's
balanced weights, and one SGD step of a linear model on a batch mixed by hand, whose gradient is
X^T (softmax(XW + b) - targets) / B in closed form. Mixing off must leave the step bitwise as it
was: plain integer-label cross-entropy, dropout drawing from the step's key as before.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.utils.class_weight import compute_class_weight

from xfer import data as xdata, models
from xfer.data.settings import DataSettings
from xfer.learning import loss as loss_lib, optim, plan as freeze_plan
from xfer.learning.loss import Loss
from xfer.training import mesh as mesh_lib, step as step_lib, train, validate

from configs import quickstart

# float32 losses and steps against float64 hand computations: |a - b| <= ATOL + RTOL |b|. Measured
# (AMD EPYC, 2 cores): loss values at most 3.9e-8 apart, parameters after a step 5.7e-8, so a margin of
# 17x at least; a lam off by 1e-3 moves the step's loss by 1.5e-4 and its parameters by 1.1e-3, and
# smoothing, weights or mixing left out move the loss by 0.011 or more: all far outside.
RTOL, ATOL = 1e-6, 1e-6

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.5, 0.0], [1.0, 1.0, -1.0]])
LABELS = np.array([0, 2, 1, 1])


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _cross_entropy(logits, targets):
    """Per-example cross-entropy of soft targets, float64."""
    return -(targets * _log_softmax(np.asarray(logits, np.float64))).sum(-1)


def _onehot(labels, num_classes):
    return np.eye(num_classes)[labels]


# --- label smoothing and class weights -----------------------------------------------------------

def test_label_smoothing_is_the_hand_computed_smoothed_cross_entropy():
    smoothing, classes = 0.1, LOGITS.shape[1]
    targets = (1 - smoothing) * _onehot(LABELS, classes) + smoothing / classes  # 0.9333 on y, 0.0333 elsewhere
    expected = _cross_entropy(LOGITS, targets).mean()
    got = float(Loss(classes, label_smoothing=smoothing)(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(LABELS)))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    plain = _cross_entropy(LOGITS, _onehot(LABELS, classes)).mean()
    assert abs(got - plain) > 1e-2  # smoothing changed it, by far more than the tolerance


def test_class_weights_give_the_weighted_mean_of_the_per_example_losses():
    weights = np.array([1.0, 3.0, 0.5])
    per_example = _cross_entropy(LOGITS, _onehot(LABELS, 3))
    expected = (weights[LABELS] * per_example).sum() / weights[LABELS].sum()
    got = float(Loss(3, class_weights=tuple(weights))(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(LABELS)))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # A weighted mean: scaling every weight changes nothing (the learning rate keeps its meaning).
    scaled = float(Loss(3, class_weights=tuple(10 * weights))(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(LABELS)))
    np.testing.assert_allclose(scaled, got, rtol=RTOL, atol=ATOL)


def test_balanced_weights_are_scikit_learns():
    labels = np.random.default_rng(0).choice(5, size=1000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    expected = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    # Both compute n / (C count_c) in float64: measured equal to the last bit.
    np.testing.assert_allclose(loss_lib.balanced_weights(labels, list("abcde")), expected, rtol=1e-15)
    with pytest.raises(ValueError, match="needs every class in the training split, and e has none"):
        loss_lib.balanced_weights(labels[labels < 4], list("abcde"))


def _digits(**fields):
    config = xdata.config_dict(source="digits", image_size=8, augment="none", num_threads=0, **fields)
    return xdata.build(config, models.info("efficientnet_lite0"), 16, 0)


def _loss_config(**fields):
    return ml_collections.ConfigDict({"label_smoothing": 0.0, "class_weights": "", **fields})


def test_balanced_weights_come_from_the_training_labels_cached_features_too():
    data = _digits()
    train_labels = np.asarray([data._splits.train[i]["label"] for i in range(data.num_train)])
    assert np.array_equal(data.train_labels(), train_labels)  # no image read for them: the source holds them
    loss = Loss.from_config(_loss_config(class_weights="balanced"), data)
    np.testing.assert_allclose(loss.class_weights, compute_class_weight(
        "balanced", classes=np.arange(10), y=train_labels), rtol=1e-15)
    cached = data.with_features((np.zeros((data.num_train, 4), np.float32), train_labels),
                                (np.zeros((data.num_eval, 4), np.float32), np.zeros(data.num_eval, int)))
    assert np.array_equal(cached.train_labels(), train_labels)


@pytest.mark.parametrize("weights", ["1,2,3", (1.0,) * 11])
def test_class_weights_of_the_wrong_length_are_refused_before_the_workdir_is_touched(tmp_path, weights):
    config = quickstart.get_config()
    config.data.image_size, config.total_steps = 32, 2
    if isinstance(weights, tuple):
        del config.class_weights  # a config file that states a tuple (the field's type is then tuple)
        config.class_weights = weights
    else:
        config.class_weights = weights
    with pytest.raises(ValueError, match=rf"config.class_weights has {len(loss_lib.parse_class_weights(weights))} "
                                         r"weights for 10 classes \(0, 1, 2, 3, ...\); give one per class"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("label_smoothing", 1.0, r"config.label_smoothing=1.0; it must be a number in \[0, 1\)"),
    ("label_smoothing", -0.1, r"config.label_smoothing=-0.1; it must be a number in \[0, 1\)"),
    ("class_weights", "balance", "config.class_weights='balance'; it must be '' .*, 'balanced'"),
    ("class_weights", "1,0,2", "config.class_weights='1,0,2'; it must be .* one finite weight > 0 per class"),
])
def test_bad_loss_fields_are_one_line_errors(field, value, message):
    config = quickstart.get_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        validate.check(config)


@pytest.mark.parametrize("field", ["mixup_alpha", "cutmix_alpha"])
def test_a_negative_alpha_is_refused(field):
    with pytest.raises(xdata.DataError, match=rf"config.data.{field}=-0.5; it must be a finite number >= 0"):
        DataSettings.read({"source": "digits", field: -0.5})


def test_mixing_counts_as_augmentation_for_the_feature_cache(tmp_path):
    config = quickstart.get_config()  # feature_cache="auto", augment="none"
    config.data.image_size, config.data.cutmix_alpha = 32, 0.5
    with pytest.raises(train.feature_cache.FeatureCacheError,
                       match=r"needs un-augmented training images, but they are augmented \(none\+cutmix\)"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- mixing in the train step ---------------------------------------------------------------------

CLASSES, BATCH, SIZE = 3, 4, 6


class _Linear(nn.Module):
    """Logits = flatten(x) W + b, optionally after dropout: a step whose gradient is known in closed form."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(CLASSES, name="head")(x)


LR = 0.5


def _step_parts(model, loss):
    images = jnp.zeros((1, SIZE, SIZE, 3))
    variables = jax.device_get(model.init(jax.random.PRNGKey(1), images))
    variables = jax.tree.map(lambda v: np.asarray(np.random.default_rng(2).normal(0, 0.1, v.shape), np.float32),
                             variables)
    plan = freeze_plan.build(((".*", "head"),), (), {"head": optim.group_config(optimizer="sgd", lr=LR)},
                             "linear", variables)
    tx = plan.optimizer(10)
    mesh = mesh_lib.data_mesh()
    train_step = step_lib.make_train_step(model, tx, plan, mesh, loss=loss)

    def run(step_index: int):
        """(params, metrics) after the step numbered `step_index` from the same start (the state is donated)."""
        state = step_lib.create_state(variables, tx, seed=0).replace(step=jnp.int32(step_index))
        new_state, metrics = train_step(mesh_lib.replicate(state, mesh), mesh_lib.global_batch(BATCH_DATA, mesh))
        return jax.device_get(new_state.params), jax.device_get(metrics)

    return variables["params"], run


BATCH_DATA = {"image": np.random.default_rng(3).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
              "label": np.array([0, 2, 1, 1], np.int32)}


def _mixing_key(step_index: int):
    """The key the step mixes with: the state's key (seed 0), the step number folded in, then the mixing stream."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), step_index), step_lib._MIX_STREAM)


def _hand_step(params, images, targets):
    """(loss, params after one SGD step) of the linear model on `images` with soft `targets`, float64."""
    x = images.reshape(len(images), -1).astype(np.float64)
    kernel, bias = (np.asarray(params["head"][k], np.float64) for k in ("kernel", "bias"))
    logits = x @ kernel + bias
    probabilities = np.exp(_log_softmax(logits))
    grad_logits = (probabilities - targets) / len(x)
    return (_cross_entropy(logits, targets).mean(),
            {"kernel": kernel - LR * x.T @ grad_logits, "bias": bias - LR * grad_logits.sum(0)})


def test_a_mixup_step_trains_on_the_hand_mixed_batch():
    alpha, smoothing, step_index = 0.4, 0.1, 7
    params, run = _step_parts(_Linear(), Loss(CLASSES, label_smoothing=smoothing, mixup_alpha=alpha))
    got_params, metrics = run(step_index)

    use_cutmix, lam = loss_lib.draw(_mixing_key(step_index), alpha, 0.0)
    lam = float(lam)
    assert not use_cutmix and 0 < lam < 1
    x, y = BATCH_DATA["image"].astype(np.float64), BATCH_DATA["label"]
    mixed = lam * x + (1 - lam) * x[::-1]  # timm's Mixup: the batch against its reverse
    targets = lam * _onehot(y, CLASSES) + (1 - lam) * _onehot(y[::-1], CLASSES)
    targets = (1 - smoothing) * targets + smoothing / CLASSES  # then smoothed, as timm's mixup_target
    loss, expected = _hand_step(params, mixed, targets)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=RTOL, atol=ATOL)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(got_params["head"][name], expected[name], rtol=RTOL, atol=ATOL)
    # An unmixed batch would have given another loss, far outside the tolerance.
    assert abs(_hand_step(params, x, (1 - smoothing) * _onehot(y, CLASSES) + smoothing / CLASSES)[0] - loss) > 1e-3


def test_the_same_step_mixes_the_same_way_twice_and_the_next_step_otherwise():
    _, run = _step_parts(_Linear(), Loss(CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0))
    first, again, following = run(7), run(7), run(8)
    assert float(first[1]["loss"]) == float(again[1]["loss"])  # bitwise: a resumed step 7 is step 7
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first[0]), jax.tree.leaves(again[0])))
    assert float(first[1]["loss"]) != float(following[1]["loss"])


def test_cutmix_pastes_one_box_whose_area_is_the_corrected_lam():
    loss = Loss(BATCH, cutmix_alpha=1.0)
    height, width = 16, 12
    # Image i is all i: each pixel says which image it came from.
    images = jnp.broadcast_to(jnp.arange(BATCH, dtype=jnp.float32)[:, None, None, None], (BATCH, height, width, 3))
    labels = jnp.arange(BATCH)
    clipped = 0
    for seed in range(40):
        key = jax.random.PRNGKey(seed)
        mixed, targets = map(np.asarray, loss.mix(key, images, labels))
        _, raw_lam = loss_lib.draw(key, 0.0, 1.0)
        for i in range(BATCH):
            pasted = mixed[i, :, :, 0] == BATCH - 1 - i  # the partner's pixels
            assert np.all(pasted | (mixed[i, :, :, 0] == i))
            rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
            if pasted.any():  # one axis-aligned box: every pixel in its rows x cols span is pasted
                assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
            lam = targets[i, i]  # the target's weight on the image's own label
            np.testing.assert_allclose(targets[i, BATCH - 1 - i], 1 - lam, rtol=0, atol=1e-7)
            # float32 lam against an exact pixel count: measured at most 4.0e-8 apart (25x margin).
            np.testing.assert_allclose(pasted.mean(), 1 - lam, rtol=0, atol=1e-6)
        clipped += bool(abs(float(raw_lam) - float(targets[0, 0])) > 0.05)
    assert clipped  # measured 34 of 40: whole-pixel sides and the border made lam differ from its draw


def test_without_mixing_the_step_is_the_plain_cross_entropy_step_bitwise():
    model = _Linear(dropout=0.5)  # dropout on: its key must stay the step's own
    config = _loss_config()
    data = _digits()  # the alphas and class count as a run reads them, all off
    loss = Loss.from_config(config, data)
    assert loss == Loss(10) and not loss.mixes
    params, run = _step_parts(model, Loss(CLASSES))
    got_params, metrics = run(3)

    # The step as it was before these knobs: integer-label cross-entropy, dropout from fold_in(key, step).
    def plain_loss(p):
        logits = model.apply({"params": p}, BATCH_DATA["image"], train=True,
                             rngs={"dropout": jax.random.fold_in(jax.random.PRNGKey(0), 3)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, BATCH_DATA["label"]).mean()

    value, grads = jax.jit(jax.value_and_grad(plain_loss))(params)
    assert float(metrics["loss"]) == float(value)
    expected = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    # SGD's p - lr g in both programs: measured bitwise equal.
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(expected)))
