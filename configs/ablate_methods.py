r"""Which fine-tuning *method*? Seven arms x seeds, one command: masks, phases, layer decay, WiSE-FT.

    python -m xfer.experiments.sweep --config=configs/ablate_methods.py --workdir=/tmp/xfer-methods

The methods of issue #13 as arms of one sweep (`config.arms`, xfer/experiments/sweep.py), on
ImageNet EfficientNet-Lite0 and scikit-learn's digits by default (offline); the real-data table
(`:data=folder:../shared/data/cifar10_subset,res=96`) and its reading are in bench/README.md.

  linear_probe   the head only
  norm_only      BatchNorm scales and biases, and the head
  full           everything; its WiSE-FT curve (`wise_ft_alphas`, in its summary.json and
                 wise_ft.csv) is the "WiSE-FT of full" method, read at an alpha fixed in advance
  full_low_lr    everything, at every learning rate x 0.1 (LP-FT's fine-tuning rates)
  lp_ft          LP-FT (Kumar et al. 2022): the head alone for the first half, then everything
                 with every learning rate x 0.1
  gradual        gradual unfreezing (ULMFiT): the head, then one more block from the head each quarter
  layer_decay    everything, block i from the head at lr x 0.7^i (BEiT, timm's --layer-decay)

Every arm shares the optimizer specs below, so this is one setting per method, not each method
at its own best: a comparison that concludes one beats another needs each arm tuned on a split
it is not reported on (issue #14). Arguments as configs/ablate_freeze.py (model, data, res).
"""

from configs import ablate_freeze

ARMS = {
    "linear_probe": {"partition": "linear_probe"},
    "norm_only": {"partition": "norm_only"},
    # The WiSE-FT curve of `full` (wise_ft_alphas) is the "WiSE-FT of full" method.
    "full": {"partition": "full", "wise_ft_alphas": (0.0, 0.25, 0.5, 0.75, 1.0)},
    # Everything at LP-FT's fine-tuning learning rates (x 0.1) all along: the control that tells
    # LP-FT's probing first apart from its smaller learning rate.
    "full_low_lr": {"partition": "full", "optim": {"head": {"lr": 1e-3}, "backbone": {"lr": 1e-4}}},
    "lp_ft": {"partition": "linear_probe@0,full@0.5*0.1"},
    "gradual": {"partition": "gradual_unfreeze:4"},
    "layer_decay": {"partition": "full", "optim": {"backbone": {"layer_decay": 0.7}}},
}


def get_config(arg: str = ""):
    """`arg`: as configs/ablate_freeze.py's (model, data, res)."""
    config = ablate_freeze.get_config(arg)
    # Each phase's warmup and decay span that phase (xfer/learning/phases.py): LP-FT's full phase
    # warms its backbone up again, as a fresh fine-tuning stage does.
    config.arms = ARMS
    arms = tuple(arm for arm in ARMS if arm != "norm_only" or config.model.name != "vgg16")
    config.sweep = {"arm": arms, "seed": (0, 1)}
    return config
