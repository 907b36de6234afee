"""A tfds dataset's first use (xfer.data.tfds_prepare): prepared once, atomically, by one process.

The datasets are tfds builders defined here, generating a few flat-colour images from
code: nothing is downloaded. The colour of image i is 10 * i and its label i % 2, so
a batch read back shows that what was written is what the run reads.
"""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from xfer import data as xdata
from xfer.data import tfds_prepare
from xfer.models import ModelInfo

IDENTITY = ModelInfo("test", lambda num_classes=1000: None, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
TESTS = Path(__file__).parent


class XferTinyColours(tfds.core.GeneratorBasedBuilder):
    """Six train and four test images as PNG bytes, which tfds stores as they are: no TensorFlow needed."""

    VERSION = tfds.core.Version("1.0.0")
    on_example = staticmethod(lambda split, index: None)  # a test's hook: count, fail, wait or die

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                                 "label": tfds.features.ClassLabel(names=["even", "odd"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 6), "test": self._generate_examples("test", 4)}

    def _generate_examples(self, split, count):
        for index in range(count):
            type(self).on_example(split, index)
            yield f"{split}-{index}", {"image": self._image(np.full((8, 8, 3), 10 * index, np.uint8)),
                                       "label": index % 2}

    def _image(self, pixels):
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="png")
        return encoded.getvalue()


class XferTinyArrays(XferTinyColours):
    """The same images as arrays, which tfds encodes with TensorFlow (as cifar10's builder does)."""

    def _image(self, pixels):
        return pixels


def _build(data_dir, name="xfer_tiny_colours"):
    config = dict(source="tfds", name=name, data_dir=str(data_dir), augment="none")
    return xdata.build(config, IDENTITY, 4, seed=0, process_index=0, process_count=1)


