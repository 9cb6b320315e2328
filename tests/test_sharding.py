"""Tests for `diffit_jax.sharding`: the one mesh, its axis names and the batch layout.

Eight host CPU devices (tests/conftest.py); nothing here compiles a network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from diffit_jax import config_lib
from diffit_jax import sharding


def test_create_mesh_without_a_config_is_data_parallel_over_every_device():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == sharding.MESH_AXES == ("data", "fsdp")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  local = sharding.create_mesh(devices=jax.local_devices()[:2])
  assert dict(local.shape) == {"data": 2, "fsdp": 1}
  fsdp = config_lib.mesh_config()
  fsdp.update(data=-1, fsdp=4)
  assert dict(sharding.create_mesh(fsdp).shape) == {"data": 2, "fsdp": 4}
  fsdp.update(data=3, fsdp=2)
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.create_mesh(fsdp)


def test_batch_is_split_over_every_data_axis_the_mesh_has():
  fsdp = config_lib.mesh_config()
  fsdp.update(data=2, fsdp=4)
  mesh = sharding.create_mesh(fsdp)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.num_batch_shards(mesh) == 8
  # A mesh someone built by hand with only a "data" axis (and a model axis) works too.
  hand = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  assert sharding.batch_axes(hand) == ("data",)
  assert sharding.num_batch_shards(hand) == 4
  with pytest.raises(ValueError, match="none of .'data', 'fsdp'. to split a batch over"):
    sharding.batch_sharding(Mesh(np.array(jax.devices()), ("model",)))

  x = jax.device_put(np.arange(16.0).reshape(16, 1), sharding.replicated(mesh))
  out = jax.jit(lambda x: sharding.constrain_batch(2 * x, mesh))(x)
  assert out.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(out, 2 * np.arange(16.0).reshape(16, 1))


def test_constrain_batch_on_an_explicit_mesh():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.ones((8, 3)), jax.sharding.NamedSharding(mesh, P()))
  out = jax.jit(lambda x: sharding.constrain_batch(x + 1, mesh))(x)
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data")), 2)
  np.testing.assert_array_equal(out, 2 * np.ones((8, 3)))


def test_initialize_distributed_needs_the_process_count_and_id(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  config = config_lib.base_config()
  sharding.initialize_distributed(config)  # one process: nothing to do
  assert not jax.distributed.is_initialized()
  config.distributed.coordinator_address = "127.0.0.1:1"
  with pytest.raises(ValueError, match="set config.distributed.num_processes/process_id"):
    sharding.initialize_distributed(config)
