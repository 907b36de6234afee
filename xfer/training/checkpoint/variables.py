"""Another run's model variables, for `config.init = run:<workdir>`: params (+ batch_stats), never
its optimizer state, so the new run may use another optimizer or partition."""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from xfer.training.checkpoint import digest as digest_lib
from xfer.training.checkpoint.checkpointer import JSON_ITEMS, STATE_ITEM
from xfer.training.checkpoint.failures import CheckpointError, first_line, quiet_orbax

log = logging.getLogger("xfer")

# The state entries `read_variables` returns: the model, not how it was trained.
_VARIABLE_COLLECTIONS = ("params", "batch_stats")


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
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore)  # PyTree, not Standard: it can read part of a tree
    for json_item in JSON_ITEMS:
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
            saved_tree = manager.item_metadata(chosen)[STATE_ITEM].tree
            verified = digest_lib.saved_with_digest(manager, where)
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
        items = {STATE_ITEM: ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True)}
        if verified:
            items[digest_lib.ITEM] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(chosen, args=ocp.args.Composite(**items))
            variables = dict(restored[STATE_ITEM])
            if verified:
                digest_lib.verify(restored[digest_lib.ITEM], variables, {}, collections=tuple(variables))
        except CheckpointError as error:  # the digest's verdict, "damaged: ..."
            raise CheckpointError(f"checkpoint {where} is {error}; {fix}") from error
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} is unreadable ({first_line(error)}); {fix}") from error
    if not verified:
        log.warning("checkpoint %s has no digest (written before xfer verified checkpoints): read unverified", where)
    return variables
