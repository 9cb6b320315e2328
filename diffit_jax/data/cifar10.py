"""CIFAR-10 from the official `cifar-10-python.tar.gz`, without TensorFlow.

The tarball (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version")
holds `cifar-10-batches-py/data_batch_1..5` (train, 50,000 images), `test_batch` (10,000)
and `batches.meta`, each a Python 2 pickle: a dict with `b"data"`, a (N, 3072) uint8 array
whose rows are the red, green and blue 32x32 planes, and `b"labels"`, N ints in 0..9;
`batches.meta` holds `b"label_names"`. The pickles are read by
`safe_pickle.load_arrays`, which runs nothing from the file.

`build_cifar10_dataset` writes one split as the same kind of dataset a folder build writes
(`folder.build_folder_dataset`, ten classes named as CIFAR-10 names them, in its label
order), so `configs/cifar10.py` trains from it with `config.data.name="folder:DIR"`.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import zlib

import numpy as np
from PIL import Image

from diffit_jax import logging_utils
from diffit_jax.convert import safe_pickle
from diffit_jax.data import folder

ROOT = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"
SIDE = 32
ROW_BYTES = 3 * SIDE * SIDE  # one image: R, G, B planes of 32x32


# What a damaged tarball raises while it is read.
_UNREADABLE = (tarfile.TarError, EOFError, OSError, zlib.error)


def is_cifar10_tarball(path: str) -> bool:
  """Whether `path` is a tar file laid out as the official CIFAR-10 python version.

  Raises:
    FolderDatasetError: `path` is a tar file that cannot be read to its end.
  """
  if not os.path.isfile(path) or not tarfile.is_tarfile(path):
    return False
  try:
    with tarfile.open(path) as tar:
      return f"{ROOT}/{META}" in tar.getnames()
  except _UNREADABLE as e:
    raise folder.FolderDatasetError(
        f"{path} is a damaged tar file ({type(e).__name__}: {e}); download it again.") from None


def _read_member(tar: tarfile.TarFile, name: str, path: str):
  try:
    member = tar.getmember(f"{ROOT}/{name}")
  except KeyError:
    raise folder.FolderDatasetError(
        f"{path} has no {ROOT}/{name}; it is not the complete official cifar-10-python.tar.gz "
        "(download it again).") from None
  with tar.extractfile(member) as f:
    return safe_pickle.load_arrays(f, source=f"{path}:{ROOT}/{name}")


def read_cifar10(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads one split of the official tarball.

  Args:
    path: `cifar-10-python.tar.gz`.
    split: "train" (data_batch_1..5) or "test" (test_batch).

  Returns:
    (images (N, 32, 32, 3) uint8, labels (N,) int64, the ten class names in label order).

  Raises:
    FolderDatasetError: a batch is missing or not laid out as the official one.
    ConversionError: a pickle asks for anything but NumPy arrays (refused; nothing ran).
  """
  if split not in BATCHES:
    raise ValueError(f"--split={split!r}: CIFAR-10 has the splits {', '.join(BATCHES)}.")
  try:
    return _read_split(path, split)
  except _UNREADABLE as e:
    raise folder.FolderDatasetError(
        f"{path} is a damaged tar file ({type(e).__name__}: {e}); download it again.") from None


def _read_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  with tarfile.open(path) as tar:
    meta = _read_member(tar, META, path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
      raise folder.FolderDatasetError(f"{path}: {META} lists no label_names.")
    class_names = [n.decode() if isinstance(n, bytes) else n for n in names]
    images, labels = [], []
    for name in BATCHES[split]:
      batch = _read_member(tar, name, path)
      data = batch.get(b"data") if isinstance(batch, dict) else None
      batch_labels = np.asarray(batch.get(b"labels", []) if isinstance(batch, dict) else [])
      if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
          or data.shape[1] != ROW_BYTES or batch_labels.shape != (data.shape[0],)):
        raise folder.FolderDatasetError(
            f"{path}: {name} is not a batch of {ROW_BYTES}-byte uint8 rows with one label each.")
      images.append(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
      labels.append(batch_labels.astype(np.int64))
  labels = np.concatenate(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise folder.FolderDatasetError(f"{path}: labels outside 0..{len(class_names) - 1}.")
  return np.concatenate(images), labels, class_names


def build_cifar10_dataset(src: str, dst: str, *, split: str = "train", name: str | None = None,
                          overwrite: bool = False) -> folder.BuildReport:
  """Builds one split of `cifar-10-python.tar.gz` as a labelled folder dataset at `dst`.

  The images go through a temporary folder of PNGs, one sub-folder per class (named
  `NN_name` if CIFAR-10's names were not already in label order, so ids stay CIFAR-10's),
  and `folder.build_folder_dataset`; the dataset is complete or absent.

  Returns:
    The folder build's `BuildReport`.
  """
  images, labels, class_names = read_cifar10(src, split)
  in_order = class_names == sorted(class_names)
  folders = class_names if in_order else [f"{i:02d}_{n}" for i, n in enumerate(class_names)]
  with tempfile.TemporaryDirectory(prefix="diffit_jax-cifar10-") as tmp:
    for folder_name in folders:
      os.makedirs(os.path.join(tmp, folder_name))
    lines = logging_utils.ProgressLines("unpacking images", len(images))
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(os.path.join(tmp, folders[label], f"{split}_{i:05d}.png"),
                                  compress_level=1)
      lines.update()
    return folder.build_folder_dataset(tmp, dst, name=name or "cifar10", overwrite=overwrite,
                                       source=f"{os.path.abspath(src)} ({split} split)")
