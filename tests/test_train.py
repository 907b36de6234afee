"""The trainer as a researcher meets it: launch.py end to end, frozen parameters, init from a run, bad input.

Each piece of the trainer has its own unit tests; this file checks what only the whole run shows:
that a headline config trains, evaluates, checkpoints and reports through `launch.py`, and resumes;
that "frozen" parameters and BatchNorm statistics come out bitwise unchanged and cost no optimizer
state; that `init = "run:<workdir>"` carries one run's final variables into the next; and that bad
input ends in one `error:` line with the workdir left as it was.

Runs are tiny (VGG11 on mock CIFAR-10, EfficientNet-Lite0 at 32 px) and shared through module
fixtures, since every run pays for JAX's import and compiles:
  vgg_run:    VGG11 on mock CIFAR-10 through launch.py (subprocess), 4 steps.
  run_a:      Lite0 on digits in-process, only `_fc/` trains; start and end states captured.
  run_b:      like run_a, but `_blocks/15/` trains too, initialised from run_a (`run:`).
  folder_run: Lite0 on a 2-class image folder through launch.py, initialised from run_b (`run:`),
              first failing on a corrupt image, then rerun once the image is fixed.

A corrupt image is only found while the data is read, after the workdir was claimed. The choice
tested here: a fresh workdir may keep the config.json it was claimed with (and no other file), as
long as a rerun of the same config works once the image is fixed; an existing run's workdir stays
untouched to the byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from xfer.training import checkpoint, step as step_lib, train
from xfer.learning import optim
from xfer.training import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
# launch.py under tfds's mock data, which patches only the process it runs in.
MOCK_LAUNCH = """\
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = ["launch.py", *sys.argv[1:]]
with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path("launch.py", run_name="__main__")
"""
VGG_ARGS = ("--config=configs/vgg16_cifar.py:res=32", "--config.init=scratch", "--config.model.name=vgg11",
            "--config.total_steps=4", "--config.eval_every=2", "--config.checkpoint.every=2",
            "--config.batch_size=8", "--config.log_every=1", "--config.feature_cache=")  # images through every step
# Lite0 on digits at 32 px: the quickest real config, for runs that must fail.
QUICK_ARGS = ("--config=configs/quickstart.py", "--config.init=scratch", "--config.data.image_size=32",
              "--config.batch_size=16", "--config.total_steps=2")
HEAD_ONLY = (("^_fc/", "head"), (".*", "frozen"))
LAST_BLOCK_AND_HEAD = (("^_blocks/15/", "last"), ("^_fc/", "head"), (".*", "frozen"))


@pytest.fixture(scope="module", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """Subprocesses share compiled programs: a rerun of a run then skips most of its compiling."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    del ENV["JAX_COMPILATION_CACHE_DIR"]


