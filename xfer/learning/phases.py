"""Schedules of freeze masks: `config.partition` as phases of training, e.g. LP-FT.

    config.partition = "linear_probe@0,full@0.5*0.1"   # LP-FT: probe, then everything at lr x 0.1
    config.partition = "gradual_unfreeze:4"            # ULMFiT: one more block every quarter
    config.partition = ((0.0, "linear_probe"), (0.5, (("^_fc/", "head"), (".*", "backbone")), 0.1))

Each phase is a preset or (regex, group) rules, the fraction of training at which it starts
(the first at 0, then increasing, each below 1) and optionally a learning-rate scale for
every group (`*S` in the string, a number as the third element of a tuple) or, in the tuple
form, overrides of the group specs (`{"backbone": {"lr": 1e-4}}`). `gradual_unfreeze:N`
is N phases: the head alone, then `last_k:1` .. `last_k:N-1` (`xfer.learning.presets`),
each starting at i/N. A plain preset or rule set is one phase, as before.

What a boundary does, and why:
  - Each phase has its own `FreezePlan` (`xfer.learning.plan`): frozen stays free in every phase
    (no gradient work, no optimizer state), and each phase compiles its own train step once.
  - Parameters a phase starts training get fresh optimizer state in a group of their own:
    `backbone.phase3` is what phase 3 unfroze of `backbone`, with `backbone`'s spec. A group
    that trains on with the same parameters and optimizer keeps its state (momentum, Adam's
    moments and count). Adding new parameters to a group that already has state would give
    them that group's Adam count, whose bias correction then misjudges their fresh moments.
  - Learning-rate schedules (warmup, cosine, linear) span each phase, as LP-FT's and fastai's
    `fine_tune` stages each have their own; a group carried over keeps its update count, so its
    schedule is shifted by the updates it made before (`optim.build`'s `schedule_offsets`).
  - Everything a boundary does is a function of the step, so a run resumed anywhere, even
    inside a later phase after `kill -9`, continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import optax

from xfer import models
from xfer.learning import optim, plan as plan_lib, presets
from xfer.learning.partition import FROZEN, PartitionError
from xfer.models import lora

GRADUAL_UNFREEZE = "gradual_unfreeze"
_PHASE_MARK = ".phase"  # joins a group and the phase that unfroze these parameters of it: backbone.phase3


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    """One phase as the config states it."""

    fraction: float  # of total steps, at which it starts
    setting: Any  # a preset name or (regex, group) rules
    optim_override: Any = None  # None, an lr scale, or {group: {field: value}}


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase made concrete for a run: its steps, its plan and what it keeps from the phase before."""

    number: int  # 1-based
    start: int  # the steps trained before it; it trains start+1 .. end
    end: int
    setting: Any
    plan: plan_lib.FreezePlan  # its labels name optimizer groups (`backbone.phase3`), its specs those groups'
    carried: frozenset[str]  # groups whose optimizer state continues from the previous phase
    schedule_offsets: Mapping[str, int]  # updates each carried group made before this phase

    @property
    def steps(self) -> int:
        return self.end - self.start

    def optimizer(self) -> optax.GradientTransformation:
        return self.plan.optimizer(self.steps, schedule_offsets=self.schedule_offsets)

    def describe(self) -> str:
        return f"phase {self.number} ({spelled(self.setting)}): steps {self.start + 1}..{self.end}"


def parse(setting) -> list[PhaseSpec] | None:
    """The phases `config.partition` lists, or None for a single preset or rule set."""
    if isinstance(setting, str):
        if setting.startswith(f"{GRADUAL_UNFREEZE}:") or setting == GRADUAL_UNFREEZE:
            return _gradual(setting)
        if "@" not in setting:
            return None
        return _checked([_parse_phase(part.strip()) for part in setting.split(",")], setting)
    if (isinstance(setting, Sequence) and setting and all(
            isinstance(item, Sequence) and not isinstance(item, str) and 2 <= len(item) <= 3
            and isinstance(item[0], (int, float)) and not isinstance(item[0], bool) for item in setting)):
        return _checked([PhaseSpec(float(item[0]), item[1], item[2] if len(item) == 3 else None)
                         for item in setting], setting)
    return None


