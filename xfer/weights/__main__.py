"""`python -m xfer.weights`: look inside a checkpoint, port it once, check a port on real photos,
fold a LoRA run's adapters into its weights.

    python -m xfer.weights inspect ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth
    python -m xfer.weights convert pretrained --model vgg16 --num-classes 10 --out ported/vgg16
    python -m xfer.weights check                      # EfficientNet-Lite0 on two photos
    python -m xfer.weights merge runs/lora_vit --out merged/lora_vit   # then config.init=merged/lora_vit

A port that goes wrong is nearly always the input's fault (a file for another
architecture, a truncated download, no internet), so those errors end in one
`error:` line saying what to fix, with exit code 2, never a traceback. An
output directory (of convert or merge) appears whole or not at all: it is written into a hidden
staging folder beside it (`.NAME.pid<PID>-<HOST>.<random>.partial`) and renamed
last. Ctrl-C or SIGTERM removes the staging folder and exits at once (130 or
143, one line); one that a SIGKILL left behind is removed by the next convert
or merge into the same folder, once its process is gone. Either output loads as
`config.init=DIR` (`xfer.weights.initialise`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from xfer.scaling import preemption  # JAX-free

if __name__ == "__main__":  # before the slow imports: a Ctrl-C is one line, never a traceback
    preemption.stop_on_interrupt("stopped; nothing was written", terminate=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from xfer import models  # noqa: E402
from xfer.weights import (CheckpointFormatError, PortReport, UnsafeCheckpointError,  # noqa: E402
                          WeightMismatchError, read, sources)
from xfer.weights.convert import format_shape  # noqa: E402
from xfer.weights.initialise import SAFETENSORS_FILE, ported  # noqa: E402

# What bad input raises; anything else is a bug and keeps its traceback.
_USER_ERRORS = (WeightMismatchError, CheckpointFormatError, UnsafeCheckpointError, ValueError,
                OSError, ModuleNotFoundError)

# scikit-image's photos and the ImageNet classes a good port puts first.
_CHECK_PHOTOS = {"chelsea": range(281, 286), "coffee": (967,)}  # a cat; an espresso


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xfer.weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="list a checkpoint's tensors: key, shape, dtype")
    inspect.add_argument("file", help="a .pth or .safetensors file")
    inspect.set_defaults(command=_inspect)

    convert = commands.add_parser("convert", help="port a torch checkpoint into a model's Flax variables")
    convert.add_argument("file", help="a .pth/.safetensors path, a torchvision file name, or 'pretrained' "
                         "(the model's registered weights; 'imagenet' is the older name)")
    convert.add_argument("--model", required=True, choices=sorted(models.MODELS))
    convert.add_argument("--num-classes", type=int, default=1000,
                         help="classes of the new head; other than the checkpoint's -> freshly initialised")
    convert.add_argument("--out", required=True, type=Path, help="output directory; must not exist or be empty")
    convert.add_argument("--format", choices=("orbax", "safetensors"), default="orbax",
                         help=f"an Orbax checkpoint, or DIR/{SAFETENSORS_FILE} with '/'-joined keys")
    convert.set_defaults(command=_convert)

    check = commands.add_parser("check", help="classify two photos with a model's ported ImageNet weights")
    check.add_argument("--model", default="efficientnet_lite0", choices=sorted(sources.imagenet_models()))
    check.set_defaults(command=_check)

    merge = commands.add_parser("merge", help="fold a LoRA run's adapters into its weights: a plain model's variables")
    merge.add_argument("run_dir", type=Path, help="the run's --workdir (config.json and checkpoints/)")
    merge.add_argument("--out", required=True, type=Path, help="output directory; must not exist or be empty")
    merge.add_argument("--format", choices=("orbax", "safetensors"), default="orbax",
                       help=f"an Orbax checkpoint, or DIR/{SAFETENSORS_FILE} with '/'-joined keys")
    merge.add_argument("--step", type=_step, default="latest",
                       help="the checkpoint: latest (default), best (by eval accuracy) or a step number")
    merge.set_defaults(command=_merge)
    return parser


def _step(text: str) -> int | str:
    if text in ("latest", "best"):
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not latest, best or a step number")
    return int(text)


# --- inspect ----------------------------------------------------------------

def _inspect(args) -> int:
    tensors = read(args.file)
    rows = [(key, format_shape(a.shape), str(a.dtype)) for key, a in tensors.items()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("key", "shape", "dtype"))]
    for row in [("key", "shape", "dtype"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    parameters = sum(a.size for a in tensors.values())
    size = sum(a.nbytes for a in tensors.values())
    print(f"{len(tensors)} tensors, {parameters:,} parameters, {size:,} bytes ({size / 2**20:.1f} MiB)")
    return 0


# --- convert ----------------------------------------------------------------

def _convert(args) -> int:
    out = _free_out(args.out)
    path = sources.resolve(args.file, args.model)
    print(f"reading {path}")
    variables, report = _ported_variables(str(path), args.model, args.num_classes)
    print(report.table())
    write = _write_orbax if args.format == "orbax" else _write_safetensors
    _write_atomically(out, functools.partial(write, variables))
    print(f"wrote {out} ({args.format}, {_count(variables):,} values)")
    return 0


def _free_out(out: Path) -> Path:
    out = out.resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty directory; "
                              "choose a new --out or remove it first")
    return out


def _ported_variables(source: str, model_name: str, num_classes: int = 1000) -> tuple[dict, PortReport]:
    """The model's variables at its ImageNet resolution (ViT's depend on it) with `source` ported in."""
    model = models.build(model_name, num_classes)
    return ported(model, model_name, source, models.info(model_name).input_size)


def _write_atomically(out: Path, write) -> None:
    """Has `write(path)` create a sibling of `out`, then renames it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_staging_owner()}.", suffix=_STAGING_SUFFIX,
                                    dir=out.parent))
    with preemption.scratch(staging):  # removed however this ends, a Ctrl-C or SIGTERM included
        write(staging / out.name)
        with preemption.uninterruptible():  # a stop now waits, so it cannot remove what becomes `out`
            (staging / out.name).rename(out)  # replaces an empty directory, refuses a full one


