"""Saving and restoring one run's checkpoints with Orbax.

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
  - **Verified restores.** Each checkpoint holds a digest of what it holds
    (`xfer.training.checkpoint.digest`), committed with it; `restore` compares what it
    read with it, and a mismatch counts as damage like a truncated file;
    `xfer.training.checkpoint.variables` checks the arrays it reads. Checkpoints without a
    digest restore with a logged note that they are unverified. The config's
    hash is saved but never checked (a resume compares the workdir's
    config.json); the metrics Orbax keeps for ranking are not covered (they only
    choose what retention keeps).
  - **Falling back past damage.** `restore` tries the newest step first; if it
    cannot be read (a truncated, deleted or damaged file), it logs the step and
    the error and tries the next older one, then deletes the unreadable newer
    steps so the resumed run can write those step numbers again. If none reads,
    one `CheckpointError` says so and what to do.
  - **Failed saves stop the run.** A save that cannot be written (disk full,
    read-only or unwritable directory) raises `CheckpointError` naming the step,
    the directory, the OS error and the newest intact step, and its partial
    `<step>.orbax-checkpoint-tmp*` directory is removed. A failure in the
    background write surfaces at the next `save`, `wait`, `close` or `check`.
    Directories are created before `save` returns (not asynchronously), so an
    unwritable directory fails at once: asynchronous creation let Orbax's
    writer threads wait 5 minutes for a directory that never came. Orbax's own
    reports of the failure stay out of the output (`xfer.training.checkpoint.failures`).
    With several processes, a write failing on one process alone still leaves
    the others in Orbax's commit barrier until its timeout (20 minutes).

Layout: `<directory>/<step>/{state, data_state, config, digest, chrono, metrics}`;
`state` is a pytree of jax arrays (`StandardSave`), the rest JSON. Every process
calls every method: Orbax coordinates multi-process writes itself.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, NoReturn

import jax
import orbax.checkpoint as ocp
from etils import epath

from xfer.training.checkpoint import digest as digest_lib
from xfer.training.checkpoint.failures import CheckpointError, first_line, join_writers, os_reason, quiet_orbax

log = logging.getLogger("xfer")

# A checkpoint's items: the state pytree, and JSON beside it.
STATE_ITEM, _DATA_STATE, _CONFIG, _DIGEST, _CHRONO = "state", "data_state", "config", digest_lib.ITEM, "chrono"
JSON_ITEMS = (_DATA_STATE, _CONFIG, _DIGEST, _CHRONO)
_TMP_MARK = ".orbax-checkpoint-tmp"


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict  # the data iterator's position
    chrono: dict  # the run's timing so far (`xfer.training.report.Chrono`); {} if saved without it


class Checkpointer:
    """Saves and restores one run's checkpoints in `directory`.

    Usage:
        with Checkpointer(workdir / "checkpoints") as ckpt:
            if ckpt.latest_step() is not None:
                step, state, data_state, chrono = ckpt.restore(state)
            ...
            ckpt.save(step, state, data_iter.get_state(), config.to_dict(), eval_metrics, chrono)
            ckpt.check()  # optional, every step: a failed background save stops the run there
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
        quiet_orbax()
        self.directory = epath.Path(directory).absolute()
        self.best_metric = best_metric
        self._pending: int | None = None  # the step whose background save is not yet known to have succeeded

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
            # Created in `save`, not in the background: an unwritable directory then fails at once,
            # instead of leaving Orbax's writer threads waiting minutes for a directory that never came.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
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
        chrono: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts writing checkpoint `step` in the background; False if `step` is already saved.

        `metrics` (scalars) rank the checkpoint for `keep_best`; they must hold
        `best_metric`. Pass None for a save without an evaluation (e.g. on
        preemption): that checkpoint is kept only while among the latest.
        `chrono` (`xfer.training.report.Chrono.saved()`) comes back from `restore`.

        Raises CheckpointError if the previous background save failed, or if
        this one cannot start (e.g. an unwritable directory).
        """
        step = int(step)
        json_items = {_DATA_STATE: dict(data_state), _CONFIG: dict(config)}
        if chrono:
            json_items[_CHRONO] = dict(chrono)
        for name, item in json_items.items():
            # Checked now: in the background write the error would surface a save later.
            try:
                json.dumps(item)
            except TypeError as error:
                raise TypeError(
                    f"{name} for step {step} is not JSON-serialisable ({error}); "
                    "convert it to dicts, lists, strings and numbers first."
                ) from None
        ranking = self._ranking_metrics(step, metrics)
        self._raise_if_failed()  # the previous save's failure, before anything else is written
        digest = digest_lib.compute(state, json_items)
        items = {name: ocp.args.JsonSave(item) for name, item in json_items.items()}
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardSave(state), _DIGEST: ocp.args.JsonSave(digest)}, **items
                ),
                metrics=ranking,
            )
        except Exception as error:  # noqa: BLE001 - re-raised by _failed, as CheckpointError or as itself
            self._failed(step, error)
        if saved:
            self._pending = step
        return saved

    def check(self) -> None:
        """Raises CheckpointError if the background save has failed; never blocks, costs a lock.

        A failure otherwise surfaces at the next `save`, `wait` or `close`; a
        trainer that calls this after every step stops within a step of it.
        With several processes it does nothing (one process stopping alone
        would leave the others waiting in a collective): there a failure
        surfaces where every process waits for the save.
        """
        if self._pending is not None and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self._raise_if_failed()

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

    def _raise_if_failed(self) -> None:
        """Waits for the background save, if any; a failure becomes a CheckpointError."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - re-raised by _failed
            self._failed(step, error)

    def _failed(self, step: int, error: BaseException) -> NoReturn:
        """Cleans up after save `step` failed and raises: a CheckpointError if the disk or the
        directory is the cause, else `error` itself (a bug keeps its traceback)."""
        self._pending = None
        self._remove_partial(step)
        reason = os_reason(error)
        if reason is None:
            raise error
        code, text = reason
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space there"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "make it writable"
        else:
            fix = "fix the cause"
        intact = max((s for s in _step_dirs(self.directory) if s != step), default=None)
        raise CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed: {text}; {fix} and rerun to resume "
            f"(or start over with another --workdir); "
            + (f"checkpoint {intact} is intact" if intact is not None else "no earlier checkpoint was saved")
        ) from error

    def _remove_partial(self, step: int) -> None:
        """Removes what the failed save of `step` wrote, so it stops holding disk space."""
        if jax.process_index() != 0:
            return
        join_writers(self._manager, timeout_s=10)
        # A tensorstore write still in flight when Orbax gave up can recreate a directory
        # once: look again a few times.
        for attempt in range(5):
            try:
                partial = [p for p in self.directory.iterdir() if p.name.startswith(f"{step}{_TMP_MARK}")]
            except OSError:
                return
            if not partial:
                return
            for path in partial:
                try:
                    path.rmtree()
                    log.debug("removed %s, the partial checkpoint %d", path, step)
                except OSError as error:  # e.g. a read-only filesystem: nothing to free anyway
                    log.debug("could not remove %s: %s", path, error)
                    return
            time.sleep(0.05 * (attempt + 1))

    def restore(self, state_template: Any | Callable[[int], Any]) -> Restored:
        """The newest checkpoint that reads back whole and matches its digest.

        `state_template` is a pytree like the saved state: jax arrays or
        `jax.ShapeDtypeStruct`s carrying the shardings the restored arrays get;
        or a function of the step giving it (a schedule of freeze masks saves
        each phase's optimizer state, `xfer.learning.phases`).
        Unreadable or damaged newer steps are logged, skipped, and then deleted;
        CheckpointError if no step reads back whole.
        """
        self._raise_if_failed()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; check the workdir, or start the run without resuming."
            )
        template_at = state_template if callable(state_template) else lambda _: state_template
        unreadable = []
        for step in steps:
            try:
                restored = self._restore_step(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, template_at(step)))
            # A damaged checkpoint fails wherever the damage is read: tensorstore, JSON,
            # a missing item, the digest. Any failure here means "try an older step".
            except Exception as error:  # noqa: BLE001
                log.warning(
                    "checkpoint step %d in %s is unreadable, trying an older one: %s",
                    step, self.directory, first_line(error),
                )
                unreadable.append((step, error))
                continue
            for bad_step, _ in unreadable:
                log.warning("deleting unreadable checkpoint step %d (resuming from step %d).", bad_step, step)
                try:
                    self._manager.delete(bad_step)
                except Exception as error:  # noqa: BLE001
                    raise CheckpointError(
                        f"checkpoint {bad_step} in {self.directory} is unreadable and could not be deleted "
                        f"({first_line(error)}); delete {self.directory / str(bad_step)} and rerun to resume "
                        f"from step {step}"
                    ) from error
            return Restored(step, *restored)
        newest_step, newest_error = unreadable[0]
        others = f"steps {', '.join(map(str, steps))} unreadable; " if len(steps) > 1 else ""
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({others}step {newest_step}: {first_line(newest_error)}); "
            f"move {self.directory} aside to restart from "
            "step 0, or restore its files (if the model or optimizer changed since they were written, "
            "use a new workdir)"
        ) from newest_error

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        verified = digest_lib.saved_with_digest(self._manager, self.directory / str(step))
        json_items = [_DATA_STATE] + ([_CHRONO] if (self.directory / str(step) / _CHRONO).exists() else [])
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                 **{name: ocp.args.JsonRestore() for name in json_items}}
        if verified:
            items[_DIGEST] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if verified:
            if _CHRONO not in json_items and _CHRONO in (restored[_DIGEST].get("json") or {}):
                raise CheckpointError(f"damaged: its {_CHRONO} item is missing")
            digest_lib.verify(restored[_DIGEST], restored[STATE_ITEM], {name: restored[name] for name in json_items})
        else:
            log.warning("checkpoint step %d in %s has no digest (written before xfer verified checkpoints): "
                        "restored unverified", step, self.directory)
        return restored[STATE_ITEM], restored[_DATA_STATE], restored[_CHRONO] if _CHRONO in json_items else {}

    def wait(self) -> None:
        """Blocks until the background save, if any, is written and committed; CheckpointError if it failed."""
        self._raise_if_failed()
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the background save and releases Orbax's threads; CheckpointError if the save failed."""
        try:
            self._raise_if_failed()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way out: a second one must not replace it
            self.close()
        except Exception as error:  # noqa: BLE001
            log.warning("%s", error if isinstance(error, CheckpointError) else first_line(error))


def _step_dirs(directory: epath.Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    except OSError:
        return []
