"""One fine-tuning run, start to finish: `run(config, workdir)`.

The flow reads top to bottom, big_vision style, in three parts:
  - `setup` builds everything that can reject the config (numbers, data,
    model, partition rules, optimizer specs, feature-cache cut) from shapes
    alone, in seconds; a sweep calls it for every run of its grid first.
  - `_compile` compiles the steps and refuses a run whose programs cannot fit
    in memory (`xfer.training.memory`); the first step reuses what it compiled.
  - Only then is the workdir locked (`xfer.training.workdir`: one writer at a time),
    claimed or recognised as this config's, the newest good checkpoint
    restored, and `_loop` trains, evaluates, checkpoints and reports.
So bad input never damages an existing run or leaves a claimed, empty one.

A step whose loss or gradients are not finite changes nothing (the step
guards its own update); `config.nan_policy` then stops the run with one line
naming the step, its last good checkpoint kept ("stop"), or skips the step
and counts it ("skip"). The host reads each step's flag one step late, so it
never waits for the device that runs ahead of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from xfer.training import checkpoint, evaluate, feature_cache, memory

from xfer import data as data_lib, models

from xfer.scaling import distributed

from xfer.learning import norms, optim
from xfer.learning import partition, presets
from xfer.scaling import preemption
from xfer.training import validate
from xfer.training import step as step_lib
from xfer import weights
from xfer.training import workdir as workdir_lib
from xfer.training.report import Reporter, StepClock

log = logging.getLogger("xfer")


class NonFiniteLossError(ValueError):
    """Training diverged: a step's loss or gradients were not finite, under nan_policy 'stop'."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's config made concrete: what it trains, on what, and how; nothing loaded or compiled yet."""

    config: ml_collections.ConfigDict
    data: data_lib.Data
    model: object  # flax.linen.Module
    variable_shapes: dict  # jax.eval_shape of model.init at the data's resolution
    labels: dict  # group per parameter
    running_stats_layers: frozenset[str]
    cut: str | None  # the feature-cache cut module, or None
    total_steps: int
    tx: optax.GradientTransformation
    schedules: dict  # group -> learning-rate schedule, for logging
    init: str  # config.init, or the preset's override ("scratch")


class Steps(NamedTuple):
    """A run's jitted programs, compiled once by `_compile`."""

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
    # Partition rules and optimizer specs are checked on the parameters' shapes (no compile),
    # so a typo in a regex fails in seconds, before any weights are initialised or loaded.
    images = jax.ShapeDtypeStruct((1, data.image_size, data.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(config.seed), images)
    labels, running_stats_layers, init_override = freeze_plan(config.partition, config.bn_policy,
                                                              config.model.name, shapes)
    cut = _feature_cache_cut(config, model, shapes, data, labels, running_stats_layers)
    total_steps = _total_steps(config, data.num_train)
    optim_config = presets.optim_specs(config.optim, config.partition, labels)
    return Setup(config, data, model, shapes, labels, running_stats_layers, cut, total_steps,
                 tx=optim.build(optim_config, labels, total_steps),
                 schedules=optim.schedules(optim_config, total_steps), init=init_override or config.init)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains (or resumes) the run `config` describes in `workdir`; returns the summary.

    On a preemption notice (`xfer.scaling.preemption`) it saves the step it reached and
    returns None; the same call then resumes from there.
    """
    started = time.perf_counter()
    workdir = Path(workdir).expanduser().absolute()
    config_json = workdir_lib.config_as_json(config)
    workdir_lib.check(workdir, config_json)
    plan = setup(config)
    mesh = step_lib.data_mesh()
    steps = _compile(plan, mesh)

    is_writer = jax.process_index() == 0
    with workdir_lib.lock(workdir, is_writer, distributed.process_zero_agrees):
        resuming = workdir_lib.check(workdir, config_json)  # again, now that no other run can claim it
        if is_writer:
            workdir_lib.claim(workdir, config_json)
        variables = init_variables(plan.model, config.model.name, plan.init, plan.data.image_size, config.seed,
                                   config.head_zero_init)
        state = step_lib.replicate(step_lib.create_state(variables, plan.tx, config.seed), mesh)
        del variables
        data = plan.data
        if plan.cut:
            try:
                data = _with_cached_features(data, steps.features, plan.cut, state, mesh, workdir)
            except preemption.Preempted:  # a SIGTERM or Ctrl-C during the pass: every process stops here
                log.info("preempted during the feature-cache pass; nothing to save, rerun to resume")
                return None
        reporter = Reporter(workdir, plan.total_steps, config.batch_size, is_writer)
        with checkpoint.Checkpointer(workdir / "checkpoints", keep_latest=config.checkpoint.keep_latest,
                                     keep_best=config.checkpoint.keep_best) as ckpt:
            start = 0
            if ckpt.latest_step() is not None:
                start, state, data_state = ckpt.restore(state)
                data.train.set_state(data_state)
                log.info("resumed from step %d of %s", start, workdir)
            elif resuming and is_writer:
                log.warning("workdir %s holds this run's config but no checkpoint (an earlier attempt stopped "
                            "before its first save): training from step 0", workdir)
            reporter.resume_from(start)  # an earlier attempt may have logged steps past its last checkpoint
            log.info("%s on %d %s device(s), %d process(es); %d steps of %d images\n%s",
                     config.model.name, jax.device_count(), jax.devices()[0].platform, jax.process_count(),
                     plan.total_steps, config.batch_size,
                     partition.table(state.params, plan.labels, state.opt_state))
            try:
                ended = _loop(plan, state, data, start, steps, ckpt, reporter, mesh, config_json)
            finally:
                reporter.close()
        if ended is None:
            return None
        state, eval_metrics, seconds_per_step, skipped = ended
        if not eval_metrics:  # resumed a finished run: evaluate what it ended with
            eval_metrics = run_eval(steps.eval, state, data, reporter, plan.total_steps)
        summary = {"model": config.model.name, "init": plan.init, "steps": plan.total_steps,
                   "trainable_parameters": partition.count_trainable(state.params, plan.labels),
                   "optimizer_state_bytes": partition.optimizer_state_bytes(state.opt_state),
                   "seconds_per_step": seconds_per_step,  # this process's steps; None if it ran fewer than 2
                   "skipped_steps": skipped,  # non-finite steps left out under nan_policy 'skip', this process's
                   **{k: v for k, v in eval_metrics.items() if k != "per_class"},
                   "wall_seconds": time.perf_counter() - started}  # this process's, start-up included
        reporter.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("done: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return summary


def _loop(plan: Setup, state, data, start: int, steps: Steps, ckpt, reporter: Reporter, mesh, config_json: dict):
    """Steps start+1..total_steps: (state, last eval metrics, seconds per step, skipped steps), or None
    when a preemption notice stopped it after saving."""
    config, total_steps = plan.config, plan.total_steps
    eval_metrics, clock = {}, StepClock()
    unchecked = None  # (step, finite flag) of the newest step whose flag the host has not read
    skipped = 0

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

    for step in range(start + 1, total_steps + 1):
        batch = step_lib.global_batch(next(data.train), mesh)
        state, metrics = steps.train(state, batch)
        ckpt.check()  # a background save that failed stops the run here, not at the next save
        check_finite()  # the previous step's flag: read while this step runs
        unchecked = (step, metrics.pop("finite"))
        if step == start + 1:
            jax.block_until_ready(metrics)
            reporter.start_timer(step)
            clock.start(step)
        logged = step % config.log_every == 0 or step == total_steps
        evaluated = step % config.eval_every == 0 or step == total_steps
        preempted = preemption.reached(step) and step < total_steps  # every process, every step
        saved = step % config.checkpoint.every == 0 or step == total_steps or preempted
        if logged or evaluated or saved:
            check_finite()  # nothing is reported or saved from a step that was not finite
        if logged:
            lrs = {f"lr/{g}": lr for g, lr in optim.learning_rates(plan.schedules, step - 1).items()}
            skips = {"skipped_steps": skipped} if config.nan_policy == "skip" else {}
            reporter.train(step, {**jax.device_get(metrics), **lrs, **skips})
        if evaluated:
            with clock.paused(state):
                eval_metrics = run_eval(steps.eval, state, data, reporter, step)
        if saved:
            ranked = {k: v for k, v in eval_metrics.items() if isinstance(v, float)} if evaluated else None
            with clock.paused(state):
                ckpt.save(step, state, data.train.get_state(), config_json, ranked)
        if preempted:
            ckpt.wait()  # the save is committed before the process may end
            log.info("preempted at step %d; saved", step)
            return None
    seconds_per_step = clock.seconds_per_step(state, total_steps)
    return state, eval_metrics, seconds_per_step, skipped


def _compile(plan: Setup, mesh) -> Steps:
    """The run's jitted steps, the train step (and the feature pass) compiled for the run's shapes and
    checked against the memory this process has."""
    config, data = plan.config, plan.data
    train_step = step_lib.make_train_step(plan.model, plan.tx, plan.labels, mesh, plan.running_stats_layers,
                                          config.bn_cross_device, plan.cut, data.image_size)
    eval_step = step_lib.make_eval_step(plan.model, mesh, plan.cut, data.image_size)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def placed(tree, sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding,
                                                           weak_type=s.weak_type), tree)

    state = placed(jax.eval_shape(lambda v: step_lib.create_state(v, plan.tx, config.seed), plan.variable_shapes),
                   replicated)
    batch = config.batch_size
    images = jax.ShapeDtypeStruct((batch, data.image_size, data.image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    device_bytes, host_bytes, feature_step = {}, 0, None
    if plan.cut:
        feature_step = feature_cache.make_feature_step(plan.model, plan.cut, mesh)
        pass_batch = placed({"image": images, "label": labels, "index": labels,
                             "mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}, split)
        lowered = feature_step.lower(state.params, state.batch_stats, pass_batch)
        device_bytes["the feature pass"] = memory.program_bytes(lowered.compile())
        features = lowered.out_info[0]  # the cut's output: the shape of the cache's rows
        row_bytes = math.prod(features.shape[1:]) * features.dtype.itemsize
        host_bytes += (data.num_train + data.num_eval) * row_bytes  # the cache, held in host memory
        images = jax.ShapeDtypeStruct(features.shape, features.dtype)
    device_bytes["the train step"] = memory.program_bytes(
        train_step.lower(state, placed({"image": images, "label": labels}, split)).compile())
    # Batches in grain's prefetch buffer (one per thread), the one being fed and the one on its way.
    local_images = math.prod(images.shape) // jax.process_count() * images.dtype.itemsize
    host_bytes += (config.data.num_threads + 2) * local_images
    memory.check(memory.Need(device_bytes, host_bytes),
                 f"lower config.batch_size (now {batch}) or config.data.image_size (now {data.image_size})")
    return Steps(train_step, eval_step, feature_step)


def freeze_plan(setting, bn_policy, model_name: str, variables) -> tuple[dict, frozenset[str], str | None]:
    """(group label per parameter, BatchNorm layers on running statistics, init override or None)
    for `config.partition` (a preset or rules) and `config.bn_policy`.

    `variables` may be shapes (`jax.eval_shape` of init): this is what a run trains and how it
    normalises, decided before any weight exists; the benchmarks build their steps through it too.
    """
    rules, init_override = presets.resolve(setting, model_name, variables["params"])
    labels = partition.labels(variables["params"], rules)
    bn_policies = norms.policies(variables.get("batch_stats", {}), presets.bn_rules(setting, bn_policy), labels)
    return norms.freeze_affine(labels, bn_policies), norms.running_statistics_layers(bn_policies), init_override


def init_variables(model, model_name: str, init: str, image_size: int, seed: int,
                   head_zero_init: bool) -> dict:
    """Fresh variables at the data's resolution, then `init` ported in.

    `init`: "scratch" (random, torch-style initialisation), "imagenet", a
    torchvision file name or checkpoint path (see `xfer.weights`), or
    "run:<workdir>" for another xfer run's latest parameters. A head whose
    class count differs is freshly initialised; with `head_zero_init` to
    zeros (big_vision's transfer default): the first steps then start from
    uniform predictions instead of large random logits, which a small
    head's default init (e.g. Lite0's U(+-1/sqrt(classes))) produces.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init_fn = functools.partial(model.init, jax.random.PRNGKey(seed), images)
    if init == "scratch":
        log.info("init: scratch (random initialisation, nothing loaded)")
        return jax.jit(init_fn)()
    shapes = jax.eval_shape(init_fn)  # porting needs shapes; only a new head needs values
    if init.startswith("run:"):
        run_dir = Path(init[len("run:"):]).expanduser()
        source = {f"{collection}/{path}": value
                  for collection, tree in checkpoint.read_variables(run_dir / "checkpoints").items()
                  for path, value in traverse_util.flatten_dict(tree, sep="/").items()}
        ported, report = weights.port_same_names(source, model_name, shapes)
    else:
        ported, report = weights.load(init, model_name, shapes)
    log.info("init: %s -> %d tensors ported%s", init, len(report.rows),
             f", new head {', '.join(report.new_head)}" if report.new_head else "")
    if head_zero_init:
        flat = traverse_util.flatten_dict(ported, sep="/")
        return traverse_util.unflatten_dict(
            {path: jnp.zeros(v.shape, v.dtype) if path in report.new_head else v for path, v in flat.items()},
            sep="/")
    return weights.initialise_new(init_fn, ported, report.new_head)


def run_eval(eval_step, state, data, reporter: Reporter, step: int) -> dict:
    """One pass over the eval split; writes the confusion matrix and per-class metrics."""
    mesh = step_lib.data_mesh()
    accumulator = evaluate.Accumulator(data.num_classes)
    for batch in data.eval_batches():
        accumulator.add(jax.device_get(eval_step(state, step_lib.global_batch(batch, mesh))))
    metrics = accumulator.metrics(list(data.class_names))
    reporter.write(step, metrics, "eval")
    reporter.write_file("confusion_matrix.csv", accumulator.confusion_csv(list(data.class_names)))
    reporter.write_file("eval_metrics.json", json.dumps({"step": step, **metrics}, indent=2) + "\n")
    log.info("eval step %d: %s", step, " ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def _feature_cache_cut(config, model, shapes, data, labels, running_stats_layers) -> str | None:
    """The module whose output is cached (`config.feature_cache`), checked before any work."""
    if not config.feature_cache:
        return None
    if data.augment != "none":
        raise feature_cache.FeatureCacheError(
            f"feature_cache={config.feature_cache!r} needs un-augmented training images, but "
            f"config.data.augment={data.augment!r}; set config.data.augment='none' or feature_cache=''")
    cut = feature_cache.check_cut(config.feature_cache, model, shapes, data.image_size, labels,
                                  running_stats_layers)
    log.info("feature cache: training from the cached output of %s", cut)
    return cut


def _with_cached_features(data, feature_step, cut: str, state, mesh, workdir: Path):
    """`data` over the cut's features of each split, computed once (or read from the workdir)."""
    def split_features(split: str, batches, count: int):
        return feature_cache.cached_features(
            workdir, {"split": split, "cut": cut},
            lambda: feature_cache.compute(feature_step, state.params, state.batch_stats, batches(), count, mesh))

    return data.with_features(split_features("train", data.train_pass, data.num_train),
                              split_features("eval", data.eval_batches, data.num_eval))


def _model_overrides(config) -> dict:
    return {k: v for k, v in config.model.items() if k != "name"}


def _total_steps(config, num_train: int) -> int:
    """config.total_steps, else num_epochs in steps (validate.check made sure one is positive)."""
    if config.total_steps > 0:
        return config.total_steps
    return math.ceil(config.num_epochs * num_train / config.batch_size)
