"""A freeze plan: `config.partition`, `config.bn_policy` and `config.optim` decided once, for one model.

    plan = xfer.learning.plan.build(config.partition, config.bn_policy, config.optim,
                                    config.model.name, variable_shapes)
    tx = plan.optimizer(total_steps)

A preset or explicit rules, the BatchNorm policies that follow from them, the
init a preset imposes and the optimizer specs of the groups that exist are
parsed here and nowhere else: the trainer, the sweep's up-front check, the
feature cache and the benchmarks all take the resulting value. It is built
from parameter shapes alone (`jax.eval_shape` of init), so a typo in a rule
fails in seconds, and it is a plain value: a schedule of masks is a sequence
of plans.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import optax

from xfer.learning import norms, optim, partition, presets


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    """What trains, in which optimizer group, and how each BatchNorm layer normalises."""

    labels: Any  # group per parameter, as the params tree; `frozen`-policy BatchNorm affines are frozen
    bn_policies: Mapping[str, str]  # BatchNorm module path -> xfer.learning.norms policy
    init_override: str | None  # "scratch" for the scratch preset; None keeps config.init
    optim_specs: Mapping  # config.optim, less the groups a preset leaves empty
    trainable_parameters: int  # parameters outside the frozen group: what ablation tables compare

    @property
    def running_stats_layers(self) -> frozenset[str]:
        """BatchNorm layers that normalise with running statistics while training."""
        return norms.running_statistics_layers(self.bn_policies)

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """`optax.partition` of each group's optimizer, `set_to_zero` for the frozen group."""
        return optim.build(self.optim_specs, self.labels, total_steps)

    def schedules(self, total_steps: int) -> dict[str, optax.Schedule]:
        """Each group's learning-rate schedule, for logging."""
        return optim.schedules(self.optim_specs, total_steps)


def build(setting, bn_policy: Sequence, optim_config: Mapping, model_name: str, variable_shapes) -> FreezePlan:
    """The plan for `config.partition` (a preset or rules), `config.bn_policy` and `config.optim`.

    `variable_shapes` holds `params` (and `batch_stats` for BatchNorm models),
    as arrays or `jax.ShapeDtypeStruct`s. Raises `PartitionError`,
    `NormPolicyError` or `OptimConfigError` on anything no run could use.
    """
    params = variable_shapes["params"]
    preset = presets.parse(setting)
    rules = setting if preset is None else presets.expand(preset, model_name, params)
    labels = partition.labels(params, rules)
    bn_rules = bn_policy if preset is None else presets.bn_rules(preset, bn_policy)
    bn_policies = norms.policies(variable_shapes.get("batch_stats", {}), bn_rules, labels)
    labels = norms.freeze_affine(labels, bn_policies)
    specs = optim_config if preset is None else _used_specs(optim_config, labels)
    optim.group_specs(specs, labels)  # checked here, before any optimizer is built
    return FreezePlan(labels, bn_policies, preset.init_override if preset else None, specs,
                      partition.count_trainable(params, labels))


def from_config(config, variable_shapes) -> FreezePlan:
    """`build` with a run config's fields."""
    return build(config.partition, config.bn_policy, config.optim, config.model.name, variable_shapes)


def _used_specs(optim_config: Mapping, labels) -> dict:
    """A preset's specs: only those of the groups it fills (`linear_probe` leaves `backbone` empty).

    Explicit rules keep optim.build's strictness instead (a spec no rule uses is an error), so a
    config written for presets serves every preset of an ablation.
    """
    used = set(jax.tree.leaves(labels))
    return {group: optim_config[group] for group in optim_config.keys() if group in used}
