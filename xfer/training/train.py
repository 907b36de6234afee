"""One fine-tuning run, start to finish: `run(config, workdir)`.

The flow reads top to bottom, big_vision style, in three parts:
  - `setup` builds everything that can reject the config (numbers, data,
    model, the freeze plan, feature-cache cut) from shapes alone, in
    seconds; a sweep calls it for every run of its grid first.
  - `_compile` compiles the steps and refuses a run whose programs cannot fit
    in memory (`xfer.training.memory`); the first step reuses what it compiled.
  - Only then is the workdir locked (`xfer.training.workdir`: one writer at a time),
    claimed or recognised as this config's, the variables initialised
    (`xfer.weights.initialise`), the newest good checkpoint restored, and
    `_loop` trains, evaluates, checkpoints and reports.
So bad input never damages an existing run or leaves a claimed, empty one.

A step whose loss or gradients are not finite changes nothing (the step
guards its own update); `config.nan_policy` then stops the run with one line
naming the step, its last good checkpoint kept ("stop"), or skips the step
and counts it ("skip"). The host reads each step's flag one step late, so it
never waits for the device that runs ahead of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from xfer import data as data_lib, models
from xfer.learning import optim, partition
from xfer.learning import phases as phases_lib
from xfer.learning.loss import Loss
from xfer.learning.phases import Phase
from xfer.models import lora
from xfer.scaling import distributed, preemption
from xfer.training import checkpoint, evaluate, feature_cache, memory, validate
from xfer.training import mesh as mesh_lib
from xfer.training import step as step_lib
from xfer.training import workdir as workdir_lib
from xfer.training import wise_ft
from xfer.training.report import Chrono, Reporter
from xfer.weights.initialise import initial_variables

log = logging.getLogger("xfer")

EXAMPLE_IDS_FILE = "example_ids.json"  # {"train": [ids], "eval": [ids], "eval_role": "val" | "test"}


class NonFiniteLossError(ValueError):
    """Training diverged: a step's loss or gradients were not finite, under nan_policy 'stop'."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's config made concrete: what it trains, on what, and how; nothing loaded or compiled yet."""

    config: ml_collections.ConfigDict
    data: data_lib.Data
    model: object  # flax.linen.Module
    variable_shapes: dict  # jax.eval_shape of model.init at the data's resolution
    phases: tuple[Phase, ...]  # what trains when (xfer.learning.phases); one for a plain config.partition
    cuts: tuple[str | None, ...]  # each phase's feature-cache cut module, or None
    total_steps: int
    init: str  # config.init, or the preset's override ("scratch")
    loss: Loss  # what the step minimises: label smoothing, class weights, mixing (xfer.learning.loss)
    step_options: step_lib.StepOptions  # the step's run-level knobs (EMA, accumulation, compute dtype)

    @property
    def trainable_parameters(self) -> int:
        """The most any phase trains: what an ablation table compares."""
        return max(phase.plan.trainable_parameters for phase in self.phases)


class Steps(NamedTuple):
    """One phase's jitted programs, compiled once by `_compile`."""

    train: Callable  # xfer.training.step.make_train_step's
    eval: Callable
    features: Callable | None  # xfer.training.feature_cache.make_feature_step's, with a cut


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Checks and builds a run's parts from shapes alone; raises on anything no run could use."""
    validate.check(config)
    info = models.info(config.model.name)
    data = data_lib.build(config.data, info, config.batch_size, config.seed)
    if config.batch_size > data.num_train:
        log.warning("config.batch_size=%d is larger than the %d training examples: every batch repeats "
                    "examples; lower config.batch_size", config.batch_size, data.num_train)
    model = models.build(config.model.name, num_classes=data.num_classes, **_model_overrides(config))
    images = jax.ShapeDtypeStruct((1, data.image_size, data.image_size, 3), jnp.float32)
    if lora_settings := phases_lib.lora_settings(config.partition):  # adapters beside their kernels, in every phase
        model = lora.wrap(model, lora_settings, config.model.name, images)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(config.seed), images)
    total_steps = _total_steps(config, data.num_train)
    phases = phases_lib.build(config, config.model.name, shapes, total_steps)
    cuts = feature_cache.choose_cuts(config.feature_cache, data.augment, model, shapes, data.image_size,
                                     [phase.plan for phase in phases])
    init_overrides = {phase.plan.init_override for phase in phases}
    if len(init_overrides) > 1:
        raise ValueError(f"config.partition={config.partition!r} mixes 'scratch' with pretrained phases; a "
                         "schedule starts from one init: drop 'scratch' or set config.init='scratch'")
    return Setup(config, data, model, shapes, phases, cuts, total_steps,
                 init=init_overrides.pop() or config.init, loss=Loss.from_config(config, data),
                 step_options=step_lib.StepOptions.from_config(config))


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        on_eval: Callable[[int, dict], bool] | None = None) -> dict | None:
    """Trains (or resumes) the run `config` describes in `workdir`; returns the summary.

    On a preemption notice (`xfer.scaling.preemption`) it saves the step it reached and
    returns None; the same call then resumes from there.

    `on_eval(step, eval_metrics)` is called after each evaluation; True ends the run there, saved,
    with `stopped_at_step` in its summary: how a hyperparameter search prunes a trial whose
    intermediate accuracy is poor (`xfer.experiments.protocol`).
    """
    started = time.perf_counter()
    workdir = Path(workdir).expanduser().absolute()
    config_json = workdir_lib.config_as_json(config)
    workdir_lib.check(workdir, config_json)
    run_setup = setup(config)
    mesh = mesh_lib.data_mesh()
    steps = _compile(run_setup, mesh)

    is_writer = jax.process_index() == 0
    with workdir_lib.lock(workdir, is_writer, distributed.process_zero_agrees):
        resuming = workdir_lib.check(workdir, config_json)  # again, now that no other run can claim it
        if is_writer:
            workdir_lib.claim(workdir, config_json)
            _record_examples(workdir, run_setup.data)
        variables = initial_variables(run_setup.model, config.model.name, run_setup.init, run_setup.data.image_size,
                                      config.seed, config.head_zero_init)
        state = step_lib.create_state(variables, run_setup.phases[0].optimizer(), config.seed, run_setup.step_options)
        state = mesh_lib.replicate(state, mesh)
        del variables
        reporter = Reporter(workdir, run_setup.total_steps, config.batch_size, is_writer)
        with checkpoint.Checkpointer(workdir / "checkpoints", keep_latest=config.checkpoint.keep_latest,
                                     keep_best=config.checkpoint.keep_best) as ckpt:
            start, state, data_state, chrono = _restore(ckpt, state, run_setup, mesh, started,
                                                        resuming and is_writer, workdir)
            reporter.resume_from(start)  # an earlier attempt may have logged steps past its last checkpoint
            log.info("%s on %d %s device(s), %d process(es); %d steps of %d images%s",
                     config.model.name, jax.device_count(), jax.devices()[0].platform, jax.process_count(),
                     run_setup.total_steps, config.batch_size, "".join(
                         f"\n  {phase.describe()}" for phase in run_setup.phases if len(run_setup.phases) > 1))
            try:
                ended = _loop(run_setup, state, data_state, start, steps, ckpt, reporter, mesh, config_json, chrono,
                              workdir, on_eval)
            finally:
                reporter.close()
        if ended is None:
            return None
        state, eval_metrics, skipped, (eval_step, data), stopped_at = ended
        if not eval_metrics:  # resumed a finished run: evaluate what it ended with
            eval_metrics = run_eval(eval_step, state, data, reporter, run_setup.total_steps)
        summary = {"model": config.model.name, "init": run_setup.init, "steps": run_setup.total_steps,
                   "trainable_parameters": run_setup.trainable_parameters,
                   "optimizer_state_bytes": partition.optimizer_state_bytes(state.opt_state),
                   "skipped_steps": skipped,  # non-finite steps left out under nan_policy 'skip', this process's
                   **{k: v for k, v in eval_metrics.items() if k != "per_class"},
                   # every attempt's, up to its last checkpoint; seconds_per_step is None before 2 steps ran
                   **chrono.totals(state, stopped_at or run_setup.total_steps)}
        if stopped_at:
            summary["stopped_at_step"] = stopped_at
        if len(run_setup.phases) > 1:
            summary["phases"] = [{"setting": phases_lib.spelled(phase.setting),
                                  "first_step": phase.start + 1, "last_step": phase.end,
                                  "trainable_parameters": phase.plan.trainable_parameters}
                                 for phase in run_setup.phases]
        if config.wise_ft_alphas and not stopped_at:  # WiSE-FT from initial to final weights, again on a resume
            if len(set(run_setup.cuts)) > 1:  # a cut's prefix may have trained in another phase: use images
                eval_step, data = step_lib.make_eval_step(run_setup.model, mesh, options=run_setup.step_options), \
                    run_setup.data
            summary["wise_ft"] = wise_ft.curve(run_setup, eval_step, state, data, reporter)
        reporter.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("done: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return summary


def _record_examples(workdir: Path, data: data_lib.Data) -> None:
    """Which examples train and which evaluate (a protocol proves from them that no test example reached a
    search); rewritten only when they changed, so resuming an existing run leaves its files as they were."""
    path, text = workdir / EXAMPLE_IDS_FILE, json.dumps(data.example_ids()) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _restore(ckpt, state, run_setup: Setup, mesh, started: float, warn_if_empty: bool, workdir: Path):
    """(first step to train, state, data iterator state or None, chrono): the newest good checkpoint's,
    or step 0's. A checkpoint holds the optimizer state of the phase that trained its step."""
    if ckpt.latest_step() is None:
        if warn_if_empty:
            log.warning("workdir %s holds this run's config but no checkpoint (an earlier attempt stopped "
                        "before its first save): training from step 0", workdir)
        return 0, state, None, Chrono(started)

    def template(step: int):
        optimizer = phases_lib.phase_at(run_setup.phases, step).optimizer()
        return state.replace(opt_state=_placed(jax.eval_shape(optimizer.init, state.params), mesh))

    restored = ckpt.restore(template)
    log.info("resumed from step %d of %s", restored.step, workdir)
    return restored.step, restored.state, restored.data_state, Chrono(started, restored.chrono)


def _phase_data(run_setup: Setup, phase: Phase, phase_steps: Steps, state, mesh, workdir: Path):
    """What `phase` trains and evaluates on: images, or the features of its cut, computed now (its
    frozen prefix is what it will be all phase) or read from the workdir."""
    cut = run_setup.cuts[phase.number - 1]
    if not cut:
        return run_setup.data
    return feature_cache.cached_data(run_setup.data, phase_steps.features, cut, state, mesh, workdir,
                                     run_setup.config.feature_cache_dtype, phase.number)


def _enter(phase: Phase, state, mesh):
    """The state at `phase`'s start: the previous phase's, with this phase's optimizer state."""
    fresh = jax.jit(phase.optimizer().init, out_shardings=NamedSharding(mesh, P()))(state.params)
    return state.replace(opt_state=phases_lib.enter(phase, state.opt_state, fresh))


def _loop(run_setup: Setup, state, data_state, start: int, steps: tuple[Steps, ...], ckpt, reporter: Reporter,
          mesh, config_json: dict, chrono: Chrono, workdir: Path, on_eval):
    """Steps start+1..total_steps, phase by phase: (state, last eval metrics, skipped steps, the last
    (eval step, data), the step `on_eval` stopped at or None), or None when a preemption notice stopped
    it (after saving)."""
    config, total_steps, phases = run_setup.config, run_setup.total_steps, run_setup.phases
    eval_metrics = {}
    unchecked = None  # (step, finite flag) of the newest step whose flag the host has not read
    skipped = 0
    data = None

    def check_finite():
        nonlocal unchecked, skipped
        if unchecked is None:
            return
        step, finite = unchecked
        unchecked = None
        if bool(finite):
            return
        if config.nan_policy == "skip":
            skipped += 1
            log.warning("step %d: the loss or gradients are not finite; step skipped (nan_policy 'skip', "
                        "%d so far)", step, skipped)
            return
        ckpt.wait()
        last_good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"step {step}: the loss or gradients are not finite; stopped, "
            + (f"the last good checkpoint is step {last_good}" if last_good is not None else "nothing saved")
            + "; lower the learning rate (config.optim.*.lr) or set config.nan_policy='skip' to skip such steps")

    for phase, phase_steps in zip(phases, steps):
        if phase.end <= start and phase is not phases[-1]:
            continue  # trained before the checkpoint this attempt resumed from
        if phase.number > 1 and start <= phase.start:
            state = _enter(phase, state, mesh)
        try:
            with chrono.paused(state):
                phase_data = _phase_data(run_setup, phase, phase_steps, state, mesh, workdir)
        except preemption.Preempted:  # a SIGTERM or Ctrl-C during the pass: every process stops here
            log.info("preempted during the feature-cache pass; rerun to resume from the last checkpoint")
            return None
        if data is not None or data_state is not None:  # the same position in the same example order
            phase_data.train.set_state(data.train.get_state() if data is not None else data_state)
        data = phase_data
        if phase.end > start:
            kept = f"; optimizer state kept for {', '.join(sorted(phase.carried))}" if phase.carried else ""
            log.info("%s%s\n%s", phase.describe(), kept,
                     partition.table(state.params, phase.plan.labels, state.opt_state))
            if lr_table := phase.plan.lr_table():
                log.info("learning rate per block:\n%s", lr_table)
        schedules = phase.plan.schedules(phase.steps)
        for step in range(max(start, phase.start) + 1, phase.end + 1):
            batch = mesh_lib.global_batch(next(data.train), mesh)
            state, metrics = phase_steps.train(state, batch)
            ckpt.check()  # a background save that failed stops the run here, not at the next save
            check_finite()  # the previous step's flag: read while this step runs
            unchecked = (step, metrics.pop("finite"))
            if step == start + 1:
                jax.block_until_ready(metrics)
                reporter.start_timer(step)
                chrono.start(step)
            logged = step % config.log_every == 0 or step == total_steps
            evaluated = step % config.eval_every == 0 or step == total_steps
            preempted = preemption.reached(step) and step < total_steps  # every process, every step
            # A phase's end is saved: a resume then never retrains a phase it finished.
            saved = step % config.checkpoint.every == 0 or step == phase.end or preempted
            if logged or evaluated or saved:
                check_finite()  # nothing is reported or saved from a step that was not finite
            if logged:
                lrs = {f"lr/{g}": lr for g, lr in optim.learning_rates(schedules, step - 1 - phase.start).items()}
                skips = {"skipped_steps": skipped} if config.nan_policy == "skip" else {}
                reporter.train(step, {**jax.device_get(metrics), **lrs, **skips})
            stop = False
            if evaluated:
                with chrono.paused(state):
                    eval_metrics = run_eval(phase_steps.eval, state, data, reporter, step)
                stop = on_eval is not None and step < total_steps and bool(on_eval(step, eval_metrics))
                saved = saved or stop
            if saved:
                ranked = {k: v for k, v in eval_metrics.items() if isinstance(v, float)} if evaluated else None
                with chrono.paused(state):
                    ckpt.save(step, state, data.train.get_state(), config_json, ranked, chrono.saved(step))
            if preempted:
                ckpt.wait()  # the save is committed before the process may end
                log.info("preempted at step %d; saved", step)
                return None
            if stop:
                ckpt.wait()
                log.info("stopped at step %d of %d: its evaluation asked to stop (a pruned trial)", step, total_steps)
                return state, eval_metrics, skipped, (phase_steps.eval, data), step
    return state, eval_metrics, skipped, (steps[-1].eval, data), None


