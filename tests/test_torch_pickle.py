"""Reading checkpoints without torch, checked against torch itself.

A reader that half-works is worse than none: it ports wrong numbers silently.
So every layout torch writes is read back and compared with torch's own
values, and files that are malicious, cut short or not checkpoints at all
must be refused with the library's errors, running nothing.
"""

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

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


def legacy_checkpoint_with(pickled: bytes, path, position: int):
    """torch's legacy stream (magic, protocol, sys_info, object, storage keys) with pickle `position` replaced."""
    parts = [pickle.dumps(part, protocol=2) for part in
             (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
              {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, {}, [])]
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