def launch(*args: str, workdir: Path, mock_cifar: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", MOCK_LAUNCH] if mock_cifar else [sys.executable, "launch.py"]
    return subprocess.run([*command, *args, f"--workdir={workdir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-5000:]


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit code 2 and a single `error:` line, the last one; log lines before it are fine."""
    assert result.returncode == 2, result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-5000:]
    return errors[0]


def snapshot(path: Path) -> dict | None:
    """Every entry under `path` with its kind, size and mtime; None if `path` does not exist.

    The workdir's lock file is left out: every start that gets as far as the lock writes its pid there.
    """
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in [path, *path.rglob("*")] if p.name != workdir_lib.LOCK_FILE}


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def metrics_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --- 1. the headline config end to end through launch.py --------------------------------------------

@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vgg") / "run"
    result = launch(*VGG_ARGS, workdir=workdir, mock_cifar=True)
    assert_ok(result)
    return workdir, result


def test_launch_trains_evaluates_and_writes_every_report(vgg_run):
    workdir, _ = vgg_run
    config = json.loads((workdir / "config.json").read_text())
    assert (config["model"]["name"], config["total_steps"], config["data"]["name"]) == ("vgg11", 4, "cifar10")

    rows = metrics_rows(workdir)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert {"loss", "accuracy", "grad_norm", "lr/classifier"} <= set(row), row
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["lr/classifier"] == 1e-3
    # Rates are measured from the end of the first (compiling) step on, over the global batch of 8.
    assert "steps_per_s" not in train_rows[0] and "images_per_s" not in train_rows[0]
    for row in train_rows[1:]:
        assert np.isfinite(row["steps_per_s"]) and row["images_per_s"] == pytest.approx(8 * row["steps_per_s"])
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert all({"eval_accuracy", "eval_top5", "eval_macro_f1"} <= set(r) for r in eval_rows)

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["eval_accuracy"] == eval_rows[-1]["eval_accuracy"]
    assert 0 <= summary["eval_accuracy"] <= summary["eval_top5"] <= 1
    # Only the classifier trains: Linear(512*7*7, 4096), Linear(4096, 4096), Linear(4096, 10).
    assert summary["trainable_parameters"] == (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert summary["eval_examples"] == 20  # the mock test split

    lines = (workdir / "confusion_matrix.csv").read_text().splitlines()
    assert lines[0] == "true\\predicted," + ",".join(map(str, range(10)))
    counts = np.array([[int(c) for c in line.split(",")[1:]] for line in lines[1:]])
    assert counts.shape == (10, 10) and counts.sum() == 20
    assert np.trace(counts) == round(summary["eval_accuracy"] * 20)

    per_class = json.loads((workdir / "eval_metrics.json").read_text())["per_class"]
    assert sorted(per_class, key=int) == [str(i) for i in range(10)]
    for name, scores in per_class.items():
        assert all(0 <= scores[k] <= 1 for k in ("precision", "recall", "f1")), (name, scores)
        assert scores["support"] == counts[int(name)].sum()

    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
    assert {p.name for p in (workdir / "checkpoints").iterdir()} == {"2", "4"}


def test_rerun_of_a_finished_run_resumes_and_trains_no_more(vgg_run):
    workdir, _ = vgg_run
    train_rows = [r for r in metrics_rows(workdir) if r["split"] == "train"]
    result = launch(*VGG_ARGS, workdir=workdir, mock_cifar=True)
    assert_ok(result)
    assert f"resumed from step 4 of {workdir}" in result.stderr
    assert not re.search(r"step \d+/4 ", result.stderr), "a finished run trained again"
    assert [r for r in metrics_rows(workdir) if r["split"] == "train"] == train_rows
    assert {p.name for p in (workdir / "checkpoints").iterdir()} == {"2", "4"}


def test_workdir_of_another_config_is_refused_and_untouched(vgg_run):
    workdir, _ = vgg_run
    before = snapshot(workdir)
    result = launch(*VGG_ARGS, "--config.optim.classifier.lr=0.01", workdir=workdir, mock_cifar=True)
    message = assert_one_error_line(result)
    assert "holds a run of a different config (differs in: optim.classifier.lr)" in message
    assert snapshot(workdir) == before


# --- 2. frozen parameters, in-process ----------------------------------------------------------------

def _lite0_config(partition, seed, init="scratch"):
    config = runpy.run_path(str(REPO / "configs" / "quickstart.py"))["get_config"]()
    config.init, config.seed, config.partition = init, seed, partition
    config.data.image_size, config.batch_size = 32, 16
    config.total_steps, config.log_every, config.eval_every = 3, 1, 100
    config.checkpoint.every = 100
    config.feature_cache = ""  # the frozen backbone runs in every train step: what is tested here
    if any(group == "last" for _, group in partition):
        config.optim.last = optim.group_config(optimizer="sgd", lr=0.1)
    return config


def _run_capturing_states(config, workdir):
    """train.run, plus the state the first step got and the state the last one returned, as numpy."""
    states, log_lines = [], []

    def spy_make_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def spied(state, batch):
            if not states:  # copied before the step, which donates its input
                states.append(jax.tree.map(np.array, state))
            new_state, metrics = train_step(state, batch)
            states[1:] = [jax.tree.map(np.array, new_state)]
            return new_state, metrics
        spied.lower = train_step.lower  # the trainer compiles the step ahead, to check its memory
        return spied

    make_train_step = step_lib.make_train_step
    handler = logging.Handler()
    handler.emit = lambda record: log_lines.append(record.getMessage())
    logger = logging.getLogger("xfer")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(step_lib, "make_train_step", spy_make_train_step)
            summary = train.run(config, workdir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {"workdir": workdir, "summary": summary, "first": states[0], "last": states[1],
            "log": "\n".join(log_lines)}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return _run_capturing_states(_lite0_config(HEAD_ONLY, seed=0), tmp_path_factory.mktemp("a") / "run")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, run_a):
    config = _lite0_config(LAST_BLOCK_AND_HEAD, seed=1, init=f"run:{run_a['workdir']}")
    return _run_capturing_states(config, tmp_path_factory.mktemp("b") / "run")


def test_frozen_params_and_batch_stats_stay_bitwise_equal_and_the_head_moves(run_a):
    first, last = run_a["first"], run_a["last"]
    assert int(last.step) == 3
    params_before, params_after = flat(first.params), flat(last.params)
    frozen = [path for path in params_before if not path.startswith("_fc/")]
    assert len(frozen) == len(params_before) - 2
    for path in frozen:
        assert np.array_equal(params_before[path], params_after[path]), path
    for path in ("_fc/kernel", "_fc/bias"):
        assert not np.array_equal(params_before[path], params_after[path]), f"{path} did not train"
    # All of the backbone is frozen, so every BatchNorm normalises with its running statistics.
    stats_before, stats_after = flat(first.batch_stats), flat(last.batch_stats)
    assert stats_before.keys() == stats_after.keys() and len(stats_before) > 0
    for path in stats_before:
        assert np.array_equal(stats_before[path], stats_after[path]), path


def test_frozen_group_holds_no_optimizer_state(run_a):
    opt_state = run_a["last"].opt_state
    is_partition = lambda node: isinstance(node, optax.PartitionState)  # noqa: E731
    [state] = [node for node in jax.tree.leaves(opt_state, is_leaf=is_partition) if is_partition(node)]
    assert set(state.inner_states) == {"head", "frozen"}
    assert jax.tree.leaves(state.inner_states["frozen"]) == []
    head_shapes = sorted(np.shape(leaf) for leaf in jax.tree.leaves(state.inner_states["head"]))
    assert (1280, 10) in head_shapes and (10,) in head_shapes  # Adam's moments of the head
    assert run_a["summary"]["trainable_parameters"] == 1280 * 10 + 10


def test_trainable_block_updates_its_batch_stats_while_frozen_neighbours_keep_theirs(run_b):
    stats_before, stats_after = flat(run_b["first"].batch_stats), flat(run_b["last"].batch_stats)
    last_block = [path for path in stats_before if path.startswith("_blocks/15/")]
    assert len(last_block) == 6  # mean and var of _bn0, _bn1, _bn2
    for path in last_block:
        assert not np.array_equal(stats_before[path], stats_after[path]), f"{path} did not train"
    for path in stats_before.keys() - set(last_block):  # _blocks/14 and every other layer
        assert np.array_equal(stats_before[path], stats_after[path]), path
    params_before, params_after = flat(run_b["first"].params), flat(run_b["last"].params)
    for path in params_before:
        trains = path.startswith(("_blocks/15/", "_fc/"))
        assert np.array_equal(params_before[path], params_after[path]) != trains, path


# --- 3. init = "run:<workdir>" -----------------------------------------------------------------------

def test_init_from_a_run_starts_from_its_final_variables(run_a, run_b):
    """Same class count: every parameter and statistic is run_a's last, not a seed-1 scratch init."""
    for collection in ("params", "batch_stats"):
        source, started = flat(getattr(run_a["last"], collection)), flat(getattr(run_b["first"], collection))
        assert source.keys() == started.keys()
        for path in source:
            assert np.array_equal(source[path], started[path]), f"{collection}/{path}"
    assert re.search(rf"init: run:{re.escape(str(run_a['workdir']))} -> \d+ tensors ported$", run_b["log"],
                     re.MULTILINE), run_b["log"]


# --- 4. bad input: one error line, the workdir untouched ------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (("--config.batch_sise=8",),
     "error: --config.batch_sise: the config has no field 'batch_sise'; did you mean \"batch_size\""),
    (("--config.partition=(('^_fcc/', 'head'), ('.*', 'frozen'))",),
     "error: partition rule 0 ('^_fcc/', 'head') matches no parameter; closest paths: _fc/"),
    (("--config.partition=(('^_fc/', 'head'), ('^_blocks/', 'frozen'))",),
     "error: 6 parameters match no partition rule (_bn0/bias, _bn0/scale, _bn1/bias, ...)"),
    (("--config.data.source=folder", "--config.data.path=/nonexistent"),
     "error: image folder /nonexistent does not exist"),
    (("--config.log_every=0",), "error: config.log_every=0; it must be a whole number >= 1"),
    (("--config.checkpoint.keep_latest=0",), "error: config.checkpoint.keep_latest=0; it must be a whole number >= 1"),
    (("--config.optim.head.lr=-1",), "error: config.optim.head.lr=-1.0; it must be a finite number > 0"),
    (("--config.optim.head.lr=nan",), "error: config.optim.head.lr=nan; it must be a finite number > 0"),
    (("--config.nan_policy=ignore",), "error: config.nan_policy='ignore'; choose 'stop'"),
    # XLA's own estimate of the step (~1.2 TiB at batch 16) against the machine's memory, before any work.
    (("--config.data.image_size=20000", "--config.feature_cache="), "error: this run needs ~"),
], ids=["config_key_typo", "rule_matches_nothing", "parameter_uncovered", "missing_image_folder", "log_every_0",
        "keep_latest_0", "negative_lr", "nan_lr", "unknown_nan_policy", "image_too_large_for_memory"])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, args, expected):
    workdir = tmp_path / "run"
    message = assert_one_error_line(launch(*QUICK_ARGS, *args, workdir=workdir))
    assert message.startswith(expected), message
    assert not workdir.exists()


