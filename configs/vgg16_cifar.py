r"""The classic recipe: ImageNet VGG16 -> CIFAR-10, features frozen, classifier trained with SGD.

    python launch.py --config=configs/vgg16_cifar.py --workdir=/tmp/vgg16_cifar
    python launch.py --config=configs/vgg16_cifar.py:res=32 --workdir=/tmp/vgg16_cifar32  # ~50x cheaper

Needs torchvision's vgg16-397923af.pth (downloaded into the torch hub cache on
first use) and CIFAR-10 prepared for tfds as ArrayRecord (`pip install
'xfer[prepare]' && tfds build cifar10 --file_format=array_record`).
Expected: ~0.86 test accuracy at 224 px after 3 epochs, the figure the
PyTorch version of this recipe reaches (not measured here: no GPU, no download).

On CPU, prefix the command with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
(jaxlib 0.10): XLA's Eigen convolutions then replace its YNNPACK ones, and the
train step at 224 px runs 1.6x (frozen) and 2.3x (full) faster (bench/README.md).
"""

import ml_collections

from xfer import data
from xfer.learning import optim


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`; `res` is the training resolution (default 224)."""
    args = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"name": "vgg16"})
    config.init = "imagenet"  # torchvision's IMAGENET1K_V1 weights
    config.head_zero_init = False  # torchvision's N(0, 0.01) head init, as the PyTorch recipe
    config.data = data.config_dict(  # every data field present, so any can be overridden
        source="tfds",
        name="cifar10",
        train_split="train",
        eval_split="test",
        image_size=int(args.get("res", 224)),  # CIFAR's 32x32 upscaled, as the seed recipe does
        augment="crop_flip",
    )
    # torch: `for p in model.features.parameters(): p.requires_grad = False`.
    config.partition = (("^features/", "frozen"), ("^classifier/", "classifier"))
    # BatchNorm layers default to `frozen` where all their parameters are frozen, else `train`;
    # (regex, policy) rules override that: policies train | frozen | stats_frozen (xfer/learning/norms.py).
    config.bn_policy = ()
    # BatchNorm statistics over the global batch on several devices (False: per device).
    config.bn_cross_device = True
    config.optim = ml_collections.ConfigDict({
        "classifier": optim.group_config(optimizer="sgd", lr=1e-3, momentum=0.9),
    })
    # Cache the output of a frozen prefix (a module path, or "auto" for the deepest valid one) and
    # train the rest from it; needs data.augment="none". "" trains on images (xfer/training/feature_cache.py).
    config.feature_cache = ""
    config.batch_size = 64
    config.num_epochs = 3
    config.total_steps = 0  # > 0 overrides num_epochs
    config.seed = 0
    # A step with a non-finite loss or gradient changes nothing; "stop" ends the run there (the last
    # good checkpoint kept), "skip" leaves such steps out and counts them.
    config.nan_policy = "stop"
    config.log_every = 50
    config.eval_every = 782  # once an epoch
    config.checkpoint = ml_collections.ConfigDict({"every": 500, "keep_latest": 3, "keep_best": 1})
    return config
