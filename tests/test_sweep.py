"""The ablation sweep's grid mode: the grid, its checks, printed commands that launch.py loads, and
real tiny sweeps: one killed, rerun, and finished without redoing a finished run; one run by
submitit's local executor.

The grid is tests/grid_config.py (configs/ablate_freeze.py's masks x seeds, without its protocol);
the protocol mode is tests/test_protocol.py's. The real sweeps are Lite0 on digits at 32 px, 2 runs
of 3 steps, through the command line (`python -m xfer.experiments.sweep`) in subprocesses that share
a JAX compilation cache.
"""

from __future__ import annotations

import csv
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags
from PIL import Image

from xfer.experiments import sweep
from xfer.training import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/grid_config.py"  # configs/ablate_freeze.py as a plain grid
TINY = ("--config.total_steps=3", "--config.batch_size=16", "--config.log_every=1",
        "--config.optim.backbone.warmup_steps=0", "--config.sweep.partition=('linear_probe', 'last_k:1')",
        "--config.sweep.seed=(0,)")
RUNS = ("partition=linear_probe,seed=0", "partition=last_k-1,seed=0")


def ablate_config(arg: str = "") -> ml_collections.ConfigDict:
    config = runpy.run_path(str(REPO / CONFIG))["get_config"](arg)
    config.lock()  # as the command line loads it: a misspelt field is an error
    return config


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xfer.experiments.sweep", f"--config={CONFIG}", *args]


def test_grid_is_the_product_in_sorted_field_order_with_named_workdirs():
    config = ablate_config()
    with config.unlocked():
        config.sweep = ml_collections.ConfigDict({"partition": ("full", "last_k:2"), "seed": (0, 1),
                                                  "optim": {"head": {"lr": (1e-3,)}}})
    runs = sweep.grid(config)
    assert [run.name for run in runs] == [
        "optim.head.lr=0.001,partition=full,seed=0", "optim.head.lr=0.001,partition=full,seed=1",
        "optim.head.lr=0.001,partition=last_k-2,seed=0", "optim.head.lr=0.001,partition=last_k-2,seed=1"]
    assert (runs[3].config.partition, runs[3].config.seed, runs[3].config.optim.head.lr) == ("last_k:2", 1, 1e-3)
    assert config.partition == "linear_probe"  # the sweep's own config is left as it was


def test_arms_set_several_fields_at_once_and_cross_with_the_other_swept_fields():
    config = ablate_config()
    with config.unlocked():
        config.arms = ml_collections.ConfigDict({
            "lp_ft": {"partition": "linear_probe@0,full@0.5*0.1"},
            "decay": {"partition": "full", "optim": {"backbone": {"lr": 1e-4}}},
            "unused": {"partition": "bias_only"},
        })
        config.sweep = ml_collections.ConfigDict({"arm": ("lp_ft", "decay"), "seed": (0, 1)})
    runs = sweep.grid(config)
    assert [run.name for run in runs] == ["arm=lp_ft,seed=0", "arm=lp_ft,seed=1", "arm=decay,seed=0",
                                          "arm=decay,seed=1"]
    assert runs[0].config.partition == "linear_probe@0,full@0.5*0.1" and runs[0].config.optim.backbone.lr == 1e-3
    assert (runs[3].config.partition, runs[3].config.optim.backbone.lr, runs[3].config.seed) == ("full", 1e-4, 1)
    assert runs[3].settings == {"partition": "full", "optim.backbone.lr": 1e-4, "seed": 1}
    assert "arms" not in workdir_lib.config_as_json(runs[0].config)  # arms are the grid, not a run's config


