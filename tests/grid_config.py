"""configs/ablate_freeze.py as the plain grid it was before the protocol: every freeze mask (and
`scratch`) x seeds 0 and 1, no search, no final stage, no arms. What tests/test_sweep.py drives the
grid mode of `xfer.experiments.sweep` with.

    python -m xfer.experiments.sweep --config=tests/grid_config.py[:model=...,data=...,res=...]

Takes configs/ablate_freeze.py's argument (model, data, res).
"""

import runpy
from pathlib import Path

import ml_collections

# By path, not `from configs import ...`: the sweep's command line may run from any directory.
ablate_freeze = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "ablate_freeze.py"))

MASKS = ("linear_probe", "last_k:1", "last_k:3", "bias_only", "norm_only", "full", "scratch")


def get_config(arg: str = ""):
    config = ablate_freeze["get_config"](arg)
    for field in ("search", "final", "arms"):
        del config[field]
    has_batch_norm = config.model.name != "vgg16"
    masks = tuple(mask for mask in MASKS if mask != "norm_only" or has_batch_norm)
    config.sweep = ml_collections.ConfigDict({"partition": masks, "seed": (0, 1)})
    return config
