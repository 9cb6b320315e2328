"""The one place diffit_jax unpickles a user's file: PyTorch `.pth` state dicts, without PyTorch.

A `.pth` file is a pickle, and unpickling runs whatever callable the file names: a crafted
`.pth` can run `os.system` the moment it is read. Every pickle record of a `.pth` (the
state dict, and in the legacy format also the magic number, protocol, sys-info and
storage-key records) is therefore read by `_RestrictedUnpickler`, which resolves only the
globals a state dict of tensors needs, each mapped to a harmless stand-in defined here:

  collections.OrderedDict                  the dict itself
  torch._utils._rebuild_tensor(_v2)        -> `TensorRef` (storage, offset, size, stride)
  torch._utils._rebuild_parameter          -> its tensor
  torch.FloatStorage, torch.HalfStorage... -> `_StorageType` (a NumPy dtype)

Any other global is refused with a `ConversionError` that names it; nothing of the file
is executed. Tensors point at raw storages, in a zip archive since torch 1.6
(`<name>/data.pkl` plus `<name>/data/<key>`) or appended to the pickle stream in the
legacy format; `read_torch_state_dict` reads both into NumPy arrays.

`load_arrays` reads the other kind of pickle a user hands us: plain data holding NumPy
arrays of numbers (the batches of CIFAR-10's official `cifar-10-python.tar.gz`, pickled by
Python 2). Its unpickler resolves only NumPy's array reconstruction (`_reconstruct`,
`ndarray`, `dtype`), each mapped to a stand-in that accepts numeric dtypes and raw bytes
only, and `_codecs.encode` for the bytes Python 3 pickles at protocol 2.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping

import ml_dtypes
import numpy as np

from diffit_jax.convert.safetensors_io import ConversionError

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_TORCH_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Errors that malformed pickle or archive bytes raise while being read; a refusal
# (ConversionError) is not among them and passes through with its own message.
_MALFORMED = (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, AttributeError,
              ValueError, struct.error, zipfile.BadZipFile, UnicodeDecodeError, OverflowError)


# ----------------------------------------------------------------------------------
# Stand-ins for the torch globals a state dict names.
# ----------------------------------------------------------------------------------


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; `array` is filled when its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, int(numel)
    self.array: np.ndarray | None = None
    self.root: tuple[_Storage, int] | None = None  # (root storage, element offset) for views.

  def data(self) -> np.ndarray:
    if self.root is not None:
      root, offset = self.root
      return root.data()[offset:offset + self.numel]
    if self.array is None:
      raise ValueError("a tensor's storage was never read; the .pth file is truncated or corrupt")
    return self.array


class TensorRef:
  """A tensor to build once its storage is read: `torch._utils._rebuild_tensor_v2`."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    if not isinstance(storage, _Storage):
      raise TypeError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(map(int, size)), tuple(map(int, stride))

  def materialize(self) -> np.ndarray:
    flat = self.storage.data()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
      raise ValueError("a tensor reaches past the end of its storage; the .pth file is corrupt")
    strides = tuple(s * flat.itemsize for s in self.stride)
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size, strides=strides)
    return np.array(view)  # Own the memory (and make it contiguous).


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


# ----------------------------------------------------------------------------------
# The restricted unpickler.
# ----------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a PyTorch state dict; refuses every other one by name."""

  _GLOBALS = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file: BinaryIO, source: str, load_storage: Callable[..., Any] | None):
    super().__init__(file)
    self._source, self._load_storage = source, load_storage

  def find_class(self, module, name):
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ConversionError(
        f"refusing to load {self._source}: it asks for the global {module}.{name}, which a "
        "weight file never needs (a crafted .pth runs code this way). Use a file you trust, "
        "saved as `torch.save(model.state_dict(), path)`.")

  def persistent_load(self, pid):
    if (self._load_storage is None or not isinstance(pid, tuple) or len(pid) < 2
        or pid[0] != "storage" or not isinstance(pid[1], _StorageType)):
      raise ConversionError(
          f"refusing to load {self._source}: unexpected persistent id {pid!r:.80} (a .pth "
          "state dict only refers to tensor storages).")
    return self._load_storage(*pid[1:])


