"""Read PyTorch `.pth` checkpoints into numpy arrays without importing torch.

A `.pth` file is a pickle, and unpickling an untrusted file can run any code
it names. So the unpickler here resolves globals from a fixed allow-list of
the few names that rebuilding tensors needs, each mapped to a function of
ours; any other global is refused *before* it is imported or called. The
numbers the file gives (sizes, strides, offsets, element counts) are checked
against the bytes it holds before any array is made, so a damaged or crafted
file is refused with `CheckpointFormatError`, never read out of bounds.

Both of torch's on-disk layouts are read: the zip archive (torch >= 1.6,
what torchvision publishes) and the legacy stream of concatenated pickles
(still common in older model zoos, e.g. the pip-shipped EfficientNet-Lite0).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import reprlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

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

_MAX_DEPTH = 32  # containers a checkpoint nests: a state dict 1-2, an optimizer's state 4
_MAX_EXPANSION = 4  # all tensors together, in bytes, per byte of the file (views and expand repeat storage)

_repr = reprlib.Repr()  # for values from the file in messages: bounded however long or deep they are
_repr.maxstring = _repr.maxother = 100


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asks for a global that is not needed to rebuild tensors."""


class CheckpointFormatError(ValueError):
    """The file is not a readable torch checkpoint (truncated, or another format)."""


def _damaged(where: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{where}: {problem}; the file is malformed, damaged or truncated, "
                                 "so download or export it again")


# The pickle can reach these objects (and BUILD attributes onto them), so they are immutable.

class _StorageType(NamedTuple):
    """Stands in for `torch.FloatStorage` etc.: only its numpy dtype matters."""
    dtype: np.dtype


class _Storage(NamedTuple):
    """A flat typed buffer, named by the pickle; its bytes are read after the pickle."""
    key: str
    dtype: np.dtype
    numel: int


class _TensorRef(NamedTuple):
    """What `_rebuild_tensor_v2` returns: the file's numbers, unchecked until `_Materialiser.tensor`."""
    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2."""
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter: a Parameter is just its data here."""
    return data


def _ordered_dict(items=()):
    """collections.OrderedDict; Python 2 pickled its items as an argument."""
    ordered = collections.OrderedDict()
    for key, value in items:
        ordered[_check_key(key)] = value
    return ordered


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}

_SCALARS = (str, int, float, bool, bytes, type(None))


def _check_key(key):
    if not (type(key) in _SCALARS or type(key) is tuple and all(type(k) in _SCALARS for k in key)):
        raise CheckpointFormatError(f"a dict key or set item is a {type(key).__name__}, "
                                    "not a name, number or tuple of them")
    return key


