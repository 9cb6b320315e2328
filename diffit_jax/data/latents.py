"""Pre-encoded latent datasets: the record format, its writer and reader, and latent sampling.

Latent DiffiT (like DiT and LDM) trains on VAE latents. `python -m diffit_jax.encode` runs
the VAE encoder once and stores, for each image and its horizontal mirror, the diagonal
Gaussian posterior (mean and log-variance); training then draws a fresh latent from the
stored posterior every time it sees the record (`sample_latent`), so the stochasticity of
the encoder is kept and the random flip is free.

Dataset layout: a directory of ArrayRecord files `latents-{i:05d}-of-{n:05d}.array_record`,
one per writer (process or device shard), so no two writers ever touch one file. A shard is
written under a temporary name and renamed on `close()`, so a crashed encode never leaves a
shard that looks complete. An optional `latents_info.json` (written once, e.g. by process 0)
records provenance and the number of classes.

Record format, version 1 (little-endian):
  bytes 0-3    magic b"DLT1"
  byte  4      dtype code: 0 = float16, 1 = float32
  byte  5      reserved (0)
  bytes 6-11   uint16 h, w, c: the latent shape of one view
  bytes 12-15  int32 label (0 for unconditional data)
  then mean   (2, h, w, c) in that dtype, view 0 = image, view 1 = its horizontal mirror
  then logvar (2, h, w, c) in that dtype
mean and logvar are what `diffit_jax.models.vae.AutoencoderKL.encode` returns (logvar already
clipped to [LOGVAR_MIN, LOGVAR_MAX]); the latent is scaled only when sampled.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from typing import Any

import numpy as np
from array_record.python import array_record_module
from etils import epath

from diffit_jax.models.vae import LATENT_SCALE  # 0.18215, defined once beside the VAE.

INFO_FILE = "latents_info.json"
_MAGIC = b"DLT1"
_HEADER = struct.Struct("<4sBBHHHi")  # magic, dtype code, reserved, h, w, c, label
_DTYPES = {0: np.dtype("<f2"), 1: np.dtype("<f4")}
_DTYPE_CODES = {np.dtype(np.float16): 0, np.dtype(np.float32): 1}
_SHARD_RE = re.compile(r"^latents-(\d{5})-of-(\d{5})\.array_record$")


def shard_filename(shard_index: int, num_shards: int) -> str:
  """Returns the file name of one writer's shard."""
  return f"latents-{shard_index:05d}-of-{num_shards:05d}.array_record"


def encode_record(mean: np.ndarray, logvar: np.ndarray, label: int = 0) -> bytes:
  """Serialises one image's posterior into a record (format above).

  Args:
    mean: (2, h, w, c) posterior mean, float16 or float32; view 0 = image, 1 = mirror.
    logvar: (2, h, w, c) posterior log-variance, same dtype and shape as `mean`.
    label: integer class id (0 for unconditional data).

  Returns:
    The record bytes.
  """
  mean, logvar = np.asarray(mean), np.asarray(logvar)
  if mean.shape != logvar.shape or mean.ndim != 4 or mean.shape[0] != 2:
    raise ValueError("mean and logvar must both have shape (2, h, w, c) (image and mirror); "
                     f"got {mean.shape} and {logvar.shape}.")
  if mean.dtype != logvar.dtype or mean.dtype not in _DTYPE_CODES:
    raise ValueError(f"mean and logvar must share dtype float16 or float32; got {mean.dtype} "
                     f"and {logvar.dtype}.")
  code = _DTYPE_CODES[mean.dtype]
  dtype = _DTYPES[code]
  _, h, w, c = mean.shape
  header = _HEADER.pack(_MAGIC, code, 0, h, w, c, int(label))
  return header + mean.astype(dtype).tobytes() + logvar.astype(dtype).tobytes()


