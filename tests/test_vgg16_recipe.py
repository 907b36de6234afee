"""configs/vgg16_cifar.py is the PyTorch tutorial, and its feature cache changes nothing but the cost.

The tutorial's values are written out here from the tutorial, independently of the config, so a
change to either shows. The runs use the config as a user gets it, on tfds's mock CIFAR-10 (20
random images a split), with only what makes them small overridden: VGG11 from scratch at 32 px
and 10 steps (2 epochs of 5 batches of 4). The classifier's dropout is on in both runs, and draws
the same masks in both: the step folds its number into the state's key, and Flax derives each
Dropout layer's key from its module path, which the cache does not change.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image

from xfer import data as xdata, models
from xfer.training import feature_cache, train
from xfer.training import mesh as mesh_lib
from xfer.weights.initialise import initial_variables

import numerics
from configs import vgg16_cifar

# The tutorial (PyTorch), one value per line of it.
TUTORIAL = {
    "model.name": "vgg16",  # models.vgg16(pretrained=True)
    "init": "imagenet",
    "data.image_size": 224,  # transforms.Resize((224, 224)), on PIL images: PIL's bilinear
    "data.interpolation": "bilinear",
    "data.mean": (0.5, 0.5, 0.5),  # transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    "data.std": (0.5, 0.5, 0.5),
    "data.augment": "none",  # no augmentation
    "batch_size": 4,  # DataLoader(trainset, batch_size=4, shuffle=True)
    "num_epochs": 10,  # for epoch in range(10)
    "total_steps": 0,
    # for p in model.features.parameters(): p.requires_grad = False;
    # optim.SGD(model.classifier.parameters(), lr=0.001, momentum=0.9)
    "partition": (("^features/", "frozen"), ("^classifier/", "classifier")),
    "optim.classifier.optimizer": "sgd",
    "optim.classifier.lr": 1e-3,
    "optim.classifier.momentum": 0.9,
    "optim.classifier.nesterov": False,
    "optim.classifier.weight_decay": 0.0,
    "optim.classifier.schedule": "constant",
    "optim.classifier.warmup_steps": 0,
    "optim.classifier.clip_norm": 0.0,
    "head_zero_init": False,  # classifier[6] = nn.Linear(4096, 10): a random head
    "log_every": 2000,  # if i % 2000 == 1999: print(running_loss / 2000)
    "feature_cache": "auto",  # xfer's: the frozen features computed once
}

MOCK_CIFAR = dict(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE)
STEPS = 10  # 2 epochs of the 20 mock images in batches of 4

# Cached vs uncached parameters: |cached - uncached| <= ATOL + RTOL |uncached| (tests/numerics.py).
# Measured (AMD EPYC, 2 cores): bitwise equal. With every cached feature moved by 1 ulp, as a CPU
# whose feature pass rounded otherwise would: 0.0013 of this tolerance (margin 760). With the
# cached run's dropout drawn from another key: 2133 times it, so a mask that differs fails.
RTOL, ATOL = 1e-4, 1e-6
# Eval predictions may differ only where the top two logits lie within MIN_MARGIN. The two runs'
# logits measured equal; 1 ulp on every cached feature moved them by 3.7e-8 (MIN_MARGIN is 2700
# times that). The smallest top-2 margin measured is 0.0095, so no example is excluded.
MIN_MARGIN = 1e-4


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_the_default_is_the_tutorial():
    config = vgg16_cifar.get_config()
    assert {key: _get(config, key) for key in TUTORIAL} == TUTORIAL
    assert list(config.optim) == ["classifier"]
    assert config.eval_every >= 10 * 50_000 // 4  # tested once, after training


def test_tutorial_preprocessing_is_torchvisions_pixel_for_pixel(tmp_path):
    """Resize((224, 224)) (PIL's bilinear on the dataset's PIL images), ToTensor, Normalize(0.5, 0.5),
    as torchvision computes them, against the config's data pipeline on the same 32x32 image."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    for split in ("train", "test"):  # the config's split names
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "cat" / "0.png")
    config = vgg16_cifar.get_config().data
    config.update(source="folder", path=str(tmp_path), num_threads=0)
    ours = next(xdata.build(config, models.info("vgg16"), 1, 0).eval_batches())["image"][0]

    resized = Image.fromarray(pixels).resize((224, 224), Image.Resampling.BILINEAR)  # torchvision's Resize
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)  # ToTensor
    mean = std = torch.tensor([0.5, 0.5, 0.5])[:, None, None]
    theirs = tensor.sub(mean).div(std).permute(1, 2, 0).numpy()  # Normalize, back to HWC
    # float32 rounding only: `normalise` multiplies by 1 / (255 * std) where torch divides twice.
    # Measured over 20 random images: at most 1.2e-7 (1 ulp at 1.0), 8x below atol; one pixel level
    # is 0.0078, and bicubic resizing (xfer's default) differs from this by up to 49 levels.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def mock_cifar():
    with tfds.testing.mock_data(**MOCK_CIFAR):
        yield