def _checking_keys(load, keys_of):
    """pickle's `load` opcode, after checking the keys it is about to hash (see `_RestrictedUnpickler`)."""
    def checked(unpickler):
        for key in keys_of(unpickler.stack):
            _check_key(key)
        load(unpickler)
    return checked


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allow-listed globals; storages come from `persistent_load`.

    This is pickle's pure-Python unpickler (3.4 ms slower than the C one on
    EfficientNet-Lite0's 296 tensors), because the C one hashes dict keys as it
    builds them, and hashing a tuple nested 200,000 deep overflows the C stack:
    a segfault that no `except` catches. So keys must be scalars or flat tuples.
    """

    _Base = pickle._Unpickler
    dispatch = {
        **_Base.dispatch,
        pickle.SETITEM[0]: _checking_keys(_Base.load_setitem, lambda stack: stack[-2:-1]),
        pickle.SETITEMS[0]: _checking_keys(_Base.load_setitems, lambda stack: stack[::2]),
        pickle.DICT[0]: _checking_keys(_Base.load_dict, lambda stack: stack[::2]),
        pickle.ADDITEMS[0]: _checking_keys(_Base.load_additems, lambda stack: stack),
        pickle.FROZENSET[0]: _checking_keys(_Base.load_frozenset, lambda stack: stack),
    }

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self.storages: dict[str, _Storage] = {}

    def load(self):
        try:
            return super().load()
        except UnsafeCheckpointError:
            raise
        except CheckpointFormatError as e:
            raise _damaged(self._source, str(e)) from None
        except Exception as e:  # a damaged pickle fails in whichever way its opcodes happen to
            raise _damaged(self._source, f"cannot unpickle it ({type(e).__name__}: {e!s:.200})") from None

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: its pickle calls {module}.{name}, which is not "
                "needed to rebuild tensors; if you trust the file, re-save its state_dict with "
                "torch.save(torch.load(path, weights_only=False).state_dict(), new_path)") from None

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel, view_metadata)
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"
                and type(pid[1]) is _StorageType):
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: unexpected persistent id {_repr.repr(pid)}")
        _, storage_type, key, _location, numel, *view = pid
        if not (type(key) is str and type(numel) is int and numel >= 0):
            raise CheckpointFormatError(f"storage {_repr.repr(key)} has {_repr.repr(numel)} elements")
        if view not in ([], [None]):  # storage views: torch < 0.4, where offsets mean something else
            raise CheckpointFormatError(f"storage {_repr.repr(key)} is a view of another, which torch < 0.4 "
                                        "wrote and this reader does not support")
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if storage != (key, storage_type.dtype, numel):
            raise CheckpointFormatError(f"storage {_repr.repr(key)} is named both as {storage.numel} "
                                        f"{storage.dtype} and as {numel} {storage_type.dtype}")
        return storage


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Returns the flat `{name: array}` state dict stored in a `.pth` file."""
    path = Path(path)
    with open(path, "rb") as file:  # past here, an OSError is the file's content (a zip offset off its end)
        try:
            load = _load_zip if zipfile.is_zipfile(file) else _load_legacy
            obj, arrays = load(file, str(path))
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except (EOFError, OSError, RuntimeError, ValueError, struct.error, zipfile.BadZipFile, zlib.error) as e:
            raise CheckpointFormatError(
                f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
                "the file is truncated or not a .pth, so download or export it again") from None
    obj = _Materialiser(str(path), arrays, _MAX_EXPANSION * path.stat().st_size)(obj)
    return _state_dict_of(obj, path)


def _load_zip(file, where: str):
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{where} is a zip file but not a torch checkpoint (no data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        big_endian = root + "byteorder" in names and archive.read(root + "byteorder").strip() == b"big"
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), where)
        obj = unpickler.load()
        arrays, entries = {}, set(names)
        for key, storage in unpickler.storages.items():
            name, nbytes = f"{root}data/{key}", storage.numel * storage.dtype.itemsize
            if name not in entries:
                raise _damaged(where, f"storage {_repr.repr(key)} is used by a tensor but missing from the file")
            size = archive.getinfo(name).file_size
            if size != nbytes:  # checked before reading, so a false size is never allocated
                raise _damaged(where, f"storage {_repr.repr(key)} should hold {storage.numel} {storage.dtype} "
                                      f"({nbytes} bytes) but its zip entry has {size} bytes")
            dtype = storage.dtype.newbyteorder(">") if big_endian else storage.dtype
            arrays[key] = np.frombuffer(archive.read(name), dtype).astype(storage.dtype, copy=False)
    return obj, arrays


def _load_legacy(file, where: str):
    """The pre-1.6 layout: magic, protocol, sys_info, the object, storage keys, then each
    storage as its element count (int64) and bytes."""
    file.seek(0)
    data = file.read()  # in memory, so that no length the file gives can make a read allocate more
    stream = io.BytesIO(data)
    if _RestrictedUnpickler(stream, where).load() != _LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{where} is neither a torch zip checkpoint nor a legacy torch file (bad magic number)")
    for _protocol_and_sys_info in range(2):
        _RestrictedUnpickler(stream, where).load()
    unpickler = _RestrictedUnpickler(stream, where)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(stream, where).load()
    if type(keys) is not list:
        raise _damaged(where, f"its list of storages is a {type(keys).__name__}")
    arrays, start = {}, stream.tell()
    for key in keys:
        storage = unpickler.storages.get(key) if type(key) is str else None
        if storage is None:
            raise _damaged(where, f"its storage list names {_repr.repr(key)}, which no tensor uses")
        (numel,) = struct.unpack_from("<q", data, start)
        start += 8
        end = start + numel * storage.dtype.itemsize
        if numel != storage.numel or end > len(data):  # the header is only a claim, like the pickle
            raise _damaged(where, f"storage {_repr.repr(key)} should hold {storage.numel} {storage.dtype}, "
                                  f"its header says {numel} and {len(data) - start} bytes are left")
        arrays[key] = np.frombuffer(data, storage.dtype, numel, start)
        start = end
    if missing := unpickler.storages.keys() - arrays.keys():
        raise _damaged(where, f"storage {_repr.repr(min(missing))} is used by a tensor but missing from the file")
    return obj, arrays


