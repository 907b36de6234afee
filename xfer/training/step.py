"""The jitted, data-parallel train and eval steps.

One `jax.jit` each over the run's `xfer.training.mesh`: state replicated, the
batch split along 'data', the gradient all-reduce inserted by XLA. What the
model is fed comes from the caller (`inputs`): the batch's images, or
(`xfer.training.feature_cache`) zeros with a module's cached output
substituted, so the step itself knows nothing of caching.

Frozen parameters are selected from the old state at trace time (their
labels are static strings), so they are bitwise unchanged and XLA drops their
gradient work. Each BatchNorm layer follows its `xfer.learning.norms` policy, and
dropout inside frozen modules is off, so a frozen part learns nothing and
computes at training what it computes at evaluation.

What is minimised is `xfer.learning.loss`'s: plain cross-entropy unless the run
smooths labels, weights classes or mixes images (`loss.mix`, on the device, from a
key the step derives from the state's key and its number, so a resumed run mixes
every step as the uninterrupted one did), plus `config.aux_loss_weight` times the same
loss of the auxiliary logits of a model that returns them in training (Inception v3);
accuracy and evaluation read the main logits.

`StepOptions` holds the run-level knobs (each off by default, and then the step is what it was):
  - `ema_decay`: the state keeps an exponential moving average of the variables
    (`xfer.training.ema`), and evaluation uses it (`eval_variables`).
  - `grad_accum_steps` = k: the global batch runs as k micro-batches one after another
    (`lax.scan`), their gradients averaged into one optimizer update, so the activations held
    at once are one micro-batch's (`make_train_step` says what BatchNorm does then).
  - `compute_dtype` "bfloat16": activations in bfloat16, parameters, optimizer state, gradients
    and BatchNorm statistics in float32 (mixed precision: `_in_dtype`, `_float32_batch_norm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xfer.learning import optim, partition
from xfer.learning.loss import Loss
from xfer.learning.plan import FreezePlan
from xfer.models import layers
from xfer.training import ema as ema_lib

# batch -> (what the model is applied to, a context to apply it in)
ModelInputs = Callable[[dict], tuple[jax.Array, ContextManager]]
_MIX_STREAM = 0x6D6978  # folded into a step's key for the mixing draws: dropout keeps the step's key itself


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.compute_dtype


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The run-level knobs of the train step that are not the model, the plan or the loss
    (`xfer.training.validate` checks the config's values)."""

    ema_decay: float = 0.0  # 0: off; else in (0, 1): evaluation uses this EMA of the variables
    grad_accum_steps: int = 1  # micro-batches per optimizer update (1: off)
    compute_dtype: str = "float32"  # the activations' dtype, a key of COMPUTE_DTYPES

    @classmethod
    def from_config(cls, config) -> "StepOptions":
        return cls(float(config.ema_decay), int(config.grad_accum_steps), str(config.compute_dtype))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    rng: jax.Array  # raw uint32 key: dropout and stochastic depth fold in the step
    ema: Any  # {} unless options.ema_decay: the averaged {"params", "batch_stats"} (xfer.training.ema)


def create_state(variables, tx: optax.GradientTransformation, seed: int,
                 options: StepOptions = StepOptions()) -> TrainState:
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = ema_lib.init(_variables(params, batch_stats)) if options.ema_decay else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(seed), ema=ema)


def _variables(params, batch_stats) -> dict:
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def eval_variables(state: TrainState) -> dict:
    """{"params", "batch_stats"} as evaluation uses them: the EMA when the run keeps one, else the
    trained variables. WiSE-FT's final end, and what `with_eval_variables` replaces."""
    return state.ema or _variables(state.params, state.batch_stats)


def with_eval_variables(state: TrainState, variables: dict) -> TrainState:
    """`state` evaluating with `variables` (shaped as `eval_variables`'), e.g. WiSE-FT's mixed ones."""
    if state.ema:
        return state.replace(ema=variables)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))


def images(batch) -> tuple[jax.Array, ContextManager]:
    """The default `ModelInputs`: the batch's images, the whole network computed."""
    return batch["image"], contextlib.nullcontext()


def _keep_frozen(new, old, frozen_mask):
    """`new`, with each frozen leaf taken from `old`; `new` may hold None there (`_trainable`'s)."""
    return jax.tree.map(lambda frozen, n, o: o if frozen else n, frozen_mask, new, old)


def _trainable(params, frozen_mask):
    """`params` with None for each frozen leaf: what the step differentiates, so no frozen gradient
    exists to be computed or carried across micro-batches."""
    return jax.tree.map(lambda p, frozen: None if frozen else p, params, frozen_mask)


