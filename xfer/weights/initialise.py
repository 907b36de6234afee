"""A model's starting variables: random, a torch checkpoint ported in, another xfer run's, or a
directory `python -m xfer.weights convert` or `merge` wrote.

Porting needs only the variables' shapes (`jax.eval_shape` of init), and only a
new head needs random values, so the network is never initialised twice: on 2
CPU cores that is 0.8 s instead of 15 s for vgg11 (`xfer.weights.initialise_new`).

A model with LoRA adapters (`xfer.models.lora`) is ported as the model without them, exactly
as strictly, and its adapters are added fresh after (A random, B zero): at step 0 it computes
what the ported model computes. A source that holds adapters is refused: `merge` folds them in.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xfer.models import lora
from xfer.weights import PortReport, initialise_new, load, port_same_names, sources

log = logging.getLogger("xfer")

RUN_PREFIX = "run:"
SAFETENSORS_FILE = "variables.safetensors"  # convert's and merge's --format safetensors: '/'-joined keys


def ported(model, model_name: str, source: str, image_size: int, seed: int = 0,
           head_zero_init: bool = False) -> tuple[dict, PortReport]:
    """`model`'s variables at `image_size` with `source` ported in, and the port's report.

    `source`: "pretrained" (or "imagenet"), a torchvision file name or a checkpoint path (see
    `xfer.weights.load`), "run:<workdir>" for another xfer run's latest
    variables, or a directory `python -m xfer.weights convert` or `merge` wrote
    (Orbax or `variables.safetensors`). A head whose class count differs is
    freshly initialised; with `head_zero_init` to zeros (big_vision's transfer
    default): the first steps then start from uniform predictions instead of the
    large random logits a small head's default init (e.g. Lite0's
    U(+-1/sqrt(classes))) produces.
    """
    init_fn = _init_fn(model, image_size, seed)
    shapes = traverse_util.flatten_dict(jax.eval_shape(init_fn), sep="/")
    adapters = [path for path in shapes if lora.is_adapter(path)]
    base = traverse_util.unflatten_dict({path: s for path, s in shapes.items() if path not in adapters}, sep="/")
    if source.startswith(RUN_PREFIX):
        from xfer.training import checkpoint  # Orbax: slow to import, and only this source needs it

        run_dir = Path(source[len(RUN_PREFIX):]).expanduser()
        saved = {f"{collection}/{path}": value
                 for collection, tree in checkpoint.read_variables(run_dir / "checkpoints").items()
                 for path, value in traverse_util.flatten_dict(tree, sep="/").items()}
        variables, report = port_same_names(_without_adapters(saved, source, str(run_dir)), model_name, base)
    elif source not in sources.PRETRAINED and Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        saved = _written_variables(directory)
        variables, report = port_same_names(_without_adapters(saved, source, "RUN_DIR"), model_name, base)
    else:
        variables, report = load(source, model_name, base)
    variables = initialise_new(init_fn, variables, [*adapters, *([] if head_zero_init else report.new_head)])
    if not head_zero_init:
        return variables, report
    flat = traverse_util.flatten_dict(variables, sep="/")
    zeroed = {path: jnp.zeros(v.shape, v.dtype) if path in report.new_head else v for path, v in flat.items()}
    return traverse_util.unflatten_dict(zeroed, sep="/"), report


def _written_variables(directory: Path) -> dict:
    """{'params/...': array} of a directory `python -m xfer.weights convert` or `merge` wrote."""
    if (directory / SAFETENSORS_FILE).is_file():
        from safetensors.numpy import load_file

        return load_file(str(directory / SAFETENSORS_FILE))
    if not (directory / "_CHECKPOINT_METADATA").is_file():
        hint = f"; for an xfer run's checkpoints write run:{directory}" if (directory / "checkpoints").is_dir() else ""
        raise FileNotFoundError(f"init directory {directory} holds neither {SAFETENSORS_FILE} nor an Orbax checkpoint "
                                f"(what python -m xfer.weights convert and merge write){hint}")
    import orbax.checkpoint as ocp  # slow to import; only this source needs it

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory.absolute())
    return {path: np.asarray(value) for path, value in traverse_util.flatten_dict(restored, sep="/").items()}


def _without_adapters(saved: dict, source: str, run_dir: str) -> dict:
    """`saved`, refused if it holds LoRA adapters: they belong to their run's model, folded in by merge."""
    adapters = [path for path in saved if lora.is_adapter(path)]
    if adapters:
        raise ValueError(f"init {source} holds LoRA adapters (e.g. {adapters[0]}); fold them into the weights "
                         f"first: python -m xfer.weights merge {run_dir} --out DIR, then init DIR")
    return saved


def initial_variables(model, model_name: str, init: str, image_size: int, seed: int, head_zero_init: bool) -> dict:
    """A run's starting variables: `init` is "scratch" (random, torch-style) or a source for `ported`."""
    if init == "scratch":
        log.info("init: scratch (random initialisation, nothing loaded)")
        return jax.jit(_init_fn(model, image_size, seed))()
    variables, report = ported(model, model_name, init, image_size, seed, head_zero_init)
    adapters = lora.adapter_count(variables["params"])
    log.info("init: %s -> %d tensors ported%s%s", init, len(report.rows),
             f", new head {', '.join(report.new_head)}" if report.new_head else "",
             f", {adapters:,} LoRA adapter parameters added (B = 0)" if adapters else "")
    return variables


def _init_fn(model, image_size: int, seed: int):
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return functools.partial(model.init, jax.random.PRNGKey(seed), images)