def test_the_methods_ablation_sets_up_every_arm(tmp_path):
    """configs/ablate_methods.py is a protocol config: every arm's search and final runs set up, at
    both ends of its search space, and each arm carries its own fields into its runs."""
    from xfer.experiments import protocol as protocol_lib

    config = runpy.run_path(str(REPO / "configs/ablate_methods.py"))["get_config"]("")
    config.lock()
    protocol = protocol_lib.read(config, tmp_path / "sweep")
    protocol_lib.check(config, protocol)
    # A ConfigDict keeps its keys sorted: so do the arms.
    assert list(protocol.arms) == ["full", "gradual", "last_k3", "layer_decay", "linear_probe", "lora8", "lp_ft",
                                   "norm_only"]
    assert protocol.baseline == "linear_probe" and protocol.trials == {**dict.fromkeys(protocol.arms, 4), "lp_ft": 3}
    assert protocol.spaces["linear_probe"] == {"optim.head.lr": protocol_lib.Categorical((1e-4, 1e-3, 1e-2, 1e-1))}
    assert protocol.spaces["lp_ft"] == {"optim.backbone.lr": protocol_lib.Categorical((1e-4, 1e-3, 1e-2))}
    assert protocol.spaces["lora8"] == {"optim.backbone.lr": protocol_lib.Categorical((1e-4, 1e-3, 1e-2, 1e-1))}
    full = protocol_lib.final_config(config, protocol, "full", {"optim.backbone.lr": 1e-5}, seed=2)
    assert (full.wise_ft_alphas, full.optim.backbone.lr, full.seed, full.data.evaluate_on) == (
        (0.0, 0.25, 0.5, 0.75, 1.0), 1e-5, 2, "test")
    search = protocol_lib.search_config(config, protocol, "layer_decay", {"optim.backbone.lr": 1e-3})
    assert (search.optim.backbone.layer_decay, search.partition, search.data.evaluate_on) == (0.7, "full", "val")
    assert protocol_lib.search_config(config, protocol, "linear_probe", {}).wise_ft_alphas == ()
    assert not (tmp_path / "sweep").exists()


def test_arms_restricts_the_grids_arms_and_names_what_it_cannot_restrict():
    config = ablate_config()
    with config.unlocked():
        config.arms = ml_collections.ConfigDict({"lp": {"partition": "linear_probe"}, "full": {"partition": "full"},
                                                 "bias": {"partition": "bias_only"}})
        config.sweep = ml_collections.ConfigDict({"arm": ("lp", "full", "bias"), "seed": (0, 1)})
    runs = sweep.grid(config, ["bias", "lp"])
    assert [run.name for run in runs] == ["arm=lp,seed=0", "arm=lp,seed=1", "arm=bias,seed=0", "arm=bias,seed=1"]
    assert [run.config.partition for run in runs] == ["linear_probe", "linear_probe", "bias_only", "bias_only"]
    assert len(sweep.grid(config)) == len(sweep.grid(config, None)) == 6
    with pytest.raises(sweep.SweepError, match=re.escape(
            "--arms names lp_ft, which config.sweep.arm does not list; pick from lp, full, bias")) as error:
        sweep.grid(config, ["lp", "lp_ft"])
    assert "\n" not in str(error.value)
    with config.unlocked():
        config.sweep = ml_collections.ConfigDict({"partition": ("full",), "seed": (0,)})
    with pytest.raises(sweep.SweepError, match=re.escape(
            "--arms restricts config.sweep.arm, which this config does not sweep; drop --arms")):
        sweep.grid(config, ["full"])


@pytest.mark.parametrize("arms, swept, message", [
    ({"full": {"partition": "full"}}, {"arm": ("full", "lp")}, "config.sweep.arm names 'lp', which config.arms"),
    ({"full": {"partition": "full"}}, {"arm": ("full",), "partition": ("full",)},
     "config.arms.full sets partition, which config.sweep also sweeps"),
    ({"full": {"partitio": "full"}}, {"arm": ("full",)}, "the config has no field partitio"),
])
def test_bad_arms_are_one_line_errors(arms, swept, message):
    config = ablate_config()
    with config.unlocked():
        config.arms = ml_collections.ConfigDict(arms)
        config.sweep = ml_collections.ConfigDict(swept)
    with pytest.raises(sweep.SweepError, match=re.escape(message)):
        sweep.grid(config)


