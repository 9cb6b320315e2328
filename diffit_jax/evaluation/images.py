"""Image sources for evaluation: ADM `.npz` batches (streamed) and folders of image files.

An ADM batch is an `.npz` whose `arr_0` holds uint8 NHWC images (the format of the
guided-diffusion reference batches and of our sampler's output). 50,000 samples at
512x512 are 39 GB, so `arr_0` is read straight out of the zip member a batch at a
time, as ADM's `StreamingNpzArrayReader` does, instead of `np.load`ing it whole.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Iterator

import numpy as np

IMAGE_KEY = "arr_0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def npz_keys(path: str) -> list[str]:
  """Array names in an `.npz` file, with a clear error for anything else."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist.")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not an .npz file (not a zip archive).")
  with zipfile.ZipFile(path) as zf:
    return [n[:-len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


class NpzImages:
  """Streams `arr_0` of an ADM `.npz` batch: `len()`, `.shape`, and batches via `batches(n)`."""

  def __init__(self, path: str):
    self.path = path
    if IMAGE_KEY not in npz_keys(path):
      raise ValueError(f"{path} has no {IMAGE_KEY!r} images (keys: {npz_keys(path)}); ADM batches "
                       f"store uint8 NHWC images as {IMAGE_KEY}: np.savez(path, images).")
    with self._open() as f:
      self.shape, self.dtype = _read_npy_header(f, path)
    if len(self.shape) != 4 or self.shape[-1] != 3 or self.dtype != np.uint8:
      raise ValueError(
          f"{path}: {IMAGE_KEY} must be uint8 images of shape (N, H, W, 3) in [0, 255], got "
          f"{self.dtype} {self.shape}. Convert float images in [-1, 1] with "
          "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8).")

  @contextlib.contextmanager
  def _open(self):
    with zipfile.ZipFile(self.path) as zf, zf.open(f"{IMAGE_KEY}.npy") as member:
      yield member

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Yields (<=batch_size, H, W, 3) uint8 arrays in file order."""
    per_image = int(np.prod(self.shape[1:]))
    with self._open() as f:
      _read_npy_header(f, self.path)
      for start in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - start)
        raw = _read_exactly(f, n * per_image, self.path)
        yield np.frombuffer(raw, np.uint8).reshape(n, *self.shape[1:])  # (n, H, W, 3)


def _read_npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version in ((2, 0), (3, 0)):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise ValueError(f"{path}: unsupported .npy format version {version}")
  if fortran:
    raise ValueError(f"{path}: {IMAGE_KEY} is stored in Fortran order; re-save it with "
                     "np.savez(path, np.ascontiguousarray(images)).")
  return tuple(shape), dtype


def _read_exactly(f, size: int, path: str) -> bytes:
  chunks, remaining = [], size
  while remaining:
    chunk = f.read(remaining)
    if not chunk:
      raise ValueError(f"{path} is truncated: {IMAGE_KEY} ended early.")
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)


class FolderImages:
  """Every image file under a folder (recursively, sorted by path), as RGB uint8 batches."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} is not a folder.")
    self.files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS))
    if not self.files:
      raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")

  def __len__(self) -> int:
    return len(self.files)

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Yields (<=batch_size, H, W, 3) uint8 arrays; all images must share one size."""
    from PIL import Image  # Imported lazily: only folders need it.
    size = None
    for start in range(0, len(self.files), batch_size):
      batch = []
      for file in self.files[start:start + batch_size]:
        with Image.open(file) as im:
          array = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        if size is None:
          size = array.shape
        elif array.shape != size:
          raise ValueError(f"{file} is {array.shape[1]}x{array.shape[0]} but earlier images are "
                           f"{size[1]}x{size[0]}; resize or crop the folder to one size first "
                           "(the ADM protocol evaluates fixed-size images).")
        batch.append(array)
      yield np.stack(batch)  # (n, H, W, 3)


def open_images(path: str) -> NpzImages | FolderImages:
  """An image source for `path`: a folder of images or an `.npz` with `arr_0`."""
  if os.path.isdir(path):
    return FolderImages(path)
  return NpzImages(path)
