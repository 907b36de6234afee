"""The ablation protocol (xfer.experiments.protocol): a search per arm on a validation split carved from
train, each arm's choice retrained over seeds on train + val and scored on test, and a report.

One real protocol (Lite0 on digits at 16 px, arms linear_probe and last_k1, 2 learning rates each,
4 steps of 16 a run, final seeds 0 and 1) runs through the command line, is SIGKILLed during its
search and rerun; several tests read what it left. Pruning and `train.run`'s `on_eval` run in this
process; bad input is checked through the command line and in-process, before any run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_collections
import optuna
import pytest
from test_sweep import launch_py_flags  # launch.py's flags, as the grid's printed commands are checked

from xfer.experiments import protocol as protocol_lib
from xfer.experiments import sweep
from xfer.training import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ablate_freeze.py:res=16"
LRS = {"linear_probe": ("optim.head.lr", (0.01, 0.1)), "last_k1": ("optim.backbone.lr", (0.0001, 0.001))}
TINY = ("--config.total_steps=4", "--config.eval_every=2", "--config.log_every=2", "--config.batch_size=16",
        "--config.optim.backbone.warmup_steps=0", "--config.final.seeds=(0, 1)",
        *(f"--config.search.space.{arm}.{field}={values!r}" for arm, (field, values) in LRS.items()),
        f"--arms={','.join(LRS)}")
SEARCH_TRIALS = sum(len(values) for _, values in LRS.values())
CSV_COLUMNS = ["arm", "stage", "trial", "seed", "state", "optim.backbone.lr", "optim.head.lr", "val_accuracy",
               "test_accuracy", "trainable_parameters", "steps", "wall_seconds", "seconds_per_step", "workdir"]


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xfer.experiments.sweep", f"--config={CONFIG}", *args]


def protocol_config(**fields) -> ml_collections.ConfigDict:
    """configs/ablate_freeze.py as TINY sets it, with `fields` ({dotted field: value}) on top, locked."""
    path, _, arg = CONFIG.partition(":")
    config = runpy.run_path(str(REPO / path))["get_config"](arg)
    config.total_steps, config.eval_every, config.log_every, config.batch_size = 4, 2, 2, 16
    config.optim.backbone.warmup_steps = 0
    config.final.seeds = (0, 1)
    config.search.space = {arm: ml_collections.ConfigDict(_nested(field, values)) for arm, (field, values) in
                           LRS.items()}
    config.arms = {arm: config.arms[arm] for arm in LRS}
    for path, value in fields.items():
        parent, _, name = path.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            node = node[part]
        node[name] = value
    config.lock()
    return config


def _nested(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and `error: <message>` as the last stderr line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr[-3000:]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def search_workdirs(sweep_dir: Path) -> list[Path]:
    return sorted(path for path in (sweep_dir / "search").glob("*/*") if path.is_dir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env):
    """The protocol SIGKILLed once its first search trial finished and the next one started, then rerun
    with the same command to the end: (sweep dir, the finished trial's workdir and file mtimes then,
    the rerun)."""
    sweep_dir = tmp_path_factory.mktemp("protocol") / "sweep"
    command = [*sweep_command(*TINY), f"--workdir={sweep_dir}"]
    killed_log = sweep_dir.parent / "killed.log"  # a file, not a pipe: a full pipe would stall the run
    with open(killed_log, "w") as log:
        killed = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 400
    # The next trial is RUNNING (its workdir is made) while the first one's summary.json exists.
    while killed.poll() is None and time.monotonic() < deadline and not (
            len(search_workdirs(sweep_dir)) >= 2 and len(list(sweep_dir.glob("search/*/*/summary.json"))) == 1):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    summaries = list(sweep_dir.glob("search/*/*/summary.json"))
    assert len(summaries) == 1 and len(search_workdirs(sweep_dir)) == 2, killed_log.read_text()[-3000:]
    first = summaries[0].parent
    mtimes = {path: path.stat().st_mtime_ns for path in first.rglob("*") if path.is_file()}

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    return types.SimpleNamespace(sweep_dir=sweep_dir, first=first, mtimes=mtimes, rerun=rerun)


def results(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def example_ids(sweep_dir: Path, workdir: str) -> dict:
    return json.loads((sweep_dir / workdir / "example_ids.json").read_text())


def study(sweep_dir: Path, arm: str) -> optuna.Study:
    """The arm's one study (named `<arm>-<digest of what its trials mean>`, protocol.Protocol.studies)."""
    storage = f"sqlite:///{sweep_dir / 'search.db'}"
    names = [name for name in optuna.get_all_study_names(storage) if name.rpartition("-")[0] == arm]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


