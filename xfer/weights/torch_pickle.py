"""Read PyTorch `.pth` checkpoints into numpy arrays without importing torch.

A `.pth` file is a pickle, and unpickling an untrusted file can run any code
it names. So the unpickler here resolves globals from a fixed allow-list of
the few names that rebuilding tensors needs, each mapped to a function of
ours; any other global is refused *before* it is imported or called.

Both of torch's on-disk layouts are read: the zip archive (torch >= 1.6,
what torchvision publishes) and the legacy stream of concatenated pickles
(still common in older model zoos, e.g. the pip-shipped EfficientNet-Lite0).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

# torch's legacy format opens with this pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asks for a global that is not needed to rebuild tensors."""


class CheckpointFormatError(ValueError):
    """The file is not a readable torch checkpoint (truncated, or another format)."""


class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only its numpy dtype matters."""

    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat typed buffer; legacy files give its bytes only after the pickle."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


class _TensorRef:
    """What `_rebuild_tensor_v2` returns: a strided view, materialised once storages are read."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        flat, size = self.storage.array, self.size
        if 0 in size:
            return np.zeros(size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(size, self.stride))
        if last >= flat.size:
            raise CheckpointFormatError(
                f"tensor of shape {size} runs past its storage of {flat.size} elements")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=size, strides=[s * item for s in self.stride], writeable=False)
        return np.array(view)  # own, contiguous memory


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter: a Parameter is just its data here."""
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from `load_storage`."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: its pickle calls {module}.{name}, which is not "
                "needed to rebuild tensors; if you trust the file, re-save its state_dict with "
                "torch.save(torch.load(path, weights_only=False).state_dict(), new_path)") from None

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return self.storages[key]


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Returns the flat `{name: array}` state dict stored in a `.pth` file."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            obj = _load_legacy(path)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, struct.error,
            ValueError, KeyError, IndexError) as e:
        raise CheckpointFormatError(
            f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
            "the file is truncated or not a .pth, so download or export it again") from None
    return _state_dict_of(obj, path)


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        big_endian = root + "byteorder" in names and archive.read(root + "byteorder").strip() == b"big"
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), str(path))
        obj = unpickler.load()
        for storage in unpickler.storages.values():
            dtype = storage.dtype.newbyteorder(">") if big_endian else storage.dtype
            storage.array = _storage_from_bytes(
                archive.read(f"{root}data/{storage.key}"), dtype, storage.numel, f"{path}:{storage.key}")
    return _materialise(obj)


def _load_legacy(path: Path):
    """The pre-1.6 layout: magic, protocol, sys_info, the object, storage keys, storages."""
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f, str(path)).load()
        if magic != _LEGACY_MAGIC:
            raise CheckpointFormatError(
                f"{path} is neither a torch zip checkpoint nor a legacy torch file (bad magic number)")
        for _protocol_and_sys_info in range(2):
            _RestrictedUnpickler(f, str(path)).load()
        unpickler = _RestrictedUnpickler(f, str(path))
        obj = unpickler.load()
        keys = _RestrictedUnpickler(f, str(path)).load()
        for key in keys:
            storage = unpickler.storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            storage.array = _storage_from_bytes(
                f.read(numel * storage.dtype.itemsize), storage.dtype, numel, f"{path}:{key}")
    return _materialise(obj)


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _storage_from_bytes(raw: bytes, dtype: np.dtype, numel: int, where: str) -> np.ndarray:
    if len(raw) != numel * dtype.itemsize:
        raise CheckpointFormatError(
            f"{where}: storage holds {len(raw)} bytes, expected {numel * dtype.itemsize}; "
            "the file is truncated, so download or export it again")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _state_dict_of(obj, path: Path) -> dict[str, np.ndarray]:
    """Accepts a bare state dict or the usual training wrappers around one."""
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointFormatError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors; "
            "save model.state_dict() instead of the model")
    prefix = "module."  # left by torch.nn.DataParallel / DistributedDataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)
