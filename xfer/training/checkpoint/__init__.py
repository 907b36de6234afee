"""Resumable runs: the training state, the data position and the config, saved with Orbax.

A run can die at any moment (preemption, OOM, Ctrl-C, a node failure, a full
disk) and must then resume from where it was, not from step 0, and never from
damaged bytes:

  - `checkpointer`: `Checkpointer` (retention of the newest and the best, async
    atomic saves, falling back past damage, failed saves that stop the run);
  - `variables`: `read_variables`, another run's params for `config.init = run:<workdir>`;
  - `digest`: a CRC-32 per array saved with each checkpoint and checked on restore;
  - `failures`: `CheckpointError`, one line per failure, Orbax's noise kept out.
"""

from xfer.training.checkpoint.checkpointer import Checkpointer
from xfer.training.checkpoint.failures import CheckpointError
from xfer.training.checkpoint.variables import read_variables

__all__ = ["CheckpointError", "Checkpointer", "read_variables"]
