"""Freeze masks by name: "which layers should I train?" as one word in a config.

    config.partition = "last_k:2"     # instead of (regex, group) rules

A preset is expanded against the model's parameters into ordinary `xfer.learning.partition`
rules, so the group table, the coverage checks and "frozen means free" apply
unchanged. It makes up to three groups: `head` (the classifier, the model's
`ModelInfo.head`), `backbone` (everything else the preset trains) and `frozen`.
A config written for presets carries optimizer specs for `head` and `backbone`;
for a preset, the freeze plan drops the spec of a group it leaves empty
(`xfer.learning.plan`), so one config serves every preset of an ablation.

  linear_probe   the head only
  last_k:K       the last K blocks (`ModelInfo.blocks`: VGG's conv stages and hidden
                 Linears, Lite0's stem / 7 stages / head conv, ResNet's stem and
                 layer1..4, ViT's embedding / encoder layers / final LayerNorm) and the head
  full           everything, from config.init
  bias_only      BitFit: every bias, and the head
  norm_only      scale and bias of every normalisation layer, and the head
  scratch        everything, from random initialisation (it sets init to "scratch", and
                 every BatchNorm layer to batch statistics: see `bn_rules`): the
                 baseline every pretrained mask has to beat
  lora:R         rank-R LoRA adapters (`xfer.models.lora`) on the model's default targets
                 and the head; everything else frozen. `lora:R:alpha=A` sets alpha (default
                 8, PEFT's: scale alpha / R), `lora:R:REGEX` (or `lora:R:alpha=A:REGEX`) the
                 targets, a regex over module paths (the rest of the string, colons and all;
                 in a phase string it cannot hold `,`, `@` or `*`: use the tuple form there)

Normalisation layers (BatchNorm, LayerNorm) are found from the parameters, as the
modules whose parameters are exactly `scale` and `bias`, so a new model family
needs no list of them. A preset changes only which parameters learn: BatchNorm
layers follow `config.bn_policy` as with explicit rules (by default a layer with
trainable scale and bias trains on batch statistics), except under `scratch`.

A model carries LoRA adapters when a preset of its `config.partition` (any phase) is `lora`
(`xfer.training.train` wraps it); every other preset leaves the adapters frozen, `full`
included, so a phase trains them only when it says `lora` (frozen, B = 0 is the identity).
Explicit (regex, group) rules see the adapters like any parameter: `(?:^|/)lora_[ab]$`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import NamedTuple, Sequence

import jax

from xfer import models
from xfer.learning.partition import FROZEN, PartitionError, path_str
from xfer.models import lora

log = logging.getLogger("xfer")

HEAD, BACKBONE = "head", "backbone"
LAST_K = "last_k"
LORA = "lora"
NAMES = ("linear_probe", f"{LAST_K}:K", "full", "bias_only", "norm_only", "scratch", f"{LORA}:R")
_FIXED = {"linear_probe", "full", "bias_only", "norm_only", "scratch"}
_NORM_PARAMS = {"scale", "bias"}


class Preset(NamedTuple):
    name: str  # one of NAMES without ":K" or ":R"
    k: int | None  # last_k's K; None for the others
    lora: lora.Settings | None = None  # lora's rank, alpha and targets; None for the others

    @property
    def init_override(self) -> str | None:
        """The init the preset imposes ("scratch" trains from random weights); None keeps config.init."""
        return "scratch" if self.name == "scratch" else None


def parse(setting) -> Preset | None:
    """The preset `setting` names, or None for explicit (regex, group) rules.

    A one-element sequence holding a preset name counts too: that is what
    `--config.partition=full` makes of a config whose partition field holds rules.
    """
    if not isinstance(setting, str):
        if not (isinstance(setting, Sequence) and len(setting) == 1 and isinstance(setting[0], str)
                and (setting[0] in _FIXED or setting[0].partition(":")[0] in (LAST_K, LORA))):
            return None
        setting = setting[0]
    if setting in _FIXED:
        return Preset(setting, None)
    name, separator, k = setting.partition(":")
    if name == LORA:
        return Preset(LORA, None, _lora_settings(setting))
    if name != LAST_K:
        raise PartitionError(f"unknown partition preset {setting!r}; the presets are {', '.join(NAMES)} "
                             "(xfer/learning/presets.py), or give (regex, group) rules")
    if not separator or not re.fullmatch(r"[0-9]+", k):
        raise PartitionError(f"partition preset {setting!r} needs a whole number of blocks: write "
                             f"{LAST_K}:K, e.g. {LAST_K}:2")
    return Preset(LAST_K, int(k))


def _lora_settings(setting: str) -> lora.Settings:
    """`lora:R[:alpha=A][:REGEX]`; REGEX is the rest of the string, so it may hold colons."""
    _, _, rest = setting.partition(":")
    rank, separator, rest = rest.partition(":")
    if not re.fullmatch(r"[0-9]+", rank) or int(rank) < 1:
        raise PartitionError(f"partition preset {setting!r} needs a whole rank >= 1: write {LORA}:R, e.g. "
                             f"{LORA}:8 (or {LORA}:R:alpha=A:REGEX)")
    alpha = lora.DEFAULT_ALPHA
    if rest.startswith("alpha="):
        text, separator, rest = rest[len("alpha="):].partition(":")
        try:
            alpha = float(text)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise PartitionError(f"partition preset {setting!r}: alpha={text!r} must be a number > 0, e.g. "
                                 f"{LORA}:{rank}:alpha=16")
    if separator and not rest:
        raise PartitionError(f"partition preset {setting!r} ends in an empty target regex; drop the trailing ':' "
                             "for the model's default targets")
    return lora.Settings(int(rank), alpha, rest or None)


def expand(preset: Preset, model_name: str, param_shapes) -> tuple:
    """The `xfer.learning.partition` rules `preset` means for `model_name`'s parameters.

    `param_shapes` is the params tree, e.g. from `jax.eval_shape`.
    """
    info = _preset_info(model_name)
    _check_k(preset, info)
    paths = [path_str(key_path) for key_path, _ in jax.tree_util.tree_flatten_with_path(param_shapes)[0]]
    block_indices(info, paths)
    head = re.compile(info.head)
    has_adapters = any(lora.is_adapter(path) for path in paths)
    if preset.name == LORA and not has_adapters:
        raise PartitionError(f"partition preset {_spelled(preset)!r} finds no LoRA adapter in {model_name}'s "
                             "parameters; build the model with xfer.models.lora.wrap (xfer's trainer does)")
    body_paths = [path for path in paths if not head.search(path) and (preset.name == LORA
                                                                         or not lora.is_adapter(path))]
    backbone = _backbone_regex(preset, info, body_paths)
    rules = [(info.head, HEAD)]
    if has_adapters and preset.name != LORA and backbone is not None:
        rules.append((lora.ADAPTER_PARAM, FROZEN))  # adapters train only under lora, never under full
    if backbone is not None:
        if not any(re.search(backbone, path) for path in body_paths):
            raise PartitionError(f"partition preset {_spelled(preset)!r} selects no parameter of {model_name} "
                                 "outside its head; pick another preset")
        rules.append((backbone, BACKBONE))
    if not all(any(re.search(regex, path) for regex, _ in rules) for path in paths):
        rules.append((".*", FROZEN))
    log.info("partition preset %r on %s: %s%s", _spelled(preset), model_name,
             ", ".join(f"({shortened(regex)!r}, {group!r})" for regex, group in rules),
             f"; init: {preset.init_override}" if preset.init_override else "")
    return tuple(rules)


def bn_rules(preset: Preset, bn_policy: Sequence) -> Sequence:
    """`config.bn_policy` under `preset`: as given, except `()` (every BatchNorm layer `train`) for `scratch`.

    A random network has no running statistics worth keeping: under `frozen` or
    `stats_frozen` it would normalise with the initial 0 and 1, i.e. not at all,
    and a sweep whose pretrained masks keep their ImageNet statistics would hand
    its baseline a crippled network (Lite0 on CIFAR at 96 px: 0.16 after 100 steps).
    """
    if preset.name != "scratch" or not bn_policy:
        return bn_policy
    log.info("partition preset 'scratch': every BatchNorm layer trains on batch statistics "
             "(config.bn_policy is for pretrained statistics, which a random initialisation lacks)")
    return ()


def _spelled(preset: Preset) -> str:
    if preset.lora is not None:
        return preset.lora.spelled()
    return preset.name if preset.k is None else f"{preset.name}:{preset.k}"


def _preset_info(model_name: str) -> models.ModelInfo:
    info = models.info(model_name)
    if info.head is None or not info.blocks:
        raise PartitionError(f"model {model_name} declares no head and blocks (xfer.models.ModelInfo), so it "
                             "takes no partition preset; write (regex, group) rules instead")
    return info


def _check_k(preset: Preset, info: models.ModelInfo) -> None:
    if preset.name == LAST_K and not 1 <= preset.k <= len(info.blocks):
        raise PartitionError(f"partition preset {_spelled(preset)!r} is out of range: {info.name} has "
                             f"{len(info.blocks)} blocks (ModelInfo.blocks), so K must be in 1..{len(info.blocks)}")


def block_indices(info: models.ModelInfo, paths: list[str]) -> list[int]:
    """Each path's index into (*info.blocks, info.head). The registry's head and blocks must take every
    parameter exactly once, or last_k counts wrong and layer decay gives a parameter the wrong depth."""
    regexes = [*info.blocks, info.head]
    indices = []
    for path in paths:
        matched = [index for index, regex in enumerate(regexes) if re.search(regex, path)]
        if len(matched) != 1:
            raise PartitionError(f"{info.name}'s ModelInfo head and blocks match parameter {path} "
                                 f"{len(matched)} times ({', '.join(regexes[i] for i in matched) or 'no regex'}); "
                                 "each parameter must be in exactly one: fix xfer/models")
        indices.append(matched[0])
    return indices


def _backbone_regex(preset: Preset, info: models.ModelInfo, body_paths: list[str]) -> str | None:
    """The regex of what the preset trains besides the head; None for the head alone."""
    if preset.name == "linear_probe":
        return None
    if preset.name in ("full", "scratch"):
        return ".*"
    if preset.name == LORA:
        return lora.ADAPTER_PARAM
    if preset.name == LAST_K:
        return "|".join(f"(?:{regex})" for regex in info.blocks[-preset.k:])
    if preset.name == "bias_only":
        return "(?:^|/)bias$"
    norm_layers = _norm_layers(body_paths)
    if not norm_layers:
        raise PartitionError(f"partition preset 'norm_only' finds no normalisation layer in {info.name} (no "
                             "module with exactly `scale` and `bias`); pick another preset")
    return f"^(?:{'|'.join(map(re.escape, norm_layers))})/(?:scale|bias)$"


def _norm_layers(paths: list[str]) -> list[str]:
    """Modules whose parameters are exactly `scale` and `bias`: BatchNorm and LayerNorm layers."""
    params_of: dict[str, set[str]] = {}
    for path in paths:
        module, _, name = path.rpartition("/")
        params_of.setdefault(module, set()).add(name)
    return sorted(module for module, names in params_of.items() if names == _NORM_PARAMS)


def shortened(regex: str, limit: int = 80) -> str:
    return regex if len(regex) <= limit else f"{regex[:limit - 3]}..."
