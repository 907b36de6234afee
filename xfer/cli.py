"""What launch.py and `python -m xfer.experiments.sweep` share: bad input ends in one `error:` line.

Kept free of JAX imports, so `--help` and flag errors stay instant.
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

# Errors that mean "bad input", reported as one line; anything else is a bug and keeps its traceback.
# An OSError here is bad input too: an offline download (xfer.weights.sources.DownloadError), a
# missing or unreadable file; its message names the file and the fix.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


def flags_parser(config_flag: flags.FlagHolder):
    """absl's flag parsing for `app.run(..., flags_parser=...)`, but any bad flag is one `error:`
    line and exit code 2.

    absl reports its own flag errors in two lines, and an override of a key the
    config lacks (`--config.batch_sise=8`) escapes it as a KeyError or
    AttributeError from ml_collections, with pages of traceback.
    """

    def parse(argv):
        try:
            argv = flags.FLAGS(argv)
            config_flag.value.keys()  # a config file that failed to load raises only when first used
            return argv
        except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
            print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
            sys.exit(2)

    return parse


RUNS_DIR = Path("runs")


def default_workdir(config_flag: flags.FlagHolder, kind: str = "") -> Path:
    """`runs/<config name>[,<config argument>]` under the current directory: where a run goes when
    no --workdir is given, so the command a tutorial prints works as written and the same command
    resumes. `kind` ("sweeps") keeps a sweep's directory apart from a run of the same config.

        --config=configs/vgg16_cifar.py           -> runs/vgg16_cifar
        --config=configs/vgg16_cifar.py:res=32    -> runs/vgg16_cifar,res=32

    Command-line overrides (`--config.x=...`) are not in the name: the workdir's config.json
    then differs and the run is refused with the differing keys named, so nothing is overwritten.
    """
    path, _, argument = config_flags.get_config_filename(config_flag).partition(":")
    name = Path(path).stem + (f",{re.sub(r'[^A-Za-z0-9_.=,+-]', '-', argument)}" if argument else "")
    return RUNS_DIR / kind / name


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


class _NoMissingPluginNotes(logging.Filter):
    """Drops JAX's note that an optional backend's library is not installed.

    Choosing a backend, JAX tries each one it knows and logs (INFO) why one could
    not start: on a machine without TPUs `Unable to initialize backend 'tpu': ...
    libtpu.so: cannot open shared object file`, the first line of every run,
    though nothing is wrong. Only that case goes: a backend that is installed but
    fails (a TPU held by another process, a driver mismatch) is still logged, and
    JAX's own warnings (an accelerator present but unusable) are untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno < logging.WARNING and message.startswith("Unable to initialize backend")
                    and "cannot open shared object file" in message)


def quiet_backend_probe() -> None:
    """Keeps JAX's backend-probe notes about uninstalled plugins out of the output (before JAX starts)."""
    logging.getLogger("jax._src.xla_bridge").addFilter(_NoMissingPluginNotes())
