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
own group's gradients. The train step (`xfer.training.step`) differentiates only
the trainable parameters and hands the optimizer zeros for the frozen ones, so
even a transformation that reads every gradient — a global-norm clip chained
outside the partition, a norm over all gradients — adds no frozen backward work
(it sees the frozen gradients as zeros). tests/test_optim.py checks this on compiled FLOPs.

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
  layer_decay   layer-wise learning-rate decay (BEiT, timm's `layer_decay`); 0 is off, else in (0, 1]:
                a parameter in block i from the head learns at lr × layer_decay**i, by the
                model's `ModelInfo.blocks` (the last block is i=1, the first i=len(blocks); the
                head is i=0), so pretrained early layers move least. Needs a model with blocks.
  lr_mults      ((regex, multiplier), ...) over parameter paths (`xfer.learning.partition`'s):
                the first regex that `re.search`es a path multiplies its learning rate, on top
                of layer_decay (big_vision's `lr_mults`). Each regex must match a parameter of
                the group, each multiplier be finite and > 0; () is off.

layer_decay and lr_mults scale each parameter's final update inside its group's transformation,
so clip_norm, weight_decay (adamw's too, as in timm) and the optimizer state keep their per-group
meaning. `xfer.learning.plan` resolves them per parameter (it knows the model's blocks) and hands
`build` the result as `lr_scales`; a group that sets neither compiles to the plain transformation.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from xfer.learning.partition import FROZEN, closest_paths, path_str

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
    "layer_decay": 0.0,
    "lr_mults": (),
}
FIELDS = REQUIRED_FIELDS + tuple(DEFAULTS)


class OptimConfigError(ValueError):
    """An optimizer config that does not fit the parameter groups or names an unknown field."""


def group_config(**fields) -> ml_collections.ConfigDict:
    """A group spec with every field present: the given ones, defaults for the rest."""
    _check_fields("group_config", fields)
    return ml_collections.ConfigDict({**DEFAULTS, **fields})


def build(optim_config: Mapping, labels, total_steps: int, schedule_offsets: Mapping[str, int] | None = None, *,
          lr_scales: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """`optax.partition` of one transformation per group in `labels`, `set_to_zero` for frozen.

    `schedule_offsets` {group: n} is for a group whose optimizer state comes from an earlier
    training phase that made n updates: its learning-rate schedule restarts at this phase's start
    (at update count c the rate is schedule(c - n)) and `total_steps` is this phase's length.
    Constant rates keep no count and ignore it.
    `lr_scales` {parameter path: multiplier} is `xfer.learning.plan.FreezePlan.lr_scales`, what
    layer_decay and lr_mults mean for these labels; a path it leaves out keeps multiplier 1.
    """
    specs = group_specs(optim_config, labels)
    offsets = _schedule_offsets(schedule_offsets, specs)
    scales = _scales_by_group(specs, labels, lr_scales)
    transforms = {}
    for group, spec in specs.items():
        transform = _group_transform(group, spec, total_steps, offsets.get(group, 0))
        transforms[group] = _scaled(transform, scales[group]) if group in scales else transform
    transforms[FROZEN] = optax.set_to_zero()
    return optax.partition(transforms, labels)


def lr_multipliers(group: str, spec: Mapping[str, Any], paths: Sequence[str],
                   depths: Sequence[int] | None) -> list[float]:
    """Learning-rate multiplier of each of `group`'s parameter `paths`: layer_decay**depth × lr_mults' factor.

    `spec` is a completed spec (`group_specs`); `depths[i]` is the block depth of `paths[i]`
    (0: the head, 1: the last block), needed only when the spec sets layer_decay.
    """
    rules = _lr_mult_rules(group, spec)
    for regex, _ in rules:
        if not any(regex.search(path) for path in paths):
            raise OptimConfigError(
                f"config.optim.{group}.lr_mults regex {regex.pattern!r} matches no parameter of group {group!r}; "
                f"closest paths: {', '.join(closest_paths(regex.pattern, list(paths)))}")
    decay = spec["layer_decay"]
    if decay and depths is None:
        raise OptimConfigError(f"config.optim.{group}.layer_decay needs the block depth of every parameter; "
                               "build the optimizer through xfer.learning.plan, which knows the model's blocks")
    factors = [next((factor for regex, factor in rules if regex.search(path)), 1.0) for path in paths]
    return [factor * decay ** depths[index] if decay else factor for index, factor in enumerate(factors)]


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
    decay = spec["layer_decay"]
    if not (_is_number(decay) and 0 <= decay <= 1):
        raise OptimConfigError(f"{where}.layer_decay={decay!r}; it must be 0 (off) or a number in (0, 1], "
                               "e.g. 0.75: each block towards the input learns at 0.75x the next one's rate")
    _lr_mult_rules(group, spec)


def _lr_mult_rules(group: str, spec: Mapping[str, Any]) -> list[tuple[re.Pattern, float]]:
    """The group's lr_mults, checked and compiled: [(regex, multiplier)] in priority order."""
    where = f"config.optim.{group}.lr_mults"
    rules = spec["lr_mults"]
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise OptimConfigError(f"{where}={rules!r}; write a tuple of (regex, multiplier) pairs, "
                               "e.g. (('^features/', 0.1),)")
    compiled = []
    for index, rule in enumerate(rules):
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2 or not isinstance(rule[0], str):
            raise OptimConfigError(f"{where}[{index}]={rule!r} is not a (regex, multiplier) pair; "
                                   "write e.g. ('^features/', 0.1)")
        regex, factor = rule
        _check_number(f"{where}[{index}]'s multiplier", factor, "label the parameters 'frozen' to train nothing",
                      above=0.0)
        try:
            compiled.append((re.compile(regex), float(factor)))
        except re.error as error:
            raise OptimConfigError(
                f"{where}[{index}] has an invalid regex {regex!r}: {error}; fix or escape it") from None
    return compiled


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(field: str, value, hint: str, *, above: float | None = None, at_least: float | None = None,
                  below: float = math.inf) -> None:
    ok = (_is_number(value) and (above is None or value > above) and (at_least is None or value >= at_least)
          and value < below)
    if not ok:
        bounds = ([f"> {above:g}"] if above is not None else []) + (
            [f">= {at_least:g}"] if at_least is not None else []) + ([f"< {below:g}"] if below < math.inf else [])
        raise OptimConfigError(f"{field}={value!r}; it must be a finite number {' and '.join(bounds)} ({hint})")


def _schedule_offsets(schedule_offsets: Mapping[str, int] | None, specs: Mapping[str, Any]) -> dict[str, int]:
    offsets = {}
    for group, offset in (schedule_offsets or {}).items():
        if group not in specs:
            raise OptimConfigError(f"schedule_offsets names group {group!r}, which trains in no optimizer here "
                                   f"(trained groups: {', '.join(specs)}); pass offsets of trained groups only")
        offsets[group] = _whole_number(offset)
        if offsets[group] is None or offsets[group] < 0:
            raise OptimConfigError(f"schedule_offsets[{group!r}]={offset!r}; it must be a whole number >= 0 "
                                   "(the updates the group's carried-over optimizer state has made)")
    return offsets


def _whole_number(value) -> int | None:
    """`value` as an int when it is an integer (Python, NumPy, or a JAX scalar such as a state's count)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _scales_by_group(specs: Mapping[str, Any], labels, lr_scales: Mapping[str, float] | None) -> dict[str, list]:
    """{group: multiplier of each of its leaves, in flatten order} for the groups with a multiplier != 1."""
    if lr_scales is None:
        scaled = [group for group, spec in specs.items() if spec["layer_decay"] or spec["lr_mults"]]
        if scaled:
            raise OptimConfigError(f"config.optim.{scaled[0]} sets layer_decay or lr_mults, which need the model: "
                                   "build the optimizer with xfer.learning.plan.build(...).optimizer(total_steps)")
        return {}
    leaves = [(path_str(key_path), group) for key_path, group in jax.tree_util.tree_flatten_with_path(labels)[0]]
    unknown = sorted(set(lr_scales) - {path for path, group in leaves if group != FROZEN})
    if unknown:
        raise OptimConfigError(f"lr_scales names {unknown[0]}, which is no trainable parameter of these labels; "
                               "take lr_scales from the FreezePlan that made the labels")
    groups = {group for path, group in leaves if path in lr_scales}
    return {group: [lr_scales.get(path, 1.0) for path, label in leaves if label == group] for group in groups}


def _scaled(transform: optax.GradientTransformation, scales: Sequence[float]) -> optax.GradientTransformation:
    """`transform`, then each leaf's update times its constant: the state is `transform`'s, unchanged.

    Inside `optax.partition` the other groups' leaves are `optax.MaskedNode`s, which flatten to
    nothing, so the group's own leaves come in flatten order, the order of `scales`.
    """
    transform = optax.with_extra_args_support(transform)

    def update(updates, state, params=None, **extra_args):
        updates, state = transform.update(updates, state, params, **extra_args)
        leaves, treedef = jax.tree.flatten(updates)
        if len(leaves) != len(scales):
            raise ValueError(f"{len(scales)} learning-rate multipliers for {len(leaves)} updates; "
                             "build the optimizer from the labels of these params")
        return jax.tree.unflatten(treedef, [leaf if scale == 1 else leaf * scale
                                            for leaf, scale in zip(leaves, scales)]), state

    return optax.GradientTransformationExtraArgs(transform.init, update)


def _group_transform(group: str, spec: Mapping[str, Any], total_steps: int,
                     schedule_offset: int = 0) -> optax.GradientTransformation:
    """clip -> [L2 weight decay] -> optimizer, all seeing only this group's gradients."""
    learning_rate = _learning_rate(group, spec, total_steps, schedule_offset)
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


def _learning_rate(group: str, spec: Mapping[str, Any], total_steps: int,
                   schedule_offset: int = 0) -> float | optax.Schedule:
    """A plain float for a constant rate (so the optimizer keeps no step count), else a schedule
    of the update count, started `schedule_offset` updates late."""
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
    schedule = main if not warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), main], [warmup_steps])
    return schedule if not schedule_offset else lambda count: schedule(count - schedule_offset)
