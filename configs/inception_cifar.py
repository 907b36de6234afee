r"""torchvision's fine-tuning tutorial for Inception v3, on CIFAR-10 at 299 px: feature extraction or fine-tuning.

    python launch.py --config=configs/inception_cifar.py                  # feature extraction, runs/inception_cifar
    python launch.py --config=configs/inception_cifar.py:mode=finetune    # every parameter trains

Needs torchvision's inception_v3_google-0cc3c7bd.pth (downloaded into the torch hub cache on first
use) and CIFAR-10 (downloaded and prepared for tfds on first use; needs `pip install 'xfer[prepare]'`).
The tutorial ran on its ants-and-bees folder; this is its recipe on CIFAR-10, upscaled to the 299 px
Inception v3 needs (its auxiliary classifier reads Mixed_6e's 17x17 maps, which only 299 px give).

Each line of the tutorial (`finetuning_torchvision_models_tutorial.py`, model_name = "inception")
and the field that says it here:

    tutorial (PyTorch)                                          config
    models.inception_v3(pretrained=True)                        model.name="inception_v3", init="imagenet";
                                                                model.aux_logits=True (and transform_input,
                                                                on by default), as torchvision builds it
    model.AuxLogits.fc = nn.Linear(768, num_classes)            both 10-class heads are new (the model's head
    model.fc = nn.Linear(2048, num_classes)                     regex takes `fc` and `AuxLogits/fc`)
    input_size = 299                                            data.image_size=299
    RandomResizedCrop(input_size), RandomHorizontalFlip()       data.augment="crop_flip" (see below)
    Resize(input_size), CenterCrop(input_size) (val)            the eval pipeline: CIFAR is square, nothing cropped
    Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])     data.mean = data.std = None: the model's, ImageNet's
    batch_size = 8                                              batch_size=8
    num_epochs = 15                                             num_epochs=15
    feature_extract = True: requires_grad False but the heads   mode=feature_extract: partition trains
                                                                ^(fc|AuxLogits/fc)/, the rest frozen
    feature_extract = False                                     mode=finetune: partition trains everything
    SGD(params_to_update, lr=0.001, momentum=0.9)               optim.params_to_update
    loss = loss1 + 0.4*loss2 (outputs, aux_outputs)             aux_loss_weight=0.4 (xfer/learning/loss.py)
    model.train() for the training phase                        bn_policy: every BatchNorm on batch statistics,
                                                                its running ones updated (frozen or not); dropout on
    model.eval() for 'val', _, preds = torch.max(outputs, 1)    the eval step: main logits only
    best_model_wts: the best epoch's weights kept               eval_every = checkpoint.every = an epoch, keep_best=1

Where xfer says it differently: `crop_flip` crops a random 299 px square of the image resized to
299 * 1.125 and mirrors it half the time, where RandomResizedCrop picks a random 8-100% of the
area at an aspect ratio in [3/4, 4/3] (xfer has no such augmentation); the new heads start as
torchvision's Inception init draws them (truncated normal, std 0.1 for `fc`, 0.001 for
`AuxLogits/fc`, biases U(+-1/sqrt(fan_in))) where the tutorial's `nn.Linear` draws its weights
from U(+-1/sqrt(fan_in)) (std 0.013 for `fc`, 0.021 for `AuxLogits/fc`); the progress line
logged once an epoch holds that step's loss, not the epoch's mean.

Under `model.train()` torch normalises every BatchNorm layer with its batch's statistics, the
frozen ones included, and moves their running statistics towards CIFAR's (momentum 0.1, batches of
8): the bn_policy rule does the same. xfer's default for a frozen layer (no rule: running
statistics, never updated, as torch's FrozenBatchNorm2d) is what is usually recommended instead;
it is not what the tutorial computes. Either way the images are augmented, so there is no feature
cache: every step runs the whole network forward, and with mode=feature_extract the backward
reaches only the two heads.

Expected accuracy and cost: not measured (no GPU, and neither the weights nor CIFAR-10 can be
downloaded where this was written).
"""

import ml_collections

from configs import vgg16_cifar
from xfer import data
from xfer.learning import optim

ARGS = {"mode": "feature_extract", "res": "299"}  # `arg`'s keys and their defaults
MODES = ("feature_extract", "finetune")
HEADS = "^(?:fc|AuxLogits/fc)/"  # the tutorial's two new nn.Linear layers
STEPS_PER_EPOCH = 50_000 // 8  # CIFAR-10's training split in batches of 8


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`: `mode` (feature_extract | finetune), `res` the resolution (299)."""
    args = _parse(arg)
    config = vgg16_cifar.get_config()  # its run-level fields; everything the tutorials differ in is set below
    config.model = ml_collections.ConfigDict({
        "name": "inception_v3",
        "aux_logits": True,  # AuxLogits trains beside fc; False drops it (then 75 px suffice)
    })
    config.init = "imagenet"  # torchvision's IMAGENET1K_V1 weights, as `pretrained=True`
    config.head_zero_init = False  # both new heads drawn as torchvision's Inception init draws them
    config.data = data.config_dict(
        source="tfds",
        name="cifar10",
        train_split="train",
        eval_split="test",
        image_size=int(args["res"]),  # CIFAR's 32x32 upscaled to input_size = 299
        interpolation="bilinear",  # torchvision's Resize and RandomResizedCrop on PIL images
        mean=None,  # Normalize(ImageNet's mean, std): the model's (registry) values
        std=None,
        augment="crop_flip",  # the tutorial's RandomResizedCrop + RandomHorizontalFlip, approximately
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    )
    trained = ".*" if args["mode"] == "finetune" else HEADS
    config.partition = ((trained, "params_to_update"),) + (((".*", "frozen"),) if trained != ".*" else ())
    # model.train(): every BatchNorm layer on batch statistics, running statistics updated.
    config.bn_policy = ((".*", "train"),)
    config.optim = ml_collections.ConfigDict({
        "params_to_update": optim.group_config(optimizer="sgd", lr=1e-3, momentum=0.9),
    })
    # loss = loss1 + 0.4 * loss2: the auxiliary classifier's cross-entropy, weighted (0 would leave it
    # untrained: an error while config.model.aux_logits is True).
    config.aux_loss_weight = 0.4
    config.feature_cache = ""  # augmented images (and BatchNorm on batch statistics): nothing to cache
    config.batch_size = 8
    config.num_epochs = 15
    config.log_every = STEPS_PER_EPOCH  # the tutorial prints once an epoch
    config.eval_every = STEPS_PER_EPOCH  # and validates once an epoch, keeping the best epoch's weights
    config.checkpoint = ml_collections.ConfigDict({"every": STEPS_PER_EPOCH, "keep_latest": 3, "keep_best": 1})
    return config


def _parse(arg: str) -> dict[str, str]:
    """`arg`'s key=value pairs over ARGS's defaults; an unknown key or mode is an error, not ignored."""
    given = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in arg.split(",") if kv)
    unknown = sorted(set(given) - set(ARGS))
    if unknown:
        raise ValueError(f"configs/inception_cifar.py: unknown argument(s) {', '.join(unknown)}; "
                         f"the arguments are {', '.join(f'{k}=' for k in ARGS)} (e.g. :mode=finetune)")
    args = {**ARGS, **given}
    if args["mode"] not in MODES:
        raise ValueError(f"configs/inception_cifar.py: mode={args['mode']!r}; choose one of {', '.join(MODES)}")
    if not args["res"].isdigit() or int(args["res"]) < 1:
        raise ValueError(f"configs/inception_cifar.py: res={args['res']!r}; it must be a whole number of pixels, "
                         "e.g. 299")
    return args
