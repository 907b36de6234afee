r"""LoRA: rank-8 adapters beside a pretrained network's kernels, trained with the new head; all else frozen.

    python launch.py --config=configs/lora.py --workdir=/tmp/lora_vit                  # ViT-B/16 -> CIFAR-10
    python launch.py --config=configs/lora.py:model=lite0,data=digits --workdir=/tmp/lora_lite0   # offline
    python -m xfer.weights merge /tmp/lora_vit --out /tmp/lora_vit_merged             # a plain ViT-B/16 again
    python launch.py --config=configs/vit_b16_cifar.py --config.init=/tmp/lora_vit_merged --workdir=...

`config.partition = "lora:8"` (xfer/models/lora.py, xfer/learning/presets.py): each target layer
computes y = layer(x) + (alpha / 8) B(A(x)), alpha 8 (PEFT's default, scale 1), B starting at zero,
so step 0 is the pretrained model exactly. Targets: ViT-B/16's attention projections (the fused
q,k,v `in_proj` and `out_proj` of its 12 layers: 24 layers, 442,368 adapter parameters at rank 8,
0.5% of the 86M); Lite0's 1x1 convolutions (expand, project and head convs: 32 layers, 182,272).
`lora:R:alpha=A:REGEX` changes rank, alpha and targets; `linear_probe@0,lora:8@0.5` probes first.

Arguments, `--config=configs/lora.py:key=value,...`:
  model=vit_b16|lite0               ViT-B/16 (default; torchvision's vit_b_16-c867db91.pth from the
                                    torch hub cache, else downloaded) or EfficientNet-Lite0 (its
                                    ImageNet weights ship with pip: offline)
  data=cifar10|digits|folder:PATH   CIFAR-10 through tfds (default; see configs/vgg16_cifar.py),
                                    scikit-learn's digits (offline), or an image folder
  res=N                             the image size (default: 224 for vit_b16, 32 for lite0)

ViT-B/16 on CIFAR-10: the recipe of PEFT's image-classification LoRA guide (Adam at 5e-3, batch
128) for 2 epochs, random crops and flips; accuracy not measured here (no GPU, no downloads).

Lite0 on digits at 32 px is configs/ablate_freeze.py's budget and recipe (60 steps of 32, Adam,
cosine) with the adapters' rate chosen on its validation split the way its protocol chooses every
mask's (1e-4: 0.794, 1e-3: 0.909, 1e-2: 0.958, 1e-1: diverged), then 3 seeds on the 360 test
digits, measured 2026-12-01 on 2 CPU cores (this config is seed 0: 0.9611, 30 s wall):

    lora:8        0.961 ± 0.003  [0.954, 0.968]  195,082 trainable parameters (182,272 adapters)
    linear_probe  0.791 ± 0.018  [0.746, 0.836]   12,810
    full          0.956 ± 0.019  [0.908, 1.003]  3,383,818  (configs/ablate_freeze.py's table)

LoRA is 0.170 [0.122, 0.219] above the probe (paired over the seeds) and level with full fine-tuning
at 6% of its trainable parameters. Merged (`python -m xfer.weights merge`), the plain Lite0 gives
the adapted one's logits within 9.4e-7 of their largest, every prediction the same.
"""

import ml_collections

from configs import ablate_freeze
from xfer.learning import optim

MODELS = {"vit_b16": "vit_b_16", "lite0": "efficientnet_lite0"}
DEFAULT_RES = {"vit_b16": 224, "lite0": 32}


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`, keys model, data, res (see the module docstring)."""
    args = _parse_args(arg)
    vit = args["model"] == "vit_b16"
    image_size = int(args["res"] or DEFAULT_RES[args["model"]])
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"name": MODELS[args["model"]]})
    if vit:
        config.model.image_size = image_size  # the patch grid, and so the position embeddings, follow it
    config.init = "imagenet"  # ported into the model without adapters; the adapters are added fresh after
    config.head_zero_init = True  # the new head starts at zero: with B = 0, step 0 predicts uniformly
    config.data = ablate_freeze._data_config(args["data"], image_size)
    # Rank-8 adapters on the model's default targets, alpha 8; the head trains in full, the rest is frozen.
    config.partition = "lora:8"
    # Frozen BatchNorm layers (Lite0's, all frozen under lora) normalise with their running statistics.
    config.bn_policy = ()
    config.bn_cross_device = True
    # The adapters sit in the first blocks: no frozen prefix worth caching (xfer/training/feature_cache.py).
    config.feature_cache = ""
    config.feature_cache_dtype = "float32"
    # The preset's groups: `head` the new classifier, `backbone` the adapters. Lite0's: configs/ablate_freeze.py's,
    # with the adapters' rate chosen on its validation split (1e-4..1e-1; 1e-1 diverged).
    if vit:
        config.optim = ml_collections.ConfigDict({
            "head": optim.group_config(optimizer="adam", lr=5e-3, schedule="cosine", warmup_steps=100),
            "backbone": optim.group_config(optimizer="adam", lr=5e-3, schedule="cosine", warmup_steps=100),
        })
    else:
        config.optim = ml_collections.ConfigDict({
            "head": optim.group_config(optimizer="adam", lr=1e-2, schedule="cosine"),
            "backbone": optim.group_config(optimizer="adam", lr=1e-2, schedule="cosine", warmup_steps=10),
        })
    config.batch_size = 128 if vit else 32
    config.num_epochs = 2 if vit else 0
    config.total_steps = 0 if vit else 60  # > 0 overrides num_epochs
    config.seed = 0
    # The loss (xfer/learning/loss.py). Label smoothing s in [0, 1): the target is (1 - s) onehot + s / classes.
    config.label_smoothing = 0.0
    # Class weights: "" none, "balanced" (n / (classes * count) over the training labels) or one per class.
    config.class_weights = ""
    # A step with a non-finite loss or gradient changes nothing; "stop" ends the run there, "skip" counts it.
    config.nan_policy = "stop"
    # WiSE-FT after training (xfer/training/wise_ft.py); () is off.
    config.wise_ft_alphas = ()
    config.wise_ft_head = "final"
    # The train step (xfer/training/step.py): EMA of the weights (0: off), micro-batches per update, activations' dtype.
    config.ema_decay = 0.0
    config.grad_accum_steps = 1
    config.compute_dtype = "float32"
    config.log_every = 50 if vit else 20
    config.eval_every = 390 if vit else 60  # ViT: once an epoch at batch 128
    config.checkpoint = ml_collections.ConfigDict({"every": 390 if vit else 60, "keep_latest": 2, "keep_best": 1})
    return config


def _parse_args(arg: str) -> dict[str, str]:
    args = {"model": "vit_b16", "data": "cifar10", "res": ""}
    for item in filter(None, arg.split(",")):
        key, separator, value = item.partition("=")
        if not separator or key not in args:
            raise ValueError(f"configs/lora.py: bad argument {item!r}; write key=value with key one of "
                             f"{', '.join(args)}")
        args[key] = value
    if args["model"] not in MODELS:
        raise ValueError(f"configs/lora.py: model={args['model']!r}; choose one of {', '.join(MODELS)}")
    if args["res"] and not (args["res"].isdigit() and int(args["res"]) > 0):
        raise ValueError(f"configs/lora.py: res={args['res']!r}; it must be a whole number of pixels, e.g. 32")
    return args
