r"""Which fine-tuning *method*? Masks, phases and layer decay as arms, each tuned, then seeds on test.

    python -m xfer.experiments.sweep --config=configs/ablate_methods.py --workdir=/tmp/xfer-methods

The methods of issue #13 as arms of the protocol of `xfer.experiments.protocol` (each arm's learning
rate chosen on a validation split carved from train, the choice retrained with 3 seeds on train + val
and reported on test with 95% CIs and paired differences against linear_probe), on ImageNet
EfficientNet-Lite0 and scikit-learn's digits by default (offline). The real-data table
(`:data=folder:../shared/data/cifar10_subset,res=96`) and its reading are in bench/README.md.

  linear_probe   the head only                                        tunes the head's rate
  norm_only      BatchNorm scales and biases, and the head            tunes the backbone's rate
  last_k3        the last 3 blocks, and the head                      likewise
  full           everything; its WiSE-FT curve (`wise_ft_alphas`, in each run's summary.json) is
                 "WiSE-FT of full", read at an alpha fixed in advance  likewise
  lp_ft          LP-FT (Kumar et al. 2022): the head alone for the first half, then everything with
                 every rate x 0.1                                     likewise (before the x 0.1)
  gradual        gradual unfreezing (ULMFiT): the head, then one more block from the head each quarter
  layer_decay    everything, block i from the head at lr x 0.7^i (BEiT, timm's --layer-decay)
  lora8          rank-8 LoRA adapters on the 1x1 convs, and the head (xfer/models/lora.py)
                                                                      tunes the adapters' rate

`--arms=linear_probe,full,lp_ft` runs some of them. Arguments as configs/ablate_freeze.py (model,
data, res).
"""

from configs import ablate_freeze

# Four rates a decade apart per arm. On the CIFAR-10 subset three were first tried (head 1e-3..1e-1, backbone
# 1e-5..1e-3); linear_probe chose 1e-3 and norm_only 1e-3 on val, ends of their ranges (results.md flags
# such choices), so each range gained a decade on that side.
HEAD_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
BACKBONE_LRS = (1e-5, 1e-4, 1e-3, 1e-2)  # Adam on a pretrained backbone: 1e-3 was unstable on CIFAR images (#13)
LP_FT_LRS = (1e-4, 1e-3, 1e-2)  # before LP-FT's x 0.1 in its second phase: the same rates as `full` there
# Adapters start from zero (B) and scale by alpha / R: they take larger rates than pretrained weights
# (configs/ablate_freeze.py's digits chose 1e-2, and 1e-1 diverged there).
LORA_LRS = (1e-4, 1e-3, 1e-2, 1e-1)

ARMS = {
    "linear_probe": {"partition": "linear_probe"},
    "norm_only": {"partition": "norm_only"},
    "last_k3": {"partition": "last_k:3"},
    "full": {"partition": "full", "wise_ft_alphas": (0.0, 0.25, 0.5, 0.75, 1.0)},
    "lp_ft": {"partition": "linear_probe@0,full@0.5*0.1"},
    "gradual": {"partition": "gradual_unfreeze:4"},
    "layer_decay": {"partition": "full", "optim": {"backbone": {"layer_decay": 0.7}}},
    "lora8": {"partition": "lora:8"},
}


def get_config(arg: str = ""):
    """`arg`: as configs/ablate_freeze.py's (model, data, res)."""
    config = ablate_freeze.get_config(arg)
    # Each phase's warmup and decay span that phase (xfer/learning/phases.py): LP-FT's full phase
    # warms its backbone up again, as a fresh fine-tuning stage does.
    arms = [arm for arm in ARMS if arm != "norm_only" or config.model.name != "vgg16"]
    config.arms = {arm: ARMS[arm] for arm in arms}
    config.search.space = {arm: _space(arm) for arm in arms}
    return config


def _space(arm: str) -> dict:
    if arm == "linear_probe":
        return {"optim": {"head": {"lr": HEAD_LRS}}}
    rates = {"lp_ft": LP_FT_LRS, "lora8": LORA_LRS}.get(arm, BACKBONE_LRS)
    return {"optim": {"backbone": {"lr": rates}}}