def decode_record(data: bytes) -> dict[str, Any]:
  """Parses a record: {"mean", "logvar": (2, h, w, c) arrays, "label": int}."""
  magic, code, _, h, w, c, label = _HEADER.unpack_from(data)
  if magic != _MAGIC or code not in _DTYPES:
    raise ValueError(f"Not a diffit_jax latent record (header {bytes(data[:6])!r}); was the "
                     "directory written by `python -m diffit_jax.encode`?")
  dtype = _DTYPES[code]
  count = 2 * h * w * c
  if len(data) != _HEADER.size + 2 * count * dtype.itemsize:
    raise ValueError(f"Truncated latent record: {len(data)} bytes for shape (2, {h}, {w}, {c}).")
  arrays = np.frombuffer(data, dtype=dtype, count=2 * count, offset=_HEADER.size)
  mean, logvar = arrays.reshape(2, 2, h, w, c)  # (mean|logvar, view, h, w, c)
  return {"mean": mean, "logvar": logvar, "label": label}


class LatentShardWriter:
  """Writes one shard of a latent dataset; use one per writer (process or device shard).

  Usage:
    with LatentShardWriter(directory, jax.process_index(), jax.process_count()) as writer:
      for mean, logvar, label in ...:
        writer.write(mean, logvar, label)

  The shard appears under its final name only when the writer closes without error.
  """

  def __init__(self, directory: str, shard_index: int, num_shards: int):
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}.")
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, shard_filename(shard_index, num_shards))
    self._tmp_path = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
    # group_size:1 keeps every record individually seekable for random access.
    self._writer = array_record_module.ArrayRecordWriter(self._tmp_path, "group_size:1")
    self.num_records = 0

  def write(self, mean: np.ndarray, logvar: np.ndarray, label: int = 0) -> None:
    """Appends one image's posterior (see `encode_record`)."""
    self._writer.write(encode_record(mean, logvar, label))
    self.num_records += 1

  def close(self) -> None:
    """Finishes the shard and moves it to its final name."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    os.replace(self._tmp_path, self.path)

  def abort(self) -> None:
    """Drops the partial shard."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self._tmp_path):
      os.remove(self._tmp_path)

  def __enter__(self) -> "LatentShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_info(directory: str, **info: Any) -> None:
  """Atomically writes `latents_info.json` (call once, e.g. from process 0).

  Suggested keys: num_classes, class_names, source (dataset name), image_size, vae.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, INFO_FILE)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_info(directory: str) -> dict[str, Any]:
  """Returns the contents of `latents_info.json`, or {} when there is none."""
  path = epath.Path(directory) / INFO_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def shard_paths(directory: str) -> list[str]:
  """Returns the sorted shard files of a latent dataset, checking the set is complete.

  `directory` may be local or any `etils.epath` location (e.g. gs://).

  Raises:
    FileNotFoundError: no directory, or no shards in it.
    ValueError: shards are missing or shards of different writer counts are mixed.
  """
  root = epath.Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"Latent dataset directory {directory} does not exist; create it "
                            "with `python -m diffit_jax.encode`.")
  found: dict[int, set[int]] = {}
  for child in root.iterdir():
    m = _SHARD_RE.match(child.name)
    if m:
      found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
  if not found:
    raise FileNotFoundError(f"No latents-*.array_record shards in {directory}; was the encode "
                            "run finished? (`python -m diffit_jax.encode`)")
  if len(found) > 1:
    raise ValueError(f"{directory} mixes shards of runs with {sorted(found)} writers; delete the "
                     "stale run's files or encode into an empty directory.")
  (num_shards, indices), = found.items()
  missing = sorted(set(range(num_shards)) - indices)
  if missing:
    raise ValueError(f"{directory} is incomplete: shards {missing} of {num_shards} are missing "
                     "(a writer failed or is still running); rerun the encode.")
  return [os.fspath(root / shard_filename(i, num_shards)) for i in range(num_shards)]


def sample_latent(mean, logvar, noise, scale: float = LATENT_SCALE):
  """Draws a scaled latent from a diagonal Gaussian posterior: z = (mean + std * noise) * scale.

  Pure arithmetic through the array namespace of `logvar`, so one implementation serves numpy
  (the grain pipeline) and `jax.numpy` (jittable: pass jax arrays and `jax.random.normal`
  noise). It is the one place a latent is drawn from a posterior.

  Args:
    mean: posterior mean, any shape.
    logvar: posterior log-variance, same shape.
    noise: standard normal draws, same shape.
    scale: latent scale factor (`LATENT_SCALE` for the SD VAE).

  Returns:
    The latent, same shape as `mean`.
  """
  xp = logvar.__array_namespace__()
  return (mean + xp.exp(0.5 * logvar) * noise) * scale