def _in_dtype(tree, dtype):
    """`tree`'s floating-point arrays as `dtype`: the parameters and inputs a bfloat16 step computes
    with (the float32 originals are what it differentiates and updates). float32 is left alone, so a
    float32 run traces what it did before the option existed."""
    if dtype == jnp.float32:
        return tree
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _float32_batch_norm(dtype) -> ContextManager:
    """Under a low-precision `dtype`, every `layers.BatchNorm` normalises in float32 and returns `dtype`.

    Its batch mean and variance, and the running statistics it updates, then stay float32, as
    mixed precision keeps them (torch's autocast runs batch_norm in float32); the casts fuse into
    the layer's elementwise work. Without the cast back, a layer on its (float32) running
    statistics would return float32 and turn every convolution after it float32 too.
    """
    if dtype == jnp.float32:
        return contextlib.nullcontext()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, layers.BatchNorm):
            x, *rest = args
            return next_fun(x.astype(jnp.float32), *rest, **kwargs).astype(dtype)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _micro_batches(batch: dict, k: int, mesh: Mesh) -> dict:
    """Each (B, ...) array of `batch` as (k, B/k, ...). Micro-batch i holds examples i, i+k, i+2k, ...:
    a device's contiguous rows then split evenly among the micro-batches, so no row changes device."""
    split = NamedSharding(mesh, P(None, "data"))
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        jnp.swapaxes(a.reshape(-1, k, *a.shape[1:]), 0, 1), split), batch)