_STAGING_SUFFIX = ".partial"
# .NAME.pid<PID>-<HOST>.<mkdtemp's random letters, digits and _>.partial
_STAGING_NAME = re.compile(r"\..+\.pid(?P<pid>\d+)-(?P<host>[A-Za-z0-9_-]*)\.[a-z0-9_]+" + re.escape(_STAGING_SUFFIX))


def _staging_owner(pid: int | None = None) -> str:
    """`pid<PID>-<HOST>`: which process on which machine writes a staging folder."""
    return f"pid{os.getpid() if pid is None else pid}-{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}"


def _remove_stale_staging(parent: Path) -> None:
    """Removes the staging folders in `parent` of converts on this machine whose process is gone."""
    host = _staging_owner().partition("-")[2]
    for path in parent.glob(f".*{_STAGING_SUFFIX}"):
        match = _STAGING_NAME.fullmatch(path.name)
        if not match or match["host"] != host or _alive(int(match["pid"])) or not path.is_dir():
            continue  # another machine's (on a shared disk), a running convert's, or not ours
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}, the staging folder of an interrupted convert (process {match['pid']}, gone)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_orbax(variables: dict, path: Path) -> None:
    import orbax.checkpoint as ocp  # slow to import; only this path needs it

    with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the async save
        checkpointer.save(path, variables)


def _write_safetensors(variables: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(variables, sep="/")
    path.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path / SAFETENSORS_FILE))


def _count(variables: dict) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))


# --- merge ------------------------------------------------------------------

def _merge(args) -> int:
    from xfer.weights import merge  # Orbax and the trainer's checkpoint reader: only merge needs them

    out = _free_out(args.out)
    variables, settings, adapters = merge.merged_run(args.run_dir.resolve(), args.step)
    print(f"{args.run_dir}: checkpoint {args.step}, {settings.spelled()}: {adapters:,} adapter parameters folded "
          f"into their kernels (W + {settings.scale:g} * A B)")
    write = _write_orbax if args.format == "orbax" else _write_safetensors
    _write_atomically(out, functools.partial(write, variables))
    print(f"wrote {out} ({args.format}, {_count(variables):,} values); train from it with --config.init={out}")
    return 0


# --- check ------------------------------------------------------------------

def _check(args) -> int:
    from skimage import data

    from xfer.data.transforms import IMAGENET_EVAL_CROP, central_crop, normalise

    info = models.info(args.model)
    path = sources.resolve("imagenet", args.model)
    print(f"{args.model}: ImageNet weights from {path}")
    variables, _ = _ported_variables(str(path), args.model)
    crops = np.stack([central_crop(getattr(data, photo)(), info.input_size, IMAGENET_EVAL_CROP)
                      for photo in _CHECK_PHOTOS])
    images = normalise(crops, info.mean, info.std)
    logits = jax.jit(models.build(args.model).apply)(variables, jnp.asarray(images))
    probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))
    class_names = _imagenet_class_names()
    passed = True
    for (photo, expected), p in zip(_CHECK_PHOTOS.items(), probabilities):
        top5 = np.argsort(p)[::-1][:5]
        ok = top5[0] in expected
        passed &= ok
        wanted = ", ".join(f"{c} {class_names[c]}" for c in expected)
        print(f"{photo}: {'OK' if ok else 'FAIL'} (expected one of: {wanted})")
        for c in top5:
            print(f"  {p[c]:6.1%}  {c:4d}  {class_names[c]}")
    return 0 if passed else 1


def _imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's weight metadata)."""
    return (importlib.resources.files("xfer.weights") / "imagenet_classes.txt").read_text().splitlines()


if __name__ == "__main__":
    sys.exit(main())