# --- the real protocol -----------------------------------------------------------------------------


def test_a_killed_study_resumes_without_redoing_finished_trials(finished):
    State = optuna.trial.TrialState
    assert {path: path.stat().st_mtime_ns for path in finished.first.rglob("*") if path.is_file()} == finished.mtimes
    failed = 0
    for arm, (field, values) in LRS.items():
        trials = study(finished.sweep_dir, arm).get_trials()
        complete = [trial for trial in trials if trial.state == State.COMPLETE]
        assert sorted(trial.params[field] for trial in complete) == sorted(values)  # each value once
        assert {trial.state for trial in trials} <= {State.COMPLETE, State.FAIL}
        # The trial the kill left RUNNING was failed and handed back as a new trial with its values.
        fails = {trial.number: trial.params for trial in trials if trial.state == State.FAIL}
        retried = {trial.system_attrs["failed_trial"]: trial.params  # optuna's retry callback's mark
                   for trial in trials if trial.system_attrs.get("failed_trial") is not None}
        assert retried == fails
        failed += len(fails)
    assert failed == 1
    assert "worker is gone; its run resumes as a new trial" in finished.rerun.stderr


def test_results_csv_has_every_search_trial_and_final_run_and_finals_use_the_argmax(finished):
    rows = results(finished.sweep_dir)
    assert list(rows[0]) == CSV_COLUMNS
    search = [row for row in rows if row["stage"] == "search"]
    final = [row for row in rows if row["stage"] == "final"]
    assert len(search) == sum(len(study(finished.sweep_dir, arm).trials) for arm in LRS) == SEARCH_TRIALS + 1
    assert len(final) == len(rows) - len(search) == 2 * len(LRS)
    for arm, (field, values) in LRS.items():
        complete = [row for row in search if row["arm"] == arm and row["state"] == "complete"]
        assert sorted(float(row[field]) for row in complete) == sorted(values)
        assert all(row["test_accuracy"] == "" and 0 <= float(row["val_accuracy"]) <= 1 for row in complete)
        best = max(complete, key=lambda row: (float(row["val_accuracy"]), -int(row["trial"])))
        finals = [row for row in final if row["arm"] == arm]
        assert sorted(int(row["seed"]) for row in finals) == [0, 1]
        for row in finals:
            assert (row[field], row["state"], row["val_accuracy"], row["trial"]) == (best[field], "complete", "", "")
            assert 0 <= float(row["test_accuracy"]) <= 1 and int(row["steps"]) == 4
            assert row["workdir"] == f"final/{arm}/{field}={float(best[field])!r},seed={row['seed']}"
        other = "optim.head.lr" if field == "optim.backbone.lr" else "optim.backbone.lr"
        assert all(row[other] == "" for row in [*complete, *finals])  # a column only where the arm searches it