def build(config, model_name: str, variable_shapes, total_steps: int) -> tuple[Phase, ...]:
    """The run's phases: one for a plain setting; raises on a schedule no run could use."""
    specs = parse(config.partition) or [PhaseSpec(0.0, config.partition)]
    _check_gradual(config.partition, model_name, len(specs))
    starts = [math.floor(spec.fraction * total_steps) for spec in specs]
    ends = starts[1:] + [total_steps]
    for number, (start, end) in enumerate(zip(starts, ends), 1):
        if end <= start:
            raise PartitionError(f"config.partition: phase {number} of {len(specs)} gets no steps of the "
                                 f"{total_steps} (it starts at step {start}, the next at {end}); space the "
                                 "fractions further apart or train longer")
    base_plans = []
    for number, spec in enumerate(specs, 1):
        optim_config = _overridden(_named_groups(config.optim, spec.setting, len(specs)), spec.optim_override,
                                   number)
        phase_plan = plan_lib.build(spec.setting, config.bn_policy, optim_config, model_name, variable_shapes)
        if not phase_plan.trainable_parameters:
            raise PartitionError(f"config.partition: phase {number} ({spelled(spec.setting)}) freezes every "
                                 "parameter; give it a preset or rules that train something")
        base_plans.append(phase_plan)
    if len(specs) == 1:
        base_plans[0].optimizer(total_steps)  # a schedule no optimizer can follow (warmup too long) fails now
        return (Phase(1, 0, total_steps, specs[0].setting, base_plans[0], frozenset(), {}),)
    return tuple(_chain(specs, base_plans, starts, ends, variable_shapes["params"]))


def lora_settings(setting) -> lora.Settings | None:
    """The LoRA adapters `config.partition` needs in the model: those of its `lora` phases (all the
    same: one model carries one set), or None when no phase is `lora`. Every phase runs the model
    with them; a phase that is not `lora` keeps them frozen (`xfer.learning.presets`)."""
    specs = parse(setting) or [PhaseSpec(0.0, setting)]
    found = {number: preset.lora for number, preset in
             ((number, presets.parse(spec.setting)) for number, spec in enumerate(specs, 1)) if preset and preset.lora}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"phase {number}: {settings.spelled()}" for number, settings in found.items())
        raise PartitionError(f"config.partition gives LoRA different settings ({listed}); the model carries one "
                             "set of adapters: give every lora phase the same rank, alpha and targets")
    return next(iter(found.values()), None)


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase whose state a checkpoint of `step` holds: the one that trained step `step`
    (the first for step 0)."""
    return next(phase for phase in phases if step <= phase.end)


def enter(phase: Phase, opt_state, fresh_opt_state):
    """`phase`'s optimizer state at its start: `fresh_opt_state` (its optimizer's init), with the
    state of each carried group taken from `opt_state`, the previous phase's."""
    inner = dict(fresh_opt_state.inner_states)
    for group in phase.carried:
        inner[group] = opt_state.inner_states[group]
    return fresh_opt_state._replace(inner_states=inner)


def frozen_throughout(phases: Sequence[Phase]):
    """The params tree of labels, `frozen` where every phase froze the parameter."""
    return jax.tree.map(lambda *labels: FROZEN if all(label == FROZEN for label in labels) else "trained",
                        *(phase.plan.labels for phase in phases))


def base_group(group: str) -> str:
    """The config.optim group an optimizer group takes its spec from: `backbone` of `backbone.phase3`."""
    return group.partition(_PHASE_MARK)[0]


def _chain(specs, base_plans, starts, ends, params) -> list[Phase]:
    """Phases whose labels say which parameters share optimizer state with the phase before."""
    phases: list[Phase] = []
    previous_base = previous_labels = None
    fresh_since: dict[str, int] = {}  # group -> the step its optimizer state was created
    for number, (spec, base_plan, start, end) in enumerate(zip(specs, base_plans, starts, ends), 1):
        labels = base_plan.labels
        if previous_labels is not None:
            used_before = set(jax.tree.leaves(previous_labels))

            def label(group, group_before, label_before, number=number, used_before=used_before):
                if group == FROZEN:
                    return FROZEN
                if group == group_before:
                    return label_before  # trained on in the same group: keeps its optimizer group
                return group if group not in used_before else f"{group}{_PHASE_MARK}{number}"

            labels = jax.tree.map(label, base_plan.labels, previous_base, previous_labels)
        specs_by_group = {group: base_plan.optim_specs[base_group(group)]
                          for group in sorted(set(jax.tree.leaves(labels)) - {FROZEN})}
        phase_plan = dataclasses.replace(base_plan, labels=labels, optim_specs=specs_by_group)
        try:  # a schedule no optimizer can follow (warmup longer than the phase) fails now, naming the phase
            phase_plan.optimizer(end - start)
        except optim.OptimConfigError as error:
            raise optim.OptimConfigError(f"config.partition: phase {number} ({spelled(spec.setting)}, "
                                         f"{end - start} steps): {error}") from None
        carried = _carried(phases[-1], phase_plan, params, end - start) if phases else frozenset()
        fresh_since = {group: fresh_since[group] if group in carried else start for group in specs_by_group}
        offsets = {group: start - fresh_since[group] for group in carried}
        phases.append(Phase(number, start, end, spec.setting, phase_plan, frozenset(carried), offsets))
        previous_base, previous_labels = base_plan.labels, labels
    return phases


