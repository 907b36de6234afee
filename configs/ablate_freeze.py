r"""Which layers should I train? Six freeze masks and LoRA, each tuned, then 3 seeds on test: one command.

    python -m xfer.experiments.sweep --config=configs/ablate_freeze.py --workdir=/tmp/xfer-ablate

Trains ImageNet EfficientNet-Lite0 on scikit-learn's digits (offline; 32 px, 60 steps of 32) with
each mask of `xfer.learning.presets` under the protocol of `xfer.experiments.protocol`:
  search  each mask's learning rates (below) on a validation split, 20% of the 1437 training digits
          carved stratified (seed 0); the 360 test digits are never seen;
  final   each mask's best setting by val accuracy, retrained on all 1437 (train + val) with seeds
          0, 1, 2 and scored on the 360 test digits;
  report  results.csv (every run), results.md (the protocol, the chosen rates, test accuracy with
          95% CIs, paired differences against linear_probe), results.png (accuracy vs trainable
          parameters).
Measured 2026-12-01 with the command above, 9 min wall on 2 CPU cores for the six masks (47 runs:
29 search, 18 final) and 4 min more for `lora8` (8 runs; `--arms=lora8,linear_probe` reads the
probe's runs back); test accuracy over the 360 test digits, mean ± std over seeds 0, 1, 2, [95% CI],
the rate chosen on val:

    linear_probe  0.791 ± 0.018  [0.746, 0.836]  head 1.0       12,810 trainable parameters
    last_k1       0.854 ± 0.020  [0.805, 0.903]  backbone 1e-3  424,970
    last_k3       0.867 ± 0.005  [0.855, 0.879]  backbone 1e-4  2,683,050
    bias_only     0.898 ± 0.011  [0.870, 0.926]  backbone 1e-2  33,818
    norm_only     0.946 ± 0.013  [0.914, 0.979]  backbone 1e-2  54,826
    full          0.956 ± 0.019  [0.908, 1.003]  backbone 1e-3  3,383,818
    lora8         0.961 ± 0.003  [0.954, 0.968]  adapters 1e-2  195,082 (182,272 adapters + the head)

Every mask but last_k1 beats the probe with a paired 95% interval clear of 0. LoRA (rank 8 on
Lite0's 32 1x1 convs, xfer/models/lora.py) matches full fine-tuning with 6% of its trainable
parameters: paired Δ +0.006 [−0.036, +0.048] against full, +0.015 [−0.024, +0.054] against
norm_only; three seeds cannot separate the three. The probe's choice,
1.0, is an end of its range (results.md says so): on val it beat 0.1 by 0.815 to 0.805, within
the noise of 287 validation digits (±0.024), and 0.1 then did better on test (0.828 in the first
pass). bench/README.md has the reading. `--arms=linear_probe,full` runs some masks only;
`--executor=local|slurm` runs elsewhere (xfer/experiments/dispatch.py); `--print_commands`
prints the commands instead (for a TPU pod).

Arguments, `--config=configs/ablate_freeze.py:key=value,...`:
  model=lite0|vgg16|resnet50        the backbone (default lite0; vgg16 and resnet50 read
                                    torchvision's ImageNet files: hub cache, else download)
  data=digits|cifar10|folder:PATH   scikit-learn's digits (default, offline); CIFAR-10 through
                                    tfds (prepared as ArrayRecord, see configs/vgg16_cifar.py);
                                    an image folder with train/ and val/ (or only train/) of class folders
  res=N                             the image size (default 32: cheap; models see upscaled images)

One optimizer spec per preset group: `head` (the classifier, new for the class count) and
`backbone` (whatever else a mask trains). Each mask tunes the rate that matters to it: the head's
for linear_probe, the backbone's for the others (the head's stays at 1e-2, which linear_probe's
search can confirm or not). `scratch` is no arm here: a random network needs far more than 60 steps
(0.10 at this budget); `--config.arms.*` and `--config.search.space.*` change the grid.
"""

import ml_collections

from xfer import data
from xfer.learning import optim

