"""An ablation a reviewer can trust: each arm tuned on a validation split, its choice retrained over
seeds and reported on the test split, with confidence intervals.

    python -m xfer.experiments.sweep --config=configs/ablate_freeze.py     # a config with `search`

The protocol is VTAB's (Zhai et al. 2019, big_vision's transfer configs): hyperparameters chosen on
a split carved from the training data (800/200 of VTAB-1k's 1000), the chosen setting retrained on
train + val, reported on test. A config that has `config.search` runs it:

    config.arms = {"linear_probe": {"partition": "linear_probe"}, "full": {"partition": "full"}}
    config.search = {
        # per arm, the fields to tune, nested as the config is: a tuple of values (categorical), or
        # {"low": a, "high": b, "log": True} (a range; ints for an integer range)
        "space": {"linear_probe": {"optim": {"head": {"lr": (1e-3, 1e-2, 1e-1)}}},
                  "full": {"optim": {"backbone": {"lr": (1e-4, 1e-3)}}}},
        "val_fraction": 0.2,    # of the train split, stratified by class (config.data.val_fraction)
        "split_seed": 0,        # which examples that is (config.data.split_seed)
        "sampler": "grid",      # optuna's: "grid" (every value combination), "tpe" or "random"
        "trials": 0,            # per arm; 0: the grid's size (grid only)
        "pruner": "none",       # "median", "successive_halving" or "hyperband" on the val accuracy of
                                # each evaluation (config.eval_every): poor trials stop early
        "seed": 0,              # the sampler's, and every search run's config.seed
        "storage": "",          # optuna's RDB URL; "": sqlite:///<sweep dir>/search.db. On a cluster a
                                # database server (postgresql://...) lets workers on many machines share it
    }
    config.final = {"seeds": (0, 1, 2), "train_on": "train+val", "baseline": "linear_probe"}

Stages, each dispatched through `xfer.experiments.dispatch` (inline, submitit local, SLURM):

  search  One optuna study per arm (named after it) in the storage; a worker asks it for trials until
          `trials` of them are complete or pruned. A trial is a run in `search/<arm>/<its values>`,
          trained on train minus val and evaluated on val (config.data.evaluate_on="val"); each
          evaluation's accuracy goes to the pruner. A run that diverges (a non-finite loss) is a
          finished trial that is never chosen. `--workers=N` runs N workers per study.
  final   Each arm's best complete trial by val accuracy (the earliest on a tie), retrained for every
          seed on train + val (`train_on`; "train" keeps the val examples out) and evaluated on test,
          in `final/<arm>/<its values>,seed=S`.
  report  From each run's `example_ids.json`: no search run trained on or was scored on a test
          example, else an error. Then results.csv, results.md and results.png
          (`xfer.experiments.protocol_report`): per arm mean, std and 95% CI over seeds, and paired
          differences against the baseline arm over the same seeds.

Everything is checked before any run: each arm's fields and space exist and type-check, the baseline
is one of the arms run, and every arm's search and final setup builds (so a val fraction that leaves a
class without an example is an error up front).

Resuming: finished trials are in the study, finished runs have their summary.json. A worker first
hands back the trials of dead workers (on this machine: its process is gone; elsewhere: optuna's
heartbeat went stale) and those that failed, as new trials with the same values, whose runs resume
from their checkpoints. So after a kill the same command does only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from xfer.experiments import sweep
from xfer.training import workdir as workdir_lib  # JAX-free

log = logging.getLogger("xfer")

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
TRAIN_ON = ("train+val", "train")
# Fields the protocol sets in every run: an arm or a search space setting one would undo it.
_PROTOCOL_FIELDS = ("seed", "data.val_fraction", "data.split_seed", "data.evaluate_on")
_HEARTBEAT_SECONDS = 60  # a worker on another machine is dead when its trial's heartbeat is 3 of these old
_SQLITE_TIMEOUT_SECONDS = 60  # local workers wait this long for the database lock


class ProtocolError(ValueError):
    """A protocol config that cannot run, or results that break the protocol."""


class Categorical(NamedTuple):
    values: tuple


class Range(NamedTuple):
    low: float
    high: float
    log: bool


@dataclasses.dataclass(frozen=True)
class Protocol:
    arms: dict[str, dict[str, Any]]  # {arm: {dotted field: value}} of the arms to run, by name (ConfigDict's order)
    spaces: dict[str, dict[str, Categorical | Range]]  # {arm: {dotted field: what to try}}
    val_fraction: float
    split_seed: int
    sampler: str
    trials: dict[str, int]  # per arm
    pruner: str
    search_seed: int
    storage: str  # an optuna RDB URL
    final_seeds: tuple[int, ...]
    train_on: str
    baseline: str
    # {arm: its optuna study's name}: the arm and a digest of what its trials mean (its search runs' config,
    # its space, sampler and pruner), so a changed search is a new study; runs of values trained before
    # are read back from their workdirs, not retrained.
    studies: dict[str, str]

    def summary(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """What results.md states (`xfer.experiments.protocol_report`)."""
        return {"val_fraction": self.val_fraction, "split_seed": self.split_seed, "sampler": self.sampler,
                "pruner": self.pruner, "trials": max(self.trials.values()), "search_seed": self.search_seed,
                "final_seeds": list(self.final_seeds), "train_on": self.train_on, "baseline": self.baseline,
                "confidence": 0.95, "storage": self.storage, "data": _describe_data(config),
                "spaces": {arm: {path: list(param.values) if isinstance(param, Categorical) else [param.low, param.high]
                                 for path, param in space.items()} for arm, space in self.spaces.items()}}


def read(config: ml_collections.ConfigDict, sweep_dir: Path, arms: list[str] | None = None,
         stage: str = "all") -> Protocol:
    """The protocol `config.search` / `config.final` / `config.arms` describe, restricted to `arms`
    (all when None); raises ProtocolError on anything that cannot run. A search alone (`stage`)
    needs no baseline among its arms."""
    search = config.search
    final = config.get("final") or ml_collections.ConfigDict()
    defined = dict(config.get("arms") or {})
    if not defined:
        raise ProtocolError("config.search needs config.arms: {arm: {field: value}}, the methods to compare")
    names = list(defined)
    if arms:
        unknown = [arm for arm in arms if arm not in defined]
        if unknown:
            raise ProtocolError(f"--arms names {', '.join(unknown)}, which config.arms does not define; pick from "
                                f"{', '.join(defined)}")
        names = [arm for arm in names if arm in arms]
    baseline = final.get("baseline", "")
    if not baseline:
        raise ProtocolError("config.final.baseline is not set; name the arm every other arm is compared with, "
                            "e.g. 'linear_probe'")
    for field, unset in (("val_fraction", 0.0), ("evaluate_on", "test")):
        if config.data.get(field, unset) != unset:
            raise ProtocolError(f"config.data.{field}={config.data[field]!r}, but the protocol sets it in every run "
                                "(search: the config.search.val_fraction carve, scored on it; final: scored on test); "
                                f"leave config.data.{field} at {unset!r} and set config.search.val_fraction")
    if baseline not in names and stage != "search":
        raise ProtocolError(f"config.final.baseline={baseline!r} is not among the arms run ({', '.join(names)}); "
                            "name one of them, or add it to --arms")
    spaces_config = search.get("space") or {}
    spaces, settings = {}, {}
    for arm in names:
        if arm not in spaces_config:
            raise ProtocolError(f"config.search.space has no entry for arm {arm!r}; give it the fields to tune "
                                "(e.g. {'optim': {'head': {'lr': (1e-3, 1e-2, 1e-1)}}}), or {} to tune nothing")
        spaces[arm] = _space(spaces_config[arm], f"config.search.space.{arm}")
        settings[arm] = sweep.arm_settings(defined[arm])
        for path in sorted((set(spaces[arm]) | set(settings[arm])) & set(_PROTOCOL_FIELDS)):
            raise ProtocolError(f"arm {arm!r} sets {path}, which the protocol sets in every run; remove it "
                                "(config.search and config.final choose it)")
        clash = sorted(set(spaces[arm]) & set(settings[arm]))
        if clash:
            raise ProtocolError(f"arm {arm!r} sets {clash[0]} and its search space tunes it; set it in one of the two")
    sampler, pruner = search.get("sampler", "grid"), search.get("pruner", "none")
    if sampler not in SAMPLERS:
        raise ProtocolError(f"config.search.sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ProtocolError(f"config.search.pruner={pruner!r}; choose one of {', '.join(PRUNERS)}")
    trials = {arm: _trials(search.get("trials", 0), sampler, spaces[arm], arm) for arm in names}
    val_fraction = search.get("val_fraction", 0.2)
    if not 0 < val_fraction < 1:
        raise ProtocolError(f"config.search.val_fraction={val_fraction}; it must lie in (0, 1): the search "
                            "needs a validation split carved from train")
    seeds = tuple(final.get("seeds", (0, 1, 2)))
    if not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ProtocolError(f"config.final.seeds={seeds!r}; give distinct integers, e.g. (0, 1, 2)")
    train_on = final.get("train_on", "train+val")
    if train_on not in TRAIN_ON:
        raise ProtocolError(f"config.final.train_on={train_on!r}; choose {' or '.join(map(repr, TRAIN_ON))}")
    storage = search.get("storage", "") or f"sqlite:///{sweep_dir / 'search.db'}"
    protocol = Protocol({arm: settings[arm] for arm in names}, spaces, val_fraction, search.get("split_seed", 0),
                        sampler, trials, pruner, search.get("seed", 0), storage, seeds, train_on, baseline, {})
    return dataclasses.replace(protocol, studies={arm: _study_name(config, protocol, arm) for arm in names})


def search_config(config: ml_collections.ConfigDict, protocol: Protocol, arm: str,
                  params: dict[str, Any]) -> ml_collections.ConfigDict:
    """A search run: the arm with `params`, trained without the val split and scored on it."""
    return _run_config(config, protocol, arm, params, _search_fields(protocol))


def final_config(config: ml_collections.ConfigDict, protocol: Protocol, arm: str, params: dict[str, Any],
                 seed: int) -> ml_collections.ConfigDict:
    """A final run: the arm with its chosen `params` and `seed`, trained on train (+ val), scored on test."""
    return _run_config(config, protocol, arm, params, _final_fields(protocol, seed))


def _search_fields(protocol: Protocol) -> dict[str, Any]:
    return {"seed": protocol.search_seed, "data.val_fraction": protocol.val_fraction,
            "data.split_seed": protocol.split_seed, "data.evaluate_on": "val"}


def _final_fields(protocol: Protocol, seed: int) -> dict[str, Any]:
    keep_val_out = protocol.train_on == "train"
    return {"seed": seed, "data.val_fraction": protocol.val_fraction if keep_val_out else 0.0,
            "data.split_seed": protocol.split_seed, "data.evaluate_on": "test"}


def _run_config(config, protocol: Protocol, arm: str, params: dict[str, Any], fixed: dict[str, Any]):
    """The config with the arm's fields, the searched values and the protocol's own, each layer's
    errors naming where its fields came from."""
    config = sweep.with_values(config, protocol.arms[arm], f"config.arms.{arm}")
    config = sweep.with_values(config, params, f"config.search.space.{arm}")
    return sweep.with_values(config, fixed, "config")


def check(config: ml_collections.ConfigDict, protocol: Protocol) -> None:
    """Every arm's search and final setup at the ends of its space: what would fail later, now."""
    from xfer.training import train

    for arm, space in protocol.spaces.items():
        for corner in _corners(space):
            for stage, run_config in (("search", search_config(config, protocol, arm, corner)),
                                      ("final", final_config(config, protocol, arm, corner, protocol.final_seeds[0]))):
                try:
                    train.setup(run_config)
                except ValueError as error:
                    raise ProtocolError(f"arm {arm} ({stage}{', ' if corner else ''}"
                                        f"{sweep.run_name(corner)}): {error}") from None


