"""A step with a non-finite loss: the run stops at it keeping the last good checkpoint, or skips it.

A NaN is injected deterministically: the train step is wrapped so that the
batch of step 5 carries NaN inputs (here cached features: the quickstart's
feature cache is on), which makes that step's loss NaN whatever the CPU.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from xfer.training import checkpoint, step as step_lib, train

REPO = Path(__file__).resolve().parents[1]
POISONED_STEP = 5


def config(nan_policy: str):
    config = runpy.run_path(str(REPO / "configs" / "quickstart.py"))["get_config"]()
    config.init, config.nan_policy = "scratch", nan_policy
    config.data.image_size, config.batch_size = 32, 16
    config.total_steps, config.log_every, config.eval_every = 6, 1, 100
    config.checkpoint.every, config.checkpoint.keep_latest = 2, 10
    return config


@pytest.fixture
def poisoned(monkeypatch):
    """make_train_step's steps, with NaN inputs at step POISONED_STEP."""
    make_train_step = step_lib.make_train_step

    def poisoning_make_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)
        calls = []

        def poisoning(state, batch):
            calls.append(None)
            if len(calls) == POISONED_STEP:
                batch = {**batch, "image": jnp.full_like(batch["image"], jnp.nan)}
            return train_step(state, batch)
        poisoning.lower = train_step.lower
        return poisoning

    monkeypatch.setattr(step_lib, "make_train_step", poisoning_make_train_step)


def train_rows(workdir: Path) -> list[dict]:
    rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [row for row in rows if row["split"] == "train"]


def test_stop_ends_the_run_at_the_step_keeping_the_last_good_checkpoint(tmp_path, poisoned):
    with pytest.raises(train.NonFiniteLossError) as error:
        train.run(config("stop"), tmp_path)
    assert str(error.value) == (
        f"step {POISONED_STEP}: the loss or gradients are not finite; stopped, the last good checkpoint is "
        "step 4; lower the learning rate (config.optim.*.lr) or set config.nan_policy='skip' to skip such steps")
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    rows = train_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(np.isfinite(row["loss"]) for row in rows)
    variables = checkpoint.read_variables(tmp_path / "checkpoints")
    assert all(np.isfinite(v).all() for v in traverse_util.flatten_dict(variables).values())
    assert not (tmp_path / "summary.json").exists()


def test_skip_leaves_the_step_out_and_counts_it(tmp_path, poisoned):
    cfg = config("skip")
    cfg.checkpoint.every = 1  # every step kept (keep_latest=10), so each can be read back
    summary = train.run(cfg, tmp_path)
    assert summary["skipped_steps"] == 1 and np.isfinite(summary["eval_accuracy"])
    rows = train_rows(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert rows[POISONED_STEP - 1]["loss"] is None  # NaN is written as null: metrics.jsonl stays JSON
    assert rows[POISONED_STEP - 1]["skipped_steps"] == 1
    steps = {step: traverse_util.flatten_dict(checkpoint.read_variables(tmp_path / "checkpoints", step))
             for step in (POISONED_STEP - 1, POISONED_STEP, POISONED_STEP + 1)}
    before, skipped, after = steps.values()
    assert all(np.array_equal(before[k], skipped[k]) for k in before)  # the skipped step changed nothing
    assert not all(np.array_equal(skipped[k], after[k]) for k in skipped)  # the next one trained

