r"""The PyTorch tutorial, line for line: ImageNet VGG16 -> CIFAR-10, features frozen, classifier trained with SGD.

    python launch.py --config=configs/vgg16_cifar.py                        # the tutorial, in runs/vgg16_cifar
    python launch.py --config=configs/vgg16_cifar.py:res=32                 # 49x fewer pixels to pass once
    python launch.py --config=configs/vgg16_cifar.py:recipe=tuned           # recommended
    python launch.py --config=configs/vgg16_cifar.py:recipe=tuned,res=32

Needs torchvision's vgg16-397923af.pth (downloaded into the torch hub cache on
first use) and CIFAR-10 (downloaded and prepared for tfds on first use; needs
`pip install 'xfer[prepare]'`).

Each line of the tutorial and the field that says it here:

    tutorial (PyTorch)                                      config
    transforms.Resize((224, 224))                           data.image_size=224, data.interpolation="bilinear"
    transforms.ToTensor(), Normalize((0.5,)*3, (0.5,)*3)    data.mean = data.std = (0.5, 0.5, 0.5)
    no augmentation                                         data.augment="none"
    DataLoader(trainset, batch_size=4, shuffle=True)        batch_size=4 (a fresh permutation every epoch)
    for epoch in range(10)                                  num_epochs=10
    vgg16(pretrained=True)                                  model.name="vgg16", init="imagenet"
    classifier[6] = nn.Linear(4096, 10)                     the 10-class head is new (see below)
    for p in model.features.parameters(): p.requires_grad = False
                                                            partition: ^features/ frozen
    SGD(model.classifier.parameters(), lr=0.001, momentum=0.9)
                                                            optim.classifier
    nn.CrossEntropyLoss(); model.train()                    the train step's loss; classifier dropout on
    if i % 2000 == 1999: print(running_loss / 2000)         log_every=2000
    test accuracy after the 10 epochs                       the eval at the last step

Where xfer says it differently: torchvision's `Resize` on the dataset's PIL images is PIL's
bilinear filter, the same call here (pixel for pixel); the new head starts N(0, 0.01) with a zero
bias (torchvision's VGG init) where torch's `nn.Linear` default draws weights and bias from
U(+-1/64), the same scale (std 0.0100 vs 0.0090); the line logged every 2000 steps holds that
step's loss, not the mean of the 2000.

The features are frozen and the images not augmented, so each image's `features` output is the
same in every epoch: it is computed once (config.feature_cache, xfer/training/feature_cache.py;
25,088 floats an image at 224 px, 512 at 32) and the 10 epochs train only the classifier, its
dropout on as under `model.train()`. The tutorial's forward pass through the 13 convolutions runs
once instead of 10 times. What is left costs 125,000 SGD updates of the classifier's 120M
parameters, batch 4 each, at any resolution: 0.54 s a step at 224 px and 0.40 s at 32 on 2 shared
CPU cores (VGG16, mock CIFAR-10; the feature pass took ~0.35 s an image at 224 px there).
Expected accuracy: not measured here (no GPU, no downloads).

`recipe=tuned` is the recipe recommended instead (each change commented in `_tuned`): the
normalisation the ImageNet weights were trained with, random crops and flips, batch 64 with the
learning rate scaled linearly and a cosine schedule. Augmented images change every epoch, so it
trains without the feature cache, through the whole network. Its gain over the tutorial: not
measured (needs the ImageNet weights and CIFAR-10, neither downloadable where this was written).

On CPU, launch.py sets the XLA:CPU flags that make VGG's convolutions faster (xfer/training/xla_flags.py).
"""

import ml_collections

from xfer import data
from xfer.learning import optim

