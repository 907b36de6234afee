"""The run-level numbers of a config, checked before anything is built or any workdir touched.

A value no run can use (`log_every=0`, `keep_latest=0`, a negative step count)
would otherwise surface deep inside the loop as a ZeroDivisionError, or after
the workdir was claimed. Each field's owner checks its own values as it reads
them: `xfer.data.settings` the data fields, `xfer.learning.optim` each group's
learning rate, momentum and decay; this module checks the rest.
"""

from __future__ import annotations

import math

import jax

from xfer.learning import loss
from xfer.training import feature_cache, step, wise_ft

NAN_POLICIES = ("stop", "skip")
_MAX_SEED = 2**32 - 1  # jax.random.PRNGKey and grain's seeds are 32-bit


def check(config) -> None:
    """Raises ValueError naming the first field whose value no run can use, and the fix."""
    _at_least("batch_size", config.batch_size, 1, "the global batch, in examples")
    _at_least("total_steps", config.total_steps, 0, "0 to train config.num_epochs epochs")
    if not (isinstance(config.num_epochs, (int, float)) and math.isfinite(config.num_epochs)
            and config.num_epochs >= 0):
        raise ValueError(f"config.num_epochs={config.num_epochs!r}; it must be a finite number >= 0")
    if config.total_steps == 0 and config.num_epochs == 0:
        raise ValueError("config.total_steps and config.num_epochs are both 0; set one of them to a positive number")
    _at_least("seed", config.seed, 0, f"and at most {_MAX_SEED}")
    if config.seed > _MAX_SEED:
        raise ValueError(f"config.seed={config.seed}; it must be a whole number in 0..{_MAX_SEED}")
    _at_least("log_every", config.log_every, 1, "log every N steps")
    _at_least("eval_every", config.eval_every, 1, "evaluate every N steps")
    _at_least("checkpoint.every", config.checkpoint.every, 1, "save every N steps")
    _at_least("checkpoint.keep_latest", config.checkpoint.keep_latest, 1, "a resume needs the newest")
    _at_least("checkpoint.keep_best", config.checkpoint.keep_best, 0, "0 keeps no best checkpoints")
    if config.feature_cache_dtype not in feature_cache.DTYPES:
        raise ValueError(f"config.feature_cache_dtype={config.feature_cache_dtype!r}; choose "
                         f"{' or '.join(map(repr, feature_cache.DTYPES))}")
    if config.nan_policy not in NAN_POLICIES:
        raise ValueError(f"config.nan_policy={config.nan_policy!r}; choose 'stop' (end the run at a non-finite "
                         "loss, keeping the last good checkpoint) or 'skip' (leave such steps out)")
    smoothing = config.label_smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ValueError(f"config.label_smoothing={smoothing!r}; it must be a number in [0, 1) (0: off, 0.1 is usual)")
    loss.parse_class_weights(config.class_weights)  # their count against the classes: once the data is read
    _check_wise_ft(config.wise_ft_alphas, config.wise_ft_head)
    _check_step_options(config)


def _check_wise_ft(alphas, head) -> None:
    """WiSE-FT's mixing weights (xfer.training.wise_ft): checked now, not after training has run."""
    if not isinstance(alphas, (tuple, list)) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in alphas):
        raise ValueError(f"config.wise_ft_alphas={alphas!r}; it must be a tuple of numbers in [0, 1] "
                         "(0: the initial weights, 1: the fine-tuned ones), e.g. (0.0, 0.5, 1.0), or () for none")
    if head not in wise_ft.HEADS:
        raise ValueError(f"config.wise_ft_head={head!r}; choose 'final' (the new head keeps its trained value "
                         "at every alpha) or 'interpolate' (from its initial value)")


def _check_step_options(config) -> None:
    """The train step's knobs (xfer.training.step.StepOptions)."""
    decay = config.ema_decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"config.ema_decay={decay!r}; it must be a number in [0, 1) (0: off, 0.999 is usual)")
    _at_least("grad_accum_steps", config.grad_accum_steps, 1, "micro-batches per optimizer update, 1 is off")
    batch, k, devices = config.batch_size, config.grad_accum_steps, jax.device_count()
    if batch % k:
        raise ValueError(f"config.batch_size={batch} does not split into config.grad_accum_steps={k} equal "
                         f"micro-batches; make the batch size a multiple of {k}")
    if k > 1 and batch // k % devices:
        raise ValueError(f"config.batch_size={batch} / grad_accum_steps={k} is {batch // k} examples a micro-batch, "
                         f"which does not split over the {devices} devices; make the batch size a multiple of "
                         f"{k * devices}")
    if config.compute_dtype not in step.COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}; choose 'float32' or 'bfloat16' "
                         "(activations only: parameters and optimizer state stay float32)")


def _at_least(field: str, value, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{field}={value!r}; it must be a whole number >= {minimum} ({meaning})")
