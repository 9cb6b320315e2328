"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-*.pth`) -> Flax FID Inception.

    python -m diffit_jax.convert inception \\
        --src=pt_inception-2015-12-05-6726825d.pth --dst=checkpoints/inception_fid

The `.pth` is the one pytorch-fid publishes as `FID_WEIGHTS_URL` (a port of the
2015-12-05 TensorFlow graph that the ADM evaluator runs); users download it by hand,
nothing here touches the network. It is read without PyTorch: a `.pth` file is a
pickle whose tensors point at raw storages (in a zip archive since torch 1.6, or
appended to the pickle stream in the legacy format), so a restricted unpickler that
knows only `OrderedDict`, tensor rebuilding and storage types maps it to NumPy.

Every parameter of `diffit_jax.models.inception.InceptionV3` must be found with the
right shape and every key of the file must be used (`fc.bias` and BatchNorm's
`num_batches_tracked` are the only keys deliberately dropped), or nothing is written.
`load_inception(path)` rebuilds the model from the converted checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from diffit_jax import checkpoint
from diffit_jax.models.inception import InceptionV3

MODEL_NAME = "inception_v3_fid_2015_12_05"

# Flax leaf name -> PyTorch parameter name inside the same module.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
# Keys of pytorch-fid's state dict that the model does not use (see models/inception.py).
_UNUSED_KEY = re.compile(r"^fc\.bias$|\.num_batches_tracked$")
# pytorch-fid (like torch.hub) puts the first 8 hex digits of the file's SHA-256 in its name.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_TORCH_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


# ----------------------------------------------------------------------------------
# A torch-free reader for .pth state dicts.
# ----------------------------------------------------------------------------------


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; `array` is filled when its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.array: np.ndarray | None = None
    self.root: tuple[_Storage, int] | None = None  # (root storage, element offset) for views.

  def data(self) -> np.ndarray:
    if self.root is not None:
      root, offset = self.root
      return root.data()[offset:offset + self.numel]
    if self.array is None:
      raise ValueError("a tensor's storage was never read; the .pth file is truncated or corrupt")
    return self.array


class _TensorRef:
  """A tensor to build once its storage is read: `torch._utils._rebuild_tensor_v2`."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.data()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= flat.size:
      raise ValueError("a tensor reaches past the end of its storage; the .pth file is corrupt")
    strides = tuple(s * flat.itemsize for s in self.stride)
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size, strides=strides)
    return np.array(view)  # Own the memory (and make it contiguous).


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch state dict without PyTorch, refusing every other global."""

  _GLOBALS = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{module}.{name} is not part of a plain PyTorch state dict; refusing to load it. "
        "Pass pytorch-fid's pt_inception-2015-12-05-*.pth (a state dict of tensors).")

  def persistent_load(self, saved_id):
    if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {saved_id!r} in .pth file")
    return self._load_storage(*saved_id[1:])


def _read_zip_state_dict(path: str) -> Any:
  """torch >= 1.6 format: `<name>/data.pkl` plus one raw file per storage in `<name>/data/`."""
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip file but not a torch.save archive (no single data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def load_storage(storage_type, key, location, numel, *unused):
      del location
      if key not in storages:
        storage = _Storage(storage_type.dtype, numel)
        raw = zf.read(f"{prefix}data/{key}")
        dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        if len(raw) < numel * dtype.itemsize:
          raise ValueError(f"storage {key} of {path} is truncated")
        storage.array = np.frombuffer(raw, dtype, count=numel).astype(storage.dtype)
        storages[key] = storage
      return storages[key]

    with zf.open(pickles[0]) as f:
      return _StateDictUnpickler(f, load_storage).load()


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
    view.root = (root, offset)
    return storages.setdefault(f"view:{view_key}", view)

  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:
      raise ValueError(f"{path} is not a PyTorch .pth file ({e}).") from None
    if magic != _TORCH_MAGIC:
      raise ValueError(f"{path} is not a PyTorch .pth file (bad magic number).")
    if pickle.load(f) != _TORCH_LEGACY_PROTOCOL:
      raise ValueError(f"{path} uses an unknown legacy torch.save protocol.")
    sys_info = pickle.load(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError(f"{path} was saved on a big-endian machine; re-save it with torch.save.")
    result = _StateDictUnpickler(f, load_storage).load()
    for key in pickle.load(f):
      storage = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f"{path} is truncated (storage {key}).")
      storage.array = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(storage.dtype)
  return result


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (`torch.save(module.state_dict(), path)`) as NumPy arrays.

  Supports the zip format (torch >= 1.6) and the legacy pickle-stream format; needs
  no PyTorch and executes no code from the file (only the globals a state dict uses
  are resolved).

  Args:
    path: the `.pth` file.

  Returns:
    {parameter name: array}, in file order.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} does not exist. Download pytorch-fid's Inception weights by hand "
        "(pytorch_fid.inception.FID_WEIGHTS_URL, pt_inception-2015-12-05-6726825d.pth).")
  try:
    obj = _read_zip_state_dict(path) if zipfile.is_zipfile(path) else _read_legacy_state_dict(path)
  except (pickle.UnpicklingError, EOFError, KeyError, struct.error) as e:
    raise ValueError(f"could not read {path} as a PyTorch state dict: {e}") from None
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, _TensorRef):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
    out[str(key)] = value.materialize()
  return out