def search_worker(config: ml_collections.ConfigDict, sweep_dir: str, arm: str, worker: int) -> bool:
    """Runs trials of `arm`'s study until it has enough; False if a preemption notice stopped one."""
    import optuna

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite study lives there
    protocol = read(config, sweep_dir, [arm], stage="search")
    study = _study(protocol, arm, seed=protocol.search_seed + worker)
    _hand_back(study)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    target = protocol.trials[arm]
    if len(study.get_trials(deepcopy=False, states=finished)) >= target:
        return True
    objective = _Objective(config, protocol, arm, sweep_dir)
    try:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(target, states=finished)],
                       gc_after_trial=False)
    except _Preempted:
        return False
    return True


def choose(protocol: Protocol) -> dict[str, dict[str, Any]]:
    """Each arm's best complete trial by val accuracy, the earliest on a tie, with its study's counts."""
    import optuna

    State = optuna.trial.TrialState
    chosen = {}
    for arm in protocol.arms:
        trials = _study(protocol, arm).get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == State.COMPLETE]
        counts = {"complete": len(complete), "pruned": sum(t.state == State.PRUNED for t in trials),
                  "failed": sum(t.state == State.FAIL for t in trials)}
        if not complete:
            raise ProtocolError(f"arm {arm}: no search trial completed ({counts['pruned']} pruned or diverged, "
                                f"{counts['failed']} failed); widen config.search.space.{arm} or the pruner's patience")
        best = max(complete, key=lambda t: (t.value, -t.number))
        chosen[arm] = {"params": dict(best.params), "val_accuracy": best.value, "trial": best.number, **counts}
    return chosen


