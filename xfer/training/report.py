"""What a run tells its researcher: a progress line, TensorBoard, metrics.jsonl, summary.json.

Only process 0 writes (on a pod every host would otherwise write the same
files); every process still calls, so callers need no `if`.
TensorBoard events go through tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping

import jax

log = logging.getLogger("xfer")


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _step_of(line: str) -> float:
    """A metrics.jsonl row's step; infinity for a line a kill cut short, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Chrono:
    """A run's cost across every attempt that resumed it: the seconds a sweep table reports.

    `seconds_per_step` is steady-state training: each attempt's first
    (compiling) step, evaluation and checkpointing are left out (`paused`), so
    masks compare on what a training step costs. `wall_seconds` is everything,
    start-up included. Both add up over attempts through `saved()`, which goes
    into every checkpoint (big_vision's `Chrono`): an attempt's time after its
    last checkpoint is lost with the steps it redoes. Steps are dispatched
    asynchronously, so `paused` and the totals first wait for the state.
    """

    def __init__(self, attempt_started: float, saved: Mapping[str, float] | None = None):
        """`attempt_started`: `time.perf_counter()` when this attempt began; `saved`: the restored `saved()`."""
        saved = saved or {}
        self._before = {key: saved.get(key, 0) for key in ("train_seconds", "timed_steps", "wall_seconds", "attempts")}
        self._attempt_started = attempt_started
        self._start_time, self._start_step, self._paused_seconds, self._paused_at = None, None, 0.0, None

    def start(self, step: int) -> None:
        """Called once `step`, the first of this attempt, has finished."""
        self._start_time, self._start_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self, state):
        if self._start_time is None:  # before the first timed step (a phase's feature pass): nothing to leave out
            yield
            return
        jax.block_until_ready(state)
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._paused_seconds += time.perf_counter() - self._paused_at
            self._paused_at = None

    def saved(self, step: int) -> dict[str, float]:
        """The totals up to `step` (the last finished one), for a checkpoint; call it inside `paused`."""
        now = self._paused_at or time.perf_counter()
        timed = step - self._start_step if self._start_step is not None else 0
        train = now - self._start_time - self._paused_seconds if timed > 0 else 0.0
        return {"train_seconds": self._before["train_seconds"] + train,
                "timed_steps": self._before["timed_steps"] + timed,
                "wall_seconds": self._before["wall_seconds"] + now - self._attempt_started,
                "attempts": self._before["attempts"] + 1}

    def totals(self, state, last_step: int) -> dict[str, float | int | None]:
        """summary.json's timing: seconds per step (None before two steps of one attempt), wall seconds,
        attempts."""
        jax.block_until_ready(state)
        totals = self.saved(last_step)
        steps = totals["timed_steps"]
        return {"seconds_per_step": totals["train_seconds"] / steps if steps else None,
                "wall_seconds": totals["wall_seconds"], "attempts": totals["attempts"]}


class Reporter:
    def __init__(self, workdir: str | Path, total_steps: int, global_batch_size: int, is_writer: bool):
        self.workdir, self.total_steps = Path(workdir), total_steps
        self.global_batch_size, self.is_writer = global_batch_size, is_writer
        self._tb = None  # opened on the first write: a run that fails before it adds no events file
        self._purge_step = None
        self._last_time, self._last_step = None, None

    def resume_from(self, step: int) -> None:
        """Forgets what an earlier attempt logged after `step`, the step training restarts from.

        A run killed (or failed) after logging step n but checkpointing only step
        c < n repeats steps c+1..n: their metrics.jsonl rows are dropped and
        TensorBoard's events purged, so every step is reported once.
        """
        self._purge_step = step + 1
        path = self.workdir / "metrics.jsonl"
        if not self.is_writer or not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            log.info("dropping %d metrics.jsonl rows logged after step %d by an earlier attempt",
                     len(lines) - len(kept), step)
            self.write_file("metrics.jsonl", "".join(kept))

    def start_timer(self, step: int) -> None:
        """Called after the first (compiling) step, so rates measure steady state."""
        self._last_time, self._last_step = time.perf_counter(), step

    def train(self, step: int, metrics: dict) -> dict:
        """Adds steps/s, images/s, ETA to `metrics`, logs a progress line, writes events."""
        metrics = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        if self._last_time is not None and step > self._last_step:
            steps_per_s = (step - self._last_step) / (now - self._last_time)
            metrics.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.global_batch_size)
            eta = _fmt_duration((self.total_steps - step) / steps_per_s)
        else:
            eta = "?"
        self._last_time, self._last_step = now, step
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("step %d/%d %s eta=%s", step, self.total_steps, shown, eta)
        self.write(step, metrics, "train")
        return metrics

    def write(self, step: int, metrics: dict, prefix: str) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if not self.is_writer:
            return
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=self._purge_step)
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)
        # JSON has no NaN: a non-finite value (a step skipped under nan_policy 'skip') is written as null.
        row = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **row}) + "\n")

    def write_file(self, name: str, text: str) -> None:
        """Atomically (write + rename), so a killed run leaves no half file."""
        if not self.is_writer:
            return
        path = self.workdir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
