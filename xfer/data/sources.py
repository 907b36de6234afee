"""Where examples come from: tfds ArrayRecord files, a folder of images, or scikit-learn's digits.

Each source gives a train and a test split as random-access sequences (`len(split)`,
`split[i]`) of `{"image": uint8 (H, W, 3), "label": int}` in a fixed order, with every label
in that order as `split.labels` (read without decoding images) and every example's id as
`split.ids` (a string naming the same example whichever split string or carve selected it),
plus the class names. `load` then carves a validation split from the train split
(config.data.val_fraction) and chooses which one runs are scored on (config.data.evaluate_on).
Shuffling, sharding and preprocessing are the pipeline's job. Random access is what lets
grain shuffle globally, shard by process and resume at an exact position.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from xfer.data import tfds_prepare
from xfer.data.errors import DataError
from xfer.data.settings import DataSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The test splits xfer carves (digits', a train-only folder's) are the same in every run, whatever
# config.data.split_seed: eval numbers stay comparable, and no search ever sees a test example.
TEST_SPLIT_SEED = 0
_LABEL_CHUNK = 4096  # tfds records read at once when only their labels are wanted


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    class_names: tuple[str, ...]
    # What `eval` is: "test", the source's held-out split, or "val", carved from its train split.
    eval_role: str = "test"


def load(settings: DataSettings) -> Splits:
    """The training records (the train split less any validation carve) and the split runs are scored on."""
    if settings.source == "tfds":
        train, test, class_names = _tfds(settings.name, settings.train_split, settings.eval_split or "test",
                                         settings.data_dir)
    elif settings.source == "folder":
        train, test, class_names = _folder(Path(settings.path).expanduser(), settings.train_split,
                                           settings.eval_split, settings.test_fraction)
    else:
        train, test, class_names = _digits(settings.test_fraction)
    if not settings.val_fraction:
        return Splits(train, test, class_names, "test")
    train, val = carve(train, settings.val_fraction, settings.split_seed, class_names, "val_fraction",
                       "validation")
    if settings.evaluate_on == "val":
        return Splits(train, val, class_names, "val")
    return Splits(train, test, class_names, "test")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) or (H, W, 1) to (H, W, 3); RGB unchanged."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3:
        raise DataError(f"images have shape {image.shape}; the pipeline reads grayscale or RGB")
    return image


# --- carved splits --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Subset:
    """The examples of `records` at `indices`, in that order: a split carved from another."""

    records: Sequence[dict[str, Any]]
    indices: np.ndarray
    labels: np.ndarray | None = None  # None: read from `records` (a carve passes those it has read)

    def __post_init__(self):
        indices = np.asarray(self.indices, np.int64)
        if isinstance(self.records, _Subset):  # a carve of a carve reads the underlying records directly
            indices = self.records.indices[indices]
            object.__setattr__(self, "records", self.records.records)
        object.__setattr__(self, "indices", indices)
        if self.labels is None:
            object.__setattr__(self, "labels", np.asarray(self.records.labels, np.int64)[indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[int(self.indices[index])]

    @property
    def ids(self) -> tuple[str, ...]:
        ids = self.records.ids
        return tuple(ids[i] for i in self.indices)


def carve(records, fraction: float, seed: int, class_names: Sequence[str], setting: str,
          role: str) -> tuple[_Subset, _Subset]:
    """(rest, carved): of each class's n examples, `_share(fraction, n)` drawn with numpy's
    `default_rng(seed)` are carved, so both parts hold every class in the proportions of `records`;
    both keep the stored order. A class the carve would leave without a `role` example, or without a
    training example, is an error naming config.data.`setting` and the class, before any run."""
    labels = np.asarray(records.labels, np.int64)
    present, sizes = np.unique(labels, return_counts=True)
    if len(present):  # the smallest class is the first left without either part: its fix fixes all
        smallest = int(np.argmin(sizes))
        _check_share(setting, fraction, role, class_names[present[smallest]], int(sizes[smallest]))
    rng = np.random.default_rng(seed)
    carved = [np.zeros(0, np.int64)]
    for label, size in zip(present, sizes):
        carved.append(rng.choice(np.flatnonzero(labels == label), _share(fraction, size), replace=False))
    carved = np.sort(np.concatenate(carved))
    rest = np.setdiff1d(np.arange(len(labels)), carved)
    return _Subset(records, rest, labels[rest]), _Subset(records, carved, labels[carved])


def _share(fraction: float, count: int) -> int:
    """round(fraction * count), halves up (so the smallest fraction an error suggests is enough)."""
    return math.floor(fraction * count + 0.5 + 1e-9)


def _check_share(setting: str, fraction: float, role: str, name: str, count: int) -> None:
    held = f"class {name!r} ({count} training example{'s' if count != 1 else ''})"
    carved = _share(fraction, count)
    if count < 2:
        raise DataError(f"config.data.{setting}={fraction} cannot split {held} into training and {role} "
                        "examples; add examples to that class")
    if carved == 0:
        raise DataError(f"config.data.{setting}={fraction} leaves {held} without a {role} example; raise "
                        f"{setting} to at least {math.ceil(0.5 / count * 1e4) / 1e4:g} or add examples")
    if carved == count:
        raise DataError(f"config.data.{setting}={fraction} leaves {held} without a training example; lower "
                        f"{setting} below {math.floor((count - 0.5) / count * 1e4) / 1e4:g} or add examples")


# --- tfds -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TfdsRecords:
    """A tfds data source reduced to the (image, label) pair of its supervised keys."""

    source: Sequence[dict[str, Any]]
    image_key: str
    label_key: str
    dataset: str = ""  # the builder's name, the first part of every id
    # (base split, start, stop) of each stretch of base-split examples the split string reads, in order;
    # or, as a string, why tfds could not tell (raised only when ids are asked for).
    ranges: tuple[tuple[str, int, int], ...] | str = ()

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

    @property
    def ids(self) -> tuple[str, ...]:
        """`<dataset>/<base split>/<index in the base split>`: `train[10:20]` starts at `cifar10/train/10`."""
        if isinstance(self.ranges, str):
            raise DataError(self.ranges)
        ids = tuple(f"{self.dataset}/{split}/{index}" for split, start, stop in self.ranges
                    for index in range(start, stop))
        if len(ids) != len(self):
            raise DataError(f"tfds dataset {self.dataset!r}: the split string's ranges {self.ranges} hold "
                            f"{len(ids)} examples but its data source {len(self)}; example ids cannot be told")
        return ids


def _tfds(name: str, train_split: str, eval_split: str, data_dir: str | None):
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


def _read_tfds(builder, train_split: str, eval_split: str):
    """(train, test, class names) of a prepared dataset, read from its files; None if it is not prepared."""
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
    records = [_TfdsRecords(source, image_key, label_key, builder.name, _absolute_ranges(builder, spec))
               for source, spec in ((train, train_split), (evaluation, eval_split))]
    return records[0], records[1], class_names


def _absolute_ranges(builder, spec: str) -> tuple[tuple[str, int, int], ...] | str:
    """Which examples of which base split `spec` reads, in order, by tfds's own slicing (the
    `ReadInstruction`s its data sources are built from); or why that cannot be told."""
    import tensorflow_datasets as tfds

    sizes = builder.info.splits or _DataSourceSizes(builder)
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes)
        # tfds writes a range that starts at the split's start, or ends at its end, as None.
        return tuple((i.splitname, i.from_ or 0, sizes[i.splitname].num_examples if i.to is None else i.to)
                     for i in instructions)
    except (ValueError, KeyError, NotImplementedError) as error:
        return (f"cannot tell which examples tfds split {spec!r} of {builder.name!r} reads ({error}); example ids "
                "support 'name', 'name[a:b]', 'name[:N]', 'name[N:]', 'name[:P%]' and '+' of those")


class _DataSourceSizes(Mapping):
    """Split sizes where a builder knows none (`tfds.testing.mock_data` reads any split without them):
    each base split is as long as its data source."""

    def __init__(self, builder):
        self._builder = builder

    def __getitem__(self, split: str):
        size = len(self._builder.as_data_source(split=split))
        return SimpleNamespace(num_examples=size, shard_lengths=[size])

    def __contains__(self, split) -> bool:
        return True

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


# --- image folder ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ImageFiles:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    root: Path  # the folder's root: ids are the paths relative to it

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

    @property
    def ids(self) -> tuple[str, ...]:
        """Each image's path below the root, e.g. `train/cat/001.jpg`."""
        return tuple(path.relative_to(self.root).as_posix() for path in self.paths)


