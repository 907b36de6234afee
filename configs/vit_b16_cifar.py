r"""ImageNet ViT-B/16 -> CIFAR-10: full fine-tuning, as vision_transformer's recipe does it.

    python launch.py --config=configs/vit_b16_cifar.py --workdir=/tmp/vit_cifar
    python launch.py --config=configs/vit_b16_cifar.py:res=384 --workdir=/tmp/vit_cifar384

SGD with momentum, warmup then cosine, gradient norm clipped to 1 (per group,
so a frozen group would stay free). At a resolution other than 224 the
position embeddings are resampled bicubically when the ImageNet weights are
ported. Needs torchvision's vit_b_16-c867db91.pth and CIFAR-10 prepared for
tfds. Not measured here (no GPU, no downloads).
"""

import ml_collections

from configs import vgg16_cifar
from xfer.learning import optim


def get_config(arg: str = ""):
    """`arg`: as configs/vgg16_cifar.py (`res=...`, default 224)."""
    config = vgg16_cifar.get_config(",".join(filter(None, ("recipe=tuned", arg))))
    config.model = ml_collections.ConfigDict({
        "name": "vit_b_16",
        "image_size": config.data.image_size,  # the patch grid, and so the position embeddings, follow it
    })
    config.head_zero_init = True
    config.partition = ((".*", "all"),)
    config.optim = ml_collections.ConfigDict({
        "all": optim.group_config(optimizer="sgd", lr=0.01, momentum=0.9, schedule="cosine",
                                  warmup_steps=100, clip_norm=1.0),
    })
    config.batch_size = 128
    config.num_epochs = 2
    config.eval_every = 390  # once an epoch at batch 128
    return config
