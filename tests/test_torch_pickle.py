"""Reading checkpoints without torch, checked against torch itself.

A reader that half-works is worse than none: it ports wrong numbers silently.
So every layout torch writes is read back and compared with torch's own
values, and files that are malicious, cut short or not checkpoints at all
must be refused with the library's errors, running nothing.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from test_weights_cli import assert_one_line_error, run_cli
from xfer.weights import CheckpointFormatError, UnsafeCheckpointError, read

LAYOUTS = ["zip", "legacy"]


def save(obj, path, layout):
    torch.save(obj, path, _use_new_zipfile_serialization=(layout == "zip"))
    return path


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.detach().numpy()


def assert_same(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = as_numpy(tensor)
        assert ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


# --- round trips ------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes(tmp_path, layout):
    generator = torch.Generator().manual_seed(0)
    state = {
        "float32": torch.randn(3, 4, generator=generator),
        "float16": torch.randn(5, generator=generator).half(),
        "bfloat16": torch.randn(2, 3, generator=generator).bfloat16(),
        "int64": torch.arange(-3, 4),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    assert_same(read(save(state, tmp_path / "dtypes.pth", layout)), state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_offset_and_shared_views(tmp_path, layout):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {
        "transposed": base.t(),
        "every_other_column": base[1:, ::2],
        "row_at_offset": base[4],
        "whole": base,  # shares one storage with all of the above
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
    }
    assert_same(read(save(state, tmp_path / "views.pth", layout)), state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_state_dict_with_parameters_and_batchnorm(tmp_path, layout):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 5))
    state = model.state_dict()
    ours = read(save(state, tmp_path / "model.pth", layout))
    assert_same(ours, state)
    assert ours["1.num_batches_tracked"].shape == ()
    # Parameters themselves (not their .data), as torch.save(dict(model.named_parameters())) writes them
    parameters = dict(model.named_parameters())
    assert_same(read(save(parameters, tmp_path / "parameters.pth", layout)), parameters)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_wrapper_and_data_parallel_prefix(tmp_path, layout):
    state = torch.nn.Linear(3, 2).state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90, "arch": "linear"}
    assert_same(read(save(wrapped, tmp_path / "wrapped.pth", layout)), state)


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {
        "float32": torch.randn(3, 4),
        "float16": torch.randn(5).half(),
        "bfloat16": torch.randn(2, 3).bfloat16(),
        "int64": torch.arange(4),
        "bool": torch.tensor([True, False]),
    }
    save_file(state, tmp_path / "weights.safetensors")
    ours = read(tmp_path / "weights.safetensors")
    assert_same(dict(sorted(ours.items())), dict(sorted(state.items())))


# --- security ---------------------------------------------------------------

class _Payload:
    """Pickles as a call of `function(argument)`: what a malicious checkpoint does on load."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def payloads(marker):
    return {
        "system": _Payload(os.system, f"touch {marker}"),
        "exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }


def zip_checkpoint_with(pickled: bytes, path, template):
    """A copy of the torch zip checkpoint `template` whose data.pkl is `pickled`."""
    with zipfile.ZipFile(template) as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            data = pickled if entry.filename.endswith("/data.pkl") else source.read(entry)
            target.writestr(entry, data)
    return path


def legacy_checkpoint_with(pickled: bytes, path, position: int, storage_keys=()):
    """torch's legacy stream (magic, protocol, sys_info, object, storage keys) with pickle `position` replaced."""
    parts = [pickle.dumps(part, protocol=2) for part in
             (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
              {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, {}, list(storage_keys))]
    parts[position] = pickled
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, and STACK_GLOBAL
@pytest.mark.parametrize("payload", ["system", "exec"])
def test_zip_checkpoint_calling_a_global_is_refused_unexecuted(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    template = save({"weight": torch.ones(2)}, tmp_path / "template.pth", "zip")
    evil = {"weight": payloads(marker)[payload]}
    path = zip_checkpoint_with(pickle.dumps(evil, protocol=protocol), tmp_path / "evil.pth", template)
    with pytest.raises(UnsafeCheckpointError, match=payload):
        read(path)
    assert not marker.exists()


@pytest.mark.parametrize("position", [0, 3])  # the magic number, the state dict
@pytest.mark.parametrize("payload", ["system", "exec"])
def test_legacy_checkpoint_calling_a_global_is_refused_unexecuted(tmp_path, payload, position):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"weight": payloads(marker)[payload]}, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match=payload):
        read(legacy_checkpoint_with(evil, tmp_path / "evil.pth", position))
    assert not marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_crafted_files_would_run_their_payload_in_torch(tmp_path, layout):
    """Guards the two tests above: their files are real attacks, not just unreadable."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"weight": payloads(marker)["exec"]}, protocol=2)
    if layout == "zip":
        template = save({"weight": torch.ones(2)}, tmp_path / "template.pth", "zip")
        path = zip_checkpoint_with(evil, tmp_path / "evil.pth", template)
    else:
        path = legacy_checkpoint_with(evil, tmp_path / "evil.pth", 3)
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- bad input --------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_file(tmp_path, layout):
    path = save({"weight": torch.randn(64, 64)}, tmp_path / "full.pth", layout)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        read(path)


@pytest.mark.parametrize("name, content", [
    ("random.pth", np.random.default_rng(0).bytes(4096)),
    ("notes.pth", b"these are my notes, not a checkpoint\n"),
    ("empty.pth", b""),
    ("notes.safetensors", b"these are my notes, not a checkpoint\n"),
])
def test_not_a_checkpoint(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointFormatError):
        read(tmp_path / name)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="no data.pkl"):
        read(tmp_path / "other.pth")


def test_whole_model_instead_of_state_dict(tmp_path):
    buffer = io.BytesIO()
    torch.save([torch.ones(2)], buffer)
    (tmp_path / "list.pth").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointFormatError, match="not a state dict"):
        read(tmp_path / "list.pth")


# --- crafted numbers --------------------------------------------------------
# A file's sizes, strides, offsets and element counts are only claims; each
# file below makes one false claim, and must be refused naming the tensor (or
# storage) that makes it, before anything is read or allocated.

FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


class StorageId:
    """Pickles (by `crafted_checkpoint`) as torch's persistent id of a storage."""

    def __init__(self, numel=4, storage_type=torch.FloatStorage, key="0", view=None):
        self.storage_type, self.key, self.numel, self.view = storage_type, key, numel, view


class Tensor:
    """Pickles as torch pickles a tensor: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, offset=0, size=(4,), stride=(1,), storage=None):
        self.args = (storage or StorageId(), offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def crafted_pickle(obj, layout) -> bytes:
    """`obj` pickled as torch would, its `StorageId`s as persistent ids."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, StorageId):
                return None
            pid = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
            return pid if layout == "zip" else (*pid, obj.view)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def crafted_checkpoint(obj, path, layout, storages=None, headers=None):
    """A torch checkpoint of `obj` (or of these pickle bytes) whose float32 storages hold `storages`.

    `headers` are the element counts a legacy file gives before each storage's
    bytes; by default the true ones.
    """
    storages = {"0": FOUR_FLOATS} if storages is None else storages
    pickled = obj if isinstance(obj, bytes) else crafted_pickle(obj, layout)
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickled)
            archive.writestr("archive/version", "3\n")
            for key, data in storages.items():
                archive.writestr(f"archive/data/{key}", data)
    else:
        headers = {key: len(data) // 4 for key, data in storages.items()} | (headers or {})
        legacy_checkpoint_with(pickled, path, 3, storages)
        with open(path, "ab") as file:
            for key, data in storages.items():
                file.write(struct.pack("<q", headers[key]) + data)
    return path


def nested(depth: int, layout) -> bytes:
    """The pickle of `{"features.0.weight": [[[...[tensor]...]]]}` with `depth` lists, written
    opcode by opcode (pickle itself would recurse too deep)."""
    key, tensor = (crafted_pickle(part, layout)[2:-1] for part in ("features.0.weight", Tensor()))  # no PROTO, STOP
    return b"\x80\x02}" + key + b"]" * depth + tensor + b"a" * depth + b"s."


@pytest.mark.parametrize("layout", LAYOUTS)
def test_crafted_files_are_real_checkpoints(tmp_path, layout):
    """Guards the tests below: with true numbers, torch and we read the crafted files alike."""
    state = {"tail": Tensor(offset=1, size=(3,)), "expanded": Tensor(size=(3, 2), stride=(0, 1)),
             "transposed": Tensor(size=(2, 2), stride=(1, 2)), "empty": Tensor(size=(0, 5), stride=(5, 1))}
    path = crafted_checkpoint(state, tmp_path / "good.pth", layout)
    assert_same(read(path), torch.load(path, weights_only=True))
    np.testing.assert_array_equal(read(path)["expanded"], [[0, 1]] * 3)


BAD_TENSORS = {  # the test's key: the tensor under "features.0.weight"
    "negative stride": Tensor(stride=(-10**9,)),  # was a segfault: reads gigabytes before the storage
    "negative offset": Tensor(offset=-3),  # was read: leftover memory as the last weights
    "offset past the end": Tensor(offset=1),
    "strides past the end": Tensor(size=(2, 2), stride=(3, 1)),
    "stride overflowing int64": Tensor(size=(3,), stride=(2**62,)),  # (3 - 1) * 2**62 wraps negative
    "huge offset": Tensor(offset=2**64),
    "negative size": Tensor(size=(-1,)),
    "more sizes than strides": Tensor(size=(2, 2), stride=(1,)),
    "bool stride": Tensor(stride=(True,)),
    "float size": Tensor(size=(4.0,)),
    "size not a tuple": Tensor(size=4),
    "empty, but past numpy's limit": Tensor(size=(0, 2**62), stride=(1, 1)),
    "3.64 TiB by stride 0": Tensor(size=(10**6, 10**6), stride=(0, 0)),  # was "Unable to allocate 3.64 TiB"
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tensor", BAD_TENSORS.values(), ids=BAD_TENSORS)
def test_tensor_outside_its_storage(tmp_path, layout, tensor):
    path = crafted_checkpoint({"features.0.weight": tensor}, tmp_path / "bad.pth", layout)
    with pytest.raises(CheckpointFormatError, match=r"tensor 'features\.0\.weight'.*malformed"):
        read(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_of_something_else_than_a_storage(tmp_path, layout):
    path = crafted_checkpoint({"features.0.weight": Tensor(storage="0")}, tmp_path / "bad.pth", layout, {})
    with pytest.raises(CheckpointFormatError, match=r"tensor 'features\.0\.weight' is built from something"):
        read(path)


BAD_STORAGES = {  # (tensor, storages, legacy headers), for storage "0"
    "claims 10^12 elements": (Tensor(storage=StorageId(numel=10**12)), None, {"0": 10**12}),  # was MemoryError
    "more elements than bytes": (Tensor(storage=StorageId(numel=5)), None, None),
    "file cut short": (Tensor(), {"0": FOUR_FLOATS[:12]}, {"0": 4}),
    "negative element count": (Tensor(storage=StorageId(numel=-1)), None, None),
    "bool element count": (Tensor(storage=StorageId(numel=True)), None, None),
    "missing": (Tensor(), {}, None),
    "two dtypes": ({"a": Tensor(), "b": Tensor(storage=StorageId(storage_type=torch.IntStorage))}, None, None),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tensor, storages, headers", BAD_STORAGES.values(), ids=BAD_STORAGES)
def test_storage_that_does_not_match_its_bytes(tmp_path, layout, tensor, storages, headers):
    obj = tensor if isinstance(tensor, dict) else {"features.0.weight": tensor}
    path = crafted_checkpoint(obj, tmp_path / "bad.pth", layout, storages, headers)
    with pytest.raises(CheckpointFormatError, match="storage '0'.*malformed"):
        read(path)


def test_legacy_storage_view_is_refused(tmp_path):
    """torch < 0.4 storage views, whose offsets this reader would misread."""
    tensor = Tensor(storage=StorageId(view=("1", 0, 2)))
    with pytest.raises(CheckpointFormatError, match="storage '0' is a view"):
        read(crafted_checkpoint({"features.0.weight": tensor}, tmp_path / "view.pth", "legacy"))


# A tuple nested 200,000 deep as a dict key: pickle's C unpickler hashes it and overflows the C stack.
DEEP_KEYS = {
    "SETITEM": b"\x80\x02}" + b"K\x01" + b"\x85" * 200_000 + b"K\x02s.",
    "DICT": b"\x80\x02(K\x01" + b"\x85" * 200_000 + b"K\x02d.",
    "FROZENSET": b"\x80\x04(K\x01" + b"\x85" * 200_000 + b"\x91.",
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pickled", DEEP_KEYS.values(), ids=DEEP_KEYS)
def test_deeply_nested_dict_key(tmp_path, layout, pickled):
    with pytest.raises(CheckpointFormatError, match="dict key or set item is a tuple"):
        read(crafted_checkpoint(pickled, tmp_path / "deep.pth", layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("depth", [200_000, 33])
def test_deeply_nested_lists(tmp_path, layout, depth):
    with pytest.raises(CheckpointFormatError, match=r"over 32 deep \(at key 'features\.0\.weight'\)"):
        read(crafted_checkpoint(nested(depth, layout), tmp_path / "deep.pth", layout))


def test_list_containing_itself(tmp_path):
    pickled = b"\x80\x02}X\x01\x00\x00\x00w]q\x00h\x00as."  # {"w": L} where L = [L]
    with pytest.raises(CheckpointFormatError, match="over 32 deep"):
        read(crafted_checkpoint(pickled, tmp_path / "cycle.pth", "zip"))


def test_shared_containers_are_walked_once(tmp_path):
    shared = [Tensor()]
    for _ in range(24):
        shared = [shared, shared]  # 25 lists, 2**24 paths to one tensor: walked path by path, its
    with pytest.raises(CheckpointFormatError, match="not a state dict"):  # copies would pass the budget
        read(crafted_checkpoint({"features.0.weight": shared}, tmp_path / "shared.pth", "zip"))


@pytest.mark.parametrize("state", [b"N}X\x05\x00\x00\x00dtypeK\x05s\x86", b"}X\x05\x00\x00\x00dtypeK\x05s"],
                         ids=["slots", "dict"])
def test_pickle_cannot_change_the_shared_storage_types(tmp_path, state):
    """BUILD on `torch.FloatStorage` would set our stand-in's dtype for every later file too."""
    pickled = b"\x80\x02ctorch\nFloatStorage\n" + state + b"b0}."
    with pytest.raises(CheckpointFormatError):
        read(crafted_checkpoint(pickled, tmp_path / "evil.pth", "zip"))
    good = save({"weight": torch.ones(2)}, tmp_path / "good.pth", "zip")
    np.testing.assert_array_equal(read(good)["weight"], [1, 1])


@pytest.mark.parametrize("layout, obj, headers", [
    ("zip", {"features.0.weight": Tensor(stride=(-10**9,))}, None),  # was a segfault, exit 139
    ("zip", {"features.0.weight": Tensor(size=(10**6, 10**6), stride=(0, 0))}, None),  # was "Unable to allocate"
    ("legacy", {"features.0.weight": Tensor(storage=StorageId(numel=10**12))}, {"0": 10**12}),  # was MemoryError
    ("zip", nested(200_000, "zip"), None),  # was RecursionError
    ("legacy", DEEP_KEYS["SETITEM"], None),  # was a segfault
], ids=["negative stride", "stride 0", "legacy 10^12", "nested lists", "nested key"])
def test_cli_refuses_crafted_file_in_one_line(tmp_path, layout, obj, headers):
    path = crafted_checkpoint(obj, tmp_path / "bad.pth", layout, headers=headers)
    assert "malformed" in assert_one_line_error(run_cli("inspect", path))
