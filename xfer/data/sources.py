"""Where examples come from: tfds ArrayRecord files, a folder of images, or scikit-learn's digits.

Each source gives a train and an eval split as random-access sequences (`len(split)`,
`split[i]`) of `{"image": uint8 (H, W, 3), "label": int}` in a fixed order, with every label
in that order as `split.labels` (read without decoding images), plus the class names;
shuffling, sharding and preprocessing are the pipeline's job. Random access is what lets
grain shuffle globally, shard by process and resume at an exact position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from xfer.data import tfds_prepare
from xfer.data.errors import DataError
from xfer.data.settings import DataSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The digits split is the same in every run, so eval numbers are comparable across seeds.
DIGITS_SPLIT_SEED = 0
_LABEL_CHUNK = 4096  # tfds records read at once when only their labels are wanted


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    class_names: tuple[str, ...]


def load(settings: DataSettings) -> Splits:
    if settings.source == "tfds":
        return _tfds(settings.name, settings.train_split, settings.eval_split or "test",
                     settings.data_dir)
    if settings.source == "folder":
        return _folder(Path(settings.path).expanduser(), settings.train_split, settings.eval_split)
    return _digits(settings.test_fraction)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) or (H, W, 1) to (H, W, 3); RGB unchanged."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3:
        raise DataError(f"images have shape {image.shape}; the pipeline reads grayscale or RGB")
    return image


# --- tfds -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TfdsRecords:
    """A tfds data source reduced to the (image, label) pair of its supervised keys."""

    source: Sequence[dict[str, Any]]
    image_key: str
    label_key: str

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        return {"image": to_rgb(np.asarray(example[self.image_key], np.uint8)),
                "label": int(example[self.label_key])}

    @property
    def labels(self) -> np.ndarray:
        """Every example's label, read with the image left encoded (tfds's `SkipDecoding`), in chunks."""
        import tensorflow_datasets as tfds

        skipping = dataclasses.replace(self.source, decoders={self.image_key: tfds.decode.SkipDecoding()})
        labels = []
        for start in range(0, len(skipping), _LABEL_CHUNK):
            chunk = skipping.__getitems__(list(range(start, min(start + _LABEL_CHUNK, len(skipping)))))
            labels += [int(example[self.label_key]) for example in chunk]
        return np.asarray(labels, np.int64)


def _tfds(name: str, train_split: str, eval_split: str, data_dir: str | None) -> Splits:
    import tensorflow_datasets as tfds  # deferred: folder and digits runs need none of it

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tfds has no dataset named {name!r}; see "
                        "https://www.tensorflow.org/datasets/catalog for the names") from None
    splits = _read_tfds(builder, train_split, eval_split)
    if splits is None:
        tfds_prepare.prepare(builder)
        # A new builder: the old one describes the dataset as its code does, not as it was written.
        splits = _read_tfds(tfds.builder(name, data_dir=data_dir), train_split, eval_split)
    return splits


def _read_tfds(builder, train_split: str, eval_split: str) -> Splits | None:
    """The splits of a prepared dataset, read from its files; None if it is not prepared."""
    try:
        train, evaluation = builder.as_data_source(split=[train_split, eval_split])
    except (NotImplementedError, ValueError, FileNotFoundError) as error:
        if not tfds_prepare.is_prepared(builder):
            return None
        if isinstance(error, NotImplementedError):  # prepared, but not as ArrayRecord
            raise DataError(f"tfds dataset {builder.name!r} in {builder.data_dir} is prepared in a format other "
                            "than ArrayRecord, which grain cannot read by index; delete that directory (the next "
                            "run prepares it as ArrayRecord) or pass another config.data.data_dir") from None
        raise DataError(f"tfds dataset {builder.name!r} in {builder.data_dir}: {error}") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    class_names = tuple(builder.info.features[label_key].names)
    return Splits(_TfdsRecords(train, image_key, label_key),
                  _TfdsRecords(evaluation, image_key, label_key), class_names)


# --- image folder ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ImageFiles:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for a bad file; all mean "unreadable"
            raise DataError(f"cannot read image {path}: {error}; delete or replace the file") from None
        return {"image": pixels, "label": self.labels[index]}


def _folder(root: Path, train_split: str, eval_split: str | None) -> Splits:
    layout = (f"expected {root}/{train_split}/<class>/<image> and {root}/val/<class>/<image> "
              f"(or test/), images being {'/'.join(s[1:] for s in IMAGE_SUFFIXES)}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {layout}")
    if eval_split is None:
        eval_split = "val" if (root / "val").is_dir() else "test"
    for split in (train_split, eval_split):
        if not (root / split).is_dir():
            raise DataError(f"image folder {root} has no {split}/ subfolder; {layout}")
    class_names = tuple(sorted(d.name for d in (root / train_split).iterdir() if d.is_dir()))
    if not class_names:
        raise DataError(f"{root / train_split} has no class folders; {layout}")
    return Splits(_list_images(root / train_split, class_names, layout),
                  _list_images(root / eval_split, class_names, layout), class_names)


def _list_images(split_dir: Path, class_names: tuple[str, ...], layout: str) -> _ImageFiles:
    extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in class_names)
    if extra:
        raise DataError(f"{split_dir} has class folder(s) {', '.join(extra)} that the train split "
                        f"lacks; the eval classes must be train classes")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if not (split_dir / name).is_dir():
            continue  # an eval split may lack a class; the train split never does
        images = sorted(p for p in (split_dir / name).iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"class folder {split_dir / name} holds no images; {layout}")
        paths += images
        labels += [label] * len(images)
    return _ImageFiles(tuple(paths), tuple(labels))


# --- scikit-learn digits ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ArrayRecords:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}


def _digits(test_fraction: float) -> Splits:
    """The 1797 8x8 digits bundled with scikit-learn (no download), as RGB 0..255 images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    images = to_rgb(gray[..., None])
    train_images, eval_images, train_labels, eval_labels = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return Splits(_ArrayRecords(train_images, train_labels), _ArrayRecords(eval_images, eval_labels),
                  tuple(str(name) for name in digits.target_names))