def _folder(root: Path, train_split: str, eval_split: str | None, test_fraction: float):
    """(train, test, class names). The test split is `eval_split`/, else val/, else test/; a folder
    holding only `train_split`/ has it carved from there instead (`test_fraction` of each class, the
    same images in every run)."""
    layout = (f"expected {root}/{train_split}/<class>/<image>, and val/ or test/ alike (or neither: the test "
              f"split is then config.data.test_fraction of {train_split}/), images being "
              f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {layout}")
    if not (root / train_split).is_dir():
        raise DataError(f"image folder {root} has no {train_split}/ subfolder; {layout}")
    if eval_split is None:
        eval_split = "val" if (root / "val").is_dir() else "test"
        others = sorted(f"{d.name}/" for d in root.iterdir()
                        if d.is_dir() and d.name not in (train_split, "test") and not d.name.startswith("."))
        if not (root / eval_split).is_dir() and others:  # the eval images may be there: never train on them
            raise DataError(f"image folder {root} has no test/ subfolder; {layout}; it holds {', '.join(others)}: "
                            f"name the test split with config.data.eval_split, or move those away to carve it "
                            f"from {train_split}/")
    elif not (root / eval_split).is_dir():
        raise DataError(f"image folder {root} has no {eval_split}/ subfolder; {layout}")
    class_names = tuple(sorted(d.name for d in (root / train_split).iterdir() if d.is_dir()))
    if not class_names:
        raise DataError(f"{root / train_split} has no class folders; {layout}")
    train = _list_images(root, train_split, class_names, layout)
    if not (root / eval_split).is_dir():
        train, test = carve(train, test_fraction, TEST_SPLIT_SEED, class_names, "test_fraction", "test")
        return train, test, class_names
    return train, _list_images(root, eval_split, class_names, layout), class_names


def _list_images(root: Path, split: str, class_names: tuple[str, ...], layout: str) -> _ImageFiles:
    split_dir = root / split
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
    return _ImageFiles(tuple(paths), tuple(labels), root)


# --- scikit-learn digits ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ArrayRecords:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # (N,)
    name: str  # ids are `<name>/<index>`

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{index}" for index in range(len(self)))


def _digits(test_fraction: float):
    """The 1797 8x8 digits bundled with scikit-learn (no download), as RGB 0..255 images. The test split is
    scikit-learn's stratified `train_test_split` with a fixed seed: the same images (and order) as ever."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    everything = _ArrayRecords(to_rgb(gray[..., None]), digits.target, "digits")
    train, test = train_test_split(np.arange(len(everything)), test_size=test_fraction, stratify=digits.target,
                                   random_state=TEST_SPLIT_SEED)
    return _Subset(everything, train), _Subset(everything, test), tuple(str(name) for name in digits.target_names)