def load(file: BinaryIO, *, source: str, load_storage: Callable[..., Any] | None = None) -> Any:
  """Reads one pickle record from `file` with the restricted unpickler.

  Args:
    file: a binary file positioned at the record.
    source: the file's name, for error messages.
    load_storage: called with a storage persistent id's fields (storage type, key, ...);
      None refuses persistent ids (plain records such as the legacy magic number).

  Returns:
    The unpickled object: plain data, `OrderedDict`s and `TensorRef`s only.

  Raises:
    ConversionError: the record names a global or persistent id a state dict never needs.
  """
  return _RestrictedUnpickler(file, source, load_storage).load()


# ----------------------------------------------------------------------------------
# The two .pth formats.
# ----------------------------------------------------------------------------------


def _read_zip_state_dict(path: str) -> Any:
  """torch >= 1.6 format: `<name>/data.pkl` plus one raw file per storage in `<name>/data/`."""
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ConversionError(
          f"{path} is a zip file but not a torch.save archive (no single data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def load_storage(storage_type, key, location, numel, *unused):
      del location
      if key not in storages:
        storage = _Storage(storage_type.dtype, numel)
        dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        name, nbytes = f"{prefix}data/{key}", storage.numel * dtype.itemsize
        if storage.numel < 0 or zf.getinfo(name).file_size < nbytes:
          raise ValueError(f"storage {key} is truncated")
        with zf.open(name) as data:
          raw = data.read(nbytes)
        storage.array = np.frombuffer(raw, dtype, count=storage.numel).astype(storage.dtype)
        storages[key] = storage
      return storages[key]

    with zf.open(pickles[0]) as f:
      return load(f, source=path, load_storage=load_storage)


def _read_legacy_state_dict(path: str) -> Any:
  """Pre-1.6 format: magic, protocol, sys info, the pickle, storage keys, then raw storages."""
  storages: dict[str, _Storage] = {}

  def load_storage(storage_type, root_key, location, numel, view_metadata=None):
    del location
    root = storages.setdefault(str(root_key), _Storage(storage_type.dtype, numel))
    if view_metadata is None:
      return root
    view_key, offset, view_numel = view_metadata
    view = _Storage(storage_type.dtype, view_numel)
    view.root = (root, int(offset))
    return storages.setdefault(f"view:{view_key}", view)

  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    try:
      magic = load(f, source=path)
    except ConversionError:
      raise
    except _MALFORMED as e:
      raise ConversionError(f"{path} is not a PyTorch .pth file ({e}).") from None
    if magic != _TORCH_MAGIC:
      raise ConversionError(f"{path} is not a PyTorch .pth file (bad magic number).")
    if load(f, source=path) != _TORCH_LEGACY_PROTOCOL:
      raise ConversionError(f"{path} uses an unknown legacy torch.save protocol.")
    sys_info = load(f, source=path)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ConversionError(
          f"{path} was saved on a big-endian machine; re-save it with torch.save.")
    result = load(f, source=path, load_storage=load_storage)
    for key in load(f, source=path):
      storage = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      nbytes = numel * storage.dtype.itemsize
      if numel < 0 or nbytes > file_size - f.tell():  # Checked before a huge read is tried.
        raise ValueError(f"storage {key} is truncated")
      raw = f.read(nbytes)
      storage.array = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(storage.dtype)
  return result


def read_torch_state_dict(path: str, *, hint: str = "") -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (`torch.save(module.state_dict(), path)`) as NumPy arrays.

  Supports the zip format (torch >= 1.6) and the legacy pickle-stream format; needs
  no PyTorch and executes no code from the file (only the globals a state dict uses
  are resolved, see the module docstring).

  Args:
    path: the `.pth` file.
    hint: a sentence added to the error for a missing file, e.g. where to download it.

  Returns:
    {parameter name: array}, in file order.

  Raises:
    ConversionError: the file is missing, is not a state dict of tensors, is corrupt,
      or asks for a global a state dict never needs.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file. {hint}".strip())
  try:
    obj = _read_zip_state_dict(path) if zipfile.is_zipfile(path) else _read_legacy_state_dict(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    out = {}
    for key, value in obj.items():
      if not isinstance(value, TensorRef):
        raise ConversionError(
            f"{path}: entry {key!r:.80} is a {type(value).__name__}, not a tensor.")
      out[str(key)] = value.materialize()
  except ConversionError:
    raise
  except OSError as e:
    raise ConversionError(f"cannot read {path}: {e}") from None
  except _MALFORMED as e:
    raise ConversionError(
        f"could not read {path} as a PyTorch state dict ({type(e).__name__}: {e}); the file "
        "is truncated or corrupt (download it again) or not a torch.save state dict.") from None
  return out


# ----------------------------------------------------------------------------------
# Pickles of plain data and NumPy arrays (CIFAR-10's batches).
# ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
  """A str from a pickled Python 2 str (bytes under encoding="bytes") or a Python 3 one."""
  return value.decode("latin1") if isinstance(value, bytes) else value


class _DType:
  """Stands in for `numpy.dtype(spec, align, copy)`: numeric dtypes only."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    spec = _text(spec)
    if not isinstance(spec, str) or np.dtype(spec).kind not in "biuf":
      raise TypeError(f"array dtype {spec!r:.40} is not a plain numeric type")
    self.dtype = np.dtype(spec)

  def __setstate__(self, state):
    byteorder = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else "|"
    if byteorder not in ("<", ">", "|", "="):
      raise TypeError(f"array byte order {byteorder!r:.20} is unknown")
    self.dtype = self.dtype.newbyteorder("=" if byteorder == "|" else byteorder)


class _Array:
  """Stands in for `numpy.core.multiarray._reconstruct(ndarray, ...)`; `array` after BUILD."""

  def __init__(self, subtype, shape, typecode):
    del shape, typecode
    if subtype is not np.ndarray:
      raise TypeError("only plain numpy.ndarray objects are read")
    self.array: np.ndarray | None = None

  def __setstate__(self, state):
    _, shape, dtype, fortran, raw = state  # (version, shape, dtype, is_fortran, raw bytes)
    if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray, str)):
      raise TypeError("an array's state is not (shape, numeric dtype, raw bytes)")
    raw = raw.encode("latin1") if isinstance(raw, str) else bytes(raw)
    shape = tuple(int(n) for n in shape)
    flat = np.frombuffer(raw, dtype.dtype, count=int(np.prod(shape)))
    self.array = flat.reshape(shape, order="F" if fortran else "C").astype(dtype.dtype.newbyteorder("="))


def _latin1_encode(text, encoding):
  if not isinstance(text, str) or encoding != "latin1":
    raise TypeError("_codecs.encode is read only as protocol 2's bytes (latin1)")
  return text.encode("latin1")


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _Array):
    if obj.array is None:
      raise ValueError("an array was never filled; the pickle is truncated or corrupt")
    return obj.array
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


class _ArrayUnpickler(pickle.Unpickler):
  """Resolves only NumPy's array reconstruction (as stand-ins); refuses every other global."""

  _GLOBALS = {
      ("numpy.core.multiarray", "_reconstruct"): _Array,
      ("numpy._core.multiarray", "_reconstruct"): _Array,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): _DType,
      ("_codecs", "encode"): _latin1_encode,
  }

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file, encoding="bytes")
    self._source = source

  def find_class(self, module, name):
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise ConversionError(
        f"refusing to load {self._source}: it asks for the global {module}.{name}, which a "
        "pickle of NumPy arrays never needs (a crafted pickle runs code this way). Use the "
        "official file, downloaded again.")

  def persistent_load(self, pid):
    raise ConversionError(f"refusing to load {self._source}: unexpected persistent id.")


def load_arrays(file: BinaryIO, *, source: str) -> Any:
  """Reads one pickle of plain data and numeric NumPy arrays, running nothing from it.

  Python 2 `str`s (such as the keys of CIFAR-10's batches) come back as `bytes`.

  Args:
    file: a binary file positioned at the pickle.
    source: the file's name, for error messages.

  Returns:
    dicts, lists, tuples, bytes, str, numbers and `np.ndarray`s of numbers.

  Raises:
    ConversionError: the pickle names any other global (nothing of it has run), or is
      malformed.
  """
  try:
    return _materialize(_ArrayUnpickler(file, source).load())
  except ConversionError:
    raise
  except _MALFORMED as e:
    raise ConversionError(
        f"could not read {source} as a pickle of arrays ({type(e).__name__}: {e}); the file is "
        "truncated or corrupt: download it again.") from None