def test_results_md_states_the_protocol_and_the_chosen_values(finished):
    rows = results(finished.sweep_dir)
    text = (finished.sweep_dir / "results.md").read_text()
    assert "## Protocol" in text and "## Chosen hyperparameters" in text and "## Final results (test split)" in text
    for fact in ("A validation split of 20% of the train split", "the grid sampler (seed 0)", "no pruning",
                 "retrained on train and validation together", "(0, 1: 2 seeds)", "Δ vs linear_probe",
                 f"sqlite:///{finished.sweep_dir / 'search.db'}"):
        assert fact in text
    for arm, (field, _) in LRS.items():
        search = [row for row in rows if row["stage"] == "search" and row["arm"] == arm]
        best = max([row for row in search if row["state"] == "complete"],
                   key=lambda row: (float(row["val_accuracy"]), -int(row["trial"])))
        line = next(line for line in text.splitlines() if line.startswith(f"| {arm} | `"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        failed = sum(row["state"] == "failed" for row in search)
        # arm | hyperparameters | best val accuracy | trial | complete | pruned | failed
        assert cells == [arm, f"`{field}={float(best[field]):g}`", f"{float(best['val_accuracy']):.4f}", best["trial"],
                         "2", "0", str(failed)], line
    assert (finished.sweep_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_test_example_reaches_a_search_run(finished):
    rows = results(finished.sweep_dir)
    search = [example_ids(finished.sweep_dir, row["workdir"]) for row in rows if row["stage"] == "search"]
    final = [example_ids(finished.sweep_dir, row["workdir"]) for row in rows if row["stage"] == "final"]
    assert len(search) == SEARCH_TRIALS + 1 and len(final) == 4
    assert {ids["eval_role"] for ids in search} == {"val"} and {ids["eval_role"] for ids in final} == {"test"}
    test = set(final[0]["eval"])
    assert test and all(set(ids["eval"]) == test for ids in final)
    for ids in search:
        assert not (set(ids["train"]) | set(ids["eval"])) & test
        assert not set(ids["train"]) & set(ids["eval"])
        for final_ids in final:  # train_on "train+val": the final runs train on what the search saw, all of it
            assert set(ids["train"]) | set(ids["eval"]) == set(final_ids["train"])
    val, train = len(search[0]["eval"]), len(final[0]["train"])
    assert abs(val - 0.2 * train) <= 10  # 20% of train, stratified over 10 classes
    assert protocol_lib.check_ids(protocol_lib_rows(rows), finished.sweep_dir) == len(test)


def protocol_lib_rows(rows: list[dict]) -> list[dict]:
    return [{"stage": row["stage"], "workdir": row["workdir"]} for row in rows]


def test_printed_commands_after_the_search_are_the_final_runs_as_launch_py_loads_them(finished, env, monkeypatch):
    result = subprocess.run([*sweep_command(*TINY), f"--workdir={finished.sweep_dir}", "--print_commands"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [shlex.split(command) for command in result.stdout.strip().splitlines()]
    config = protocol_config()
    protocol = protocol_lib.read(config, finished.sweep_dir)
    finals = protocol_lib.final_runs(config, protocol, protocol_lib.choose(protocol))
    assert [final.name for final in finals] == [row["workdir"] for row in results(finished.sweep_dir)
                                                 if row["stage"] == "final"]
    assert len(printed) == len(finals) == 4
    monkeypatch.chdir(REPO)
    for argv, final in zip(printed, finals):
        assert argv[:2] == ["python", "launch.py"]
        launched, workdir = launch_py_flags(argv[1:])
        assert workdir == str(finished.sweep_dir / final.name)
        assert workdir_lib.config_as_json(launched) == workdir_lib.config_as_json(final.config)
        ran = json.loads((finished.sweep_dir / final.name / "config.json").read_text())
        assert ran == json.loads(json.dumps(workdir_lib.config_as_json(launched)))  # the command is the run that ran


# --- in-process ------------------------------------------------------------------------------------


def test_train_run_stops_at_the_first_evaluation_on_eval_asks_to_stop_at(tmp_path):
    from xfer.training import train

    config = protocol_config()
    protocol = protocol_lib.read(config, tmp_path)
    calls = []
    summary = train.run(protocol_lib.search_config(config, protocol, "linear_probe", {"optim.head.lr": 0.1}),
                        tmp_path / "run", on_eval=lambda step, metrics: calls.append((step, metrics)) or True)
    assert [step for step, _ in calls] == [2] and 0 <= calls[0][1]["eval_accuracy"] <= 1
    assert summary["stopped_at_step"] == 2 and summary["steps"] == 4
    assert summary["eval_accuracy"] == calls[0][1]["eval_accuracy"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_at_step"] == 2
    assert {path.name for path in (tmp_path / "run" / "checkpoints").iterdir() if path.name.isdigit()} == {"2"}


def test_a_pruned_trial_is_recorded_and_an_arm_without_a_complete_trial_cannot_be_chosen(tmp_path, monkeypatch):
    real_study = protocol_lib._study

    def always_pruning(*args, **kwargs):
        study = real_study(*args, **kwargs)
        study.pruner = optuna.pruners.ThresholdPruner(lower=2.0)  # any accuracy is below 2: prune
        return study

    monkeypatch.setattr(protocol_lib, "_study", always_pruning)
    config = protocol_config(**{"search.space.linear_probe.optim.head.lr": (0.1,)})
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()  # the command line's coordinator makes it (and locks it) before any worker starts
    assert protocol_lib.search_worker(config, str(sweep_dir), "linear_probe", 0)
    (trial,) = study(sweep_dir, "linear_probe").get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [2]
    workdir = sweep_dir / trial.user_attrs["workdir"]
    assert workdir == sweep_dir / "search" / "linear_probe" / "optim.head.lr=0.1"
    assert json.loads((workdir / "summary.json").read_text())["stopped_at_step"] == 2
    assert {path.name for path in (workdir / "checkpoints").iterdir() if path.name.isdigit()} == {"2"}

    protocol = protocol_lib.read(config, sweep_dir, ["linear_probe"])
    (row,) = protocol_lib.rows(protocol, [], sweep_dir)
    assert (row["state"], row["steps"], row["val_accuracy"]) == ("pruned", 2, trial.intermediate_values[2])
    with pytest.raises(protocol_lib.ProtocolError, match=re.escape(
            "arm linear_probe: no search trial completed (1 pruned or diverged, 0 failed); widen "
            "config.search.space.linear_probe or the pruner's patience")) as error:
        protocol_lib.choose(protocol)
    assert "\n" not in str(error.value)
    # A pruned trial is finished: a worker started again has nothing to do.
    assert protocol_lib.search_worker(config, str(sweep_dir), "linear_probe", 0)
    assert len(study(sweep_dir, "linear_probe").get_trials()) == 1


def test_check_ids_refuses_a_search_run_that_saw_a_test_example(tmp_path):
    def write(workdir: str, train: list, eval_ids: list, role: str) -> dict:
        (tmp_path / workdir).mkdir(parents=True)
        (tmp_path / workdir / "example_ids.json").write_text(json.dumps(
            {"train": train, "eval": eval_ids, "eval_role": role}))
        return {"stage": workdir.split("/")[0], "workdir": workdir}

    final = write("final/lp/seed=0", ["a", "b", "c", "d"], ["t1", "t2", "t3"], "test")
    clean = write("search/lp/lr=1", ["a", "b", "c"], ["d"], "val")
    assert protocol_lib.check_ids([clean, final], tmp_path) == 3
    leaky = write("search/lp/lr=2", ["a", "b", "t2"], ["d"], "val")
    with pytest.raises(protocol_lib.ProtocolError, match=re.escape(
            "search run search/lp/lr=2 saw 1 test example(s), e.g. t2: ")) as error:
        protocol_lib.check_ids([clean, leaky, final], tmp_path)
    assert "\n" not in str(error.value)
    scored_on_test = write("search/lp/lr=3", ["a", "b", "c"], ["t3"], "test")
    with pytest.raises(protocol_lib.ProtocolError, match=re.escape(
            "search/lp/lr=3 was evaluated on its test split, a search run must be on val")):
        protocol_lib.check_ids([scored_on_test, final], tmp_path)


# --- bad input: one line, before any run or directory ---------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("--arms=last_k1",), "config.final.baseline='linear_probe' is not among the arms run (last_k1); name one of "
                          "them, or add it to --arms"),
    (("--arms=linear_probe,lats_k1",), "--arms names lats_k1, which config.arms does not define; pick from "
                                       "bias_only, full, last_k1, last_k3, linear_probe, lora8, norm_only"),
    (("--config.search.val_fraction=0.001", "--arms=linear_probe"),
     "arm linear_probe (search, optim.head.lr=0.001): config.data.val_fraction=0.001 leaves class '8' (139 "
     "training examples) without a validation example; raise val_fraction to at least 0.0036 or add examples"),
    (("--config.search.sampler=grids",), "config.search.sampler='grids'; choose one of grid, tpe, random"),
    (("--config.search.pruner=median_",),
     "config.search.pruner='median_'; choose one of none, median, successive_halving, hyperband"),
    (("--config.final.baseline=ful",), "config.final.baseline='ful' is not among the arms run (bias_only, full, "
                                       "last_k1, last_k3, linear_probe, lora8, norm_only); name one of them, or add "
                                       "it to --arms"),
])
def test_bad_protocol_command_lines_are_one_error_line_before_any_directory(args, message, tmp_path):
    workdir = tmp_path / "sweep"
    result = subprocess.run([*sweep_command(*args), f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert_one_error_line(result, message)
    assert "task " not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("fields, error, message", [
    ({"search.space.linear_probe": {"optim": {"head": {"lrr": (0.1,)}}}}, sweep.SweepError,
     "config.search.space.linear_probe.optim.head.lrr: the config has no field optim.head.lrr"),
    ({"search.space.last_k1": {"optim": {"backbone": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}},
     protocol_lib.ProtocolError, "config.search.space.last_k1 has a range, which the grid sampler cannot "
                                 "enumerate; give value tuples or set config.search.sampler='tpe' or 'random'"),
    ({"search.sampler": "tpe", "search.trials": 0}, protocol_lib.ProtocolError,
     "config.search.trials=0; the tpe sampler needs a number of trials per arm"),
    ({"search.val_fraction": 0.0}, protocol_lib.ProtocolError, "config.search.val_fraction=0.0; it must lie in (0, 1)"),
    ({"search.val_fraction": 0.001}, protocol_lib.ProtocolError,
     "arm last_k1 (search, optim.backbone.lr=0.0001): config.data.val_fraction=0.001 leaves class '8'"),
    ({"final.seeds": (0, 0)}, protocol_lib.ProtocolError, "config.final.seeds=(0, 0); give distinct integers"),
    ({"arms.last_k1": {"partition": "last_k:1", "seed": 3}}, protocol_lib.ProtocolError,
     "arm 'last_k1' sets seed, which the protocol sets in every run"),
    ({"data.val_fraction": 0.3}, protocol_lib.ProtocolError,
     "config.data.val_fraction=0.3, but the protocol sets it in every run"),
    ({"final.baseline": ""}, protocol_lib.ProtocolError, "config.final.baseline is not set; name the arm"),
])
def test_bad_protocol_configs_are_one_line_errors_before_any_run(fields, error, message, tmp_path):
    config = protocol_config(**{path: ml_collections.ConfigDict(value) if isinstance(value, dict) else value
                                for path, value in fields.items()})
    with pytest.raises(error, match=re.escape(message)) as raised:
        protocol_lib.check(config, protocol_lib.read(config, tmp_path / "sweep"))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "sweep").exists()


def test_a_search_alone_needs_no_baseline_among_its_arms(tmp_path):
    config = protocol_config()
    protocol = protocol_lib.read(config, tmp_path, ["last_k1"], stage="search")
    assert list(protocol.arms) == ["last_k1"] and protocol.trials == {"last_k1": 2}


def test_print_commands_prints_one_search_worker_per_arm_and_runs_nothing(tmp_path, env):
    workdir = tmp_path / "sweep"
    result = subprocess.run([*sweep_command(*TINY), f"--workdir={workdir}", "--print_commands"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert [argv[-1] for argv in printed] == [f"--arms={arm}" for arm in sorted(LRS)]
    for argv in printed:
        assert argv[:4] == ["python", "-m", "xfer.experiments.sweep", f"--config={CONFIG}"]
        assert argv[-3:-1] == [f"--workdir={workdir}", "--stage=search"]
        assert argv[4:-3] == [arg for arg in TINY if arg.startswith("--config.")]  # the overrides, as given
    assert "task " not in result.stderr
    assert not workdir.exists()
