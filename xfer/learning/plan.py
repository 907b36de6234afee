"""A freeze plan: `config.partition`, `config.bn_policy` and `config.optim` decided once, for one model.

    plan = xfer.learning.plan.build(config.partition, config.bn_policy, config.optim,
                                    config.model.name, variable_shapes)
    tx = plan.optimizer(total_steps)
    table = plan.lr_table()  # each block's learning rate; "" unless a group sets layer_decay or lr_mults

A preset or explicit rules, the BatchNorm policies that follow from them, the
init a preset imposes, the optimizer specs of the groups that exist and each
parameter's learning-rate multiplier (layer_decay by the model's blocks, lr_mults
by regex: `xfer.learning.optim`) are parsed here and nowhere else: the trainer,
the sweep's up-front check, the feature cache and the benchmarks all take the
resulting value. It is built from parameter shapes alone (`jax.eval_shape` of
init), so a typo in a rule fails in seconds, and it is a plain value: a schedule
of masks is a sequence of plans.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import optax

from xfer import models
from xfer.learning import norms, optim, partition, presets


class LrBlock(NamedTuple):
    """The parameters of one block that share a learning-rate multiplier.

    Kept by path, not by group, so a plan whose groups are renamed (`dataclasses.replace` with
    new labels, as `xfer.learning.phases` does) keeps its multipliers.
    """

    block: str  # the block's regex (ModelInfo.blocks), "head", or "-" for a model without blocks
    multiplier: float  # of its group's learning rate: layer_decay**depth × the lr_mults factor
    paths: tuple[str, ...]
    sizes: tuple[int, ...]  # parameters of each path


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    """What trains, in which optimizer group, and how each BatchNorm layer normalises."""

    labels: Any  # group per parameter, as the params tree; `frozen`-policy BatchNorm affines are frozen
    bn_policies: Mapping[str, str]  # BatchNorm module path -> xfer.learning.norms policy
    init_override: str | None  # "scratch" for the scratch preset; None keeps config.init
    optim_specs: Mapping  # config.optim, less the groups a preset leaves empty
    trainable_parameters: int  # parameters outside the frozen group: what ablation tables compare
    lr_blocks: tuple[LrBlock, ...]  # of the groups that set layer_decay or lr_mults; blocks in forward order

    @property
    def lr_scales(self) -> dict[str, float]:
        """{parameter path: learning-rate multiplier} for every multiplier other than 1."""
        return {path: block.multiplier for block in self.lr_blocks if block.multiplier != 1 for path in block.paths}

    @property
    def running_stats_layers(self) -> frozenset[str]:
        """BatchNorm layers that normalise with running statistics while training."""
        return norms.running_statistics_layers(self.bn_policies)

    def optimizer(self, total_steps: int, schedule_offsets: Mapping[str, int] | None = None
                  ) -> optax.GradientTransformation:
        """`optax.partition` of each group's optimizer, `set_to_zero` for the frozen group.

        `schedule_offsets` {group: updates its carried-over state has made}: see `optim.build`.
        """
        return optim.build(self.optim_specs, self.labels, total_steps, schedule_offsets, lr_scales=self.lr_scales)

    def lr_table(self) -> str:
        """Effective peak learning rate per block of the groups that set layer_decay or lr_mults; "" if none does."""
        group_of = {partition.path_str(key_path): group
                    for key_path, group in jax.tree_util.tree_flatten_with_path(self.labels)[0]}
        counts: dict[tuple[str, str, float], list[int]] = {}  # (group, block, multiplier) -> [tensors, parameters]
        for block in self.lr_blocks:
            for path, size in zip(block.paths, block.sizes):
                count = counts.setdefault((group_of[path], block.block, block.multiplier), [0, 0])
                count[0], count[1] = count[0] + 1, count[1] + size
        rows = []
        for (group, block, multiplier), (tensors, parameters) in sorted(counts.items(), key=lambda row: row[0][0]):
            peak = float(self.optim_specs[group]["lr"]) * multiplier
            rows.append((group, presets.shortened(block, 40), f"{tensors:,}", f"{parameters:,}", f"{multiplier:.4g}",
                         f"{peak:.4g}"))
        header = ("group", "block", "tensors", "parameters", "multiplier", "peak lr")
        return partition.format_rows(header, rows, left=2) if rows else ""

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
    complete_specs = optim.group_specs(specs, labels)  # checked here, before any optimizer is built
    return FreezePlan(labels, bn_policies, preset.init_override if preset else None, specs,
                      partition.count_trainable(params, labels),
                      _lr_blocks(complete_specs, labels, params, model_name))


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


def _lr_blocks(specs: Mapping[str, Mapping], labels, params, model_name: str) -> tuple[LrBlock, ...]:
    """The parameters of the groups that set layer_decay or lr_mults, by block and multiplier."""
    scaled = [group for group, spec in specs.items() if spec["layer_decay"] or spec["lr_mults"]]
    if not scaled:
        return ()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [partition.path_str(key_path) for key_path, _ in leaves]
    sizes = [math.prod(leaf.shape) for _, leaf in leaves]
    groups = jax.tree.leaves(labels)
    info = models.MODELS.get(model_name)
    blocks = (*info.blocks, "head") if info and info.head and info.blocks else None
    block_of = presets.block_indices(info, paths) if blocks else None
    shared: dict[tuple[int, float], list[int]] = {}  # (block, multiplier) -> parameter indices
    for group in scaled:
        if specs[group]["layer_decay"] and blocks is None:
            raise optim.OptimConfigError(
                f"config.optim.{group}.layer_decay needs the model's blocks, but {model_name} declares none "
                f"(xfer.models.ModelInfo.blocks); set it to 0 and scale parts with config.optim.{group}.lr_mults")
        members = [index for index, label in enumerate(groups) if label == group]
        depths = None if blocks is None else [len(blocks) - 1 - block_of[index] for index in members]
        multipliers = optim.lr_multipliers(group, specs[group], [paths[index] for index in members], depths)
        for index, multiplier in zip(members, multipliers):
            shared.setdefault((block_of[index] if blocks else 0, multiplier), []).append(index)
    return tuple(LrBlock(blocks[block] if blocks else "-", multiplier, tuple(paths[index] for index in indices),
                         tuple(sizes[index] for index in indices))
                 for (block, multiplier), indices in sorted(shared.items()))