def _tutorial(**overrides):
    """The default config, made small: VGG11 from scratch at 32 px, STEPS steps."""
    config = vgg16_cifar.get_config("res=32")
    config.model.name = "vgg11"
    config.init = "scratch"
    config.total_steps = STEPS
    config.log_every = 1
    config.eval_every = config.checkpoint.every = STEPS
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def cached_and_uncached(tmp_path_factory, mock_cifar):
    root = tmp_path_factory.mktemp("runs")
    return root, numerics.run_cached_and_uncached(_tutorial, root)


def test_the_tutorial_caches_vggs_features(mock_cifar):
    run = train.setup(_tutorial())
    assert run.cuts == ("features",)
    assert run.trainable_parameters == (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)


def test_dropout_masks_are_the_same_with_and_without_the_cache(mock_cifar):
    """The train step draws dropout from `fold_in(state.rng, step)` through the module paths of the
    classifier's Dropout layers, which the cache leaves where they were: the same masks both ways."""
    run = train.setup(_tutorial())
    variables = initial_variables(run.model, "vgg11", "scratch", 32, seed=0, head_zero_init=False)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    batch = {"image": images, "label": jnp.zeros(4, jnp.int32), "index": jnp.zeros(4, jnp.int32),
             "mask": jnp.ones(4)}
    features = feature_cache.make_feature_step(run.model, run.cuts[0], mesh_lib.data_mesh())(
        variables["params"], {}, batch)[0]

    def logits(rng, cached: bool):
        if not cached:
            return run.model.apply(variables, images, train=True, rngs={"dropout": rng})
        with feature_cache.substituted(run.cuts[0], features):
            return run.model.apply(variables, jnp.zeros_like(images), train=True, rngs={"dropout": rng})

    key, other = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    np.testing.assert_array_equal(logits(key, cached=True), logits(key, cached=False))
    assert not np.allclose(logits(key, cached=False), logits(other, cached=False))  # dropout is on


def test_cached_training_of_the_tutorial_equals_training_on_images(cached_and_uncached):
    root, summaries = cached_and_uncached
    numerics.assert_cached_equals_uncached(_tutorial, root, summaries, RTOL, ATOL, MIN_MARGIN)


@pytest.mark.parametrize("arg", ["recipe=tuned", "recipe=tuned,res=32"])
def test_the_tuned_recipe_builds_and_trains_on_images(mock_cifar, arg):
    config = vgg16_cifar.get_config(arg)
    assert (config.batch_size, config.optim.classifier.lr, config.optim.classifier.schedule) == (64, 0.016, "cosine")
    config.total_steps = 7813  # CIFAR-10's 10 epochs of 64 (mock CIFAR has 20 images, fewer than the warmup)
    run = train.setup(config)
    assert run.cuts == (None,) and config.feature_cache == ""  # augmented: nothing to cache
    assert (run.data.augment, run.data.image_size) == ("crop_flip", 32 if "res=32" in arg else 224)
    assert config.data.mean is None and config.data.std is None  # the model's: ImageNet's


@pytest.mark.parametrize("arg, message", [
    ("recpie=tuned", "unknown argument(s) recpie; the arguments are recipe=, res="),
    ("recipe=fast", "recipe='fast'; choose one of tutorial, tuned"),
    ("res=3x", "res='3x'; it must be a whole number of pixels"),
])
def test_a_bad_config_argument_is_an_error(arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        vgg16_cifar.get_config(arg)


@pytest.mark.parametrize("field, value, message", [
    ("mean", (0.5, 0.5), "config.data.mean=(0.5, 0.5); it must be 3 finite numbers (R, G, B)"),
    ("std", (0.5, 0.0, 0.5), "config.data.std=(0.5, 0.0, 0.5); it must be 3 finite numbers > 0"),
    ("std", (0.5, float("nan"), 0.5), "config.data.std=(0.5, nan, 0.5); it must be 3 finite numbers > 0"),
    ("interpolation", "nearest", "config.data.interpolation='nearest'; choose one of bicubic, bilinear"),
])
def test_bad_normalisation_or_interpolation_is_an_error(field, value, message):
    with pytest.raises(xdata.DataError, match=re.escape(message)):
        xdata.DataSettings.read({"source": "digits", field: value})
