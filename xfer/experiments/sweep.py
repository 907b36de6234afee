"""The ablation command line, and its plain form: every combination of a config's `sweep` values.

    python -m xfer.experiments.sweep --config=configs/ablate_freeze.py --workdir=/tmp/xfer-ablate

A config with `config.search` runs the protocol of `xfer.experiments.protocol` (arms tuned on a
validation split, final seeds on test, confidence intervals); one with only `config.sweep` runs the
grid described here, a quick look that reports on the split it runs on. Either way runs go through
`--executor` (`xfer.experiments.dispatch`: inline, submitit's local processes, SLURM jobs) and
`--arms` restricts the arms.

`config.sweep` holds the values to try per config field, nested as the config is:

    config.sweep = ml_collections.ConfigDict({
        "partition": ("linear_probe", "last_k:2", "full"),
        "seed": (0, 1),
        "optim": {"head": {"lr": (1e-3, 1e-2)}},      # the field optim.head.lr
    })

Methods that differ in several fields at once (LP-FT is a partition schedule and a learning
rate; layer decay a preset and a group field) are *arms*: `config.arms` names each one's
field values, nested as the config is, and `config.sweep.arm` lists the arms to run, crossed
with the other swept fields like any value:

    config.arms = ml_collections.ConfigDict({
        "full": {"partition": "full"},
        "layer_decay": {"partition": "full", "optim": {"backbone": {"layer_decay": 0.7}}},
    })
    config.sweep = ml_collections.ConfigDict({"arm": ("full", "layer_decay"), "seed": (0, 1)})

Each combination is one run, in a workdir under --workdir (default
`runs/sweeps/<config name>[,<config argument>]`) named by its values
(`partition=last_k-2,seed=1`), fields in sorted order, the last varying fastest.
Runs share compiled programs through JAX's persistent cache (`jax_cache/` there, unless
JAX_COMPILATION_CACHE_DIR names another), so runs that differ only in seed
compile once. A run whose summary.json exists is skipped and an interrupted one
resumes (train.run does that by itself), so after a kill the same command
finishes only what is missing. Then `xfer.experiments.ablation` writes results.csv,
results.md and results.png.

Before anything runs or any directory is made, the whole grid is checked: each
field exists, each value has the field's type, every run's setup builds
(`xfer.training.train.setup`: its numbers, data, model, partition and optimizer over its
own step count), and a run's workdir that exists holds that run's config.

`--print_commands` prints one launch.py command per run instead (for a
cluster or a pod); those runs land in the same workdirs, so this command,
rerun without the flag, then only collects the table.
"""

from __future__ import annotations

import itertools
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from xfer import cli
from xfer.experiments import dispatch

log = logging.getLogger("xfer")

SUMMARY_FILE = "summary.json"


class SweepError(ValueError):
    """A grid that names a field the config lacks, or a value the field cannot hold."""


ARM = "arm"  # config.sweep.arm: names of config.arms entries
# The grid's own fields, no run's config field (xfer.training.workdir leaves them out of config.json).
_GRID_FIELDS = ("sweep", "arms", "search", "final")


class Run(NamedTuple):
    name: str  # its workdir under the sweep's, e.g. "partition=last_k-2,seed=1"
    values: dict[str, Any]  # {dotted config field, or "arm": value} for every swept field
    config: ml_collections.ConfigDict  # the sweep's config with those values set
    settings: dict[str, Any]  # {dotted config field: value} the run sets: `values` with its arm's fields


def grid(config: ml_collections.ConfigDict, only_arms: Sequence[str] | None = None) -> list[Run]:
    """Every combination of `config.sweep`'s values (of its arms, only `only_arms` when given), checked:
    raises SweepError before anything runs."""
    if "sweep" not in config:
        raise SweepError("the config has no `sweep` field; add config.sweep = {field: (values, ...)}, "
                         "or config.search for the protocol (xfer.experiments.protocol, configs/ablate_freeze.py)")
    fields = _fields(config.sweep, "")
    if not fields:
        raise SweepError("config.sweep is empty; give it at least one field and its values")
    if only_arms:
        fields = _only_arms(fields, only_arms)
    arms = _arms(config, fields)
    runs = []
    for combination in itertools.product(*(values for _, values in fields)):
        values = {path: value for (path, _), value in zip(fields, combination)}
        arm, swept = values.get(ARM), {path: v for path, v in values.items() if path != ARM}
        run_config = with_values(with_values(config, arms.get(arm, {}), f"config.arms.{arm}"), swept)
        runs.append(Run(run_name(values), values, run_config, {**arms.get(arm, {}), **swept}))
    names = [run.name for run in runs]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash:
        raise SweepError(f"two runs of the grid get the workdir name {clash!r}; make the swept values "
                         "differ in letters or digits, not only in punctuation")
    return runs


