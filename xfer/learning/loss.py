"""The training loss: cross-entropy on targets shaped by label smoothing, class weights and mixing.

    loss = Loss.from_config(config, data)   # once per run, before compiling; logs what it uses
    images, targets = loss.mix(key, batch["image"], batch["label"])   # in the step; (x, None) when off
    value = loss(logits, batch["label"], targets)

All three knobs are off by default, and then the loss is exactly the integer-label
cross-entropy averaged over the batch, the same operations as before these knobs
existed, so a run that sets none of them computes bitwise what it did.

- `config.label_smoothing` = s: the target is (1 - s) onehot(y) + s / C (optax's
  `smooth_labels`, timm's `mixup_target`'s off/on values).
- `config.class_weights`: "" none, "balanced" (n / (C count_c) over the training labels,
  scikit-learn's `compute_class_weight('balanced')`), or one weight per class. The batch's
  loss is sum_i w_i l_i / sum_i w_i: a weighted mean, not a weighted sum, so the weights
  change which examples matter and not the gradient's scale, and a learning rate tuned
  without them still fits. With mixed targets w_i is the mixed weight lam w_y + (1 - lam)
  w_y' (the target's weights before smoothing).
- `config.data.mixup_alpha` / `cutmix_alpha` (timm's `Mixup`, mode "batch"): the batch is
  paired with itself reversed, lam ~ Beta(alpha, alpha) once per batch; mixup blends
  lam x + (1 - lam) x', cutmix pastes x''s box of area ~(1 - lam) into x and corrects lam
  to the box's real area; both on: each batch picks one, half the time each (timm's
  `switch_prob`). Targets mix likewise, then smooth. It runs on the device in the jitted
  step from a key the step derives from the state's key and its number, so a resumed
  run mixes each step as the uninterrupted run did.
- `config.aux_loss_weight` = w, for a model with an auxiliary classifier (Inception v3's
  `AuxLogits`, `config.model.aux_logits`), whose training forward returns (logits, aux_logits) as
  torchvision's `InceptionOutputs`: the loss is loss(logits) + w loss(aux_logits), both on the
  same smoothed, weighted, mixed targets (torchvision's fine-tuning tutorial: plain cross-entropy,
  w = 0.4). A config without the field has w = 0, and a model that returns auxiliary logits is
  then refused when the step is traced (a branch trained by nothing is a mistake, not a choice:
  build the model with aux_logits=False instead); a weight with a model that returns no auxiliary
  logits is unused. Accuracy, evaluation and predictions read the main logits only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger("xfer")

BALANCED = "balanced"
SWITCH_PROB = 0.5  # with both alphas > 0: the chance a batch is cut-mixed rather than mixed up (timm's default)


@dataclasses.dataclass(frozen=True)
class Loss:
    """What the train step minimises; `Loss()` is plain cross-entropy."""

    num_classes: int = 0  # needed only to mix: the targets' width
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None  # one per class, or None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    aux_weight: float = 0.0  # the auxiliary classifier's share (`of_outputs`); 0 for a model without one

    @classmethod
    def from_config(cls, config, data) -> "Loss":
        """The run's loss from `config.label_smoothing`, `config.class_weights` and `data` (an
        `xfer.data.Data`: its classes, training labels and mixing); logs what differs from plain
        cross-entropy. Raises ValueError for weights that do not fit the data's classes."""
        setting = parse_class_weights(config.class_weights)
        weights, names = None, data.class_names
        if setting == BALANCED:
            weights = balanced_weights(data.train_labels(), names)
        elif setting:
            if len(setting) != data.num_classes:
                raise ValueError(f"config.class_weights has {len(setting)} weights for {data.num_classes} classes "
                                 f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); give one per "
                                 "class in that order, or 'balanced'")
            weights = setting
        loss = cls(data.num_classes, float(config.label_smoothing), weights, float(data.mixup_alpha),
                   float(data.cutmix_alpha), parse_aux_weight(config.get(AUX_WEIGHT_FIELD, 0.0)))
        if loss != cls(data.num_classes):
            shown = "none" if weights is None else (f"{setting if setting == BALANCED else 'given'}: "
                                                    + " ".join(f"{n}={w:.4g}" for n, w in zip(names, weights)))
            aux = (f", auxiliary classifier weight {loss.aux_weight:g} (used by a model that returns auxiliary "
                   "logits)" if loss.aux_weight else "")
            log.info("loss: label smoothing %g, class weights %s, mixup alpha %g, cutmix alpha %g%s",
                     loss.label_smoothing, shown, loss.mixup_alpha, loss.cutmix_alpha, aux)
        return loss

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def mix(self, key: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(mixed images, mixed one-hot targets (B, C)) from `key`; (images, None) when mixing is off."""
        if not self.mixes:
            return images, None
        use_cutmix, lam = draw(key, self.mixup_alpha, self.cutmix_alpha)
        keep, lam = where_kept(key, use_cutmix, lam, images.shape[1:3])
        mixed = images * keep + images[::-1] * (1 - keep)
        onehot = jax.nn.one_hot(labels, self.num_classes, dtype=images.dtype)
        return mixed, lam * onehot + (1 - lam) * onehot[::-1]

    def __call__(self, logits: jax.Array, labels: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """The batch's loss; `targets` are `mix`'s (None: the one-hot labels)."""
        if targets is None and not self.label_smoothing and self.class_weights is None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        if targets is None:
            targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        per_example = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, self.label_smoothing))
        if self.class_weights is None:
            return per_example.mean()
        weights = self._example_weights(targets)
        return jnp.sum(weights * per_example) / jnp.sum(weights)

    def of_outputs(self, outputs, labels: jax.Array, targets: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """(the batch's loss, the main logits) from a model's training `outputs`: its logits, or
        (logits, aux_logits) from a model with an auxiliary classifier, whose loss is then
        loss(logits) + aux_weight * loss(aux_logits). Raises ValueError (at trace time, before
        step 0) for auxiliary logits with `aux_weight` 0."""
        if not isinstance(outputs, tuple):
            return self(outputs, labels, targets), outputs
        logits, aux_logits = outputs
        if not self.aux_weight:
            raise ValueError(f"the model returns auxiliary logits (e.g. config.model.aux_logits=True) but "
                             f"config.{AUX_WEIGHT_FIELD} is 0 or unset, so nothing would train its auxiliary "
                             f"classifier; set config.{AUX_WEIGHT_FIELD} > 0 (torchvision's recipe: 0.4) or build "
                             "the model with config.model.aux_logits=False")
        return self(logits, labels, targets) + self.aux_weight * self(aux_logits, labels, targets), logits

    def total_weight(self, labels: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """What the loss divides a batch's summed per-example losses by, up to one factor for every
        batch of a size: the summed class weights (of the mixed `targets` when it mixes), else 1.
        Micro-batch losses weighted by it combine into the whole batch's (`xfer.training.step`)."""
        if self.class_weights is None:
            return jnp.ones((), jnp.float32)
        if targets is None:
            targets = jax.nn.one_hot(labels, len(self.class_weights), dtype=jnp.float32)
        return jnp.sum(self._example_weights(targets))

    def _example_weights(self, targets: jax.Array) -> jax.Array:
        return targets @ jnp.asarray(self.class_weights, targets.dtype)


def draw(key: jax.Array, mixup_alpha: float, cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
    """(cutmix this batch?, lam ~ Beta(alpha, alpha) of the chosen kind): timm's `_params_per_batch`."""
    switch_key, mixup_key, cutmix_key = jax.random.split(jax.random.fold_in(key, 0), 3)
    if not cutmix_alpha:
        return jnp.asarray(False), jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
    cutmix_lam = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha)
    if not mixup_alpha:
        return jnp.asarray(True), cutmix_lam
    use_cutmix = jax.random.bernoulli(switch_key, SWITCH_PROB)
    return use_cutmix, jnp.where(use_cutmix, cutmix_lam, jax.random.beta(mixup_key, mixup_alpha, mixup_alpha))


def box(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """(top, bottom, left, right) of cutmix's box for `lam`: timm's `rand_bbox`, sides
    int(side * sqrt(1 - lam)) around a uniform centre, clipped to the image."""
    y_key, x_key = jax.random.split(jax.random.fold_in(key, 1))
    ratio = jnp.sqrt(1 - lam)
    half_h, half_w = (jnp.floor(height * ratio).astype(jnp.int32) // 2,
                      jnp.floor(width * ratio).astype(jnp.int32) // 2)
    cy, cx = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    return (jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height),
            jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width))


def where_kept(key: jax.Array, use_cutmix: jax.Array, lam: jax.Array, size: tuple[int, int]):
    """(weight of each image's own pixels, broadcastable to (B, H, W, C); the lam its targets take).

    Mixup: lam everywhere. Cutmix: 0 inside the box, 1 outside, and lam corrected to the
    share of pixels kept (timm's `correct_lam`): a box clipped at the border pastes less.
    """
    height, width = size
    top, bottom, left, right = box(key, lam, height, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    outside = ~((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right))
    kept_share = 1 - (bottom - top) * (right - left) / (height * width)
    keep = jnp.where(use_cutmix, outside.astype(lam.dtype), lam)
    return keep[None, :, :, None], jnp.where(use_cutmix, kept_share.astype(lam.dtype), lam)


# --- config -------------------------------------------------------------------------------------

AUX_WEIGHT_FIELD = "aux_loss_weight"  # config.aux_loss_weight; a config without it has none


def parse_aux_weight(value) -> float:
    """`config.aux_loss_weight` as a float; raises ValueError naming the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"config.{AUX_WEIGHT_FIELD}={value!r}; it must be a finite number >= 0, the auxiliary "
                         "classifier's share of the loss (torchvision's recipe: 0.4)")
    return float(value)


def parse_class_weights(value) -> str | tuple[float, ...]:
    """`config.class_weights` as "", "balanced" or a tuple of weights; raises ValueError naming the fix.

    A tuple in a config file, or from the command line (where the field holds a string)
    comma-separated numbers, brackets optional: --config.class_weights=1,2.5,1.
    """
    if isinstance(value, str) and value.strip() in ("", BALANCED):
        return value.strip()
    items = [item for item in value.strip("()[] ").split(",") if item.strip()] if isinstance(value, str) else value
    try:
        weights = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        weights = ()
    if not weights or any(isinstance(item, bool) for item in items) or not all(0 < w < math.inf for w in weights):
        raise ValueError(f"config.class_weights={value!r}; it must be '' (no weights), 'balanced' (from the "
                         "training labels' counts) or one finite weight > 0 per class, e.g. (1.0, 2.5, 1.0)")
    return weights


def balanced_weights(labels: Sequence[int], class_names: Sequence[str]) -> tuple[float, ...]:
    """n / (C count_c) for each class c: scikit-learn's `compute_class_weight('balanced')`. A class
    without training examples would get an infinite weight: an error naming it instead."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    if not counts.all():
        missing = ", ".join(class_names[c] for c in np.flatnonzero(counts == 0)[:5])
        raise ValueError(f"config.class_weights='balanced' needs every class in the training split, and "
                         f"{missing} has none; give one weight per class or ''")
    return tuple(float(w) for w in len(labels) / (len(class_names) * counts))
