"""WiSE-FT after training (xfer/training/wise_ft.py): the curve's ends are the run's two models, exactly.

One tiny run (EfficientNet-Lite0 from its ImageNet weights on digits at 32 px, 6 steps; the last
block and a new 10-way head train, the head starting random so that step 0's model predicts
something) with `wise_ft_head="interpolate"`, its first and last states captured through
test_train's spy. Against it: the initial variables WiSE-FT recomputes are bitwise step 0's; α = 0
evaluates exactly as the trainer's own `run_eval` does on step 0's state, α = 1 exactly as the
run's final evaluation; the files exist and agree; a rerun of the finished run writes them again.
The head choice and the arithmetic are checked on a toy tree; a bad α is refused before any work.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from xfer.training import mesh as mesh_lib, step as step_lib, train, validate, wise_ft
from xfer.training.report import Reporter

from test_train import (LAST_BLOCK_AND_HEAD, QUICK_ARGS, _lite0_config, _run_capturing_states, assert_one_error_line,
                        flat, launch)

ALPHAS = (1.0, 0.0, 0.5)  # given out of order: the curve is sorted by alpha
NEW_HEAD = frozenset({"params/_fc/kernel", "params/_fc/bias"})  # Lite0's 1000-way ImageNet head, new for 10 classes


def _config():
    config = _lite0_config(LAST_BLOCK_AND_HEAD, seed=0, init="imagenet")
    config.head_zero_init = False  # a random head: step 0's predictions are not all class 0
    config.total_steps = 6
    config.wise_ft_alphas, config.wise_ft_head = ALPHAS, "interpolate"
    return config


@pytest.fixture(scope="module")
def wise_run(tmp_path_factory):
    return _run_capturing_states(_config(), tmp_path_factory.mktemp("wise") / "run")


def _eval_of(state) -> dict:
    """The trainer's own evaluation of `state` (a host TrainState), writing nothing."""
    run_setup, mesh = train.setup(_config()), mesh_lib.data_mesh()
    reporter = Reporter("/nonexistent", 1, 1, is_writer=False)
    metrics = train.run_eval(step_lib.make_eval_step(run_setup.model, mesh), mesh_lib.replicate(state, mesh),
                             run_setup.data, reporter, 0)
    return {k: metrics[k] for k in wise_ft.ROW}


def test_interpolation_is_elementwise_exact_at_the_ends_and_keeps_equal_leaves():
    rng = np.random.default_rng(0)
    initial = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in {"params/w": (3, 4), "params/head": (4,), "batch_stats/mean": (4,)}.items()}
    final = {**{k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()},
             "batch_stats/mean": initial["batch_stats/mean"]}  # a frozen leaf: equal at both ends
    frozen = rng.standard_normal(1000).astype(np.float32)
    initial["params/frozen"] = final["params/frozen"] = frozen
    for alpha in (0.25, 0.3, 0.9):
        mixed = {k: np.asarray(v) for k, v in wise_ft.interpolate(initial, final, alpha).items()}
        for path in ("params/w", "params/head"):
            expected = (1 - np.float32(alpha)) * initial[path] + np.float32(alpha) * final[path]
            np.testing.assert_allclose(mixed[path], expected, rtol=1e-6, err_msg=path)
            assert mixed[path].dtype == np.float32
        for path in ("params/frozen", "batch_stats/mean"):
            assert np.array_equal(mixed[path], initial[path]), path
    # Why equal leaves are selected, not mixed: (1 - a) x + a x rounds some x off x in float32.
    naive = (1 - np.float32(0.3)) * frozen + np.float32(0.3) * frozen
    assert not np.array_equal(naive, frozen)
    for alpha, end in ((0.0, initial), (1.0, final)):
        mixed = wise_ft.interpolate(initial, final, alpha)
        assert all(np.array_equal(mixed[path], end[path]) for path in end), alpha
    kept = wise_ft.interpolate(initial, final, 0.0, keep_final=frozenset({"params/head"}))
    assert np.array_equal(kept["params/head"], final["params/head"])
    assert np.array_equal(kept["params/w"], initial["params/w"])


def test_the_recomputed_initial_variables_are_bitwise_step_0s(wise_run):
    initial, new_head = wise_ft.initial_state(train.setup(_config()))
    first = wise_run["first"]
    started = {f"{collection}/{path}": value for collection in ("params", "batch_stats")
               for path, value in flat(getattr(first, collection)).items()}
    assert initial.keys() == started.keys()
    for path, value in started.items():
        assert np.array_equal(np.asarray(initial[path]), value), path
    assert new_head == NEW_HEAD


