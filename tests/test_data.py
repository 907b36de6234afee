"""The data pipeline: the three sources, preprocessing, determinism, exact resume, sharding, eval masks.

Image-folder tests draw each image as one flat colour whose value is the image's id, and use a
ModelInfo with mean 0 and std 1, so a batch's pixels read back as the ids of the images in it.
"""

import json
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from xfer import data as xdata
from xfer.data.transforms import IMAGENET_EVAL_CROP, Normalise, central_crop
from xfer.models import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

IMAGENET = ModelInfo("test", lambda num_classes=1000: None, 224, IMAGENET_MEAN, IMAGENET_STD)
IDENTITY = ModelInfo("test", lambda num_classes=1000: None, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _image_folder(root, counts):
    """counts: {split: {class: n}} -> PNGs of 4x4 flat colour, each value a distinct id from 1."""
    next_id = 1
    for split, classes in counts.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for _ in range(n):
                pixels = np.full((4, 4, 3), next_id, np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{next_id}.png")
                next_id += 1
    return root


def _ids(batch, mask=None):
    """The ids of the images in a batch built with IDENTITY (mask: keep only these rows)."""
    ids = np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)
    return ids if mask is None else ids[mask > 0]


@pytest.fixture
def folder(tmp_path):
    # train ids 1..12 (cat 1-6, dog 7-12), val ids 13..17.
    return _image_folder(tmp_path / "pets", {"train": {"cat": 6, "dog": 6},
                                             "val": {"cat": 2, "dog": 3}})


def _folder_data(folder, *, batch=4, seed=0, **kwargs):
    config = dict(source="folder", path=str(folder), augment="none", num_threads=0)
    return xdata.build(config, IDENTITY, batch, seed, **kwargs)


def _digits(seed=0, **overrides):
    config = {"source": "digits", "image_size": 12, "flip": False, "num_threads": 2, **overrides}
    return xdata.build(config, IMAGENET, 8, seed, process_index=0, process_count=1)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def _assert_imagenet_normalised(images):
    low = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    high = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert images.dtype == np.float32
    assert np.all(images >= low - 1e-5) and np.all(images <= high + 1e-5)


def test_batch_normalisation_is_the_models_scaling():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    batch = Normalise(IMAGENET.mean, IMAGENET.std).map({"image": images, "label": np.arange(2)})
    expected = (images / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(batch["image"], expected, atol=1e-5)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32


def test_central_crop_keeps_the_whole_centred_square():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    assert central_crop(square, 10) is square
    wide = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(central_crop(wide, 10), wide[:, 5:15])
    # An odd margin is split exactly in half: a mirror-symmetric image gives a mirror-symmetric crop.
    half = rng.integers(0, 256, (10, 11, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, ::-1][:, 1:]], axis=1)  # width 21, margin 5.5 a side
    crop = central_crop(symmetric, 10).astype(int)
    assert np.abs(crop - crop[:, ::-1]).max() <= 1


def test_imagenet_eval_crop_keeps_the_central_224_of_256_in_whole_pixels():
    image = np.random.default_rng(0).integers(0, 256, (256, 301, 3), dtype=np.uint8)
    # The shorter side is already 256, so nothing is resampled: the crop is a plain slice.
    np.testing.assert_array_equal(central_crop(image, 224, IMAGENET_EVAL_CROP), image[16:240, 38:262])
    assert central_crop(np.zeros((300, 451, 3), np.uint8), 224, IMAGENET_EVAL_CROP).shape == (224, 224, 3)


def test_tfds_mock_cifar10():
    config = dict(source="tfds", name="cifar10", train_split="train", eval_split="test",
                  image_size=40, augment="crop_flip", num_workers=0)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        data = xdata.build(config, IMAGENET, 8, seed=0, process_index=0, process_count=1)
        batch = next(data.train)
        eval_batches = list(data.eval_batches())
    assert (data.num_classes, data.num_train, data.num_eval) == (10, 20, 20)
    assert batch["image"].shape == (8, 40, 40, 3) and batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
    _assert_imagenet_normalised(batch["image"])
    assert batch["image"].std() > 0.1  # real (random) pixels, not blanks
    assert [b["image"].shape[0] for b in eval_batches] == [8, 8, 8]
    assert sum(b["mask"].sum() for b in eval_batches) == 20


def test_image_folder(folder):
    data = _folder_data(folder, process_index=0, process_count=1)
    assert data.class_names == ("cat", "dog")
    assert (data.num_classes, data.num_train, data.num_eval) == (2, 12, 5)
    batch = next(data.train)
    assert batch["image"].shape == (4, 4, 4, 3) and batch["image"].dtype == np.float32
    # Labels follow the sorted class folders: cat ids 1..6, dog ids 7..12.
    np.testing.assert_array_equal(batch["label"], (_ids(batch) > 6).astype(np.int32))


def test_image_folder_resizes_and_augments(folder):
    config = dict(source="folder", path=str(folder), image_size=10, num_threads=0)
    batch = next(xdata.build(config, IMAGENET, 4, 0, process_index=0, process_count=1).train)
    assert batch["image"].shape == (4, 10, 10, 3)
    _assert_imagenet_normalised(batch["image"])


def test_digits_counts_and_stratified_split():
    data = _digits()
    assert (data.num_train, data.num_eval, data.num_classes) == (1437, 360, 10)
    assert data.class_names == tuple("0123456789")
    eval_labels = np.concatenate([b["label"][b["mask"] > 0] for b in data.eval_batches()])
    class_sizes = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(eval_labels, minlength=10) - 0.2 * class_sizes) <= 1)
    batch = next(data.train)
    assert batch["image"].shape == (8, 12, 12, 3)
    _assert_imagenet_normalised(batch["image"])
    # Grayscale: the three channels carry the same pixels before normalisation.
    pixels = batch["image"] * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_same_seed_same_batches_other_seed_other_batches():
    first, again, other = _digits(seed=1), _digits(seed=1), _digits(seed=2)
    _assert_same(_take(first.train, 3), _take(again.train, 3))
    assert not np.array_equal(next(first.train)["image"], next(other.train)["image"])


