"""`config.data`, read once into a checked dataclass: one place lists every field and its default.

A plain dict or an ml_collections ConfigDict both work. An unknown key is an error (a typo must not
silently fall back to a default); fields that belong to another source are ignored, so one config
can switch `source` from the command line without clearing the other source's fields.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import ml_collections

from xfer.data.errors import DataError
from xfer.data.transforms import INTERPOLATIONS

SOURCES = ("tfds", "folder", "digits")
AUGMENTATIONS = ("crop_flip", "none")
EVALUATE_ON = ("test", "val")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    source: str  # "tfds", "folder" or "digits"
    # tfds: the registered dataset name, e.g. "cifar10".
    name: str | None = None
    # tfds: root of the prepared datasets (None: tfds's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    data_dir: str | None = None
    # folder: the directory holding train/ and val/ (or test/), each with one folder per class; with
    # train/ alone the test split is carved from it (test_fraction).
    path: str | None = None
    # tfds: split names (any tfds split string, e.g. "train[:90%]"); folder: subfolder names.
    train_split: str = "train"
    # The test split. None: "test" for tfds; for a folder "val", or "test" where there is no val/.
    eval_split: str | None = None
    # digits, and a folder with only train/: share of the examples held out as the test split
    # (stratified, always the same examples, whatever split_seed).
    test_fraction: float = 0.2
    # Share of the train split held out as a validation split, stratified: of each class's n training
    # examples round(val_fraction * n) (halves up), drawn with split_seed. 0: no validation split.
    # A class it would leave without a validation or a training example is an error.
    val_fraction: float = 0.0
    # The seed of the validation draw: another split_seed, other validation examples (never other test ones).
    split_seed: int = 0
    # The split runs are scored on: "test", the source's held-out split (tfds eval_split, the folder's
    # val/ or test/, the test_fraction carve); "val", the validation split (val_fraction > 0). Validation
    # examples are never trained on: with val_fraction = 0 training uses the whole train split.
    evaluate_on: str = "test"
    # Side of the square images the model sees (None: the model's ModelInfo.input_size). Eval images
    # (and train images with augment="none") are the image's largest central square resized to it
    # (`transforms.central_crop`): nothing is cropped away, and a square image is simply resized.
    image_size: int | None = None
    # The resize filter, PIL's: "bicubic", or "bilinear" as torchvision's `Resize` on PIL images.
    interpolation: str = "bicubic"
    # Per-channel normalisation of pixels scaled to [0, 1], `(x - mean) / std` (None: the model's
    # ModelInfo mean/std, which its ImageNet weights were trained with; a recipe written for other
    # constants, e.g. torch's `Normalize((0.5,)*3, (0.5,)*3)`, states its own).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # "crop_flip": the central square resized to image_size * (1 + crop_margin), then a random
    # image_size crop, mirrored left-right half the time if `flip`. "none": exactly like eval.
    augment: str = "crop_flip"
    # crop_flip only: False for data where mirroring changes the class (digits, text).
    flip: bool = True
    # crop_flip only: how much larger than image_size the image is before the random crop;
    # 0.125 shifts by up to 1/16 of the image each way, like CIFAR's 4-pixel pad on 32.
    crop_margin: float = 0.125
    # Mixing, done on the device inside the train step (xfer.learning.loss): each batch is paired with
    # itself reversed and mixed with lam ~ Beta(alpha, alpha), the targets mixed alike (timm's Mixup).
    # mixup_alpha > 0 blends whole images; cutmix_alpha > 0 pastes a box of area 1 - lam; both > 0:
    # each batch picks one, half the time each. 0 turns it off. Mixed images are augmented images:
    # no feature cache.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Threads per process preparing batches concurrently (PIL resizing releases the GIL).
    num_threads: int = 4
    # grain worker processes per process (0: threads only). The batches are the same either way, but
    # the saved iterator state is not: resume with the same num_workers. grain reads absl flags in
    # its workers, so the program must parse them first (launch.py's absl app does).
    num_workers: int = 0

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> "DataSettings":
        given = dict(config)
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise DataError(f"unknown config.data key(s) {', '.join(unknown)}; "
                            f"the keys are: {', '.join(known)}")
        if "source" not in given:
            raise DataError(f"config.data.source is not set; choose one of {', '.join(SOURCES)}")
        settings = cls(**given)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"config.data.source={self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "tfds" and not self.name:
            raise DataError('config.data.source="tfds" needs config.data.name, e.g. "cifar10"')
        if self.source == "folder" and not self.path:
            raise DataError('config.data.source="folder" needs config.data.path, the directory '
                            "holding train/ and val/")
        if self.augment not in AUGMENTATIONS:
            raise DataError(f"config.data.augment={self.augment!r}; choose one of "
                            f"{', '.join(AUGMENTATIONS)}")
        if not 0 < self.test_fraction < 1:
            raise DataError(f"config.data.test_fraction={self.test_fraction}; it must lie in (0, 1)")
        if not _number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise DataError(f"config.data.val_fraction={self.val_fraction!r}; it must lie in [0, 1) "
                            "(0: no validation split)")
        seed = self.split_seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise DataError(f"config.data.split_seed={self.split_seed!r}; it must be an integer >= 0")
        if self.evaluate_on not in EVALUATE_ON:
            raise DataError(f"config.data.evaluate_on={self.evaluate_on!r}; choose one of {', '.join(EVALUATE_ON)}")
        if self.evaluate_on == "val" and not self.val_fraction:
            raise DataError('config.data.evaluate_on="val" needs a validation split; set config.data.val_fraction, '
                            "e.g. 0.1")
        if self.image_size is not None and self.image_size < 1:
            raise DataError(f"config.data.image_size={self.image_size}; it must be positive, or None "
                            "for the model's input size")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"config.data.interpolation={self.interpolation!r}; choose one of "
                            f"{', '.join(INTERPOLATIONS)}")
        for name, values, low in (("mean", self.mean, -math.inf), ("std", self.std, 0)):
            if values is not None and not _channels(values, low):
                raise DataError(f"config.data.{name}={values!r}; it must be 3 finite numbers"
                                f"{' > 0' if low == 0 else ''} (R, G, B), or None for the model's")
        if self.crop_margin < 0:
            raise DataError(f"config.data.crop_margin={self.crop_margin}; it must be >= 0")
        for name in ("mixup_alpha", "cutmix_alpha"):
            alpha = getattr(self, name)
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
                raise DataError(f"config.data.{name}={alpha!r}; it must be a finite number >= 0 (0 turns it off, "
                                "0.2 to 1 are usual)")
        if self.num_threads < 0 or self.num_workers < 0:
            raise DataError("config.data.num_threads and num_workers must be >= 0")


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _channels(values, low: float) -> bool:
    """`values` is one finite number > `low` per RGB channel."""
    return (isinstance(values, (tuple, list)) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and low < v < math.inf
                    for v in values))


# The type of each field whose default is None: ml_collections overrides those through placeholders.
_OPTIONAL_TYPES = {"str | None": str, "int | None": int, "tuple[float, float, float] | None": tuple}


def config_dict(**fields) -> ml_collections.ConfigDict:
    """`config.data` with every field present: the given ones, defaults for the rest.

    Under launch.py's locked config only fields the config holds can be set from the
    command line, so a config written with this can switch to any source there
    (`--config.data.source=folder --config.data.path=DIR`). Fields whose default is
    None become typed placeholders, the form ml_collections can override.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(DataSettings)
                if field.default is not dataclasses.MISSING}
    unknown = sorted(set(fields) - set(defaults) - {"source"})
    if unknown:
        raise DataError(f"unknown config.data key(s) {', '.join(unknown)}; "
                        f"the keys are: source, {', '.join(defaults)}")
    types = {field.name: _OPTIONAL_TYPES[field.type] for field in dataclasses.fields(DataSettings)
             if field.default is None}
    values = {**defaults, **fields}
    return ml_collections.ConfigDict(
        {name: ml_collections.config_dict.placeholder(types[name]) if value is None and name in types
         else value for name, value in values.items()})
