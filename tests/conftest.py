"""Test-wide set-up: eight host CPU devices so mesh and sharding tests run anywhere, and a
free local port for multi-process tests."""

import os
import socket

import pytest

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on, for a local JAX coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
