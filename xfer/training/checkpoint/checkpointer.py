"""Saving and restoring one run's checkpoints with Orbax, and reading another run's variables.

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
    `read_variables` checks the arrays it reads. Checkpoints written before the
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

Layout: `<directory>/<step>/{state, data_state, config, digest, metrics}`;
`state` is a pytree of jax arrays (`StandardSave`), the rest JSON. Every process
calls every method: Orbax coordinates multi-process writes itself.

`read_variables` reads another run's params (+ batch_stats) as numpy arrays for
`config.init = run:<workdir>`, without its optimizer state.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
from typing import Any, Mapping, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from xfer.training.checkpoint import digest as digest_lib
from xfer.training.checkpoint.failures import CheckpointError, first_line, join_writers, os_reason, quiet_orbax

log = logging.getLogger("xfer")

_STATE, _DATA_STATE, _CONFIG, _DIGEST = "state", "data_state", "config", "digest"
_TMP_MARK = ".orbax-checkpoint-tmp"
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
    ) -> bool:
        """Starts writing checkpoint `step` in the background; False if `step` is already saved.

        `metrics` (scalars) rank the checkpoint for `keep_best`; they must hold
        `best_metric`. Pass None for a save without an evaluation (e.g. on
        preemption): that checkpoint is kept only while among the latest.

        Raises CheckpointError if the previous background save failed, or if
        this one cannot start (e.g. an unwritable directory).
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
        ranking = self._ranking_metrics(step, metrics)
        self._raise_if_failed()  # the previous save's failure, before anything else is written
        digest = digest_lib.compute(state, json_items)
        items = {name: ocp.args.JsonSave(item) for name, item in json_items.items()}
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _DIGEST: ocp.args.JsonSave(digest)}, **items
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

    def restore(self, state_template: Any) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest checkpoint that reads back whole and matches its digest.

        `state_template` is a pytree like the saved state: jax arrays or
        `jax.ShapeDtypeStruct`s carrying the shardings the restored arrays get.
        Unreadable or damaged newer steps are logged, skipped, and then deleted;
        CheckpointError if no step reads back whole.
        """
        self._raise_if_failed()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; check the workdir, or start the run without resuming."
            )
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        unreadable = []
        for step in steps:
            try:
                state, data_state = self._restore_step(step, abstract_state)
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
            return step, state, data_state
        newest_step, newest_error = unreadable[0]
        others = f"steps {', '.join(map(str, steps))} unreadable; " if len(steps) > 1 else ""
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({others}step {newest_step}: {first_line(newest_error)}); "
            f"move {self.directory} aside to restart from "
            "step 0, or restore its files (if the model or optimizer changed since they were written, "
            "use a new workdir)"
        ) from newest_error

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        verified = _has_digest(self._manager, self.directory / str(step))
        items = {_STATE: ocp.args.StandardRestore(abstract_state), _DATA_STATE: ocp.args.JsonRestore()}
        if verified:
            items[_DIGEST] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if verified:
            digest_lib.verify(restored[_DIGEST], restored[_STATE], {_DATA_STATE: restored[_DATA_STATE]})
        else:
            log.warning("checkpoint step %d in %s has no digest (written before xfer verified checkpoints): "
                        "restored unverified", step, self.directory)
        return restored[_STATE], restored[_DATA_STATE]

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
    present only if the run had BatchNorm. The arrays are checked against the
    checkpoint's digest: CheckpointError if they are damaged or unreadable.
    """
    quiet_orbax()
    directory = epath.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}; check the run path.")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.PyTreeRestore)  # PyTree, not Standard: it can read part of a tree
    for json_item in (_DATA_STATE, _CONFIG, _DIGEST):
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
        where = directory / str(chosen)
        others = sorted(set(manager.all_steps()) - {chosen})
        fix = f"read another of its steps {others}, or restore its files" if others else "restore its files"
        try:
            saved_tree = manager.item_metadata(chosen)[_STATE].tree
            verified = _has_digest(manager, where)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint {where} is {error}; {fix}") from error
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} is unreadable ({first_line(error)}); {fix}") from error
        wanted = {name: saved_tree[name] for name in _VARIABLE_COLLECTIONS if name in saved_tree}
        if "params" not in wanted:
            raise ValueError(
                f"checkpoint {where} has no 'params' in its state (has {sorted(saved_tree)}); "
                "it was not written by xfer's trainer."
            )
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        items = {_STATE: ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True)}
        if verified:
            items[_DIGEST] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(chosen, args=ocp.args.Composite(**items))
            variables = dict(restored[_STATE])
            if verified:
                digest_lib.verify(restored[_DIGEST], variables, {}, collections=tuple(variables))
        except CheckpointError as error:  # the digest's verdict, "damaged: ..."
            raise CheckpointError(f"checkpoint {where} is {error}; {fix}") from error
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} is unreadable ({first_line(error)}); {fix}") from error
    if not verified:
        log.warning("checkpoint %s has no digest (written before xfer verified checkpoints): read unverified", where)
    return variables


def _has_digest(manager: ocp.CheckpointManager, step_dir: epath.Path) -> bool:
    """Whether the step was saved with a digest; CheckpointError if it was and the digest is gone."""
    if (step_dir / _DIGEST).exists():
        return True
    try:
        handlers = manager.metadata(int(step_dir.name)).item_handlers or {}
    except Exception:  # noqa: BLE001 - unreadable step metadata: treat the step as written before digests
        return False
    if _DIGEST in handlers:
        raise CheckpointError(f"damaged: its {_DIGEST} item is missing")
    return False


def _step_dirs(directory: epath.Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    except OSError:
        return []