def _write_images(root: Path, counts: dict[str, int], classes=("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(root / split / name / f"{i}.png")


def test_the_card_command_runs_without_workdir_and_the_same_command_resumes(tmp_path):
    """`python launch.py --config=configs/vgg16_cifar.py` as written (offline overrides only): the run goes to
    runs/<config name>[,<config argument>] under the current directory, and the same command resumes it."""
    _write_images(tmp_path / "images", {"train": 4, "test": 2})
    command = [sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs' / 'vgg16_cifar.py'}:res=32",
               "--config.init=scratch", "--config.data.source=folder", f"--config.data.path={tmp_path / 'images'}",
               "--config.total_steps=4", "--config.batch_size=4"]
    first, second = (subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
                     for _ in range(2))
    workdir = tmp_path / "runs" / "vgg16_cifar,res=32"
    for result in (first, second):
        assert_ok(result)
        assert f"workdir: {Path('runs') / 'vgg16_cifar,res=32'} (the default for this config" in result.stderr
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
    assert "resumed from step 4" in second.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["vgg16_cifar,res=32"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, run_b):
    """A 2-class folder run from run_b's final variables: first with a corrupt image, then fixed."""
    root = tmp_path_factory.mktemp("folder")
    images, workdir = root / "pets", root / "run"
    _write_images(images, {"train": 4, "val": 2})
    corrupt = images / "train" / "dog" / "2.png"
    corrupt.write_bytes(b"these bytes are no PNG")
    # No feature cache: the rerun of the finished run must read the images again.
    args = (*QUICK_ARGS, "--config.batch_size=4", "--config.seed=2", "--config.log_every=1", "--config.feature_cache=",
            "--config.data.source=folder", f"--config.data.path={images}", f"--config.init=run:{run_b['workdir']}")
    failed = launch(*args, workdir=workdir)
    after_failure = snapshot(workdir)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(corrupt)
    rerun = launch(*args, workdir=workdir)
    return {"args": args, "images": images, "workdir": workdir, "corrupt": corrupt, "failed": failed,
            "after_failure": after_failure, "rerun": rerun}


def test_corrupt_image_is_named_and_a_fixed_rerun_of_the_fresh_workdir_works(folder_run):
    message = assert_one_error_line(folder_run["failed"])
    assert message.startswith(f"error: cannot read image {folder_run['corrupt']}"), message
    # Found while training, after the claim: the workdir holds config.json, no checkpoint, and the
    # metrics of step 1 (with seed 2 the bad image is in the second batch).
    assert {"config.json", "metrics.jsonl"} <= set(folder_run["after_failure"])
    assert not [path for path in folder_run["after_failure"] if path.startswith("checkpoints/")]
    assert_ok(folder_run["rerun"])
    assert "holds this run's config but no checkpoint (an earlier attempt stopped before its first save): " \
           "training from step 0" in folder_run["rerun"].stderr
    assert json.loads((folder_run["workdir"] / "summary.json").read_text())["steps"] == 2
    # The rerun started over and reported every step once, whatever the failed attempt had logged.
    assert [r["step"] for r in metrics_rows(folder_run["workdir"]) if r["split"] == "train"] == [1, 2]


def test_corrupt_image_leaves_an_existing_run_untouched(folder_run):
    bad = folder_run["images"] / "val" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG truncated")
    before = snapshot(folder_run["workdir"])
    # The run is finished, so the rerun only evaluates, and meets the bad file there.
    message = assert_one_error_line(launch(*folder_run["args"], workdir=folder_run["workdir"]))
    assert message.startswith(f"error: cannot read image {bad}"), message
    assert snapshot(folder_run["workdir"]) == before


def test_init_from_a_run_with_another_class_count_gets_a_new_head(folder_run, run_b):
    """The 10-class run_b starts the 2-class folder run: a new head, everything else run_b's last."""
    log = folder_run["rerun"].stderr
    assert re.search(r"init: run:\S+ -> \d+ tensors ported, new head params/_fc/(kernel|bias), "
                     r"params/_fc/(kernel|bias)$", log, re.MULTILINE), log
    saved = checkpoint.read_variables(folder_run["workdir"] / "checkpoints")
    for collection in ("params", "batch_stats"):
        # Only the head trains in the folder run, so its last variables are its first.
        source, ended = flat(getattr(run_b["last"], collection)), flat(saved[collection])
        assert source.keys() == ended.keys()
        for path in source:
            if path.startswith("_fc/"):
                assert ended[path].shape[-1] == 2, path
            else:
                assert np.array_equal(source[path], ended[path]), f"{collection}/{path}"


def test_a_batch_larger_than_the_training_set_is_a_warning(caplog):
    config = _lite0_config(HEAD_ONLY, seed=0)
    config.batch_size = 2048
    with caplog.at_level(logging.WARNING, logger="xfer"):
        train.setup(config)
    assert "config.batch_size=2048 is larger than the 1437 training examples" in caplog.text
