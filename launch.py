"""Runs one fine-tuning job: `python launch.py --config=configs/X.py[:args] --workdir=DIR`.

Override any config field from the command line (`--config.batch_size=32`);
the config is locked, so a misspelt key is an error, not a silently ignored
flag. Re-running with the same workdir and config resumes the run.
"""

import logging
import pickle
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "bad input", reported as one line; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, pickle.UnpicklingError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from xfer import train  # after flag parsing: importing JAX is slow, --help should not be

    try:
        train.run(_CONFIG.value, _WORKDIR.value)
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
