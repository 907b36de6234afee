"""`python -m xfer.models`: the zoo as a table, to choose a backbone before a run is written.

    python -m xfer.models                      # every registered model
    python -m xfer.models resnet50 vit_b_16    # some

A row holds what the choice turns on: the resolution the weights were trained
at, the parameter count (from the module itself, at 1000 classes), the blocks
`last_k:K` and layer decay count over, what the pretrained weights were trained on
(DINOv2's and CLIP's heads do not score ImageNet's classes), where they come from,
and whether that file is already on this machine (so a run will not download).
Parameter counts trace `init` abstractly (`jax.eval_shape`): nothing is
allocated, a ViT-B costs about a second.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from xfer import models
from xfer.weights import sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfer.models", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="MODEL", help="models to list (default: all)")
    args = parser.parse_args(argv)
    try:
        infos = [models.info(name) for name in args.names] or [models.MODELS[n] for n in sorted(models.MODELS)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("model", "input", "parameters", "blocks", "pretrained on", "weights from", "on this machine")]
    rows += [(info.name, f"{info.input_size} px", f"{parameter_count(info) / 1e6:.1f}M", str(len(info.blocks)),
              info.pretrained_on if info.imagenet else "-", sources.describe(info.imagenet), _on_machine(info))
             for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def parameter_count(info: models.ModelInfo) -> int:
    """Parameters (not BatchNorm statistics) of the model with a 1000-class head, at its input size."""
    images = jnp.zeros((1, info.input_size, info.input_size, 3))
    shapes = jax.eval_shape(info.make(num_classes=1000).init, jax.random.key(0), images)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def _on_machine(info: models.ModelInfo) -> str:
    if info.imagenet is None:
        return "-"
    return "yes" if sources.cached_file(info.imagenet) else "no"


if __name__ == "__main__":
    sys.exit(main())
