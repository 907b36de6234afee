r"""ImageNet ResNet-50 -> CIFAR-10: stem and stages 1-3 frozen, stage 4 and a new head trained.

    python launch.py --config=configs/resnet50_cifar.py --workdir=/tmp/resnet50_cifar
    python launch.py --config=configs/resnet50_cifar.py:res=64 --workdir=/tmp/resnet50_64

The data pipeline of configs/vgg16_cifar.py's tuned recipe (ImageNet normalisation, crop + flip,
batch 64) for 3 epochs, with the
freeze mask a ResNet wants: BatchNorm in the frozen stages runs on its
ImageNet running statistics (policy `frozen`, torch's FrozenBatchNorm2d)
while stage 4's BatchNorm trains. Needs torchvision's resnet50-0676ba61.pth
(downloaded into the torch hub cache on first use) and CIFAR-10 prepared for tfds.
Not measured here (no GPU, no downloads).
"""

import ml_collections

from configs import vgg16_cifar
from xfer.learning import optim


def get_config(arg: str = ""):
    """`arg`: as configs/vgg16_cifar.py (`res=...`); the base is its tuned recipe."""
    config = vgg16_cifar.get_config(",".join(filter(None, ("recipe=tuned", arg))))
    config.model.name = "resnet50"
    config.head_zero_init = True  # the new 10-way `fc` starts at zero
    config.num_epochs = 3
    config.partition = (("^fc/", "head"), ("^layer4/", "layer4"), (".*", "frozen"))
    config.optim = ml_collections.ConfigDict({
        "head": optim.group_config(optimizer="sgd", lr=1e-2, momentum=0.9, schedule="cosine"),
        "layer4": optim.group_config(optimizer="sgd", lr=1e-3, momentum=0.9, schedule="cosine",
                                     weight_decay=1e-4),
    })
    return config
