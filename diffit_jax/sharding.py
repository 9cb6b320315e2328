"""The device mesh, how arrays are laid out on it, and the processes that share it.

This module owns the mesh axis names (defined here once), mesh creation and the
multi-process start-up (`initialize_distributed`). Library code (the trainer, samplers,
the Inception feature extractor, the VAE encoder) takes a mesh as an argument and
shards batches with `batch_sharding(mesh)`; commands without a config (encode,
evaluate) use `create_mesh()`, data parallelism over every device.

One mesh, built once from `config.mesh`, with two axes:

  "data"  pure data parallelism: the batch is split, parameters are replicated.
  "fsdp"  fully sharded data parallelism (ZeRO-3): the batch is split over this axis too,
          and each large parameter (with its EMA copy and Adam moments) is split along
          one of its dimensions, gathered by XLA when a layer needs it.

The batch is always sharded over both axes, `P(("data", "fsdp"))`. Parameters follow
one rule that depends only on an array's shape, so a parameter, its EMA copy and its
optimizer moments always get the same layout: replicated by default; with
`mesh.fsdp > 1`, arrays of at least `mesh.fsdp_min_size` elements are split over "fsdp"
along their largest dimension that the axis size divides (big_vision's "fsdp" rule).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffit_jax import config_lib

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Calls `jax.distributed.initialize` when the run spans several processes.

  The coordinator comes from `config.distributed.coordinator_address` or the environment
  (`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`);
  `config.distributed.auto=True` lets JAX detect the cluster (TPU pods, SLURM, ...).
  Must run before anything touches a JAX device.
  """
  if jax.distributed.is_initialized():
    return
  dist = config.distributed
  address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = dist.num_processes or os.environ.get("JAX_NUM_PROCESSES")
  process_id = dist.process_id
  if process_id < 0:
    process_id = os.environ.get("JAX_PROCESS_ID")
  if address:
    if num_processes is None or process_id is None:
      raise ValueError(
          f"A coordinator address ({address}) is set but not the number of processes and this "
          "process's id; set config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/"
          "JAX_PROCESS_ID.")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                               process_id=int(process_id))
  elif dist.auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def get_default_mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`'s defaults: data parallel over every device (`data=-1` takes what is left)."""
  return config_lib.mesh_config()


def create_mesh(mesh_config: Any = None, devices: Any = None) -> Mesh:
  """Builds the ("data", "fsdp") mesh that `config.mesh` describes.

  `create_mesh()` is the mesh of a command that has no config: pure data parallelism
  over every device; `create_mesh(devices=jax.local_devices())` the same over this
  process's devices only.

  Args:
    mesh_config: `config.mesh` with `data` and `fsdp` axis sizes; -1 in one of them
      means "all remaining devices". None: pure data parallelism.
    devices: the devices to use (default: all, across every process).

  Returns:
    A mesh with Auto axes, so that jit propagates shardings (`jax.make_mesh` alone would
    give Explicit axes, whose inputs must be placed with `device_put` first).
  """
  mesh_config = mesh_config or get_default_mesh_config()
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_config[DATA_AXIS]), int(mesh_config[FSDP_AXIS])]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh sets both data and fsdp to -1 ({sizes}); fix one of them.")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
      raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: {len(devices)} devices "
                       f"are not divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices) or min(sizes) < 1:
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices but {len(devices)} are available; set config.mesh.data=-1 to "
                     "use whatever is left after fsdp.")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of `mesh` that split a batch: ("data", "fsdp"), or those of them it has."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)} but none of {BATCH_AXES} to "
                     "split a batch over; build it with diffit_jax.sharding.create_mesh.")
  return axes


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces `batch_sharding(mesh)` cuts a batch into (batches must be a multiple)."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axes ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Inside jit: keeps x's leading (batch) axis split as `batch_sharding(mesh)` says.

  Works for meshes with Auto axes (a sharding constraint) and Explicit ones (a reshard).
  """
  sharding = batch_sharding(mesh)
  if mesh.axis_types and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (weights of data-parallel runs, scalars)."""
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  """The partition spec of one parameter-like array (see the module docstring)."""
  fsdp = mesh.shape[FSDP_AXIS]
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # The largest dimension that splits evenly; ties go to the last (usually the output) axis.
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = FSDP_AXIS
  return P(*spec)


def state_shardings(abstract_tree: Any, mesh: Mesh, mesh_config: Any = None) -> Any:
  """NamedShardings for every leaf of a (train-state) pytree of arrays or ShapeDtypeStructs.

  Scalars and small arrays are replicated; large ones follow `param_spec`.
  """
  min_size = int((mesh_config or get_default_mesh_config())["fsdp_min_size"])
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), mesh, min_size)), abstract_tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process sharded) array gathered whole onto every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

