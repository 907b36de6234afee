"""One optimizer per parameter group, and frozen parameters that cost nothing.

`xfer.learning.partition.labels` names a group for every parameter; `build` turns a config
with one spec per group into a single `optax.partition` (optax >= 0.2.5, where
`multi_transform` got that name):

    config.optim = ml_collections.ConfigDict({
        "head": xfer.learning.optim.group_config(optimizer="sgd", lr=1e-3, momentum=0.9),
    })

The built-in `frozen` group gets `optax.set_to_zero()`: no optimizer state, no
weight decay, no clipping. Everything that reads gradients (weight decay,
clipping, the optimizer) sits *inside* the partition, so it only ever sees its
own group's gradients. Anything that reads every gradient — a global-norm clip
chained outside the partition, a norm metric over all gradients — makes XLA
compute the frozen gradients after all; `trainable_grad_norm` is the metric
that does not. tests/test_optim.py checks this on compiled FLOPs.

Per-group spec fields (`group_config` fills the defaults, so that every field
can be overridden from the command line under `lock_config`):
  optimizer     'sgd' | 'adam' | 'adamw'; SGD with momentum is 'sgd' with `momentum`.
  lr            peak learning rate.
  momentum      SGD momentum (torch's SGD `momentum`); 0 is plain SGD.
  nesterov      Nesterov momentum, SGD only.
  weight_decay  'sgd' and 'adam': L2, added to the gradient before the optimizer
                (torch's SGD/Adam `weight_decay`); 'adamw': decoupled.
  schedule      'constant' | 'cosine' (to 0 at total_steps) | 'linear' (to 0 at total_steps).
  warmup_steps  linear warmup from 0 to `lr` before the schedule starts.
  clip_norm     clip this group's gradients to this global norm; 0 is off.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from xfer.learning.partition import FROZEN

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
REQUIRED_FIELDS = ("optimizer", "lr")
DEFAULTS = {
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "clip_norm": 0.0,
}
FIELDS = REQUIRED_FIELDS + tuple(DEFAULTS)


class OptimConfigError(ValueError):
    """An optimizer config that does not fit the parameter groups or names an unknown field."""


def group_config(**fields) -> ml_collections.ConfigDict:
    """A group spec with every field present: the given ones, defaults for the rest."""
    _check_fields("group_config", fields)
    return ml_collections.ConfigDict({**DEFAULTS, **fields})


def build(optim_config: Mapping, labels, total_steps: int) -> optax.GradientTransformation:
    """`optax.partition` of one transformation per group in `labels`, `set_to_zero` for frozen."""
    specs = group_specs(optim_config, labels)
    transforms = {group: _group_transform(group, spec, total_steps) for group, spec in specs.items()}
    transforms[FROZEN] = optax.set_to_zero()
    return optax.partition(transforms, labels)


def schedules(optim_config: Mapping, total_steps: int) -> dict[str, optax.Schedule]:
    """Learning-rate schedule of every group in the config, for logging."""
    rates = {group: _learning_rate(group, _complete(group, spec), total_steps)
             for group, spec in _items(optim_config)}
    return {group: rate if callable(rate) else optax.constant_schedule(rate) for group, rate in rates.items()}


def learning_rates(schedules_by_group: Mapping[str, optax.Schedule], step: int) -> dict[str, float]:
    """{group: learning rate at `step`}, from `schedules(...)`."""
    return {group: float(schedule(step)) for group, schedule in schedules_by_group.items()}


def trainable_grad_norm(grads, labels) -> jax.Array:
    """Global L2 norm of the non-frozen gradients; frozen leaves are never read."""
    if jax.tree.structure(grads) != jax.tree.structure(labels):
        raise ValueError("grads and labels have different tree structures; "
                         "pass the labels made from the same params the grads are taken for")
    squares = [jnp.sum(jnp.square(grad.astype(jnp.float32)))
               for grad, group in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if group != FROZEN]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def _items(optim_config: Mapping):
    return [(group, optim_config[group]) for group in optim_config.keys()]


def group_specs(optim_config: Mapping, labels) -> dict[str, dict[str, Any]]:
    """Validated, default-completed spec of every trainable group in `labels`."""
    configured = dict(_items(optim_config))
    if FROZEN in configured:
        raise OptimConfigError(
            f"config.optim.{FROZEN} is not allowed: the '{FROZEN}' group is built in (set_to_zero); remove it")
    used = set(jax.tree.leaves(labels)) - {FROZEN}
    missing = sorted(used - set(configured))
    if missing:
        raise OptimConfigError(
            f"parameter group(s) {missing} have no optimizer: add config.optim.{missing[0]} = "
            f"xfer.learning.optim.group_config(optimizer=..., lr=...), or label them '{FROZEN}'")
    unused = sorted(set(configured) - used)
    if unused:
        raise OptimConfigError(
            f"config.optim.{unused[0]} is used by no partition rule: remove it or add a rule "
            f"('regex', '{unused[0]}') to config.partition")
    return {group: _complete(group, configured[group]) for group in sorted(used)}


def _complete(group: str, spec: Mapping) -> dict[str, Any]:
    fields = {name: spec[name] for name in spec.keys()}
    _check_fields(f"config.optim.{group}", fields)
    for name in REQUIRED_FIELDS:
        if name not in fields:
            raise OptimConfigError(f"config.optim.{group} has no '{name}': set config.optim.{group}.{name}")
    fields = {**DEFAULTS, **fields}
    _check_values(group, fields)
    return fields


def _check_fields(where: str, fields: Mapping) -> None:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise OptimConfigError(f"{where} has unknown field '{unknown[0]}'; allowed fields: {', '.join(FIELDS)}")


def _check_values(group: str, spec: Mapping[str, Any]) -> None:
    where = f"config.optim.{group}"
    if spec["optimizer"] not in OPTIMIZERS:
        raise OptimConfigError(
            f"{where}.optimizer is {spec['optimizer']!r}; use one of {', '.join(OPTIMIZERS)}")
    if spec["schedule"] not in SCHEDULES:
        raise OptimConfigError(f"{where}.schedule is {spec['schedule']!r}; use one of {', '.join(SCHEDULES)}")
    if spec["optimizer"] != "sgd" and (spec["momentum"] or spec["nesterov"]):
        raise OptimConfigError(
            f"{where}: momentum and nesterov apply to optimizer 'sgd' only, not {spec['optimizer']!r}; unset them")
    if spec["nesterov"] and not spec["momentum"]:
        raise OptimConfigError(f"{where}.nesterov needs momentum > 0; set {where}.momentum")
    # A value no optimizer can use would train silently wrong: lr=-1 is gradient ascent, lr=nan NaN.
    _check_number(f"{where}.lr", spec["lr"], "label the group 'frozen' to train nothing", above=0.0)
    _check_number(f"{where}.momentum", spec["momentum"], "0 is plain SGD", at_least=0.0, below=1.0)
    _check_number(f"{where}.weight_decay", spec["weight_decay"], "0 is off", at_least=0.0)
    _check_number(f"{where}.clip_norm", spec["clip_norm"], "0 is off", at_least=0.0)
    warmup = spec["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise OptimConfigError(f"{where}.warmup_steps={warmup!r}; it must be a whole number >= 0")


def _check_number(field: str, value, hint: str, *, above: float | None = None, at_least: float | None = None,
                  below: float = math.inf) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (above is None or value > above) and (at_least is None or value >= at_least) and value < below)
    if not ok:
        bounds = ([f"> {above:g}"] if above is not None else []) + (
            [f">= {at_least:g}"] if at_least is not None else []) + ([f"< {below:g}"] if below < math.inf else [])
        raise OptimConfigError(f"{field}={value!r}; it must be a finite number {' and '.join(bounds)} ({hint})")


def _group_transform(group: str, spec: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """clip -> [L2 weight decay] -> optimizer, all seeing only this group's gradients."""
    learning_rate = _learning_rate(group, spec, total_steps)
    steps = []
    if spec["clip_norm"]:
        steps.append(optax.clip_by_global_norm(spec["clip_norm"]))
    if spec["weight_decay"] and spec["optimizer"] != "adamw":
        steps.append(optax.add_decayed_weights(spec["weight_decay"]))
    if spec["optimizer"] == "sgd":
        steps.append(optax.sgd(learning_rate, momentum=spec["momentum"] or None, nesterov=spec["nesterov"]))
    elif spec["optimizer"] == "adam":
        steps.append(optax.adam(learning_rate))
    else:
        steps.append(optax.adamw(learning_rate, weight_decay=spec["weight_decay"]))
    return optax.chain(*steps)


def _learning_rate(group: str, spec: Mapping[str, Any], total_steps: int) -> float | optax.Schedule:
    """A plain float for a constant rate (so the optimizer keeps no step count), else a schedule."""
    peak, warmup_steps = float(spec["lr"]), int(spec["warmup_steps"])
    if spec["schedule"] == "constant" and not warmup_steps:
        return peak
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        raise OptimConfigError(
            f"config.optim.{group}.warmup_steps={warmup_steps} leaves no steps of the {total_steps} "
            "total for the schedule; lower warmup_steps")
    main = {
        "constant": lambda: optax.constant_schedule(peak),
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
        "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
    }[spec["schedule"]]()
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), main], [warmup_steps])
