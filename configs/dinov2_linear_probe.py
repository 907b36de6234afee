r"""DINOv2 ViT-S/14, frozen, and a linear head on CIFAR-10: the strongest cheap baseline.

    python launch.py --config=configs/dinov2_linear_probe.py                       # CIFAR-10 at 224 px
    python launch.py --config=configs/dinov2_linear_probe.py:model=b14             # ViT-B/14 instead
    python launch.py --config=configs/dinov2_linear_probe.py:data=folder:PATH      # your image folder
    python launch.py --config=configs/dinov2_linear_probe.py:data=digits,res=112   # offline data, smaller

Needs DINOv2's weights, model.safetensors of the Hugging Face hub repo
timm/vit_small_patch14_dinov2.lvd142m (downloaded into huggingface_hub's cache on first use; on a
machine without internet, `hf download timm/vit_small_patch14_dinov2.lvd142m model.safetensors`
elsewhere and copy the cache folder, as the error message says), and CIFAR-10 prepared for tfds
(see configs/vgg16_cifar.py). Expected accuracy: not measured (neither the weights nor CIFAR-10
could be downloaded where this was written).

What it trains and why:
- The whole backbone is frozen and runs in inference mode on un-augmented images, so each image's
  features are the same in every epoch: the feature cache (xfer/training/feature_cache.py, cut
  "auto") computes them once, at the module `pool`, whose output is the head's input (384 floats an
  image; 768 for B/14). The epochs then train a 10-way linear layer on cached vectors, a logistic
  regression; the cost is the one pass of the backbone over train and test (at 224 px 12.6 GFLOPs
  an image for S/14, 47 for B/14, XLA's count).
- Features: the class token after the final LayerNorm, timm's default 'token' pooling, which
  xfer.models.timm_vit mirrors. DINOv2's own linear evaluation concatenates the class token with
  the mean of the patch tokens; that is not timm's model, so not this one.
- ViT-S/14 by default: about a quarter of B/14's compute per image for a few points less (DINOv2's
  published ImageNet-1k linear probes: 81.1% for S/14, 84.5% for B/14), the trade a baseline run on
  every new dataset should make; `model=b14` for the stronger one.
- 224 px, the registered input (16 x 16 patches): the checkpoint's 37 x 37 position grid (518 px) is
  resampled on loading as timm does (antialiased bicubic). `res=` must be a multiple of 14.
- Normalisation: ImageNet's mean and std (the model's, as DINOv2 was trained), bicubic resizing
  (timm's for these weights); CIFAR's 32 x 32 images are upscaled.
- The head starts at zero (uniform predictions) and trains with Adam at 1e-3, cosine-decayed over
  10 epochs of batches of 256: on fixed features Adam's per-weight step sizes make the rate
  insensitive to the feature scale. `python bench/logreg_probe.py --model dinov2_vits14
  --image_size 224 --data PATH` fits scikit-learn's logistic regression on the same features, a
  reference for this head.

Arguments, `--config=configs/dinov2_linear_probe.py:key=value,...`:
  model=s14|b14                     DINOv2 ViT-S/14 (default) or ViT-B/14
  data=cifar10|digits|folder:PATH   CIFAR-10 through tfds (default); scikit-learn's digits (offline);
                                    an image folder with train/ and val/ (or only train/)
  res=N                             the image size, a multiple of 14 (default 224)
"""

import ml_collections

from configs import vgg16_cifar
from xfer import data
from xfer.learning import optim

MODELS = {"s14": "dinov2_vits14", "b14": "dinov2_vitb14"}
PATCH_SIZE = 14


def get_config(arg: str = ""):
    """`arg`: comma-separated `key=value`, keys model, data, res (see the module docstring)."""
    args = _parse_args(arg)
    # Every run-level field of the tutorial config, so each can be overridden; the rest is set here.
    config = vgg16_cifar.get_config(f"res={args['res']}")
    config.model = ml_collections.ConfigDict({
        "name": MODELS[args["model"]],
        "image_size": int(args["res"]),  # the patch grid, and so the position embedding, follows it
    })
    config.init = "pretrained"  # DINOv2's LVD-142M weights from the Hugging Face hub
    config.head_zero_init = True
    config.data = _data_config(args["data"], int(args["res"]))
    with config.ignore_type():  # the tutorial's partition is (regex, group) rules; this is a preset
        config.partition = "linear_probe"  # the head only (xfer/learning/presets.py)
    config.optim = ml_collections.ConfigDict({
        "head": optim.group_config(optimizer="adam", lr=1e-3, schedule="cosine"),
    })
    config.feature_cache = "auto"  # the cut: `pool`, the class token after the final norm
    config.feature_cache_dtype = "float32"
    config.batch_size = 256
    config.num_epochs = 10
    config.log_every = 50
    config.eval_every = 196  # once an epoch of CIFAR-10 (50,000 / 256); the last step always evaluates
    config.checkpoint = ml_collections.ConfigDict({"every": 196, "keep_latest": 1, "keep_best": 1})
    return config


def _parse_args(arg: str) -> dict[str, str]:
    args = {"model": "s14", "data": "cifar10", "res": "224"}
    for item in filter(None, arg.split(",")):
        key, separator, value = item.partition("=")
        if not separator or key not in args:
            raise ValueError(f"configs/dinov2_linear_probe.py: bad argument {item!r}; write key=value with key "
                             f"one of {', '.join(args)}")
        args[key] = value
    if args["model"] not in MODELS:
        raise ValueError(f"configs/dinov2_linear_probe.py: model={args['model']!r}; choose one of {', '.join(MODELS)}")
    if not args["res"].isdigit() or int(args["res"]) < PATCH_SIZE or int(args["res"]) % PATCH_SIZE:
        raise ValueError(f"configs/dinov2_linear_probe.py: res={args['res']!r}; it must be a multiple of the "
                         f"{PATCH_SIZE} px patch, e.g. 224 or 112")
    return args


def _data_config(spec: str, image_size: int) -> ml_collections.ConfigDict:
    """Un-augmented (the feature cache needs it), with the model's normalisation and bicubic resizing."""
    common = dict(image_size=image_size, augment="none", interpolation="bicubic", mixup_alpha=0.0, cutmix_alpha=0.0)
    if spec == "cifar10":
        return data.config_dict(source="tfds", name="cifar10", train_split="train", eval_split="test", **common)
    if spec == "digits":
        return data.config_dict(source="digits", **common)
    if spec.startswith("folder:") and spec != "folder:":
        return data.config_dict(source="folder", path=spec[len("folder:"):], **common)
    raise ValueError(f"configs/dinov2_linear_probe.py: data={spec!r}; choose cifar10, digits or folder:PATH")