ARGS = {"recipe": "tutorial", "res": "224"}  # `arg`'s keys and their defaults
RECIPES = ("tutorial", "tuned")


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`: `recipe` (tutorial | tuned), `res` the training resolution (224)."""
    args = _parse(arg)
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"name": "vgg16"})
    config.init = "imagenet"  # torchvision's IMAGENET1K_V1 weights, as `pretrained=True`
    config.head_zero_init = False  # torchvision's N(0, 0.01) init for the new 10-class `classifier/6`
    config.data = data.config_dict(  # every data field present, so any can be overridden
        source="tfds",
        name="cifar10",
        train_split="train",
        eval_split="test",
        image_size=int(args["res"]),  # CIFAR's 32x32 upscaled, as `Resize((224, 224))` does
        interpolation="bilinear",  # torchvision's Resize on PIL images
        mean=(0.5, 0.5, 0.5),  # Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): pixels to [-1, 1]
        std=(0.5, 0.5, 0.5),
        augment="none",
        mixup_alpha=0.0,  # no mixup or cutmix (0: off)
        cutmix_alpha=0.0,
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
    # Cache the output of a frozen prefix (a module path, or "auto" for the deepest valid one: here
    # `features`) and train the rest from it; needs data.augment="none". "" trains on images.
    config.feature_cache = "auto"
    # How the cache stores features on disk: "bfloat16" halves its size and reads, rounding each
    # feature to 8 significant bits; float32 keeps the tutorial's numbers.
    config.feature_cache_dtype = "float32"
    config.batch_size = 4
    config.num_epochs = 10
    config.total_steps = 0  # > 0 overrides num_epochs
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
    config.log_every = 2000
    # The tutorial tests once, after training; the last step always evaluates, and 125,000 steps
    # (10 epochs of 12,500) is that step.
    config.eval_every = 125_000
    # Once an epoch: each save writes ~1 GB (VGG16's 134M parameters and the classifier's 120M
    # momentum buffers), and a resumed run repeats at most an epoch (a SIGTERM saves at once, so only
    # a hard kill loses steps; ~1.5 h of them on 2 CPU cores). keep_best ranks evaluated saves: the last.
    config.checkpoint = ml_collections.ConfigDict({"every": 12_500, "keep_latest": 3, "keep_best": 1})
    if args["recipe"] == "tuned":
        _tuned(config)
    return config


def _tuned(config: ml_collections.ConfigDict) -> None:
    """The recommended recipe: the tutorial with these changes, each a standard practice (gain not measured)."""
    config.data = data.config_dict(**{  # rebuilt: a field set to None stays overridable (a placeholder)
        **config.data,
        "mean": None,  # the model's mean and std: ImageNet's, which its weights were trained with
        "std": None,
        "augment": "crop_flip",  # CIFAR's standard: a crop shifted by up to 1/16 of the image, mirrored
    })
    config.feature_cache = ""  # augmented images differ every epoch: nothing to cache
    config.batch_size = 64  # 16x the tutorial's: 16x fewer optimizer updates of 120M parameters
    # lr scaled linearly with the batch (Goyal et al. 2017: 1e-3 * 64 / 4), a short warmup for the
    # new head's first large gradients, then cosine decay to 0 at the last step.
    config.optim.classifier.update(lr=0.016, schedule="cosine", warmup_steps=200)
    config.log_every = 125  # every 8,000 images, as the tutorial's 2,000 batches of 4
    config.eval_every = 782  # once an epoch (50,000 / 64): the best epoch is kept (keep_best)
    config.checkpoint.every = 782


def _parse(arg: str) -> dict[str, str]:
    """`arg`'s key=value pairs over ARGS's defaults; an unknown key or recipe is an error, not ignored."""
    given = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in arg.split(",") if kv)
    unknown = sorted(set(given) - set(ARGS))
    if unknown:
        raise ValueError(f"configs/vgg16_cifar.py: unknown argument(s) {', '.join(unknown)}; "
                         f"the arguments are {', '.join(f'{k}=' for k in ARGS)} (e.g. :recipe=tuned,res=32)")
    args = {**ARGS, **given}
    if args["recipe"] not in RECIPES:
        raise ValueError(f"configs/vgg16_cifar.py: recipe={args['recipe']!r}; choose one of {', '.join(RECIPES)}")
    if not args["res"].isdigit() or int(args["res"]) < 1:
        raise ValueError(f"configs/vgg16_cifar.py: res={args['res']!r}; it must be a whole number of pixels, e.g. 32")
    return args
