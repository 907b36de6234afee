"""One fine-tuning run, start to finish: `run(config, workdir)`.

The flow reads top to bottom, big_vision style: everything that can reject
the config (data, model, weights, partition rules, optimizer specs) runs
before the workdir is touched, so bad input never damages an existing run.
Then the workdir is claimed (or recognised as this config's, to resume), the
newest good checkpoint restored, and the loop trains, evaluates, checkpoints
and reports.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from xfer import checkpoint, data as data_lib, evaluate, feature_cache, models, norms, optim, partition, preemption
from xfer import presets
from xfer import step as step_lib
from xfer import weights
from xfer.report import Reporter, StepClock

log = logging.getLogger("xfer")

CONFIG_FILE = "config.json"


class WorkdirError(ValueError):
    """The workdir holds something this run must not overwrite."""


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains (or resumes) the run `config` describes in `workdir`; returns the summary.

    On a preemption notice (`xfer.preemption`) it saves the step it reached and
    returns None; the same call then resumes from there.
    """
    started = time.perf_counter()
    workdir = Path(workdir).expanduser().absolute()
    config_json = config_as_json(config)
    check_workdir(workdir, config_json)

    info = models.info(config.model.name)
    data = data_lib.build(config.data, info, config.batch_size, config.seed)
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
    tx = optim.build(optim_config, labels, total_steps)
    schedules = optim.schedules(optim_config, total_steps)
    init = init_override or config.init
    variables = init_variables(model, config.model.name, init, data.image_size, config.seed,
                               config.head_zero_init)

    mesh = step_lib.data_mesh()
    state = step_lib.replicate(step_lib.create_state(variables, tx, config.seed), mesh)
    del variables
    train_step = step_lib.make_train_step(model, tx, labels, mesh, running_stats_layers, config.bn_cross_device,
                                          cut, data.image_size)
    eval_step = step_lib.make_eval_step(model, mesh, cut, data.image_size)

    is_writer = jax.process_index() == 0
    _claim_workdir(workdir, config_json, is_writer)
    reporter = Reporter(workdir, total_steps, config.batch_size, is_writer)
    if cut:
        data = _with_cached_features(data, model, cut, state, mesh, workdir)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep_latest=config.checkpoint.keep_latest,
                                   keep_best=config.checkpoint.keep_best)
    start = 0
    if ckpt.latest_step() is not None:
        start, state, data_state = ckpt.restore(state)
        data.train.set_state(data_state)
        log.info("resumed from step %d of %s", start, workdir)
    reporter.resume_from(start)  # an earlier attempt may have logged steps past its last checkpoint
    log.info("%s on %d %s device(s), %d process(es); %d steps of %d images\n%s",
             config.model.name, jax.device_count(), jax.devices()[0].platform, jax.process_count(),
             total_steps, config.batch_size, partition.table(state.params, labels, state.opt_state))

    eval_metrics, clock = {}, StepClock()
    for step in range(start + 1, total_steps + 1):
        batch = step_lib.global_batch(next(data.train), mesh)
        state, metrics = train_step(state, batch)
        if step == start + 1:
            jax.block_until_ready(metrics)
            reporter.start_timer(step)
            clock.start(step)
        if step % config.log_every == 0 or step == total_steps:
            lrs = {f"lr/{g}": lr for g, lr in optim.learning_rates(schedules, step - 1).items()}
            reporter.train(step, {**jax.device_get(metrics), **lrs})
        evaluated = step % config.eval_every == 0 or step == total_steps
        if evaluated:
            with clock.paused(state):
                eval_metrics = run_eval(eval_step, state, data, reporter, step)
        preempted = preemption.reached(step) and step < total_steps  # every process, every step
        if step % config.checkpoint.every == 0 or step == total_steps or preempted:
            ranked = {k: v for k, v in eval_metrics.items() if isinstance(v, float)} if evaluated else None
            with clock.paused(state):
                ckpt.save(step, state, data.train.get_state(), config_json, ranked)
        if preempted:
            ckpt.close()  # waits until the save is committed
            reporter.close()
            log.info("preempted at step %d; saved", step)
            return None
    seconds_per_step = clock.seconds_per_step(state, total_steps)
    ckpt.close()

    if not eval_metrics:  # resumed a finished run: evaluate what it ended with
        eval_metrics = run_eval(eval_step, state, data, reporter, total_steps)
    summary = {"model": config.model.name, "init": init, "steps": total_steps,
               "trainable_parameters": partition.count_trainable(state.params, labels),
               "optimizer_state_bytes": partition.optimizer_state_bytes(state.opt_state),
               "seconds_per_step": seconds_per_step,  # this process's steps; None if it ran fewer than 2
               **{k: v for k, v in eval_metrics.items() if k != "per_class"},
               "wall_seconds": time.perf_counter() - started}  # this process's, start-up included
    reporter.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
    reporter.close()
    log.info("done: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return summary


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


def _with_cached_features(data, model, cut: str, state, mesh, workdir: Path):
    """`data` over the cut's features of each split, computed once (or read from the workdir)."""
    feature_step = feature_cache.make_feature_step(model, cut, mesh)

    def split_features(split: str, batches, count: int):
        return feature_cache.cached_features(
            workdir, {"split": split, "cut": cut},
            lambda: feature_cache.compute(feature_step, state.params, state.batch_stats, batches(), count, mesh))

    return data.with_features(split_features("train", data.train_pass, data.num_train),
                              split_features("eval", data.eval_batches, data.num_eval))


def _model_overrides(config) -> dict:
    return {k: v for k, v in config.model.items() if k != "name"}


def _total_steps(config, num_train: int) -> int:
    if config.total_steps > 0:
        return config.total_steps
    if config.num_epochs <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number")
    return math.ceil(config.num_epochs * num_train / config.batch_size)


def config_as_json(config) -> dict:
    """The config as plain JSON data: what is saved, and compared on resume.

    A `sweep` field (the grid of an ablation config, xfer.sweep) is left out: it
    says which runs exist, not what this run is, so a run launched alone and the
    same run inside a sweep share their workdir.
    """
    return {k: v for k, v in json.loads(config.to_json_best_effort(sort_keys=True)).items() if k != "sweep"}


def check_workdir(workdir: Path, config_json: dict) -> None:
    """Refuses a workdir that holds another run; called before any work or write."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is a file; pass a directory path")
    saved_file = workdir / CONFIG_FILE
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        changed = sorted(_diff_keys(saved, config_json))
        if changed:
            raise WorkdirError(
                f"workdir {workdir} holds a run of a different config (differs in: {', '.join(changed)}); "
                "pass a new --workdir, or the same config to resume that run")
    elif workdir.is_dir() and any(workdir.iterdir()):
        raise WorkdirError(f"workdir {workdir} is not empty and holds no xfer run ({CONFIG_FILE} missing); "
                           "pass a new or empty --workdir")


def _diff_keys(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in set(a) | set(b)
                for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


def _claim_workdir(workdir: Path, config_json: dict, is_writer: bool) -> None:
    if not is_writer or (workdir / CONFIG_FILE).exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, workdir / CONFIG_FILE)
