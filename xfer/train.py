"""One fine-tuning run, start to finish: `run(config, workdir)`.

The flow reads top to bottom, big_vision style: everything that can reject
the config (data, model, weights, partition rules, optimizer specs) runs
before the workdir is touched, so bad input never damages an existing run.
Then the workdir is claimed (or recognised as this config's, to resume), the
newest good checkpoint restored, and the loop trains, evaluates, checkpoints
and reports.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from xfer import checkpoint, data as data_lib, evaluate, models, norms, optim, partition, step as step_lib
from xfer import weights
from xfer.report import Reporter

log = logging.getLogger("xfer")

CONFIG_FILE = "config.json"


class WorkdirError(ValueError):
    """The workdir holds something this run must not overwrite."""


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the run `config` describes in `workdir`; returns the summary."""
    workdir = Path(workdir).expanduser().absolute()
    config_json = _config_json(config)
    _check_workdir(workdir, config_json)

    info = models.info(config.model.name)
    data = data_lib.build(config.data, info, config.batch_size, config.seed)
    model = models.build(config.model.name, num_classes=data.num_classes, **_model_overrides(config))
    # Partition rules and optimizer specs are checked on the parameters' shapes (no compile),
    # so a typo in a regex fails in seconds, before any weights are initialised or loaded.
    images = jax.ShapeDtypeStruct((1, data.image_size, data.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(config.seed), images)
    labels = partition.labels(shapes["params"], config.partition)
    bn_policies = norms.policies(shapes.get("batch_stats", {}), config.bn_policy, labels)
    labels = norms.freeze_affine(labels, bn_policies)
    total_steps = _total_steps(config, data.num_train)
    tx = optim.build(config.optim, labels, total_steps)
    schedules = optim.schedules(config.optim, total_steps)
    variables = init_variables(model, config.model.name, config.init, data.image_size, config.seed,
                               config.head_zero_init)

    mesh = step_lib.data_mesh()
    state = step_lib.replicate(step_lib.create_state(variables, tx, config.seed), mesh)
    del variables
    train_step = step_lib.make_train_step(model, tx, labels, mesh, norms.running_statistics_layers(bn_policies),
                                          config.bn_cross_device)
    eval_step = step_lib.make_eval_step(model, mesh)

    is_writer = jax.process_index() == 0
    _claim_workdir(workdir, config_json, is_writer)
    reporter = Reporter(workdir, total_steps, config.batch_size, is_writer)
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

    eval_metrics = {}
    for step in range(start + 1, total_steps + 1):
        batch = step_lib.global_batch(next(data.train), mesh)
        state, metrics = train_step(state, batch)
        if step == start + 1:
            jax.block_until_ready(metrics)
            reporter.start_timer(step)
        if step % config.log_every == 0 or step == total_steps:
            lrs = {f"lr/{g}": lr for g, lr in optim.learning_rates(schedules, step - 1).items()}
            reporter.train(step, {**jax.device_get(metrics), **lrs})
        evaluated = step % config.eval_every == 0 or step == total_steps
        if evaluated:
            eval_metrics = run_eval(eval_step, state, data, reporter, step)
        if step % config.checkpoint.every == 0 or step == total_steps:
            ranked = {k: v for k, v in eval_metrics.items() if isinstance(v, float)} if evaluated else None
            ckpt.save(step, state, data.train.get_state(), config_json, ranked)
    ckpt.close()

    if not eval_metrics:  # resumed a finished run: evaluate what it ended with
        eval_metrics = run_eval(eval_step, state, data, reporter, total_steps)
    summary = {"model": config.model.name, "init": config.init, "steps": total_steps,
               "trainable_parameters": partition.count_trainable(state.params, labels),
               **{k: v for k, v in eval_metrics.items() if k != "per_class"}}
    reporter.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
    reporter.close()
    log.info("done: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return summary


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
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
    if init == "scratch":
        log.info("init: scratch (random initialisation, nothing loaded)")
        return variables
    if init.startswith("run:"):
        run_dir = Path(init[len("run:"):]).expanduser()
        source = {f"{collection}/{path}": value
                  for collection, tree in checkpoint.read_variables(run_dir / "checkpoints").items()
                  for path, value in traverse_util.flatten_dict(tree, sep="/").items()}
        ported, report = weights.port_same_names(source, model_name, variables)
    else:
        ported, report = weights.load(init, model_name, variables)
    log.info("init: %s -> %d tensors ported%s", init, len(report.rows),
             f", new head {', '.join(report.new_head)}" if report.new_head else "")
    if head_zero_init and report.new_head:
        flat = traverse_util.flatten_dict(ported, sep="/")
        ported = traverse_util.unflatten_dict(
            {path: jnp.zeros_like(v) if path in report.new_head else v for path, v in flat.items()}, sep="/")
    return ported


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


def _model_overrides(config) -> dict:
    return {k: v for k, v in config.model.items() if k != "name"}


def _total_steps(config, num_train: int) -> int:
    if config.total_steps > 0:
        return config.total_steps
    if config.num_epochs <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number")
    return math.ceil(config.num_epochs * num_train / config.batch_size)


def _config_json(config) -> dict:
    """The config as plain JSON data: what is saved, and compared on resume."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_workdir(workdir: Path, config_json: dict) -> None:
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