def test_restored_state_resumes_with_the_same_batches():
    uninterrupted = _digits(seed=3, flip=True)
    _take(uninterrupted.train, 4)
    state = json.loads(json.dumps(uninterrupted.train.get_state()))
    expected = _take(uninterrupted.train, 3)
    resumed = _digits(seed=3, flip=True)
    resumed.train.set_state(state)
    _assert_same(_take(resumed.train, 3), expected)


def test_two_processes_read_disjoint_shards_that_make_up_the_global_batch(folder):
    single = _folder_data(folder, process_index=0, process_count=1)
    shards = [_folder_data(folder, process_index=p, process_count=2) for p in (0, 1)]
    assert all(shard.batch_size == 2 for shard in shards)
    epochs = []
    for _ in range(2):  # 12 images, global batch 4: 3 steps an epoch
        epoch = []
        for _ in range(3):
            global_ids = _ids(next(single.train))
            local_ids = [_ids(next(shard.train)) for shard in shards]
            assert not set(local_ids[0]) & set(local_ids[1])
            assert sorted(np.concatenate(local_ids)) == sorted(global_ids)
            epoch += list(global_ids)
        assert sorted(epoch) == list(range(1, 13))  # each image once an epoch
        epochs.append(epoch)
    assert epochs[0] != epochs[1]  # reshuffled


def test_eval_pass_counts_every_example_once(folder):
    seen = Counter()
    for process in (0, 1):
        batches = list(_folder_data(folder, process_index=process, process_count=2).eval_batches())
        assert len(batches) == 2  # 5 examples, global batch 4 -> 2 steps on every process
        for batch in batches:
            assert batch["mask"].dtype == np.float32 and batch["image"].shape[0] == 2
            seen.update(_ids(batch, batch["mask"]))
    assert seen == Counter(range(13, 18))


def test_batch_not_divisible_by_process_count(folder):
    with pytest.raises(xdata.DataError, match="multiple of the process count 2"):
        _folder_data(folder, batch=5, process_index=0, process_count=2)


def test_folder_errors_name_the_path_and_layout(tmp_path, folder):
    with pytest.raises(xdata.DataError, match=r"nowhere does not exist; expected .*/train/<class>"):
        _folder_data(tmp_path / "nowhere")
    (folder / "val").rename(folder / "elsewhere")
    with pytest.raises(xdata.DataError, match=r"pets has no test/ subfolder; expected"):
        _folder_data(folder)
    (folder / "elsewhere").rename(folder / "val")
    (folder / "train" / "empty").mkdir()
    with pytest.raises(xdata.DataError, match=r"train/empty holds no images"):
        _folder_data(folder)


def test_corrupt_image_error_names_the_file(folder):
    corrupt = folder / "val" / "dog" / "broken.png"
    corrupt.write_bytes(b"not a png")
    config = dict(source="folder", path=str(folder), num_threads=2)  # raised in a reader thread
    data = xdata.build(config, IDENTITY, 4, 0, process_index=0, process_count=1)
    with pytest.raises(xdata.DataError, match=r"cannot read image .*broken\.png"):
        list(data.eval_batches())


def test_config_typo_is_an_error():
    with pytest.raises(xdata.DataError, match=r"unknown config.data key\(s\) augmnet"):
        xdata.build(dict(source="digits", augmnet="none"), IMAGENET, 8, 0)