class Final(NamedTuple):
    arm: str
    seed: int
    params: dict[str, Any]  # the arm's chosen values
    name: str  # its workdir, relative to the sweep's
    settings: dict[str, Any]  # {dotted field: value} it sets: the arm's, the chosen values, the protocol's
    config: ml_collections.ConfigDict


def final_runs(config: ml_collections.ConfigDict, protocol: Protocol, chosen: dict[str, dict[str, Any]]) -> list[Final]:
    """Every final run: each arm's chosen values, once per seed."""
    finals = []
    for arm in protocol.arms:
        params = chosen[arm]["params"]
        for seed in protocol.final_seeds:
            finals.append(Final(arm, seed, params, f"final/{arm}/{sweep.run_name({**params, 'seed': seed})}",
                                {**protocol.arms[arm], **params, **_final_fields(protocol, seed)},
                                final_config(config, protocol, arm, params, seed)))
    return finals


STAGES = ("all", "search", "final")


def run(config: ml_collections.ConfigDict, protocol: Protocol, sweep_dir: Path, executor, workers: int = 1,
        stage: str = "all") -> bool:
    """The search, the final runs and the report (or only `stage`), each through `executor`
    (`xfer.experiments.dispatch`); False if a preemption notice stopped a run."""
    from xfer.experiments import dispatch, protocol_report

    if stage in ("all", "search"):
        tasks = [dispatch.Task(f"search {arm}, worker {worker}", search_worker, (config, str(sweep_dir), arm, worker))
                 for arm in protocol.arms for worker in range(workers)]
        if not executor.run(tasks):
            return False
        if stage == "search":
            return True
    chosen = choose(protocol)
    finals = final_runs(config, protocol, chosen)
    for final in finals:  # a changed choice must not resume another setting's run
        workdir_lib.check(sweep_dir / final.name, workdir_lib.config_as_json(final.config))
    missing = [final for final in finals if _summary(sweep_dir / final.name) is None]
    log.info("final: %d of %d runs to do (%s)", len(missing), len(finals),
             "; ".join(f"{arm}: {sweep.run_name(c['params']) or 'nothing tuned'}" for arm, c in chosen.items()))
    tasks = [dispatch.Task(f"final {final.name}", dispatch.train_run, (final.config, str(sweep_dir / final.name)))
             for final in missing]
    if not executor.run(tasks):
        return False
    table = rows(protocol, finals, sweep_dir)
    checked = check_ids(table, sweep_dir)
    protocol_report.write(table, protocol.summary(config), chosen, sweep_dir)
    log.info("no search run saw any of the %d test examples; results in %s", checked, sweep_dir / "results.md")
    return True


