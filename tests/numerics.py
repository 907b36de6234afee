"""What tests that compare two XLA programs' numbers share: tolerances that rounding cannot break.

Two programs that compute the same thing (1 vs 8 devices, 1 vs 2 processes, cached vs uncached
features) add float32 terms in other orders, and the order differs from CPU to CPU. So a check
must hold for any rounding, not for the rounding of the machine it was written on:
- parameters are compared elementwise with a tolerance whose measured share is written beside it
  (`tolerance_used`), and trained with SGD, where a rounding-sized gradient difference stays a
  difference of that size (Adam's g / (sqrt(v) + eps) turns a rounding-noise gradient into a
  +-lr step: tests/test_train_equivalence.py);
- eval accuracies are compared only where rounding cannot flip a prediction (`assert_same_accuracy`):
  an example whose two top logits lie closer than rounding could move them may go either way.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xfer.training import checkpoint, feature_cache, train


def tolerance_used(actual: dict, expected: dict, rtol: float, atol: float) -> tuple[float, str]:
    """Largest |a - b| / (atol + rtol |b|) over every entry of two variable trees (<= 1: within the
    tolerance), and the path where it is."""
    got, want = (traverse_util.flatten_dict(tree, sep="/") for tree in (actual, expected))
    assert got.keys() == want.keys()
    return max((float(np.max(np.abs(np.asarray(got[k]) - want[k]) / (atol + rtol * np.abs(want[k])),
                             initial=0)), k) for k in want)


def cached_eval_logits(config, workdirs: list[Path]) -> tuple[list[np.ndarray], np.ndarray]:
    """Eval-split logits of each run's final variables on the eval features cached by the first run
    (`config` with its feature cache on), and the labels: what the runs' evaluations computed, up
    to rounding."""
    run_setup = train.setup(config)
    rows, labels = feature_cache.read(next((workdirs[0] / "feature_cache").glob("eval-*")), run_setup.data.num_eval)
    features = np.stack([rows[i] for i in range(len(rows))])

    @jax.jit
    def logits(variables):
        images = jnp.zeros((features.shape[0], run_setup.data.image_size, run_setup.data.image_size, 3), jnp.float32)
        with feature_cache.substituted(run_setup.cuts[0], features):
            return run_setup.model.apply(variables, images, train=False)

    return [np.asarray(logits(checkpoint.read_variables(w / "checkpoints"))) for w in workdirs], labels


def top2_margins(logits: np.ndarray) -> np.ndarray:
    """Per example, how far the top logit lies above the runner-up."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def assert_same_accuracy(accuracies: tuple[float, float], logits: list[np.ndarray], labels: np.ndarray,
                         min_margin: float) -> None:
    """The runs' eval accuracies are equal, except for examples whose top two logits (in either run)
    lie within `min_margin`, which rounding could flip; elsewhere the two runs' predictions agree.

    `min_margin` must exceed, by a measured factor, how far rounding moves a logit between the runs
    and between `cached_eval_logits` and a run's own evaluation.
    """
    near_ties = np.zeros(len(labels), bool)
    for run in logits:
        near_ties |= top2_margins(run) < min_margin
    predictions = [run.argmax(-1) for run in logits]
    print(f"eval: {near_ties.sum()} of {len(labels)} examples within {min_margin:g} of a tie; "
          f"smallest top-2 margin {min(top2_margins(run).min() for run in logits):.3g}")
    np.testing.assert_array_equal(predictions[0][~near_ties], predictions[1][~near_ties])
    for run, accuracy in zip(predictions, accuracies):  # these logits are the runs' evaluations
        assert abs(np.mean(run == labels) - accuracy) * len(labels) <= near_ties.sum() + 1e-6
    assert abs(accuracies[0] - accuracies[1]) * len(labels) <= near_ties.sum() + 1e-6, accuracies


def run_cached_and_uncached(make_config, root: Path) -> dict[str, dict]:
    """`train.run` of `make_config(feature_cache=...)` with the cache ("auto") and without (""), in
    root/cached and root/uncached: each run's summary."""
    return {name: train.run(make_config(feature_cache=cut), root / name)
            for name, cut in (("cached", "auto"), ("uncached", ""))}


def assert_cached_equals_uncached(make_config, root: Path, summaries: dict, rtol: float, atol: float,
                                  min_margin: float) -> None:
    """The two runs of `run_cached_and_uncached` ended with the same parameters (within the
    tolerance) and the same eval accuracy (off near-tied logits)."""
    params = {name: checkpoint.read_variables(root / name / "checkpoints")["params"] for name in summaries}
    used, where = tolerance_used(params["cached"], params["uncached"], rtol, atol)
    print(f"cached vs uncached params: {used:.3g} of the tolerance at {where}")
    assert used <= 1, f"{where} differs by {used:.3g} times the tolerance"
    runs = ("cached", "uncached")
    logits, labels = cached_eval_logits(make_config(feature_cache="auto"), [root / run for run in runs])
    assert_same_accuracy(tuple(summaries[run]["eval_accuracy"] for run in runs), logits, labels, min_margin)
