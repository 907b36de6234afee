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
every step as the uninterrupted one did).
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

# batch -> (what the model is applied to, a context to apply it in)
ModelInputs = Callable[[dict], tuple[jax.Array, ContextManager]]
_MIX_STREAM = 0x6D6978  # folded into a step's key for the mixing draws: dropout keeps the step's key itself


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The run-level knobs of the train step that are not the model, the plan or the loss."""

    @classmethod
    def from_config(cls, config) -> "StepOptions":
        return cls()


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    rng: jax.Array  # raw uint32 key: dropout and stochastic depth fold in the step


def create_state(variables, tx: optax.GradientTransformation, seed: int,
                 options: StepOptions = StepOptions()) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def images(batch) -> tuple[jax.Array, ContextManager]:
    """The default `ModelInputs`: the batch's images, the whole network computed."""
    return batch["image"], contextlib.nullcontext()


def _keep_frozen(new, old, frozen_mask):
    return jax.tree.map(lambda n, o, frozen: o if frozen else n, new, old, frozen_mask)


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
    """
    labels, running_stats_layers = plan.labels, plan.running_stats_layers
    params_frozen = partition.frozen_mask(labels)
    frozen_modules = partition.frozen_modules(labels)
    bn_groups = 1 if bn_cross_device else mesh.size

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        targets = None
        if loss.mixes:
            mixed, targets = loss.mix(jax.random.fold_in(rng, _MIX_STREAM), batch["image"], batch["label"])
            batch = {**batch, "image": mixed}

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            x, context = inputs(batch)
            with training_modes(running_stats_layers, frozen_modules, bn_groups), context:
                logits, updated = model.apply(variables, x, train=True,
                                              mutable=["batch_stats"], rngs={"dropout": rng})
            value = loss(logits, batch["label"], targets)
            return value, (logits, updated.get("batch_stats", {}))

        (value, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = _keep_frozen(optax.apply_updates(state.params, updates), state.params, params_frozen)
        grad_norm = optim.trainable_grad_norm(grads, labels)
        # A non-finite loss or gradient leaves the state as it was (optax.apply_if_finite's rule), so
        # a diverged step never reaches a checkpoint; the host decides to stop or skip (config.nan_policy).
        # The select fuses into the update, and frozen leaves (n is o) are untouched: Lite0 fully fine-tuned
        # at 96 px, batch 32, Adam, 1538 vs 1512 ms a step without it (medians of 3 alternating runs, 2 CPUs).
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, new_stats, opt_state),
                            (state.params, state.batch_stats, state.opt_state))
        metrics = {
            "loss": value,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": grad_norm,
            "finite": finite,
        }
        new_state = state.replace(step=state.step + 1, params=kept[0], batch_stats=kept[1], opt_state=kept[2])
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: Mesh, inputs: ModelInputs = images,
                   options: StepOptions = StepOptions()) -> Callable:
    """`eval_step(state, batch) -> dict` of per-example prediction, top-5 hit, label and mask.

    Per-example outputs (not sums) so the host can build the confusion matrix;
    replicated, so every process can read the whole global batch.
    """
    def eval_step(state: TrainState, batch):
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        x, context = inputs(batch)
        with context:
            logits = model.apply(variables, x, train=False)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        return {"prediction": top_k[:, 0], "top5": jnp.any(top_k == batch["label"][:, None], axis=-1),
                "label": batch["label"], "mask": batch["mask"]}

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))