def _naturals(values) -> bool:
    return type(values) in (tuple, list) and all(type(n) is int and 0 <= n < 2**63 for n in values)


class _Materialiser:
    """Replaces each `_TensorRef` in the unpickled object with its array, checked."""

    def __init__(self, where: str, arrays: dict[str, np.ndarray], budget: int):
        self.where, self.arrays, self.budget = where, arrays, budget
        self.done: dict[int, object] = {}  # by id: a shared container is materialised once

    def __call__(self, obj, key=None, depth=0):
        if id(obj) in self.done:
            return self.done[id(obj)]
        if depth > _MAX_DEPTH:
            raise _damaged(self.where, f"it nests containers over {_MAX_DEPTH} deep (at key {_repr.repr(key)})")
        if isinstance(obj, _TensorRef):
            result = self.tensor(key, obj)
        elif isinstance(obj, dict):
            result = type(obj)((k, self(v, k, depth + 1)) for k, v in obj.items())
        elif type(obj) in (list, tuple):
            result = type(obj)(self(v, key, depth + 1) for v in obj)
        else:
            return obj
        self.done[id(obj)] = result
        return result

    def tensor(self, key, ref: _TensorRef) -> np.ndarray:
        """The tensor `ref` describes, copied out of its storage once its numbers are checked.

        They come straight from the file, and numpy trusts strides: a negative
        offset or stride, or one reaching past the storage, reads other memory
        (a segfault, or leftover bytes passed off as weights). So offset, sizes
        and strides must be non-negative Python ints (no int64 overflow) with
        the last element inside the storage. Stride 0 (torch's `expand`) and
        views repeat storage elements, so a tiny file could still ask for
        terabytes: all tensors together get `_MAX_EXPANSION` bytes per byte of
        the file.
        """
        storage, offset, size, stride = ref

        def refuse(problem: str) -> CheckpointFormatError:
            name = f"storage {storage.key}" if key is None and isinstance(storage, _Storage) else key
            return _damaged(self.where, f"tensor {_repr.repr(name)} {problem}")

        if not isinstance(storage, _Storage):
            raise refuse("is built from something that is not a storage")
        flat = self.arrays[storage.key]
        if not (_naturals([offset]) and _naturals(size) and _naturals(stride) and len(size) == len(stride) <= 64
                and math.prod(max(n, 1) for n in size) * flat.itemsize < 2**63):  # numpy's own limit
            raise refuse(f"has shape {_repr.repr(size)}, stride {_repr.repr(stride)} and offset "
                         f"{_repr.repr(offset)}: not non-negative integers, one per axis")
        numel = math.prod(size)
        if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= flat.size:
            raise refuse(f"of shape {size}, stride {stride} and offset {offset} reaches past the end "
                         f"of its storage of {flat.size} elements")
        self.budget -= numel * flat.itemsize
        if self.budget < 0:
            raise refuse(f"of shape {size} repeats its storage's elements until the tensors need "
                         f"over {_MAX_EXPANSION} times the file's size")
        if not numel:
            return np.zeros(size, flat.dtype)
        strides = [s * flat.itemsize if n > 1 else 0 for n, s in zip(size, stride)]  # unused ones may overflow
        view = np.ndarray(size, flat.dtype, flat, offset * flat.itemsize, strides)  # numpy checks bounds too
        return np.array(view)  # own, contiguous memory


def _state_dict_of(obj, path: Path) -> dict[str, np.ndarray]:
    """Accepts a bare state dict or the usual training wrappers around one."""
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise CheckpointFormatError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors; "
            "save model.state_dict() instead of the model")
    prefix = "module."  # left by torch.nn.DataParallel / DistributedDataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)
