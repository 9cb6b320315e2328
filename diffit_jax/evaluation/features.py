"""Batched Inception feature extraction, jitted once and sharded over the mesh's data axes.

`FeatureExtractor` turns a stream of NHWC image batches (uint8 in [0, 255], any size
and any batch length) into `Activations`: the three feature sets the ADM evaluator
reads (pool_3, mixed_6/conv, logits). Batches are re-cut to one fixed global batch
size so the network compiles once per image size; the last batch is padded and the
padding dropped again. The model is replicated and each batch split over the mesh's
data axes (`diffit_jax.sharding.batch_sharding`), so the same object serves a laptop,
one GPU or the trainer's mesh. In a multi-process run every process feeds its own images, and
every process must feed the same number of batches; each receives all features.
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterable, Iterator, NamedTuple

import jax
import numpy as np
from flax import nnx

from diffit_jax import logging_utils, sharding
from diffit_jax.models.inception import InceptionV3, NUM_CLASSES, POOL_DIM, SPATIAL_DIM


class Activations(NamedTuple):
  """Inception features of N images (ADM's `read_activations` plus the logits for IS)."""
  pool: np.ndarray  # (N, 2048) pool_3
  spatial: np.ndarray  # (N, 2023) mixed_6/conv[..., :7]
  logits: np.ndarray  # (N, 1008)

  def __len__(self) -> int:
    return len(self.pool)


def _check_images(batch: np.ndarray, warned: list[bool]) -> np.ndarray:
  batch = np.asarray(batch)
  if batch.ndim != 4 or batch.shape[-1] != 3:
    hint = " (NCHW? transpose to NHWC)" if batch.ndim == 4 and batch.shape[1] == 3 else ""
    raise ValueError(f"expected NHWC RGB images (N, H, W, 3), got shape {batch.shape}{hint}")
  if batch.dtype != np.uint8:
    if not np.issubdtype(batch.dtype, np.floating):
      raise ValueError(f"images must be uint8 or float in [0, 255], got dtype {batch.dtype}")
    if not warned[0] and batch.size and batch.min() >= -1.0 and batch.max() <= 1.0:
      warnings.warn("float images lie within [-1, 1]; the Inception expects [0, 255] "
                    "(convert with (x + 1) * 127.5 or x * 255).", stacklevel=3)
      warned[0] = True
    batch = batch.astype(np.float32)
  return batch


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
  """Re-cuts a stream of image batches of any lengths into batches of `size` (last: fewer)."""
  buffer, count, warned = [], 0, [False]
  for batch in batches:
    batch = _check_images(batch, warned)
    if buffer and batch.shape[1:] != buffer[0].shape[1:]:
      raise ValueError(f"image size changed mid-stream from {buffer[0].shape[1:3]} to "
                       f"{batch.shape[1:3]}; evaluate one image size at a time.")
    buffer.append(batch)
    count += len(batch)
    while count >= size:
      joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
      yield joined[:size]
      rest = joined[size:]
      buffer, count = ([rest] if len(rest) else []), len(rest)
  if count:
    yield np.concatenate(buffer) if len(buffer) > 1 else buffer[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "out_sharding"))
def inception_forward(state, images, valid, *, graphdef, out_sharding):
  """The Inception on one global batch; jitted at module level so every extractor shares it."""
  pool, spatial, logits = nnx.merge(graphdef, state)(images)
  # Replicated outputs (an all-gather of a few KB per image) can be read by every process.
  return jax.lax.with_sharding_constraint((pool, spatial, logits, valid), out_sharding)


class FeatureExtractor:
  """Computes `Activations` for streams of images with the FID Inception.

  Example:
    extractor = FeatureExtractor(load_inception("checkpoints/inception_fid"))
    acts = extractor(images)  # (N, H, W, 3) uint8, or an iterable of such batches
  """

  def __init__(self, model: InceptionV3, *, batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None):
    """Places the model, replicated, on the mesh.

    Args:
      model: the FID Inception (`diffit_jax.convert.inception.load_inception`).
      batch_size: global images per forward pass; a multiple of the number of devices
        the mesh splits a batch over (`sharding.num_batch_shards`).
      mesh: the run's mesh (`diffit_jax.sharding.create_mesh`); default: data
        parallelism over all devices.
    """
    mesh = mesh or sharding.create_mesh()
    shards = sharding.num_batch_shards(mesh)
    if batch_size < 1 or batch_size % shards or batch_size % jax.process_count():
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {shards} "
                       f"devices the mesh splits a batch over and of the process count "
                       f"({jax.process_count()}).")
    self.batch_size = batch_size
    self._local_batch = batch_size // jax.process_count()
    self._data = sharding.batch_sharding(mesh)
    self._replicated = sharding.replicated(mesh)
    self._graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, self._replicated)

  def _global(self, local: np.ndarray) -> jax.Array:
    global_shape = (self.batch_size, *local.shape[1:])
    return jax.make_array_from_process_local_data(self._data, local, global_shape)

  def __call__(self, images: np.ndarray | Iterable[np.ndarray], *, total: int | None = None,
               progress: bool = True, desc: str = "inception features") -> Activations:
    """Runs the Inception over all images.

    Args:
      images: (N, H, W, 3) array, or an iterable of such batches (any lengths, one
        image size), uint8 or float in [0, 255].
      total: number of images (for the progress lines) when `images` is an iterable.
      progress: print progress lines (`logging_utils.ProgressLines`).
      desc: the progress lines' label.

    Returns:
      `Activations` with one row per image, in input order (per process).
    """
    if isinstance(images, (np.ndarray, jax.Array)):
      array, total = images, len(images)
      images = (array[i:i + self._local_batch] for i in range(0, len(array), self._local_batch))
    lines = logging_utils.ProgressLines(desc, total, enabled=progress and jax.process_index() == 0)
    outputs, pending = [], None
    for batch in _rebatch(images, self._local_batch):
      n = len(batch)
      valid = np.zeros(self._local_batch, bool)
      valid[:n] = True
      if n < self._local_batch:  # Pad the last batch; the padding is dropped below.
        batch = np.concatenate([batch, np.zeros((self._local_batch - n, *batch.shape[1:]),
                                                batch.dtype)])
      result = inception_forward(self._state, self._global(batch), self._global(valid),
                        graphdef=self._graphdef, out_sharding=self._replicated)
      if pending is not None:  # Fetch the previous batch while this one runs.
        outputs.append(jax.device_get(pending))
      pending = result
      lines.update(n)
    if pending is not None:
      outputs.append(jax.device_get(pending))
    lines.close()
    if not outputs:
      raise ValueError("no images to evaluate (the image stream was empty)")
    pool, spatial, logits, valid = (np.concatenate(parts) for parts in zip(*outputs))
    acts = Activations(pool=pool[valid], spatial=spatial[valid], logits=logits[valid])
    assert acts.pool.shape[1:] == (POOL_DIM,) and acts.spatial.shape[1:] == (SPATIAL_DIM,)
    assert acts.logits.shape[1:] == (NUM_CLASSES,)
    return acts