MODELS = {"lite0": "efficientnet_lite0", "vgg16": "vgg16", "resnet50": "resnet50"}
MASKS = ("linear_probe", "last_k:1", "last_k:3", "bias_only", "norm_only", "full", "lora:8")
# The search spaces, rates a decade apart. With three (head 1e-3..1e-1, backbone 1e-4..1e-2) four masks
# chose an end of their range on val (results.md flags that), so each range gained a decade there.
HEAD_LRS = (1e-3, 1e-2, 1e-1, 1.0)  # linear_probe's: the head is all it trains
BACKBONE_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # every other mask's: the backbone's rate is what a mask changes


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`, keys model, data, res (see the module docstring)."""
    args = _parse_args(arg)
    has_batch_norm = args["model"] != "vgg16"
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"name": MODELS[args["model"]]})
    config.init = "imagenet"  # the `scratch` mask overrides it
    config.head_zero_init = True  # a new head starts at zero: uniform predictions at step 0
    config.data = _data_config(args["data"], int(args["res"]))
    # A preset name (xfer/learning/presets.py) instead of (regex, group) rules; the sweep sets it per run.
    config.partition = "linear_probe"
    # Every BatchNorm layer normalises with its ImageNet running statistics, in training and in
    # evaluation, whatever the mask: masks then differ only in which parameters learn. With the
    # default `()` a layer whose scale and bias train switches to batch statistics while its running
    # ones (momentum 0.99) trail far behind, and evaluation suffers: seed 0 measured full 0.32,
    # bias_only 0.23, norm_only 0.24, against 0.98, 0.83, 0.86 with this policy. `scratch` ignores
    # it and trains on batch statistics: a random network has no statistics to keep (xfer.learning.presets).
    config.bn_policy = ((".*", "stats_frozen"),) if has_batch_norm else ()
    config.bn_cross_device = True
    config.feature_cache = ""  # the masks train different prefixes, so none is cached (xfer/training/feature_cache.py)
    config.feature_cache_dtype = "float32"  # how a cache would store its rows: "float32" or "bfloat16"
    config.optim = ml_collections.ConfigDict({
        "head": optim.group_config(optimizer="adam", lr=1e-2, schedule="cosine"),
        # Without warmup Adam's first steps, normalised by a second moment from a few gradients, can
        # wreck a pretrained network: `full` collapsed to chance for seed 0 (0.12) and reached 0.98 with it.
        "backbone": optim.group_config(optimizer="adam", lr=1e-3, schedule="cosine", warmup_steps=10),
    })
    config.batch_size = 32
    config.num_epochs = 0
    config.total_steps = 60  # 1.3 epochs of digits: enough to rank the masks, not to finish training
    config.seed = 0
    # The loss (xfer/learning/loss.py). Label smoothing s in [0, 1): the target is (1 - s) onehot + s / classes.
    config.label_smoothing = 0.0  # 0 is off; 0.1 is usual
    # Class weights: "" none, "balanced" (n / (classes * count) over the training labels) or one per class.
    config.class_weights = ""
    # A step with a non-finite loss or gradient changes nothing; "stop" ends the run there (the last
    # good checkpoint kept), "skip" leaves such steps out and counts them.
    config.nan_policy = "stop"
    # WiSE-FT after training (xfer/training/wise_ft.py): eval of (1-a)*initial + a*final weights for each a.
    config.wise_ft_alphas = ()  # e.g. (0.0, 0.25, 0.5, 0.75, 1.0); () is off
    config.wise_ft_head = "final"  # a new head keeps its trained value at every a; "interpolate" mixes it too
    # The train step (xfer/training/step.py). An exponential moving average of the weights, which evaluation
    # (and so the best checkpoint) then uses: 0 is off, else in (0, 1), e.g. 0.999 (timm's ModelEmaV2).
    config.ema_decay = 0.0
    # Gradient accumulation: the batch runs as this many micro-batches, one optimizer update (1: off).
    config.grad_accum_steps = 1
    # "bfloat16": activations in bfloat16, parameters, optimizer state, gradients float32 (mixed precision).
    config.compute_dtype = "float32"
    config.log_every = 20
    config.eval_every = 60
    config.checkpoint = ml_collections.ConfigDict({"every": 60, "keep_latest": 1, "keep_best": 1})
    # The protocol (xfer/experiments/protocol.py): the arms, each one's search space, then the final runs.
    masks = tuple(mask for mask in MASKS if mask != "norm_only" or has_batch_norm)
    config.arms = {arm_name(mask): {"partition": mask} for mask in masks}
    config.search = ml_collections.ConfigDict({
        "space": {arm_name(mask): ({"optim": {"head": {"lr": HEAD_LRS}}} if mask == "linear_probe" else
                                   {"optim": {"backbone": {"lr": BACKBONE_LRS}}}) for mask in masks},
        "val_fraction": 0.2,  # VTAB's 800/200
        "split_seed": 0,
        "sampler": "grid",  # every value: 3 runs per arm
        "trials": 0,  # 0: the grid's size
        "pruner": "none",  # 60 steps, 1 evaluation: nothing to prune on
        "seed": 0,
        "storage": "",  # sqlite in the sweep directory
    })
    config.final = ml_collections.ConfigDict({"seeds": (0, 1, 2), "train_on": "train+val", "baseline": "linear_probe"})
    return config


def arm_name(mask: str) -> str:
    """`last_k:3` -> `last_k3`, `lora:8` -> `lora8`: an arm is a config key, which holds no colon."""
    return mask.replace(":", "")


def _parse_args(arg: str) -> dict[str, str]:
    args = {"model": "lite0", "data": "digits", "res": "32"}
    for item in filter(None, arg.split(",")):
        key, separator, value = item.partition("=")
        if not separator or key not in args:
            raise ValueError(f"configs/ablate_freeze.py: bad argument {item!r}; write key=value with key "
                             f"one of {', '.join(args)}")
        args[key] = value
    if args["model"] not in MODELS:
        raise ValueError(f"configs/ablate_freeze.py: model={args['model']!r}; choose one of {', '.join(MODELS)}")
    return args


def _data_config(spec: str, image_size: int) -> ml_collections.ConfigDict:
    if spec == "digits":
        # No augmentation: a random crop shifts an 8x8 digit by whole pixels (see configs/quickstart.py).
        return data.config_dict(source="digits", image_size=image_size, augment="none")
    if spec == "cifar10":
        return data.config_dict(source="tfds", name="cifar10", eval_split="test", image_size=image_size)
    if spec.startswith("folder:") and spec != "folder:":
        return data.config_dict(source="folder", path=spec[len("folder:"):], image_size=image_size)
    raise ValueError(f"configs/ablate_freeze.py: data={spec!r}; choose digits, cifar10 or folder:PATH")