def _compile(run_setup: Setup, mesh) -> tuple[Steps, ...]:
    """Each phase's jitted steps, its train step (and feature pass) compiled for the run's shapes and
    checked against the memory this process has."""
    return tuple(_compile_phase(run_setup, phase, mesh) for phase in run_setup.phases)


def _compile_phase(run_setup: Setup, phase: Phase, mesh) -> Steps:
    config, data, model = run_setup.config, run_setup.data, run_setup.model
    cut = run_setup.cuts[phase.number - 1]
    tx = phase.optimizer()
    inputs = feature_cache.inputs(cut, data.image_size) if cut else step_lib.images
    train_step = step_lib.make_train_step(model, tx, phase.plan, mesh, config.bn_cross_device, inputs,
                                          run_setup.loss, run_setup.step_options)
    eval_step = step_lib.make_eval_step(model, mesh, inputs, run_setup.step_options)
    split = NamedSharding(mesh, P("data"))
    state = _placed(jax.eval_shape(lambda v: step_lib.create_state(v, tx, config.seed, run_setup.step_options),
                                   run_setup.variable_shapes), mesh)
    batch = config.batch_size
    images = jax.ShapeDtypeStruct((batch, data.image_size, data.image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    device_bytes, host_bytes, feature_step = {}, 0, None
    if cut:
        feature_step = feature_cache.make_feature_step(model, cut, mesh)
        pass_batch = _placed({"image": images, "label": labels, "index": labels,
                             "mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}, mesh, split)
        lowered = feature_step.lower(state.params, state.batch_stats, pass_batch)
        device_bytes["the feature pass"] = memory.program_bytes(lowered.compile())
        features = lowered.out_info[0]  # the cut's output: the shape of the cache's rows
        images = jax.ShapeDtypeStruct(features.shape, features.dtype)
    device_bytes["the train step"] = memory.program_bytes(
        train_step.lower(state, _placed({"image": images, "label": labels}, mesh, split)).compile())
    # Batches in grain's prefetch buffer (one per thread), the one being fed and the one on its way.
    local_images = math.prod(images.shape) // jax.process_count() * images.dtype.itemsize
    host_bytes += (config.data.num_threads + 2) * local_images
    memory.check(memory.Need(device_bytes, host_bytes),
                 f"lower config.batch_size (now {batch}) or config.data.image_size (now {data.image_size})")
    return Steps(train_step, eval_step, feature_step)


def _placed(tree, mesh, sharding=None):
    """Shapes of `tree` as `jax.ShapeDtypeStruct`s placed on `mesh` (replicated unless `sharding`)."""
    sharding = sharding or NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding,
                                                       weak_type=s.weak_type), tree)


def run_eval(eval_step, state, data, reporter: Reporter, step: int) -> dict:
    """One pass over the eval split; writes the confusion matrix and per-class metrics."""
    accumulator = evaluate.one_pass(eval_step, state, data)
    metrics = accumulator.metrics(list(data.class_names))
    reporter.write(step, metrics, "eval")
    reporter.write_file("confusion_matrix.csv", accumulator.confusion_csv(list(data.class_names)))
    reporter.write_file("eval_metrics.json", json.dumps({"step": step, **metrics}, indent=2) + "\n")
    log.info("eval step %d: %s", step, " ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def _model_overrides(config) -> dict:
    return {k: v for k, v in config.model.items() if k != "name"}


def _total_steps(config, num_train: int) -> int:
    """config.total_steps, else num_epochs in steps (validate.check made sure one is positive)."""
    if config.total_steps > 0:
        return config.total_steps
    return math.ceil(config.num_epochs * num_train / config.batch_size)