def searched(protocol: Protocol) -> bool:
    """Every arm's study has its trials (what --print_commands asks before printing the final runs)."""
    import optuna

    if protocol.storage.startswith("sqlite:///") and not Path(protocol.storage[len("sqlite:///"):]).exists():
        return False  # no search ran yet (and asking would create the database)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return all(len(_study(protocol, arm).get_trials(deepcopy=False, states=finished)) >= protocol.trials[arm]
               for arm in protocol.arms)


def rows(protocol: Protocol, finals: list[Final], sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per search trial and final run (`xfer.experiments.protocol_report`'s input)."""
    import optuna

    State = optuna.trial.TrialState
    states = {State.COMPLETE: "complete", State.PRUNED: "pruned", State.FAIL: "failed"}
    table = []
    for arm in protocol.arms:
        for trial in _study(protocol, arm).get_trials(deepcopy=False):
            state = "diverged" if "diverged" in trial.user_attrs else states.get(trial.state, "running")
            intermediate = trial.intermediate_values
            val = trial.value if trial.state == State.COMPLETE else (
                intermediate[max(intermediate)] if intermediate else None)
            workdir = trial.user_attrs.get("workdir", "")
            table.append({"arm": arm, "stage": "search", "trial": trial.number, "seed": protocol.search_seed,
                          "state": state, "params": dict(trial.params), "val_accuracy": val, "test_accuracy": None,
                          **_run_facts(_summary(sweep_dir / workdir) if workdir else None), "workdir": workdir})
    for final in finals:
        summary = _summary(sweep_dir / final.name)
        table.append({"arm": final.arm, "stage": "final", "trial": None, "seed": final.seed,
                      "state": "complete" if summary else "running", "params": dict(final.params), "val_accuracy": None,
                      "test_accuracy": summary.get("eval_accuracy") if summary else None,
                      **_run_facts(summary), "workdir": final.name})
    return table


def check_ids(table: list[dict[str, Any]], sweep_dir: Path) -> int:
    """Raises ProtocolError if a search run trained on or was scored on an example a final run reports
    on; returns how many test examples were checked. Every run records its ids (`example_ids.json`)."""
    test_ids, seen = set(), {}
    for row in table:
        ids = _example_ids(sweep_dir / row["workdir"]) if row["workdir"] else None
        if ids is None:
            continue
        expected_role = "val" if row["stage"] == "search" else "test"
        if ids["eval_role"] != expected_role:
            raise ProtocolError(f"{row['workdir']} was evaluated on its {ids['eval_role']} split, a {row['stage']} "
                                f"run must be on {expected_role}; delete that run and rerun")
        if row["stage"] == "final":
            test_ids.update(ids["eval"])
        else:
            seen[row["workdir"]] = set(ids["train"]) | set(ids["eval"])
    for workdir, ids in seen.items():
        leaked = ids & test_ids
        if leaked:
            raise ProtocolError(f"search run {workdir} saw {len(leaked)} test example(s), e.g. {sorted(leaked)[0]}: "
                                "the train/eval splits of the data config overlap (config.data.train_split and "
                                "eval_split); make them disjoint and rerun")
    return len(test_ids)


# --- optuna ----------------------------------------------------------------------------------------

class _Preempted(Exception):
    """A preemption notice stopped a search run (saved): the worker ends, the trial resumes on a rerun."""


class _Objective:
    """One trial: a run with the sampled values; its evaluations report val accuracy to the pruner."""

    def __init__(self, config, protocol: Protocol, arm: str, sweep_dir: Path):
        self.config, self.protocol, self.arm, self.sweep_dir = config, protocol, arm, sweep_dir

    def __call__(self, trial) -> float:
        import optuna

        from xfer.training import train

        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {path: _suggest(trial, path, param) for path, param in self.protocol.spaces[self.arm].items()}
        workdir = f"search/{self.arm}/{sweep.run_name(params) or 'default'}"
        trial.set_user_attr("workdir", workdir)
        run_config = search_config(self.config, self.protocol, self.arm, params)
        summary = _summary(self.sweep_dir / workdir)  # the same values ran before (a retried trial, a widened space)
        if summary is not None:  # read back only if it is this run: the same config
            workdir_lib.check(self.sweep_dir / workdir, workdir_lib.config_as_json(run_config))
        else:
            def on_eval(step: int, metrics: dict) -> bool:
                trial.report(metrics["eval_accuracy"], step)
                return trial.should_prune()

            try:
                summary = train.run(run_config, self.sweep_dir / workdir, on_eval=on_eval)
            except train.NonFiniteLossError as error:
                trial.set_user_attr("diverged", str(error))
                raise optuna.TrialPruned(str(error)) from None
            if summary is None:
                raise _Preempted(workdir)
        if summary.get("stopped_at_step"):
            raise optuna.TrialPruned(f"stopped at step {summary['stopped_at_step']}")
        return summary["eval_accuracy"]


def _study(protocol: Protocol, arm: str, seed: int | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat and retry API is marked experimental, unchanged since optuna 3.0: no warning per study.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine = {"connect_args": {"timeout": _SQLITE_TIMEOUT_SECONDS}} if protocol.storage.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(
        protocol.storage, engine_kwargs=engine, heartbeat_interval=_HEARTBEAT_SECONDS,
        grace_period=3 * _HEARTBEAT_SECONDS, heartbeat_stale_trial_callback=_retry())
    seed = protocol.search_seed if seed is None else seed
    space = protocol.spaces[arm]
    if protocol.sampler == "grid":
        # A space with nothing to tune is one trial; GridSampler needs a parameter, so that is random.
        sampler = (optuna.samplers.GridSampler({path: list(p.values) for path, p in space.items()}, seed=seed)
                   if space else optuna.samplers.RandomSampler(seed=seed))
    else:
        sampler = (optuna.samplers.TPESampler(seed=seed) if protocol.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=seed))
    pruner = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
              "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
              "hyperband": optuna.pruners.HyperbandPruner}[protocol.pruner]()
    return optuna.create_study(storage=storage, study_name=protocol.studies[arm], sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def _retry():
    """optuna's hand-back: a new trial with a dead or failed trial's values and its evaluations so far
    (for the pruner), marked with the trial it retries; GridSampler counts it as that grid point."""
    import optuna

    return optuna.storages.RetryHeartbeatStaleTrialCallback(None, inherit_intermediate_values=True)


def _study_name(config, protocol: Protocol, arm: str) -> str:
    what = {"run": workdir_lib.config_as_json(search_config(config, protocol, arm, {})),
            "space": repr(protocol.spaces[arm]), "sampler": protocol.sampler, "pruner": protocol.pruner,
            "seed": protocol.search_seed}
    return f"{arm}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]}"


def _hand_back(study) -> None:
    """Trials whose worker died (on this machine: its process is gone) or that failed come back as new
    trials with the same values (`_retry`); their runs resume from their checkpoints. Workers elsewhere
    are judged by optuna's heartbeat."""
    import optuna

    State = optuna.trial.TrialState
    retry = _retry()
    storage = study._storage  # noqa: SLF001 -- optuna exposes trial state changes only on the storage
    optuna.storages.fail_stale_trials(study)  # heartbeats of other machines' dead workers
    trials = study.get_trials(deepcopy=False)
    retried = {number for trial in trials for number in retry.retry_history(trial)}
    host = socket.gethostname()
    for trial in trials:
        dead = (trial.state == State.RUNNING and trial.user_attrs.get("host") == host
                and not _alive(trial.user_attrs.get("pid", 0)))
        if dead:
            storage.set_trial_state_values(trial._trial_id, State.FAIL)  # noqa: SLF001
            log.info("search %s: trial %d's worker is gone; its run resumes as a new trial",
                     study.study_name, trial.number)
        if dead or (trial.state == State.FAIL and trial.number not in retried):
            retry(study, storage.get_trial(trial._trial_id))  # noqa: SLF001


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _suggest(trial, path: str, param: Categorical | Range):
    if isinstance(param, Categorical):
        return trial.suggest_categorical(path, list(param.values))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (param.low, param.high)):
        return trial.suggest_int(path, param.low, param.high, log=param.log)
    return trial.suggest_float(path, param.low, param.high, log=param.log)


# --- config ----------------------------------------------------------------------------------------

def _space(node, where: str) -> dict[str, Categorical | Range]:
    space = {}
    for path, value in _leaves(node, ""):
        name = f"{where}.{path}"
        if isinstance(value, dict):
            low, high, log_scale = value.get("low"), value.get("high"), value.get("log", False)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if set(value) - {"low", "high", "log"} or not numbers or not low < high or (log_scale and low <= 0):
                raise ProtocolError(f"{name}={value}; a range is {{'low': a, 'high': b, 'log': bool}} with a < b "
                                    "(and a > 0 when log)")
            space[path] = Range(low, high, bool(log_scale))
        elif isinstance(value, (tuple, list)) and value and all(
                v is None or isinstance(v, (bool, int, float, str)) for v in value):
            space[path] = Categorical(tuple(value))
        else:
            raise ProtocolError(f"{name}={value!r}; give a non-empty tuple of numbers or strings to try, or a "
                                "range {'low': a, 'high': b, 'log': True}")
    return space


def _leaves(node, prefix: str):
    """(dotted field, value) of a nested space; a {low, high[, log]} dict is one leaf."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, (dict, ml_collections.ConfigDict)) and not {"low", "high"} <= set(value):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, dict(value) if isinstance(value, ml_collections.ConfigDict) else value


def _trials(trials: int, sampler: str, space: dict, arm: str) -> int:
    if sampler == "grid":
        if any(isinstance(param, Range) for param in space.values()):
            raise ProtocolError(f"config.search.space.{arm} has a range, which the grid sampler cannot enumerate; "
                                "give value tuples or set config.search.sampler='tpe' or 'random'")
        size = 1
        for param in space.values():
            size *= len(param.values)
        return trials or size
    if trials < 1:
        raise ProtocolError(f"config.search.trials={trials}; the {sampler} sampler needs a number of trials per arm")
    return trials


def _corners(space: dict[str, Categorical | Range]) -> list[dict[str, Any]]:
    """The values every setup check builds: each field's first and last value (a range's ends)."""
    firsts = {path: p.values[0] if isinstance(p, Categorical) else p.low for path, p in space.items()}
    lasts = {path: p.values[-1] if isinstance(p, Categorical) else p.high for path, p in space.items()}
    return [firsts] if firsts == lasts else [firsts, lasts]


def _describe_data(config) -> str:
    data = config.data
    where = {"tfds": f"tfds {data.get('name')}", "folder": f"folder {data.get('path')}"}.get(data.source, data.source)
    size = data.get("image_size")
    return f"{where}, {size} px" if size else where


# --- run files -------------------------------------------------------------------------------------

def _summary(workdir: Path) -> dict | None:
    path = workdir / sweep.SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _example_ids(workdir: Path) -> dict | None:
    from xfer.training.train import EXAMPLE_IDS_FILE

    path = workdir / EXAMPLE_IDS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _run_facts(summary: dict | None) -> dict[str, Any]:
    summary = summary or {}
    return {"trainable_parameters": summary.get("trainable_parameters"),
            "steps": summary.get("stopped_at_step") or summary.get("steps"),
            "wall_seconds": summary.get("wall_seconds"), "seconds_per_step": summary.get("seconds_per_step")}