def _python(code):
    """Runs `code` in a new interpreter that can import this file; its completed process."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r})\n{code}"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def starts(monkeypatch):
    """The splits whose generation started, in order: one entry per split per preparation."""
    started = []
    monkeypatch.setattr(XferTinyColours, "on_example",
                        staticmethod(lambda split, index: started.append(split) if index == 0 else None))
    return started


def _prepared(data_dir, name="xfer_tiny_colours"):
    return tfds.builder(name, data_dir=str(data_dir)).is_prepared()


def _leftovers(data_dir, name="xfer_tiny_colours"):
    return sorted(path.name for path in (data_dir / name).glob("incomplete.*"))


def test_first_use_prepares_and_the_run_reads_it_later_uses_do_not_prepare_again(tmp_path, starts):
    data = _build(tmp_path)
    assert sorted(starts) == ["test", "train"]
    assert (data.num_train, data.num_eval, data.class_names) == (6, 4, ("even", "odd"))
    batch = next(data.train)
    colour_ids = np.rint(batch["image"][:, 0, 0, 0] * 255 / 10).astype(int)
    np.testing.assert_array_equal(batch["label"], colour_ids % 2)
    assert sum(b["mask"].sum() for b in data.eval_batches()) == 4

    assert _build(tmp_path).num_train == 6
    assert sorted(starts) == ["test", "train"]


def test_a_preparation_that_fails_half_way_leaves_nothing_and_the_next_one_starts_clean(tmp_path, monkeypatch):
    def broken(split, index):
        if split == "train" and index == 3:
            raise RuntimeError("the source broke\nat example 3")
    monkeypatch.setattr(XferTinyColours, "on_example", staticmethod(broken))
    with pytest.raises(xdata.DataError) as failed:
        _build(tmp_path)
    message = str(failed.value)
    assert message.startswith("preparing tfds dataset 'xfer_tiny_colours' under ")
    assert "(RuntimeError: the source broke at example 3)" in message and "\n" not in message
    assert not _prepared(tmp_path) and _leftovers(tmp_path) == []

    monkeypatch.setattr(XferTinyColours, "on_example", staticmethod(lambda split, index: None))
    assert _build(tmp_path).num_train == 6


def test_a_killed_preparation_never_reads_as_prepared_and_its_leftovers_go(tmp_path):
    killed = _python(
        "import os, signal, test_data_prepare as t\n"
        "t.XferTinyColours.on_example = staticmethod(\n"
        "    lambda split, index: os.kill(os.getpid(), signal.SIGKILL) if index == 3 else None)\n"
        f"t._build({str(tmp_path)!r})")
    assert killed.returncode == -9, killed.stderr
    assert len(_leftovers(tmp_path)) == 1 and not _prepared(tmp_path)

    assert _build(tmp_path).num_train == 6
    assert _leftovers(tmp_path) == []


def test_processes_that_start_together_prepare_once_the_others_wait(tmp_path, monkeypatch, caplog):
    # Threads stand in for processes: each use opens the lock file itself, and flock
    # locks belong to the open file, so two uses in one process exclude each other too.
    generating, release = threading.Event(), threading.Event()
    starts = []

    def slow(split, index):
        if index == 0:
            starts.append(split)
        if split == "train" and index == 0:
            generating.set()
            release.wait(60)
    monkeypatch.setattr(XferTinyColours, "on_example", staticmethod(slow))
    sizes = {}

    def use(who):
        sizes[who] = _build(tmp_path).num_train
    caplog.set_level("INFO", logger="xfer")
    first = threading.Thread(target=use, args=("first",))
    first.start()
    assert generating.wait(60)
    second = threading.Thread(target=use, args=("second",))
    second.start()
    second.join(2)
    assert second.is_alive()  # waiting for the first to finish
    release.set()
    first.join(60)
    second.join(60)
    assert sizes == {"first": 6, "second": 6}
    assert sorted(starts) == ["test", "train"]
    assert "waiting for another process to finish preparing tfds dataset xfer_tiny_colours" in caplog.text


def test_an_unknown_dataset_name_is_one_line(tmp_path):
    with pytest.raises(xdata.DataError,
                       match=r"^tfds has no dataset named 'xfer_no_such_set'; see https://\S+ for the names$"):
        _build(tmp_path, "xfer_no_such_set")
    assert not (tmp_path / "xfer_no_such_set").exists()


def test_without_tensorflow_a_dataset_that_needs_it_is_one_line_and_nothing_reads_as_prepared(tmp_path):
    # A new interpreter in which TensorFlow is not found, whether or not it is installed: every
    # import finder is wrapped to say it has no `tensorflow` (a None in sys.modules would not do:
    # tfds takes any entry there for a loaded TensorFlow).
    result = _python(
        "class Hide:\n"
        "    def __init__(self, finder):\n"
        "        self.finder = finder\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] != 'tensorflow':\n"
        "            return self.finder.find_spec(name, path, target)\n"
        "sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]\n"
        "import test_data_prepare as t\n"
        "try:\n"
        f"    t._build({str(tmp_path)!r}, 'xfer_tiny_arrays')\n"
        "except t.xdata.DataError as error:\n"
        "    print('DataError:', error)")
    lines = [line for line in result.stdout.splitlines() if line.startswith("DataError:")]
    assert len(lines) == 1, result.stdout + result.stderr
    assert (f"DataError: tfds dataset 'xfer_tiny_arrays' is not prepared in ArrayRecord format under {tmp_path}, "
            "and preparing it needs tensorflow: pip install 'xfer[prepare]', then rerun") in lines[0]
    assert not _prepared(tmp_path, "xfer_tiny_arrays") and _leftovers(tmp_path, "xfer_tiny_arrays") == []
    assert os.listdir(tmp_path / "xfer_tiny_arrays") == []


def test_a_data_dir_on_cloud_storage_is_not_prepared_in_the_run():
    # No flock on gs://, so nothing could keep the processes of a job from preparing at once.
    builder = SimpleNamespace(name="cifar10", data_dir_root="gs://bucket/tfds")
    with pytest.raises(xdata.DataError, match=r"^tfds dataset 'cifar10' is not prepared under gs://bucket/tfds; "
                                              r".*`tfds build cifar10 --file_format=array_record "
                                              r"--data_dir=gs://bucket/tfds` once$"):
        tfds_prepare.prepare(builder)