def run_name(values: dict[str, Any]) -> str:
    """`partition=last_k-2,seed=1`: the values, with anything but [A-Za-z0-9._=+-] as '-'."""
    return ",".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{path}={_text(value)}") for path, value in values.items())


def check(runs: Sequence[Run], sweep_dir: Path) -> None:
    """What would fail later, now: every run's whole setup (numbers, data, model, partition, optimizer
    over its own step count), and workdirs that hold another config."""
    from xfer.training import train, workdir  # JAX: imported when a grid is checked, not for --help

    for run in runs:
        try:
            workdir.check(sweep_dir / run.name, workdir.config_as_json(run.config))
            train.setup(run.config)
        except ValueError as error:
            raise SweepError(f"run {run.name}: {error}") from None


def run_all(runs: Sequence[Run], sweep_dir: Path, executor: dispatch.Executor) -> bool:
    """Trains the runs that have not finished (no summary.json) through `executor`.

    False when a preemption notice stopped a run (`xfer.scaling.preemption`): it saved
    where it was, and the same command resumes it.
    """
    missing = [run for run in runs if not (sweep_dir / run.name / SUMMARY_FILE).exists()]
    if len(missing) < len(runs):
        log.info("sweep: %d of %d runs finished before, skipped", len(runs) - len(missing), len(runs))
    tasks = [dispatch.Task(f"sweep run {run.name}", dispatch.train_run, (run.config, str(sweep_dir / run.name)))
             for run in missing]
    if not executor.run(tasks):
        log.info("sweep stopped by a preemption notice; rerun the same command to resume")
        return False
    return True


def commands(runs: Sequence[Run], sweep_dir: Path, config_arg: str, overrides: Sequence[str]) -> list[str]:
    """One launch.py command per run: the sweep's config and overrides, then the run's values.

    Overrides of swept fields and of `sweep` itself are dropped, since each
    command sets its own values and the grid is no part of a run's config.
    """
    swept = {path for run in runs for path in run.settings} | set(_GRID_FIELDS)
    kept = [arg for arg in overrides if not any(
        _override_path(arg) == path or _override_path(arg).startswith(f"{path}.") for path in swept)]
    return [shlex.join(["python", "launch.py", f"--config={config_arg}", *kept,
                        *(f"--config.{path}={_text(value)}" for path, value in run.settings.items()),
                        f"--workdir={sweep_dir / run.name}"]) for run in runs]


def _fields(node: ml_collections.ConfigDict, prefix: str, singles: bool = False) -> list[tuple[str, Any]]:
    """[(dotted field, values)] of a nested `sweep`, in the ConfigDict's (sorted) key order; with
    `singles`, [(dotted field, value)] of an arm."""
    fields = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            fields += _fields(value, f"{path}.", singles)
        elif singles:
            fields.append((path, value))
        elif isinstance(value, (tuple, list)) and value:
            fields.append((path, tuple(value)))
        else:
            raise SweepError(f"config.sweep.{path} is {value!r}; give a non-empty tuple of the values to try, "
                             f"e.g. config.sweep.{path} = (a, b)")
    return fields