@pytest.mark.parametrize("arg, model, runs", [
    ("", "efficientnet_lite0", 14),
    ("model=resnet50,data=cifar10", "resnet50", 14),
    ("model=vgg16,data=folder:{images},res=64", "vgg16", 12),  # no norm_only: VGG16 has no BatchNorm
])
def test_ablate_config_arguments_give_grids_whose_runs_all_set_up(arg, model, runs, tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / name / "0.png")
    grid = sweep.grid(ablate_config(arg.format(images=tmp_path / "images")))
    with tfds.testing.mock_data(num_examples=20):  # every run's data is built: CIFAR-10 is not here
        sweep.check(grid, tmp_path / "sweep")
    assert len(grid) == runs and grid[0].config.model.name == model
    assert not (tmp_path / "sweep").exists()


def test_a_run_the_grid_cannot_set_up_fails_the_sweep_before_the_first_run(tmp_path):
    """linear_probe trains no backbone, so only the second run meets the backbone's warmup."""
    workdir = tmp_path / "sweep"
    result = subprocess.run([*sweep_command("--config.total_steps=10", "--config.sweep.seed=(0,)",
                                            "--config.sweep.partition=('linear_probe', 'bias_only')"),
                             f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run partition=bias_only,seed=0: config.optim.backbone.warmup_steps=10 leaves no steps of the 10 "
        "total for the schedule; lower warmup_steps")
    assert "sweep run" not in result.stderr
    assert not workdir.exists()
    with pytest.raises(ValueError, match=r"bad argument 'modle=vgg16'; write key=value with key one of model"):
        ablate_config("modle=vgg16")


@pytest.mark.parametrize("grid, message", [
    ({"optim": {"head": {"lrr": (1e-3,)}}}, r"config.sweep.optim.head.lrr: the config has no field optim.head.lrr"),
    ({"seed": ("one",)}, r"config.sweep.seed: value 'one' is of type str, config.seed of type int; "
                         r"give values of its type"),
    ({"seed": 1}, r"config.sweep.seed is 1; give a non-empty tuple"),
    ({}, r"config.sweep is empty"),
])
def test_bad_grids_are_one_line_errors_before_anything_runs(grid, message):
    config = ablate_config()
    with config.unlocked():
        config.sweep = ml_collections.ConfigDict(grid)
    with pytest.raises(sweep.SweepError, match=message) as error:
        sweep.grid(config)
    assert "\n" not in str(error.value)


def test_printed_commands_load_in_launch_py_as_the_runs_the_sweep_would_run(tmp_path, monkeypatch):
    args = ("--config.total_steps=7", "--config.optim.backbone.warmup_steps=0", "--config.seed", "5",
            "--config.sweep.seed=(0, 1)",
            "--config.sweep.partition=('full', 'last_k:2')")
    result = subprocess.run([*sweep_command(*args), f"--workdir={tmp_path}", "--print_commands"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    config = ablate_config()
    with config.unlocked():
        config.total_steps = 7
        config.optim.backbone.warmup_steps = 0
        config.sweep = ml_collections.ConfigDict({"partition": ("full", "last_k:2"), "seed": (0, 1)})
    runs = sweep.grid(config)
    assert len(printed) == len(runs) == 4
    assert not list(tmp_path.iterdir())  # printing runs nothing
    monkeypatch.chdir(REPO)
    for command, run in zip(printed, runs):
        argv = shlex.split(command)
        assert argv[:2] == ["python", "launch.py"]
        launched, workdir = launch_py_flags(argv[1:])
        assert workdir_lib.config_as_json(launched) == workdir_lib.config_as_json(run.config)
        assert workdir == str(tmp_path / run.name)


def test_without_workdir_a_sweep_goes_to_runs_sweeps_named_by_its_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xfer.experiments.sweep", f"--config={REPO / CONFIG}:res=16",
                             "--print_commands"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep directory: runs/sweeps/grid_config,res=16 (the default" in result.stderr
    workdirs = {launch_py_flags(shlex.split(command)[1:])[1] for command in result.stdout.strip().splitlines()}
    assert workdirs and {str(Path(w).parent) for w in workdirs} == {
        str(tmp_path / "runs" / "sweeps" / "grid_config,res=16")}


def launch_py_flags(argv: list[str]):
    """The config and workdir that `argv` gives launch.py, through flags defined as launch.py defines them."""
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                             sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(argv)
    return config.value, workdir.value


def test_unknown_preset_fails_before_any_run_or_directory(tmp_path):
    workdir = tmp_path / "sweep"
    result = subprocess.run([*sweep_command("--config.sweep.partition=('full', 'linaer_probe')"),
                             f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run partition=linaer_probe,seed=0: unknown partition preset 'linaer_probe'; the presets are "
        "linear_probe, last_k:K, full, bias_only, norm_only, scratch, lora:R (xfer/learning/presets.py), "
        "or give (regex, group) rules")
    assert "sweep run" not in result.stderr
    assert not workdir.exists()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_killed_sweep_reruns_only_what_is_missing_and_writes_the_results(tmp_path, env):
    workdir = tmp_path / "sweep"
    first_summary = workdir / RUNS[0] / "summary.json"
    killed_log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the run
    with open(killed_log, "w") as log:
        killed = subprocess.Popen([*sweep_command(*TINY), f"--workdir={workdir}"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 400
    while not first_summary.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert first_summary.exists(), killed_log.read_text()[-3000:]
    assert not (workdir / RUNS[1] / "summary.json").exists()
    finished = {path: path.stat().st_mtime_ns for path in (workdir / RUNS[0]).rglob("*") if path.is_file()}

    rerun = subprocess.run([*sweep_command(*TINY), f"--workdir={workdir}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "sweep: 1 of 2 runs finished before, skipped" in rerun.stderr
    assert f"task 1/1: sweep run {RUNS[1]}\n" in rerun.stderr
    assert {path: path.stat().st_mtime_ns for path in (workdir / RUNS[0]).rglob("*") if path.is_file()} == finished

    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["partition"], row["seed"]) for row in rows] == [("linear_probe", "0"), ("last_k:1", "0")]
    assert list(rows[0]) == ["partition", "seed", "eval_accuracy", "eval_top5", "trainable_parameters",
                             "optimizer_state_bytes", "seconds_per_step", "wall_seconds"]
    assert [int(row["trainable_parameters"]) for row in rows] == [12_810, 424_970]  # head; + 1x1 head conv, BN
    assert all(0 <= float(row["eval_accuracy"]) <= 1 and float(row["seconds_per_step"]) > 0 for row in rows)
    assert int(rows[0]["optimizer_state_bytes"]) < int(rows[1]["optimizer_state_bytes"])
    table = (workdir / "results.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table if line.startswith("| ")] == [
        "| partition", "| linear_probe", "| last_k:1"]
    assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_local_executor_runs_a_two_run_sweep_and_the_table_is_collected(tmp_path, env):
    """submitit's local executor: each run a process of its own (two at once), the table collected
    from their workdirs by the command that dispatched them."""
    workdir = tmp_path / "sweep"
    runs = ("partition=linear_probe,seed=0", "partition=linear_probe,seed=1")
    args = (*TINY[:4], "--config.sweep.partition=('linear_probe',)", "--config.sweep.seed=(0, 1)")
    result = subprocess.run([*sweep_command(*args), f"--workdir={workdir}", "--executor=local", "--parallel=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"job (\S+): sweep run (\S+) \(log (\S+)\)", result.stderr)
    assert sorted(name for _, name, _ in jobs) == list(runs), result.stderr[-3000:]
    assert len({job for job, _, _ in jobs}) == 2
    for _, name, log in jobs:  # each job's own log, under the sweep's jobs/ folder
        assert Path(log).is_relative_to(workdir / "jobs") and "done: " in Path(log).read_text()
    assert all((workdir / name / "summary.json").exists() for name in runs)
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["partition"], row["seed"]) for row in rows] == [("linear_probe", "0"), ("linear_probe", "1")]
    assert all(0 <= float(row["eval_accuracy"]) <= 1 for row in rows)
    table = (workdir / "results.md").read_text()
    assert "| linear_probe" in table
    assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