def test_alpha_0_is_the_initial_model_and_alpha_1_the_final_one_exactly(wise_run):
    entry = wise_run["summary"]["wise_ft"]
    curve = {row["alpha"]: {k: row[k] for k in wise_ft.ROW} for row in entry["curve"]}
    assert list(curve) == [0.0, 0.5, 1.0]
    assert curve[0.0] == _eval_of(wise_run["first"])
    assert curve[1.0] == {k: wise_run["summary"][k] for k in wise_ft.ROW}  # the run's final evaluation
    assert curve[1.0] == _eval_of(wise_run["last"])
    assert curve[0.0]["eval_accuracy"] != curve[1.0]["eval_accuracy"]  # the two ends are different models


def test_csv_plot_and_summary_agree(wise_run):
    workdir, entry = wise_run["workdir"], wise_run["summary"]["wise_ft"]
    assert json.loads((workdir / "summary.json").read_text())["wise_ft"] == entry
    assert entry["head"] == "interpolate" and entry["kept_final"] == []
    assert "eval split" in entry["best_chosen_on"] and "optimistic" in entry["best_chosen_on"]
    # The last block (and the head) trained: their tensors and the block's BatchNorm statistics move.
    assert entry["interpolated_tensors"] > len(NEW_HEAD)
    best = max(entry["curve"], key=lambda row: (row["eval_accuracy"], row["alpha"]))
    assert (entry["best_alpha"], entry["best_eval_accuracy"]) == (best["alpha"], best["eval_accuracy"])
    lines = (workdir / "wise_ft.csv").read_text().splitlines()
    assert lines[0] == "alpha,eval_accuracy,eval_macro_f1,eval_top5,eval_examples"
    assert [[float(x) for x in line.split(",")] for line in lines[1:]] == [
        [row[k] for k in ("alpha", *wise_ft.ROW)] for row in entry["curve"]]
    assert (workdir / "wise_ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.glob("*.tmp"))
    assert "WiSE-FT over alpha [0.0, 0.5, 1.0]: head 'interpolate'" in wise_run["log"]


def test_a_rerun_of_the_finished_run_writes_the_missing_outputs_again(wise_run):
    workdir = wise_run["workdir"]
    for name in ("wise_ft.csv", "wise_ft.png"):
        (workdir / name).unlink()
    summary = train.run(_config(), workdir)
    assert summary["wise_ft"]["curve"] == wise_run["summary"]["wise_ft"]["curve"]
    assert (workdir / "wise_ft.csv").exists() and (workdir / "wise_ft.png").exists()


def test_new_head_keeps_its_trained_value_under_head_final(wise_run):
    """The default: at α = 0 the backbone is step 0's and the head the trained one."""
    initial, new_head = wise_ft.initial_state(train.setup(_config()))
    last = wise_run["last"]
    final = jax.tree.map(np.asarray, wise_ft.flat_variables(last))
    mixed = wise_ft.interpolate({path: initial[path] for path in final}, final, 0.0, new_head)
    for path in final:
        assert np.array_equal(mixed[path], final[path] if path in NEW_HEAD else initial[path]), path


@pytest.mark.parametrize("alphas, head, message", [
    ((0.5, 1.5), "final", "config.wise_ft_alphas=(0.5, 1.5); it must be a tuple of numbers in [0, 1]"),
    ((-0.25,), "final", "config.wise_ft_alphas=(-0.25,); it must be a tuple of numbers in [0, 1]"),
    ((float("nan"),), "final", "config.wise_ft_alphas=(nan,); it must be"),
    ((True,), "final", "config.wise_ft_alphas=(True,); it must be"),
    ((0.5,), "mean", "config.wise_ft_head='mean'; choose 'final'"),
])
def test_bad_settings_are_one_line_errors(alphas, head, message):
    config = _config()
    config.wise_ft_alphas, config.wise_ft_head = alphas, head
    with pytest.raises(ValueError) as raised:
        validate.check(config)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_bad_alpha_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    message = assert_one_error_line(launch(*QUICK_ARGS, "--config.wise_ft_alphas=(0.0, 2.0)", workdir=workdir))
    assert message.startswith("error: config.wise_ft_alphas=(0.0, 2.0); it must be a tuple of numbers in [0, 1]")
    assert not workdir.exists()


def test_with_an_ema_the_curve_ends_at_the_weights_evaluation_uses(tmp_path):
    """θ_final is the EMA when the run keeps one (config.ema_decay): α = 1 is the run's own evaluation."""
    config = _config()
    config.ema_decay, config.wise_ft_alphas = 0.9, (0.0, 1.0)
    summary = train.run(config, tmp_path / "run")
    final = summary["wise_ft"]["curve"][-1]
    assert final["alpha"] == 1.0
    assert {k: final[k] for k in wise_ft.ROW} == {k: summary[k] for k in wise_ft.ROW}