def _carried(previous: Phase, phase_plan, params, steps: int) -> set[str]:
    """Groups of both phases whose optimizer state has the same structure: same parameters, same
    kind of optimizer (a changed learning rate keeps the state; momentum switched on does not)."""
    before = jax.eval_shape(previous.optimizer().init, params).inner_states
    now = jax.eval_shape(phase_plan.optimizer(steps).init, params).inner_states
    def layout(state):
        return jax.tree.structure(state), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(state)]

    return {group for group in set(before) & set(now) - {FROZEN} if layout(before[group]) == layout(now[group])}


def _named_groups(optim_config, setting, phase_count: int):
    """config.optim for one phase of a schedule given as rules: only the groups its rules name, as a
    preset keeps only the groups it fills, so one config.optim serves every phase."""
    if phase_count == 1 or presets.parse(setting) is not None:
        return optim_config
    named = {group for _, group in setting}
    return ml_collections.ConfigDict({group: optim_config[group] for group in optim_config.keys() if group in named})


def _overridden(optim_config, override, number: int):
    """config.optim as phase `number` uses it: every lr times a scale, or some fields replaced."""
    if override is None:
        return optim_config
    result = ml_collections.ConfigDict({group: dict(optim_config[group]) for group in optim_config.keys()})
    if isinstance(override, (int, float)) and not isinstance(override, bool):
        if not (math.isfinite(override) and override > 0):
            raise PartitionError(f"config.partition: phase {number}'s learning-rate scale is {override!r}; "
                                 "it must be a finite number > 0")
        for group in result.keys():
            result[group]["lr"] = result[group]["lr"] * override
        return result
    if not isinstance(override, Mapping):
        raise PartitionError(f"config.partition: phase {number}'s third element is {override!r}; give a "
                             "learning-rate scale (a number) or {group: {field: value}} overrides")
    for group, fields in override.items():
        if group not in result:
            raise PartitionError(f"config.partition: phase {number} overrides config.optim.{group}, which does "
                                 f"not exist; the groups are {', '.join(result.keys())}")
        for field, value in dict(fields).items():
            if field not in optim.FIELDS:
                raise PartitionError(f"config.partition: phase {number} overrides unknown field "
                                     f"'{group}.{field}'; allowed fields: {', '.join(optim.FIELDS)}")
            result[group][field] = value
    return result


def _parse_phase(text: str) -> PhaseSpec:
    match = re.fullmatch(r"([^@*]+)@([^@*]+)(?:\*([^@*]+))?", text)
    if not match:
        raise PartitionError(f"config.partition: phase {text!r} is not PRESET@FRACTION[*LR_SCALE]; write "
                             "e.g. 'linear_probe@0,full@0.5*0.1'")
    name, fraction, scale = match.groups()
    presets.parse(name)  # an unknown preset fails here, naming the presets
    return PhaseSpec(_number(fraction, text), name, None if scale is None else _number(scale, text))


def _number(text: str, phase: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PartitionError(f"config.partition: {text!r} in phase {phase!r} is not a number") from None


def _gradual(setting: str) -> list[PhaseSpec]:
    _, _, count = setting.partition(":")
    if not re.fullmatch(r"[0-9]+", count) or int(count) < 2:
        raise PartitionError(f"config.partition={setting!r}: write {GRADUAL_UNFREEZE}:N with N >= 2 phases (the "
                             "head alone, then one more block from the head in each)")
    n = int(count)
    return [PhaseSpec(i / n, "linear_probe" if i == 0 else f"{presets.LAST_K}:{i}") for i in range(n)]


def _check_gradual(setting, model_name: str, phase_count: int) -> None:
    if isinstance(setting, str) and setting.startswith(GRADUAL_UNFREEZE):
        blocks = len(models.info(model_name).blocks)
        if phase_count - 1 > blocks:
            raise PartitionError(f"config.partition={setting!r} unfreezes {phase_count - 1} blocks, but "
                                 f"{model_name} has {blocks} (ModelInfo.blocks); use "
                                 f"{GRADUAL_UNFREEZE}:N with N <= {blocks + 1}")


def _checked(specs: list[PhaseSpec], setting) -> list[PhaseSpec]:
    fractions = [spec.fraction for spec in specs]
    if fractions[0] != 0:
        raise PartitionError(f"config.partition={setting!r}: the first phase starts at {fractions[0]:g}; it "
                             "must start at 0 (write its preset @0)")
    if any(b <= a for a, b in zip(fractions, fractions[1:])) or not all(0 <= f < 1 for f in fractions):
        raise PartitionError(f"config.partition={setting!r}: phase fractions {fractions} must increase from 0 "
                             "and stay below 1")
    return specs


def spelled(setting) -> str:
    """A phase's setting for a log line or summary.json: the preset's name, or "rules"."""
    return setting if isinstance(setting, str) else "rules"