# ----------------------------------------------------------------------------------
# Key and layout mapping.
# ----------------------------------------------------------------------------------


def abstract_inception() -> InceptionV3:
  """The model with abstract (shape-only) parameters: nothing is initialised."""
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=1)
def _abstract_split() -> tuple[nnx.GraphDef, nnx.State]:
  # Tracing the model takes seconds; load_inception reuses one trace.
  return nnx.split(abstract_inception())


def _flat_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  _, state = _abstract_split()
  return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _torch_key(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  return ".".join([*modules, _TORCH_LEAF[leaf]])


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # (O, I, kH, kW) -> (kH, kW, I, O)
  if path[-1] == "kernel" and array.ndim == 2:
    return array.T  # nn.Linear (out, in) -> (in, out)
  return array


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Maps pytorch-fid's Inception state dict to the nested parameter dict of `InceptionV3`.

  Args:
    state_dict: {torch parameter name: array}, e.g. from `read_torch_state_dict`.

  Returns:
    Nested dict of float32 arrays mirroring `nnx.to_pure_dict(nnx.state(InceptionV3(...)))`.

  Raises:
    ValueError: listing every missing, misshapen or unexpected key.
  """
  problems, used, flat = [], set(), {}
  for path, shape in _flat_param_shapes().items():
    key = _torch_key(path)
    if key not in state_dict:
      problems.append(f"missing {key}")
      continue
    used.add(key)
    array = _to_flax_layout(path, np.asarray(state_dict[key], dtype=np.float32))
    if array.shape != shape:
      problems.append(f"{key}: expected shape {shape} after conversion, got {array.shape}")
      continue
    flat[path] = array
  unexpected = sorted(k for k in state_dict if k not in used and not _UNUSED_KEY.search(k))
  if unexpected:
    shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
    problems.append(f"{len(unexpected)} unexpected keys: {shown}")
  if problems:
    hint = ""
    if any(k.startswith("AuxLogits.") for k in state_dict) or any("fc" in p for p in problems):
      hint = (" This looks like torchvision's ImageNet Inception-v3 (1000 classes, aux head),"
              " not the FID network; use pytorch-fid's pt_inception-2015-12-05-*.pth.")
    raise ValueError("the state dict is not pytorch-fid's FID Inception: "
                     + "; ".join(problems[:12]) + ("; ..." if len(problems) > 12 else "") + hint)
  nested: dict = {}
  for path, array in flat.items():
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
  return nested


# ----------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_inception(path: str, params: dict, *, source: str, sha256: str = "",
                   overwrite: bool = False) -> None:
  """Writes converted Inception parameters as a diffit_jax weights checkpoint.

  Args:
    path: destination folder.
    params: nested parameter dict (`convert_state_dict`, or `nnx.to_pure_dict(nnx.state(model))`).
    source: where the weights came from (recorded in the metadata).
    sha256: SHA-256 of the source file; evaluation caches key on it.
    overwrite: replace an existing checkpoint.
  """
  metadata = {"model": MODEL_NAME, "source": source, "source_sha256": sha256}
  checkpoint.save_weights(path, params, metadata=metadata, overwrite=overwrite)


def load_inception(path: str) -> InceptionV3:
  """Loads a checkpoint written by this converter into an `InceptionV3`.

  Args:
    path: the checkpoint folder (`python -m diffit_jax.convert inception --dst=...`).

  Returns:
    The FID Inception, eval-mode, parameters as float32 arrays.
  """
  metadata = checkpoint.load_metadata(path)
  if metadata.get("model") != MODEL_NAME:
    raise ValueError(
        f"{path} holds a {metadata.get('model')!r} checkpoint, not the FID Inception "
        f"({MODEL_NAME!r}); create one with `python -m diffit_jax.convert inception`.")
  graphdef, abstract_state = _abstract_split()
  state = jax.tree.map(lambda x: x, abstract_state)  # A fresh State; the cached one stays abstract.
  params, _ = checkpoint.load_weights(path, target=nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True,
                      help="pytorch-fid's pt_inception-2015-12-05-*.pth (downloaded by hand)")
  parser.add_argument("--dst", required=True, help="output checkpoint folder")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")


def run(args: argparse.Namespace) -> int:
  """Converts `args.src` into the checkpoint folder `args.dst`; writes nothing on error."""
  if os.path.exists(args.dst) and not args.overwrite:
    raise FileExistsError(f"{args.dst} already exists; pass --overwrite to replace it.")
  state_dict = read_torch_state_dict(args.src)
  sha256 = _sha256(args.src)
  match = _HASH_IN_NAME.search(os.path.basename(args.src))
  if match and not sha256.startswith(match.group(1)):
    raise ValueError(
        f"{args.src}: its SHA-256 starts {sha256[:len(match.group(1))]}, but the file name says "
        f"{match.group(1)}; the download is incomplete or corrupt. Download it again.")
  params = convert_state_dict(state_dict)
  save_inception(args.dst, params, source=os.path.basename(args.src), sha256=sha256,
                 overwrite=args.overwrite)
  print(f"wrote the FID Inception ({MODEL_NAME}) to {args.dst}")
  return 0
