"""Input pipelines: tfds (ArrayRecord), an image folder or scikit-learn's digits, through grain.

    data = xfer.data.build(config.data, model_info, global_batch_size, seed)
    batch = next(data.train)          # {"image": f32 (B, S, S, 3), "label": i32 (B,)}, endless
    state = data.train.get_state()    # JSON-serialisable; data.train.set_state(state) resumes exactly
    for batch in data.eval_batches(): # one pass, plus "mask": f32 (B,), 0 on padding
        ...

B is this process's share, global_batch_size // jax.process_count(), and each process reads only
its own examples. Images are normalised for the model: `(pixels / 255 - mean) / std` with its
ModelInfo's mean and std, unless config.data.mean / std give others. No TensorFlow is needed at
run time. A tfds dataset not yet prepared is downloaded and written as ArrayRecord on first use
(xfer.data.tfds_prepare); builders that encode image arrays (cifar10) need
`pip install 'xfer[prepare]'` for that.

Config examples (every field and its default: `xfer.data.settings.DataSettings`):

    config.data = dict(source="tfds", name="cifar10", train_split="train", eval_split="test",
                       image_size=224, augment="crop_flip", num_workers=0)
    config.data = dict(source="folder", path="~/data/flowers")   # train/ and val/ of class folders
    config.data = dict(source="digits", flip=False)               # offline: sklearn's 8x8 digits

Every source holds a test split (tfds's eval_split, the folder's val/ or test/, or a fixed carve:
digits, a folder with train/ alone). `val_fraction` carves a validation split from the train split,
stratified and drawn with `split_seed`, never trained on; `evaluate_on="val"` scores runs on it
(hyperparameter searches), "test" on the test split. `data.example_ids()` names the examples of both.

In a config file for launch.py write `config.data = xfer.data.config_dict(source=..., ...)`: it holds
every field, so any of them (the other sources' too) can be overridden from the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from xfer.data import pipeline, sources
from xfer.data.errors import DataError
from xfer.data.settings import DataSettings, config_dict
from xfer.data.transforms import INTERPOLATIONS, CropFlip, Identity, LabelsToInt32, Normalise, Prepare
from xfer.models import ModelInfo

__all__ = ["Data", "DataError", "DataSettings", "build", "config_dict"]


@dataclasses.dataclass
class Data:
    train: grain.DatasetIterator  # endless per-process batches; get_state() / set_state(state)
    class_names: tuple[str, ...]
    num_train: int  # examples in the train split, all processes together
    num_eval: int  # likewise for the eval split
    image_size: int  # batches hold (batch_size, image_size, image_size, 3) images
    batch_size: int  # this process's batch size
    # What changes the training images: "crop_flip" or "none" (config.data.augment), then "+mixup" and/or
    # "+cutmix" where the train step mixes them; anything but "none" rules out a feature cache.
    augment: str
    mixup_alpha: float  # the train step's mixing (config.data; xfer.learning.loss), 0 = off
    cutmix_alpha: float
    # What the eval split is: "test", the source's held-out split, or "val", carved from the train split
    # (config.data.evaluate_on); its examples are never in the train split.
    eval_role: str
    _splits: sources.Splits = dataclasses.field(repr=False)
    _prepare: grain.transforms.Map = dataclasses.field(repr=False)
    _normalise: grain.transforms.Map = dataclasses.field(repr=False)
    _seed: int = dataclasses.field(repr=False)
    _shard: dict = dataclasses.field(repr=False)
    # The splits as the source gave them, which name the examples (`example_ids`) after `with_features`.
    _named: sources.Splits | None = dataclasses.field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def example_ids(self) -> dict[str, Any]:
        """{"train": ids of the examples trained on, "eval": of those scored on, "eval_role": "val" or
        "test"}, each in stored order: what shows that a search never saw a test example. An id names
        the same example whichever split string or carve selected it (`xfer.data.sources`)."""
        named = self._named or self._splits
        return {"train": list(named.train.ids), "eval": list(named.eval.ids), "eval_role": self.eval_role}

    def train_labels(self) -> np.ndarray:
        """The label of every training example, in stored order, without decoding an image: what
        class weights are counted from (`xfer.learning.loss`). Folders, digits and cached features
        hold them already; tfds reads its records with the image left encoded."""
        return np.asarray(self._splits.train.labels, np.int64)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """A fresh pass over the eval split; weigh each example by batch["mask"]."""
        return iter(self._pass(self._splits.eval))

    def train_pass(self) -> Iterator[dict[str, Any]]:
        """One pass over the train split in stored order, prepared as for eval, with "mask" and
        "index" (the example's position in the split): what a feature cache is computed from."""
        return iter(self._pass(self._splits.train))

    def with_features(self, train: tuple[Sequence[np.ndarray], np.ndarray],
                      eval: tuple[Sequence[np.ndarray], np.ndarray]) -> "Data":
        """The same pipelines (order, sharding, iterator state) over precomputed per-example
        (features, labels) of each split in stored order: batch["image"] then holds feature rows.
        Rows are read one by one as batches need them, never copied whole."""
        splits = sources.Splits(train=FeatureRecords(*train), eval=FeatureRecords(*eval),
                                class_names=self._splits.class_names, eval_role=self.eval_role)
        return _assemble(splits, Identity(), Identity(), LabelsToInt32(), self.image_size, self.batch_size,
                         "none", (0.0, 0.0), self._seed, self._shard, named=self._named or self._splits)

    def _pass(self, records) -> grain.IterDataset:
        return pipeline.eval_batches(records, self._prepare, self._normalise, batch_size=self.batch_size,
                                     **self._shard)


@dataclasses.dataclass(frozen=True)
class FeatureRecords:
    """Random access to (feature row, label) pairs: a split whose images were replaced."""

    features: Sequence[np.ndarray]  # features[i]: example i's float32 row, read when asked for (it may be on disk)
    labels: np.ndarray  # (N,) int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.features[index], "label": int(self.labels[index])}


def build(config: Mapping[str, Any], model_info: ModelInfo, global_batch_size: int, seed: int, *,
          process_index: int | None = None, process_count: int | None = None) -> Data:
    """The train and eval pipelines of this process (`process_*` default to jax's)."""
    settings = DataSettings.read(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} must be a positive multiple of the "
                        f"process count {process_count}; change the batch size")
    batch_size = global_batch_size // process_count

    splits = sources.load(settings)
    for split_name, records in (("train", splits.train), ("eval", splits.eval)):
        if not len(records):
            raise DataError(f"the {split_name} split of {settings.source} data is empty")
    image_size = settings.image_size or model_info.input_size
    resample = INTERPOLATIONS[settings.interpolation]
    prepare = Prepare(image_size, resample)
    augment = (CropFlip(image_size, settings.crop_margin, settings.flip, resample)
               if settings.augment == "crop_flip" else prepare)
    normalise = Normalise(model_info.mean if settings.mean is None else settings.mean,
                          model_info.std if settings.std is None else settings.std)
    shard = dict(process_index=process_index, process_count=process_count,
                 num_threads=settings.num_threads, num_workers=settings.num_workers)
    mixing = (settings.mixup_alpha, settings.cutmix_alpha)
    augment_name = "+".join([settings.augment] + [name for name, alpha in zip(("mixup", "cutmix"), mixing) if alpha])
    return _assemble(splits, prepare, augment, normalise, image_size, batch_size, augment_name, mixing, seed, shard)


def _assemble(splits, prepare, augment, normalise, image_size: int, batch_size: int, augment_name: str,
              mixing: tuple[float, float], seed: int, shard: dict, named: sources.Splits | None = None) -> Data:
    return Data(
        train=pipeline.train_batches(splits.train, augment, normalise, batch_size=batch_size,
                                     seed=seed, **shard),
        class_names=splits.class_names,
        num_train=len(splits.train),
        num_eval=len(splits.eval),
        image_size=image_size,
        batch_size=batch_size,
        augment=augment_name,
        mixup_alpha=mixing[0],
        cutmix_alpha=mixing[1],
        eval_role=splits.eval_role,
        _splits=splits,
        _prepare=prepare,
        _normalise=normalise,
        _seed=seed,
        _shard=shard,
        _named=named,
    )