def training_modes(running_stats_layers: frozenset[str], frozen_modules: frozenset[str], bn_groups: int = 1):
    """A context that sets each BatchNorm's and Dropout's mode by module path, for any model.

    BatchNorm layers in `running_stats_layers` (their `xfer.learning.norms` policy is
    `frozen` or `stats_frozen`) normalise with running statistics and leave
    them alone; the others use batch statistics, split into `bn_groups`
    per-device slices when cross-device BatchNorm is off. Dropout inside a
    frozen module is off, so a frozen part computes what it computes at eval.
    Models pass these modes at call time (`xfer.models.layers`), which is
    what lets the interceptor override them.
    """
    def interceptor(next_fun, args, kwargs, context):
        module, path = context.module, "/".join(context.module.path)
        if context.method_name == "__call__":
            if isinstance(module, layers.BatchNorm):
                if path in running_stats_layers:
                    kwargs = {**kwargs, "use_running_average": True}
                elif bn_groups > 1:
                    kwargs = {**kwargs, "groups": bn_groups}
            elif isinstance(module, nn.Dropout) and "/".join(module.path[:-1]) in frozen_modules:
                kwargs = {**kwargs, "deterministic": True}
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, plan: FreezePlan, mesh: Mesh,
                    bn_cross_device: bool = True, inputs: ModelInputs = images, loss: Loss = Loss(),
                    options: StepOptions = StepOptions()) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, jitted; `state` is donated. metrics["finite"] is
    False for a step whose loss or gradients were not finite: it changed nothing but the step count.

    `plan` says what is frozen and how each BatchNorm layer normalises. Under
    jit the batch is one global array, so BatchNorm statistics are over the
    global batch (cross-device) unless `bn_cross_device` is False. `loss`
    (`xfer.learning.loss`) is plain cross-entropy unless given; mixing needs `inputs` to be the images.
    metrics["accuracy"] compares the argmax with the batch's own labels, mixed or not.

    With `options.grad_accum_steps` = k > 1 every array of the batch (images or cached features)
    is split into k micro-batches (`_micro_batches`), each with its own dropout and mixing keys (the
    step's key with the micro-batch's index folded in). The gradient is their average and the
    metrics are the whole batch's (loss, accuracy; class weights combine exactly, `Loss.total_weight`),
    so without BatchNorm k micro-batches give one k-times-larger batch's step. A BatchNorm layer
    that trains normalises each micro-batch with that micro-batch's own statistics and updates its
    running statistics k times, once per micro-batch (timm's and torch's accumulation do the same);
    layers on running statistics (`frozen`, `stats_frozen`) are unaffected. Mixing pairs each
    micro-batch with itself reversed, one lam per micro-batch.
    """
    labels, running_stats_layers = plan.labels, plan.running_stats_layers
    params_frozen = partition.frozen_mask(labels)
    frozen_modules = partition.frozen_modules(labels)
    bn_groups = 1 if bn_cross_device else mesh.size
    dtype, k = COMPUTE_DTYPES[options.compute_dtype], options.grad_accum_steps

    def gradients(params, batch_stats, batch, rng):
        """(loss, accuracy, loss weight, gradients of the trainable parameters, new batch statistics)
        of one batch or micro-batch."""
        targets = None
        if loss.mixes:
            mixed, targets = loss.mix(jax.random.fold_in(rng, _MIX_STREAM), batch["image"], batch["label"])
            batch = {**batch, "image": mixed}

        def loss_fn(trainable):
            variables = {"params": _in_dtype(_keep_frozen(trainable, params, params_frozen), dtype)}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            x, context = inputs(_in_dtype(batch, dtype))
            with training_modes(running_stats_layers, frozen_modules, bn_groups), _float32_batch_norm(dtype), context:
                outputs, updated = model.apply(variables, _in_dtype(x, dtype), train=True,
                                               mutable=["batch_stats"], rngs={"dropout": rng})
            # Logits, or (logits, aux_logits) from a model with an auxiliary classifier (Loss.of_outputs).
            outputs = jax.tree.map(lambda a: a.astype(jnp.float32), outputs)
            value, logits = loss.of_outputs(outputs, batch["label"], targets)
            return value, (logits, updated.get("batch_stats", {}))

        (value, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            _trainable(params, params_frozen))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return value, accuracy, loss.total_weight(batch["label"], targets), grads, new_stats

    def accumulated(params, batch_stats, batch, rng):
        """`gradients` of the whole batch, computed as k micro-batches one after another."""
        def micro_step(carry, indexed):
            (loss_sum, accuracy_sum, weight_sum, grad_sum), stats = carry
            index, micro_batch = indexed
            value, accuracy, weight, grads, stats = gradients(params, stats, micro_batch,
                                                              jax.random.fold_in(rng, index))
            sums = (loss_sum + weight * value, accuracy_sum + accuracy, weight_sum + weight,
                    jax.tree.map(lambda total, g: total + weight * g, grad_sum, grads))
            return (sums, stats), None

        zero = jnp.zeros((), jnp.float32)
        sums = (zero, zero, zero, jax.tree.map(jnp.zeros_like, _trainable(params, params_frozen)))
        ((loss_sum, accuracy_sum, weight_sum, grad_sum), stats), _ = jax.lax.scan(
            micro_step, (sums, batch_stats), (jnp.arange(k), _micro_batches(batch, k, mesh)))
        grads = jax.tree.map(lambda total: total / weight_sum, grad_sum)
        return loss_sum / weight_sum, accuracy_sum / k, weight_sum, grads, stats

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        value, accuracy, _, trainable_grads, new_stats = (gradients if k == 1 else accumulated)(
            state.params, state.batch_stats, batch, rng)
        # Frozen leaves get zeros, a constant: their optimizer is set_to_zero and _keep_frozen drops them.
        grads = jax.tree.map(lambda frozen, p, g: jnp.zeros_like(p) if frozen else g,
                             params_frozen, state.params, trainable_grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = _keep_frozen(optax.apply_updates(state.params, updates), state.params, params_frozen)
        ema = state.ema
        if options.ema_decay:
            ema = ema_lib.update(ema, _variables(params, new_stats), options.ema_decay, params_frozen)
        grad_norm = optim.trainable_grad_norm(grads, labels)
        # A non-finite loss or gradient leaves the state as it was (optax.apply_if_finite's rule), so
        # a diverged step never reaches a checkpoint; the host decides to stop or skip (config.nan_policy).
        # The select fuses into the update, and frozen leaves (n is o) are untouched: Lite0 fully fine-tuned
        # at 96 px, batch 32, Adam, 1538 vs 1512 ms a step without it (medians of 3 alternating runs, 2 CPUs).
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, new_stats, opt_state, ema),
                            (state.params, state.batch_stats, state.opt_state, state.ema))
        metrics = {"loss": value, "accuracy": accuracy, "grad_norm": grad_norm, "finite": finite}
        new_state = state.replace(step=state.step + 1, params=kept[0], batch_stats=kept[1], opt_state=kept[2],
                                  ema=kept[3])
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: Mesh, inputs: ModelInputs = images,
                   options: StepOptions = StepOptions()) -> Callable:
    """`eval_step(state, batch) -> dict` of per-example prediction, top-5 hit, label and mask.

    Per-example outputs (not sums) so the host can build the confusion matrix;
    replicated, so every process can read the whole global batch. It evaluates
    `eval_variables(state)` (the EMA when the run keeps one) in the run's compute dtype.
    """
    dtype = COMPUTE_DTYPES[options.compute_dtype]

    def eval_step(state: TrainState, batch):
        variables = eval_variables(state)
        variables = {**variables, "params": _in_dtype(variables["params"], dtype)}
        x, context = inputs(_in_dtype(batch, dtype))
        with _float32_batch_norm(dtype), context:
            logits = model.apply(variables, _in_dtype(x, dtype), train=False).astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        return {"prediction": top_k[:, 0], "top5": jnp.any(top_k == batch["label"][:, None], axis=-1),
                "label": batch["label"], "mask": batch["mask"]}

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))
