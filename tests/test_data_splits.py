"""Train / val / test from every source: disjoint, stratified, deterministic, named by example ids.

A search trains on the train split less the validation carve and is scored on the carve
(evaluate_on="val"); a final run is scored on the test split, which no split_seed changes. Each
source is checked the same way (`_assert_three_way`), through its example ids.

Folder images are flat colours whose value is the image's number (its file name), as in
test_data.py, so a batch read back names the images in it. The tfds cases use a real dataset
prepared from code into tmp_path (each image of a split its own colour), because tfds's mock_data
gives every split string the same examples and cannot read labels without images; the mock covers
what it can: cifar10's ids of unsliced reads.
"""

import io
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from xfer import data as xdata
from xfer.data import sources
from xfer.data.settings import DataSettings
from xfer.models import ModelInfo

IDENTITY = ModelInfo("test", lambda num_classes=1000: None, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _load(**config):
    return sources.load(DataSettings.read(config))


def _share(fraction, count):
    """The documented carve size: round(fraction * count), halves up."""
    return math.floor(fraction * count + 0.5)


def _by_class(ids, labels):
    return Counter(np.asarray(labels).tolist()), dict(zip(ids, np.asarray(labels).tolist()))


def _assert_three_way(config, holds=None, val_fraction=0.25):
    """The train, val and test ids of `config` with a validation carve: disjoint, covering `holds`
    (every id the source has, where the carves take all of it), the carve stratified and fixed by
    split_seed; evaluate_on picks the eval split and never changes what is trained on.
    Returns (train, val, test) ids."""
    carved = {**config, "val_fraction": val_fraction}
    on_test, on_val = _load(**carved), _load(**carved, evaluate_on="val")
    assert (on_test.eval_role, on_val.eval_role) == ("test", "val")
    train, val, test = on_test.train.ids, on_val.eval.ids, on_test.eval.ids
    assert on_val.train.ids == train  # the same training examples, whichever split is scored
    assert len(set(train)) == len(train) and len(set(val)) == len(val) and len(set(test)) == len(test)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    if holds is not None:
        assert set(train) | set(val) | set(test) == set(holds)

    # Stratified: each class gives round(val_fraction * n) of its n examples to val.
    uncarved = _load(**config)
    assert uncarved.eval_role == "test" and uncarved.eval.ids == test
    assert sorted(uncarved.train.ids) == sorted(train + val)  # val_fraction=0 trains on all of it
    whole, label_of = _by_class(uncarved.train.ids, uncarved.train.labels)
    val_counts = Counter(label_of[i] for i in val)
    assert val_counts == {label: _share(val_fraction, n) for label, n in whole.items()}
    assert list(on_val.eval.labels) == [label_of[i] for i in val]
    assert list(on_test.train.labels) == [label_of[i] for i in train]

    # Deterministic: the same split_seed draws the same val; another, other val but the same test.
    again = _load(**carved, evaluate_on="val")
    other = _load(**carved, evaluate_on="val", split_seed=1)
    other_test = _load(**carved, split_seed=1)
    assert again.eval.ids == val
    assert set(other.eval.ids) != set(val) and Counter(label_of[i] for i in other.eval.ids) == val_counts
    assert other_test.eval.ids == test
    return train, val, test


# --- digits -----------------------------------------------------------------------------------------

def _digits_reference(test_fraction=0.2):
    """The digits split as xfer made it before it had ids: scikit-learn's, seed 0, on the arrays."""
    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
    return train_test_split(images, digits.target, np.arange(len(digits.target)), test_size=test_fraction,
                            stratify=digits.target, random_state=0)


def test_digits_three_way():
    train, val, test = _assert_three_way({"source": "digits"}, holds=[f"digits/{i}" for i in range(1797)])
    assert (len(train), len(val), len(test)) == (1076, 361, 360)


def test_digits_test_split_and_training_order_are_as_ever():
    train_images, test_images, train_labels, test_labels, train_index, test_index = _digits_reference()
    for config in ({}, {"val_fraction": 0.1, "split_seed": 3}):
        splits = _load(source="digits", **config)
        assert splits.eval.ids == tuple(f"digits/{i}" for i in test_index)
        np.testing.assert_array_equal(np.stack([splits.eval[i]["image"] for i in range(len(test_index))]),
                                      test_images)
        np.testing.assert_array_equal(splits.eval.labels, test_labels)
    # Without a carve the training records are today's, in today's order: the same batches.
    splits = _load(source="digits")
    np.testing.assert_array_equal(np.stack([splits.train[i]["image"] for i in range(len(splits.train))]),
                                  train_images)
    assert [splits.train[i]["label"] for i in range(len(splits.train))] == train_labels.tolist()
    assert splits.train.ids == tuple(f"digits/{i}" for i in train_index)


# --- image folders ----------------------------------------------------------------------------------

def _image_folder(root, counts):
    """counts: {split: {class: n}} -> 4x4 PNGs of one flat colour, each value a distinct number from 1,
    named `<number>.png`."""
    number = 1
    for split, classes in counts.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for _ in range(n):
                Image.fromarray(np.full((4, 4, 3), number, np.uint8)).save(root / split / name / f"{number}.png")
                number += 1
    return root


def _files(root):
    return [path.relative_to(root).as_posix() for path in sorted(root.rglob("*.png"))]


def _numbers(ids):
    return sorted(int(i.rsplit("/", 1)[1].removesuffix(".png")) for i in ids)


@pytest.fixture
def pets(tmp_path):
    return _image_folder(tmp_path / "pets", {"train": {"cat": 8, "dog": 12, "eel": 6},
                                             "val": {"cat": 2, "dog": 3, "eel": 2}})


@pytest.fixture
def train_only(tmp_path):
    return _image_folder(tmp_path / "loose", {"train": {"cat": 10, "dog": 15, "eel": 7}})


def test_folder_with_train_and_val_three_way(pets):
    train, val, test = _assert_three_way({"source": "folder", "path": str(pets)}, holds=_files(pets))
    assert all(i.startswith("train/") for i in train + val) and all(i.startswith("val/") for i in test)
    assert "train/cat/1.png" in train + val


def test_folder_with_only_train_carves_a_fixed_test_split(train_only):
    config = {"source": "folder", "path": str(train_only)}
    train, val, test = _assert_three_way(config, holds=_files(train_only))
    plain = _load(**config)
    whole, label_of = _by_class(plain.train.ids + plain.eval.ids,
                                np.concatenate([plain.train.labels, plain.eval.labels]))
    assert Counter(label_of[i] for i in test) == {label: _share(0.2, n) for label, n in whole.items()}
    # The test carve is the same whatever the validation carve, and another test_fraction is another.
    assert _load(**config, val_fraction=0.4, split_seed=7).eval.ids == test
    assert len(_load(**config, test_fraction=0.3).eval.ids) == sum(_share(0.3, n) for n in whole.values())


def test_folder_with_only_train_and_another_folder_asks_which_is_the_test_split(train_only):
    (train_only / "holdout" / "cat").mkdir(parents=True)
    with pytest.raises(xdata.DataError, match=r"has no test/ subfolder; .* it holds holdout/: name the test split "
                                              r"with config.data.eval_split"):
        _load(source="folder", path=str(train_only))


@pytest.mark.parametrize("evaluate_on", ["val", "test"])
def test_pipelines_score_and_train_on_exactly_the_named_examples(pets, evaluate_on):
    config = dict(source="folder", path=str(pets), augment="none", num_threads=0, val_fraction=0.3,
                  evaluate_on=evaluate_on)
    data = xdata.build(config, IDENTITY, 4, 0, process_index=0, process_count=1)
    ids = data.example_ids()
    assert data.eval_role == ids["eval_role"] == evaluate_on
    assert (len(ids["train"]), len(ids["eval"])) == (data.num_train, data.num_eval)
    seen = []
    for batch in data.eval_batches():
        seen += np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)[batch["mask"] > 0].tolist()
    assert sorted(seen) == _numbers(ids["eval"])
    trained = [np.rint(next(data.train)["image"][:, 0, 0, 0] * 255).astype(int) for _ in range(data.num_train // 4)]
    assert set(np.concatenate(trained).tolist()) <= set(_numbers(ids["train"]))
    if evaluate_on == "test":
        assert all(i.startswith("val/") for i in ids["eval"])
    # Precomputed features keep the ids of the examples they were computed from.
    features = data.with_features((np.zeros((data.num_train, 2), np.float32), data.train_labels()),
                                  (np.zeros((data.num_eval, 2), np.float32), np.zeros(data.num_eval, int)))
    assert features.example_ids() == ids and features.eval_role == evaluate_on


def test_without_a_carve_the_run_trains_on_the_whole_train_split(pets):
    data = xdata.build(dict(source="folder", path=str(pets), num_threads=0), IDENTITY, 4, 0,
                       process_index=0, process_count=1)
    ids = data.example_ids()
    assert ids["eval_role"] == "test"
    assert sorted(ids["train"]) == sorted(i for i in _files(pets) if i.startswith("train/"))
    assert sorted(ids["eval"]) == sorted(i for i in _files(pets) if i.startswith("val/"))


# --- tfds -------------------------------------------------------------------------------------------

class XferSplitColours(tfds.core.GeneratorBasedBuilder):
    """60 train and 15 test PNGs, each of its own colour; example i of a split has label i % 3."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(4, 4, 3)),
                                                 "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60), "test": self._generate_examples(15)}

    def _generate_examples(self, count):
        for index in range(count):
            encoded = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), index, np.uint8)).save(encoded, format="png")
            yield index, {"image": encoded.getvalue(), "label": index % 3}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """config.data of the dataset above, prepared once (on first load) in a temporary data_dir."""
    config = {"source": "tfds", "name": "xfer_split_colours", "data_dir": str(tmp_path_factory.mktemp("tfds"))}
    _load(**config)
    return config


def _assert_ids_name_the_examples(config, records):
    """Each id is `<dataset>/<base split>/<position in that split as tfds stores it>` (tfds stores
    examples shuffled, so the colour of each position is read from the whole split)."""
    stored = {}
    for split in ("train", "test"):
        whole = _load(**{**config, "train_split": split}).train
        stored.update({f"xfer_split_colours/{split}/{i}": whole[i]["image"][0, 0, 0] for i in range(len(whole))})
    assert [records[i]["image"][0, 0, 0] for i in range(len(records))] == [stored[i] for i in records.ids]


@pytest.mark.parametrize("train_split, eval_split", [("train", "test"), ("train[:45]", "train[45:]"),
                                                     ("train[10:55]+test[:6]", "test[6:]")])
def test_tfds_three_way(colours, train_split, eval_split):
    config = {**colours, "train_split": train_split, "eval_split": eval_split}
    holds = [f"xfer_split_colours/{split}/{i}" for split, n in (("train", 60), ("test", 15)) for i in range(n)]
    train, val, test = _assert_three_way(config, holds=holds if train_split == "train" else None,
                                         val_fraction=0.2)
    on_val = _load(**config, val_fraction=0.2, evaluate_on="val")
    for records in (on_val.train, on_val.eval, _load(**config).eval):
        _assert_ids_name_the_examples(colours, records)


def test_tfds_slices_have_absolute_ids(colours):
    first, rest = _load(**colours, train_split="train[:45]"), _load(**colours, train_split="train[45:]")
    assert first.train.ids[0] == "xfer_split_colours/train/0" and rest.train.ids[0] == "xfer_split_colours/train/45"
    assert not set(first.train.ids) & set(rest.train.ids) and len(first.train) + len(rest.train) == 60
    window = _load(**colours, train_split="train[10:20]", eval_split="test[:20%]")
    assert window.train.ids[0] == "xfer_split_colours/train/10" and len(window.train.ids) == 10
    assert window.eval.ids == tuple(f"xfer_split_colours/test/{i}" for i in range(3))
    _assert_ids_name_the_examples(colours, window.train)


def _records(spec, sizes):
    """_TfdsRecords of a fake builder whose splits have `sizes`, without data behind them."""
    builder = SimpleNamespace(name="cifar10", info=SimpleNamespace(
        splits={name: SimpleNamespace(num_examples=n, shard_lengths=[n]) for name, n in sizes.items()}))
    ranges = sources._absolute_ranges(builder, spec)
    count = sum(stop - start for _, start, stop in ranges) if isinstance(ranges, tuple) else 0
    return sources._TfdsRecords(range(count), "image", "label", "cifar10", ranges)


def test_tfds_ids_follow_tfds_split_strings():
    sizes = {"train": 1000, "test": 300}
    assert _records("train[10:20]", sizes).ids[0] == "cifar10/train/10"
    head, tail = _records("train[:800]", sizes).ids, _records("train[800:]", sizes).ids
    assert (len(head), len(tail)) == (800, 200) and not set(head) & set(tail)
    assert set(head) | set(tail) == set(_records("train", sizes).ids)
    assert _records("train[:20%]", sizes).ids[-1] == "cifar10/train/199"
    assert _records("train[:2]+test[5:7]", sizes).ids == ("cifar10/train/0", "cifar10/train/1",
                                                          "cifar10/test/5", "cifar10/test/6")
    assert _records("train[-3:]", sizes).ids == ("cifar10/train/997", "cifar10/train/998", "cifar10/train/999")
    unknown = _records("validation", sizes)  # reading it fails elsewhere; asking for ids says why here
    with pytest.raises(xdata.DataError, match=r"cannot tell which examples tfds split 'validation'"):
        unknown.ids


def test_tfds_mock_cifar10_ids():
    with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = _load(source="tfds", name="cifar10", train_split="train[:50]", eval_split="test")
    assert splits.train.ids == tuple(f"cifar10/train/{i}" for i in range(50))
    assert splits.eval.ids == tuple(f"cifar10/test/{i}" for i in range(50))


# --- errors -------------------------------------------------------------------------------------------

def test_a_carve_that_empties_a_class_is_one_line_naming_it_and_the_fix(pets, train_only):
    with pytest.raises(xdata.DataError) as error:
        _load(source="folder", path=str(pets), val_fraction=0.05)
    assert str(error.value) == ("config.data.val_fraction=0.05 leaves class 'eel' (6 training examples) without "
                                "a validation example; raise val_fraction to at least 0.0834 or add examples")
    assert len(_load(source="folder", path=str(pets), val_fraction=0.0834, evaluate_on="val").eval) == 3
    with pytest.raises(xdata.DataError, match=r"^config.data.val_fraction=0.95 leaves class 'eel' \(6 training "
                                              r"examples\) without a training example; lower val_fraction below "
                                              r"0.9166 or add examples$"):
        _load(source="folder", path=str(pets), val_fraction=0.95)
    # The test carve of a train-only folder: 7 eels, 20% of 7 = 1.4 -> 1; 5% of 7 -> 0.
    with pytest.raises(xdata.DataError, match=r"^config.data.test_fraction=0.05 leaves class 'eel' \(7 training "
                                              r"examples\) without a test example; raise test_fraction to at least"):
        _load(source="folder", path=str(train_only), test_fraction=0.05)
    # After that carve 6 eels remain for the validation carve.
    with pytest.raises(xdata.DataError, match=r"class 'eel' \(6 training examples\) without a validation"):
        _load(source="folder", path=str(train_only), val_fraction=0.05)


@pytest.mark.parametrize("config, message", [
    (dict(evaluate_on="val"), r'^config.data.evaluate_on="val" needs a validation split; set '
                              r"config.data.val_fraction"),
    (dict(evaluate_on="train"), r"^config.data.evaluate_on='train'; choose one of test, val$"),
    (dict(val_fraction=1.0), r"^config.data.val_fraction=1.0; it must lie in \[0, 1\)"),
    (dict(val_fraction=-0.1), r"^config.data.val_fraction=-0.1; it must lie in \[0, 1\)"),
    (dict(val_fraction=True), r"^config.data.val_fraction=True; it must lie in \[0, 1\)"),
    (dict(split_seed=-1), r"^config.data.split_seed=-1; it must be an integer >= 0$"),
])
def test_bad_split_settings_are_one_line(config, message):
    with pytest.raises(xdata.DataError, match=message):
        DataSettings.read({"source": "digits", **config})


def test_the_split_fields_can_be_set_from_the_command_line():
    config = xdata.config_dict(source="digits")
    assert (config.val_fraction, config.split_seed, config.evaluate_on) == (0.0, 0, "test")
    config.val_fraction, config.split_seed, config.evaluate_on = 0.1, 2, "val"
    settings = DataSettings.read(config)
    assert (settings.val_fraction, settings.split_seed, settings.evaluate_on) == (0.1, 2, "val")