def arm_settings(arm: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field: value} of one arm, nested as the config is."""
    return dict(_fields(arm, "", singles=True))


def _only_arms(fields: list[tuple[str, tuple]], only: Sequence[str]) -> list[tuple[str, tuple]]:
    """`fields` with config.sweep.arm restricted to `only` (--arms)."""
    named = next((values for path, values in fields if path == ARM), None)
    if named is None:
        raise SweepError("--arms restricts config.sweep.arm, which this config does not sweep; drop --arms")
    unknown = [arm for arm in only if arm not in named]
    if unknown:
        raise SweepError(f"--arms names {', '.join(unknown)}, which config.sweep.arm does not list; pick from "
                         f"{', '.join(named)}")
    return [(path, tuple(v for v in values if v in only) if path == ARM else values) for path, values in fields]


def _arms(config: ml_collections.ConfigDict, fields: list[tuple[str, tuple]]) -> dict[str, dict[str, Any]]:
    """{arm: {dotted field: value}} of the arms `config.sweep.arm` names, checked."""
    named = next((values for path, values in fields if path == ARM), ())
    if not named:
        return {}
    defined = config.get("arms") or {}
    for name in named:
        if name not in defined:
            raise SweepError(f"config.sweep.arm names {name!r}, which config.arms does not define; define it or "
                             f"pick from {', '.join(defined) or 'nothing (config.arms is empty)'}")
    swept = {path for path, _ in fields} - {ARM}
    arms = {}
    for name in named:
        settings = arm_settings(defined[name])
        clash = sorted(swept & set(settings))
        if clash:
            raise SweepError(f"config.arms.{name} sets {clash[0]}, which config.sweep also sweeps; set it in one "
                             "of the two")
        arms[name] = settings
    return arms


def with_values(config: ml_collections.ConfigDict, values: dict[str, Any],
                source: str = "config.sweep") -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted field set, through ml_collections' own type checks; errors
    name the field as `source`.<field>."""
    run_config = config.copy_and_resolve_references()
    for path, value in values.items():
        parent, _, field = path.rpartition(".")
        node = run_config
        for part in filter(None, parent.split(".")):
            node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
        if not isinstance(node, ml_collections.ConfigDict) or field not in node or path.split(".")[0] in _GRID_FIELDS:
            raise SweepError(f"{source}.{path}: the config has no field {path}; name one of its fields "
                             f"({', '.join(k for k in config.keys() if k not in _GRID_FIELDS)}, or a nested one)")
        try:
            node[field] = value
        except (TypeError, ValueError):
            raise SweepError(f"{source}.{path}: value {value!r} is of type {type(value).__name__}, config.{path} "
                             f"of type {type(node[field]).__name__}; give values of its type") from None
    return run_config


def _text(value) -> str:
    """A value as a flag takes it: strings bare, everything else as its Python literal."""
    return value if isinstance(value, str) else repr(value)


def _override_path(arg: str) -> str:
    return arg.split("=", 1)[0].removeprefix("--no").removeprefix("--").removeprefix("config.")


