"""Runs one fine-tuning job: `python launch.py --config=configs/X.py[:args] [--workdir=DIR]`.

Override any config field from the command line (`--config.batch_size=32`);
the config is locked, so a misspelt key is an error, not a silently ignored
flag. Without --workdir the run goes to `runs/X[,args]` (`xfer.cli.default_workdir`).
Re-running with the same workdir and config resumes the run.

A SIGTERM (a preemption notice) saves a checkpoint at the next step and exits
0; a Ctrl-C does the same and exits 130, and a second Ctrl-C stops at once
(xfer.scaling.preemption). Either way the same command resumes.

XLA flags that make the model's family faster on CPU are set unless XLA_FLAGS
is (xfer.training.xla_flags), and logged.
"""

import logging
import os
import sys

from xfer.scaling import preemption  # JAX-free: a Ctrl-C during the slow imports below is one line, no traceback

if __name__ == "__main__":
    preemption.stop_on_interrupt()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from xfer import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary "
                                "(default: runs/<config name>[,<config argument>]).")
flags.mark_flags_as_required(["config"])
# A manual multi-process launch; TPU pods, SLURM and Kubernetes are detected without them (xfer/scaling/distributed.py).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, the same for every process (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (env XFER_NUM_PROCESSES); "
                                      "1 turns cluster detection off.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0..num_processes-1 (env XFER_PROCESS_ID).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # force: absl put its own handler (and its long line prefix) on the root logger already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    cli.quiet_backend_probe()
    workdir = _WORKDIR.value or cli.default_workdir(flags.FLAGS["config"])
    if _WORKDIR.value is None:
        logging.info("workdir: %s (the default for this config; --workdir chooses another)", workdir)
    import jax  # after flag parsing: importing JAX is slow, --help should not be
    from xfer import models
    from xfer.scaling import distributed
    from xfer.training import train, xla_flags

    try:
        xla_flags.apply(models.info(_CONFIG.value.model.name).cpu_xla_flags)  # before the backend starts
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device
        if jax.process_index() > 0:  # one copy of the progress lines, process 0's
            logging.getLogger().setLevel(logging.WARNING)
        preemption.listen()
        summary = train.run(_CONFIG.value, workdir)
        if summary is None:  # stopped at a boundary (SIGTERM: 0, Ctrl-C: 130); the same command resumes
            sys.exit(preemption.exit_code())
    except cli.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        if jax.distributed.is_initialized():
            # At once: the others may wait for this process in a collective, and JAX's exit
            # handler would wait up to 5 minutes for them; their launcher stops them when we exit.
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(_CONFIG))
