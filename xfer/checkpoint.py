"""Resumable runs: the training state, the data position and the config, saved with Orbax.

A run can die at any moment (preemption, OOM, Ctrl-C, a node failure) and must
then resume from where it was, not from step 0. `Checkpointer` wraps one
`orbax.checkpoint.CheckpointManager` (the v0 API with `args.Composite`) and
adds what a training loop needs on top of it:

  - **Retention that keeps both the newest and the best.** Orbax's `best_fn` +
    `max_to_keep` keeps only the best N, so the newest checkpoint is deleted
    whenever it is not among the best, and a preemption then loses progress.
    Here a checkpoint survives if it is among the latest `keep_latest` OR the
    best `keep_best` by `metrics[best_metric]` (Orbax's `preservation_policy`).
  - **Async, atomic saves.** Orbax writes in a background thread into
    `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only when every
    item is written (a `commit_success.txt` marks it on object stores), so a
    kill mid-save leaves the previous steps intact; leftovers are removed when
    the next run opens the directory.
  - **Falling back past damage.** `restore` tries the newest step first; if it
    cannot be read (a truncated or deleted file), it logs the step and the error
    and tries the next older one, then deletes the unreadable newer steps so the
    resumed run can write those step numbers again.

Layout: `<directory>/<step>/{state, data_state, config, metrics}`; `state` is a
pytree of jax arrays (`StandardSave`), the rest JSON. Every process calls every
method: Orbax coordinates multi-process writes itself.

`read_variables` reads another run's params (+ batch_stats) as numpy arrays for
`config.init = run:<workdir>`, without its optimizer state.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("xfer")

_STATE, _DATA_STATE, _CONFIG = "state", "data_state", "config"
# The state entries `read_variables` returns: the model, not how it was trained.
_VARIABLE_COLLECTIONS = ("params", "batch_stats")


class Checkpointer:
    """Saves and restores one run's checkpoints in `directory`.

    Usage:
        with Checkpointer(workdir / "checkpoints") as ckpt:
            if ckpt.latest_step() is not None:
                step, state, data_state = ckpt.restore(state)
            ...
            ckpt.save(step, state, data_iter.get_state(), config.to_dict(), eval_metrics)
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        keep_latest: int = 3,
        keep_best: int = 1,
        best_metric: str = "eval_accuracy",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if keep_latest < 1:
            raise ValueError(
                f"keep_latest={keep_latest} would delete the newest checkpoint; use keep_latest >= 1."
            )
        if keep_best < 0:
            raise ValueError(f"keep_best={keep_best} is negative; use 0 to keep no best checkpoints.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r}; use 'max' (e.g. accuracy) or 'min' (e.g. loss).")
        self.directory = epath.Path(directory).absolute()
        self.best_metric = best_metric

        def rank(metrics: Mapping[str, float]) -> float:
            return metrics[best_metric]

        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax write each step's metrics next to it, so the best
            # checkpoint is still known after a restart; retention is the policy's.
            best_fn=rank,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=keep_latest),
                    policies.BestN(
                        get_metric_fn=rank,
                        reverse=best_mode == "min",
                        n=keep_best,
                        # Unranked saves (no eval yet) live only while among the latest.
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None for a fresh directory."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric`, or None if no save had that metric."""
        return self._manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts writing checkpoint `step` in the background; False if `step` is already saved.

        `metrics` (scalars) rank the checkpoint for `keep_best`; they must hold
        `best_metric`. Pass None for a save without an evaluation (e.g. on
        preemption): that checkpoint is kept only while among the latest.
        """
        step = int(step)
        json_items = {_DATA_STATE: dict(data_state), _CONFIG: dict(config)}
        for name, item in json_items.items():
            # Checked now: in the background write the error would surface a save later.
            try:
                json.dumps(item)
            except TypeError as error:
                raise TypeError(
                    f"{name} for step {step} is not JSON-serialisable ({error}); "
                    "convert it to dicts, lists, strings and numbers first."
                ) from None
        items = {name: ocp.args.JsonSave(item) for name, item in json_items.items()}
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}, **items),
            metrics=self._ranking_metrics(step, metrics),
        )

    def _ranking_metrics(self, step: int, metrics: Mapping[str, float] | None) -> dict | None:
        if metrics is None:
            return None
        if self.best_metric not in metrics:
            raise ValueError(
                f"metrics for step {step} lack best_metric {self.best_metric!r} (have {sorted(metrics)}); "
                "pass metrics=None for an unranked save or set best_metric to one of these."
            )
        scalars = {name: float(value) for name, value in metrics.items()}
        if not math.isfinite(scalars[self.best_metric]):
            log.warning(
                "checkpoint step %d: %s=%s is not finite; saving it unranked.",
                step, self.best_metric, scalars[self.best_metric],
            )
            return None
        return scalars

    def restore(self, state_template: Any) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest checkpoint that reads back whole.

        `state_template` is a pytree like the saved state: jax arrays or
        `jax.ShapeDtypeStruct`s carrying the shardings the restored arrays get.
        Unreadable newer steps are logged, skipped, and then deleted.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; check the workdir, or start the run without resuming."
            )
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        unreadable = []
        for step in steps:
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardRestore(abstract_state),
                            _DATA_STATE: ocp.args.JsonRestore(),
                        }
                    ),
                )
            # A damaged checkpoint fails wherever the damage is read: tensorstore,
            # JSON, a missing item. Any failure here means "try an older step".
            except Exception as error:
                log.warning(
                    "checkpoint step %d in %s is unreadable, trying an older one: %s",
                    step, self.directory, _first_line(error),
                )
                unreadable.append((step, error))
                continue
            for bad_step, _ in unreadable:
                log.warning("deleting unreadable checkpoint step %d (resuming from step %d).", bad_step, step)
                self._manager.delete(bad_step)
            return step, restored[_STATE], restored[_DATA_STATE]
        newest_step, newest_error = unreadable[0]
        raise RuntimeError(
            f"no readable checkpoint in {self.directory} (tried steps {steps}; step {newest_step}: "
            f"{_first_line(newest_error)}); if the model or optimizer changed since they were written, "
            "resume in a new workdir, otherwise delete the damaged step directories."
        ) from newest_error

    def wait(self) -> None:
        """Blocks until the background save, if any, is written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the background save and releases Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_variables(
    directory: str | epath.PathLike,
    step: int | str = "latest",
    *,
    best_metric: str = "eval_accuracy",
    best_mode: str = "max",
) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} of another run's checkpoint, as numpy arrays.

    For initialising a new run from an old one (`config.init = run:<workdir>`):
    only the model variables are read, never the optimizer state, so the new
    run may use a different optimizer or partition. `directory` is the old
    run's `Checkpointer` directory; `step` is a step number, "latest", or
    "best" (by `best_metric`, as that run ranked them). `batch_stats` is
    present only if the run had BatchNorm.
    """
    directory = epath.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}; check the run path.")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.PyTreeRestore)  # PyTree, not Standard: it can read part of a tree
    for json_item in (_DATA_STATE, _CONFIG):
        registry.add(json_item, ocp.args.JsonRestore)
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as manager:
        if step == "latest":
            chosen = manager.latest_step()
        elif step == "best":
            scores = {s: (manager.metrics(s) or {}).get(best_metric) for s in manager.all_steps()}
            scores = {s: score for s, score in scores.items() if score is not None}
            pick = max if best_mode == "max" else min
            chosen = pick(scores, key=scores.get) if scores else None
        elif isinstance(step, int) and step in manager.all_steps():
            chosen = step
        else:
            raise ValueError(
                f"step={step!r} is not one of {directory}'s steps {manager.all_steps()}, 'latest' or 'best'."
            )
        if chosen is None:
            raise FileNotFoundError(
                f"no {step} checkpoint in {directory}"
                + (f" ranked by {best_metric!r}" if step == "best" else "")
                + "; check the run path, or use step='latest'."
            )
        saved_tree = manager.item_metadata(chosen)[_STATE].tree
        wanted = {name: saved_tree[name] for name in _VARIABLE_COLLECTIONS if name in saved_tree}
        if "params" not in wanted:
            raise ValueError(
                f"checkpoint {directory}/{chosen} has no 'params' in its state (has {sorted(saved_tree)}); "
                "it was not written by xfer's trainer."
            )
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(
            chosen,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True)}
            ),
        )
    return dict(restored[_STATE])


def _first_line(error: BaseException) -> str:
    """`Type: first line` of the root cause: tensorstore wraps it in pages of spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