def _config_overrides(argv: Sequence[str]) -> list[str]:
    """The `--config.*` arguments of a command line, as `--config.x=value` (absl also takes `--config.x value`)."""
    overrides, index = [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith(("--config.", "--noconfig.")):
            value_follows = (arg.startswith("--config.") and "=" not in arg and index + 1 < len(argv)
                             and not argv[index + 1].startswith("--"))
            overrides.append(f"{arg}={argv[index + 1]}" if value_follows else arg)
            index += value_follows
        index += 1
    return overrides


def _choose_xla_flags(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """One process runs every run: the models' XLA flags (xfer.training.xla_flags) only where every
    run's model asks for the same."""
    from xfer import models
    from xfer.training import xla_flags

    wanted = set()
    for config in configs:
        try:
            wanted.add(models.info(config.model.name).cpu_xla_flags)
        except ValueError:
            return  # an unknown model: `check` names it
    xla_flags.apply(wanted.pop() if len(wanted) == 1 else ())


def _main() -> None:
    """The command line; flags are defined here, not on import, so tests and launch.py can import this."""
    from xfer.scaling import preemption  # JAX-free

    preemption.stop_on_interrupt()  # first: from here on a Ctrl-C is one line and exit 130, no traceback
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Path to a config with a `sweep` field (a grid) or a `search` field (the protocol of "
        "xfer.experiments.protocol), e.g. configs/ablate_freeze.py.", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Directory that gets one workdir per run and the results "
                                       "(default: runs/sweeps/<config name>[,<config argument>]).")
    print_commands_flag = flags.DEFINE_bool(
        "print_commands", False, "Print one command per run (protocol: per search worker, then per final run) "
        "instead of running them; rerun without it to collect the table.")
    executor_flag = flags.DEFINE_enum("executor", "inline", dispatch.EXECUTORS,
                                      "Where runs execute: this process, local processes or SLURM jobs (submitit).")
    arms_flag = flags.DEFINE_list("arms", None, "Only these arms (config.arms names), e.g. linear_probe,full.")
    stage_flag = flags.DEFINE_enum("stage", "all", ("all", "search", "final"),
                                   "Protocol only: run the search, the final runs and the report, or one stage.")
    workers_flag = flags.DEFINE_integer("workers", 1, "Protocol only: search workers per arm, sharing its study.")
    parallel_flag = flags.DEFINE_integer("parallel", 1, "local: jobs at once; slurm: the job array's parallelism.")
    partition_flag = flags.DEFINE_string("slurm_partition", "", "slurm: the partition (default: the cluster's).")
    gpus_flag = flags.DEFINE_integer("slurm_gpus", 0, "slurm: GPUs per job.")
    time_flag = flags.DEFINE_integer("slurm_time", 60, "slurm: minutes per job; a job past it is requeued and resumes.")
    cpus_flag = flags.DEFINE_integer("slurm_cpus", 8, "slurm: CPUs per job.")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        # force: absl put its own handler (and its long line prefix) on the root logger already.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)
        cli.quiet_backend_probe()
        sweep_dir = Path(workdir_flag.value or cli.default_workdir(flags.FLAGS["config"], "sweeps"))
        if workdir_flag.value is None:
            logging.info("sweep directory: %s (the default for this config; --workdir chooses another)", sweep_dir)
        sweep_dir = sweep_dir.expanduser().absolute()
        config = config_flag.value
        try:
            executor = dispatch.Executor(executor_flag.value, sweep_dir / "jobs", parallel_flag.value, {
                "partition": partition_flag.value, "gpus": gpus_flag.value, "time": time_flag.value,
                "cpus": cpus_flag.value})
            if "search" in config:
                from xfer.experiments import protocol as protocol_lib

                protocol = protocol_lib.read(config, sweep_dir, arms_flag.value, stage_flag.value)
                _choose_xla_flags([protocol_lib.search_config(config, protocol, arm, {}) for arm in protocol.arms])
                protocol_lib.check(config, protocol)
            else:
                runs = grid(config, arms_flag.value)
                _choose_xla_flags([run.config for run in runs])  # before `check` starts the backend
                check(runs, sweep_dir)
            if print_commands_flag.value:
                config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
                overrides = _config_overrides(sys.argv[1:])
                if "search" not in config:
                    print("\n".join(commands(runs, sweep_dir, config_arg, overrides)))
                elif not protocol_lib.searched(protocol):
                    worker = ["python", "-m", "xfer.experiments.sweep", f"--config={config_arg}", *overrides,
                              f"--workdir={sweep_dir}", "--stage=search"]  # one per arm, then rerun to go on
                    print("\n".join(shlex.join([*worker, f"--arms={arm}"]) for arm in protocol.arms))
                else:
                    finals = protocol_lib.final_runs(config, protocol, protocol_lib.choose(protocol))
                    print("\n".join(commands(finals, sweep_dir, config_arg, overrides)))
                return
            import jax
            import os

            from xfer.experiments import ablation
            from xfer.training import workdir

            if not jax.config.jax_compilation_cache_dir:  # runs that differ in seed only compile once
                os.environ["JAX_COMPILATION_CACHE_DIR"] = str(sweep_dir / "jax_cache")  # a job's too
                jax.config.update("jax_compilation_cache_dir", str(sweep_dir / "jax_cache"))
            preemption.listen()
            with workdir.lock(sweep_dir):  # one sweep at a time; each run also locks its own workdir
                if "search" in config:
                    done = protocol_lib.run(config, protocol, sweep_dir, executor, workers_flag.value, stage_flag.value)
                elif (done := run_all(runs, sweep_dir, executor)):
                    ablation.write(runs, sweep_dir)
                if not done:
                    sys.exit(preemption.exit_code())  # stopped at a boundary: SIGTERM 0, Ctrl-C 130
        except cli.USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main, flags_parser=cli.flags_parser(config_flag))


if __name__ == "__main__":
    _main()
