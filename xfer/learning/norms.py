"""How each BatchNorm layer behaves while fine-tuning: its policy, set by regex rules.

Most JAX fine-tuning code gets BatchNorm wrong quietly: a "frozen" backbone
whose BatchNorm still normalises with batch statistics (and drifts its running
averages) computes another function in training than at evaluation. Here each
BatchNorm module gets one explicit policy:

    train         batch statistics, running averages updated, affine as the partition says
    frozen        running statistics, never updated, affine frozen (torch's FrozenBatchNorm2d)
    stats_frozen  running statistics, never updated, affine as the partition says

`config.bn_policy` holds ordered `(regex, policy)` rules over BatchNorm module
paths (`layer3/1/bn2`, `features/1`), first match wins, in the same forms as
`config.partition`. Layers no rule matches default to `frozen` where every
parameter of the layer is frozen, else `train`. The policy is applied by
`xfer.training.step` through the layer's call-time mode, never by whether a variable
collection happens to be mutable.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from flax import traverse_util

from xfer.learning import partition

TRAIN, FROZEN, STATS_FROZEN = "train", "frozen", "stats_frozen"
POLICIES = (TRAIN, FROZEN, STATS_FROZEN)


class NormPolicyError(ValueError):
    """A BatchNorm policy rule that names an unknown policy or no BatchNorm layer."""


def batch_norm_paths(batch_stats: Mapping) -> list[str]:
    """Module paths of the BatchNorm layers: the parents of `mean`/`var` statistics."""
    flat = traverse_util.flatten_dict(dict(batch_stats), sep="/")
    return sorted({path.rpartition("/")[0] for path in flat})


def policies(batch_stats: Mapping, rules: Sequence, params_labels) -> dict[str, str]:
    """`{BatchNorm module path: policy}` for every BatchNorm layer of the model."""
    compiled = partition.parse_rules(rules) if rules else []
    for index, (regex, policy) in enumerate(compiled):
        if policy not in POLICIES:
            raise NormPolicyError(f"bn_policy rule {index} ({regex.pattern!r}, {policy!r}) names an unknown "
                                  f"policy; choose one of {', '.join(POLICIES)}")
    paths = batch_norm_paths(batch_stats)
    frozen_modules = partition.frozen_modules(params_labels)
    chosen, used = {}, set()
    for path in paths:
        match = next((i for i, (regex, _) in enumerate(compiled) if regex.search(path)), None)
        if match is None:
            chosen[path] = FROZEN if path in frozen_modules else TRAIN
        else:
            chosen[path] = compiled[match][1]
            used.add(match)
    for index, (regex, policy) in enumerate(compiled):
        if index not in used:
            where = f"the BatchNorm layers are {', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}" \
                if paths else "this model has no BatchNorm layer"
            raise NormPolicyError(f"bn_policy rule {index} ({regex.pattern!r}, {policy!r}) matches no BatchNorm "
                                  f"layer ({where}); fix the regex or drop the rule")
    return chosen


def running_statistics_layers(layer_policies: Mapping[str, str]) -> frozenset[str]:
    """The layers that normalise with running statistics while training."""
    return frozenset(path for path, policy in layer_policies.items() if policy != TRAIN)


def freeze_affine(params_labels, layer_policies: Mapping[str, str]):
    """Labels with the scale and bias of every `frozen`-policy layer moved to the frozen group."""
    frozen_layers = {path for path, policy in layer_policies.items() if policy == FROZEN}

    def relabel(key_path, group):
        module = partition.path_str(key_path).rpartition("/")[0]
        return partition.FROZEN if module in frozen_layers else group

    return jax.tree_util.tree_map_with_path(relabel, params_labels)
