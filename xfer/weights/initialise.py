"""A model's starting variables: random, a torch checkpoint ported in, or another xfer run's.

Porting needs only the variables' shapes (`jax.eval_shape` of init), and only a
new head needs random values, so the network is never initialised twice: on 2
CPU cores that is 0.8 s instead of 15 s for vgg11 (`xfer.weights.initialise_new`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util

from xfer.weights import PortReport, initialise_new, load, port_same_names

log = logging.getLogger("xfer")

RUN_PREFIX = "run:"


def ported(model, model_name: str, source: str, image_size: int, seed: int = 0,
           head_zero_init: bool = False) -> tuple[dict, PortReport]:
    """`model`'s variables at `image_size` with `source` ported in, and the port's report.

    `source`: "imagenet", a torchvision file name or a checkpoint path (see
    `xfer.weights.load`), or "run:<workdir>" for another xfer run's latest
    variables. A head whose class count differs is freshly initialised; with
    `head_zero_init` to zeros (big_vision's transfer default): the first steps
    then start from uniform predictions instead of the large random logits a
    small head's default init (e.g. Lite0's U(+-1/sqrt(classes))) produces.
    """
    init_fn = _init_fn(model, image_size, seed)
    shapes = jax.eval_shape(init_fn)
    if source.startswith(RUN_PREFIX):
        from xfer.training import checkpoint  # Orbax: slow to import, and only this source needs it

        run_dir = Path(source[len(RUN_PREFIX):]).expanduser()
        saved = {f"{collection}/{path}": value
                 for collection, tree in checkpoint.read_variables(run_dir / "checkpoints").items()
                 for path, value in traverse_util.flatten_dict(tree, sep="/").items()}
        variables, report = port_same_names(saved, model_name, shapes)
    else:
        variables, report = load(source, model_name, shapes)
    if not head_zero_init:
        return initialise_new(init_fn, variables, report.new_head), report
    flat = traverse_util.flatten_dict(variables, sep="/")
    zeroed = {path: jnp.zeros(v.shape, v.dtype) if path in report.new_head else v for path, v in flat.items()}
    return traverse_util.unflatten_dict(zeroed, sep="/"), report


def initial_variables(model, model_name: str, init: str, image_size: int, seed: int, head_zero_init: bool) -> dict:
    """A run's starting variables: `init` is "scratch" (random, torch-style) or a source for `ported`."""
    if init == "scratch":
        log.info("init: scratch (random initialisation, nothing loaded)")
        return jax.jit(_init_fn(model, image_size, seed))()
    variables, report = ported(model, model_name, init, image_size, seed, head_zero_init)
    log.info("init: %s -> %d tensors ported%s", init, len(report.rows),
             f", new head {', '.join(report.new_head)}" if report.new_head else "")
    return variables


def _init_fn(model, image_size: int, seed: int):
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return functools.partial(model.init, jax.random.PRNGKey(seed), images)
