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


def _parse_flags(argv):
    """absl's flag parsing, but any bad flag is one `error:` line and exit code 2.

    absl reports its own flag errors in two lines, and an override of a key the
    config lacks (`--config.batch_sise=8`) escapes it as a KeyError or
    AttributeError from ml_collections, with pages of traceback.
    """
    try:
        argv = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises only when first used
        return argv
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def _flag_error(error: BaseException, argv) -> str:
    if isinstance(error, (KeyError, AttributeError)):
        # ml_collections: KeyError("'key'\nDid you mean ...?"), sometimes wrapped in an AttributeError.
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        key, _, hint = (str(error.args[0]) if error.args else str(error)).partition("\n")
        key = key.strip("'\"")
        overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        flag = next((o for o in overrides if key in o[len("--config."):].split(".")), "--config")
        return f"{flag}: the config has no field {key!r}" + (f"; {hint[:1].lower()}{hint[1:]}" if hint else "")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # get_config raised: keep what and where it said
        lines = lines[:lines.index("Traceback (most recent call last):")] + lines[-1:]
    return " ".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
