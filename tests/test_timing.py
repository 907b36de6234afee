"""summary.json's timings cover every attempt of a resumed run, not only the last one.

The first attempt's steps are slowed by a known sleep and it stops at a
preemption boundary; the resumed attempt runs at full speed. Without the
chronometer saved in the checkpoint, the summary would report only the fast
attempt (milliseconds per step, one attempt).
"""

from __future__ import annotations

import json
import runpy
import time
from pathlib import Path

from xfer.scaling import preemption
from xfer.training import step as step_lib, train

REPO = Path(__file__).resolve().parents[1]
SLOW_SECONDS = 0.5  # added to each step of the first attempt
STOP_AT = 4  # the first attempt saves this step and stops, as on a preemption notice


def config():
    config = runpy.run_path(str(REPO / "configs" / "quickstart.py"))["get_config"]()
    config.init, config.data.image_size, config.batch_size = "scratch", 32, 16
    config.total_steps, config.log_every, config.eval_every, config.checkpoint.every = 6, 1, 100, 2
    return config


def test_a_resumed_run_reports_the_time_of_every_attempt(tmp_path, monkeypatch):
    make_train_step = step_lib.make_train_step

    def slow_make_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def slow(state, batch):
            time.sleep(SLOW_SECONDS)
            return train_step(state, batch)
        slow.lower = train_step.lower
        return slow

    with monkeypatch.context() as patch:
        patch.setattr(step_lib, "make_train_step", slow_make_train_step)
        patch.setattr(preemption, "reached", lambda step=None: step == STOP_AT)
        started = time.perf_counter()
        assert train.run(config(), tmp_path) is None
        first_attempt = time.perf_counter() - started
    summary = train.run(config(), tmp_path)

    assert summary["attempts"] == 2
    # Timed steps: 2..4 of the first attempt (step 1 compiles), 6 of the second (5 compiles).
    assert summary["seconds_per_step"] >= 3 * SLOW_SECONDS / 4
    # The first attempt's wall time up to its last save, then the whole second attempt.
    assert summary["wall_seconds"] >= STOP_AT * SLOW_SECONDS
    assert summary["wall_seconds"] <= first_attempt + (time.perf_counter() - started - first_attempt)
    assert json.loads((tmp_path / "summary.json").read_text())["attempts"] == 2
