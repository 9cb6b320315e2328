"""TPU targets without a TPU: libtpu's compiler, run on any machine, plans a program for a slice.

libtpu (the TPU runtime and compiler, `pip install "libtpu==0.0.42.*"`, the version that
jax 0.10.2 pins) describes any TPU slice by name and compiles for it with no TPU present:
`compile_only_devices("v5e-8")` gives one device per chip of that slice, a mesh over them is
an ordinary mesh, and `jax.jit(f).lower(abstract args).compile()` is a TPU executable whose
memory plan and cost analysis are the TPU compiler's own. `python -m diffit_jax.main
--dry_run_tpu=v5e-8` (and `python -m diffit_jax.sample --dry_run_tpu=v5e-1`) use this.

This module owns the chip table, slice names and loading libtpu quietly. libtpu is looked
for, in order, at `TPU_LIBRARY_PATH`, as the `libtpu` package, and in `sys.prefix/libtpu`:
installing it there (`pip install --target "$VIRTUAL_ENV/libtpu" ...`) keeps it out of
JAX's sight, so ordinary CPU and GPU runs stay as fast and quiet as without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any

import jax

from diffit_jax.config_lib import ConfigError

LIBTPU_VERSION = "0.0.42.*"  # the libtpu that jax 0.10.2 pins (`jax[tpu]==0.10.2`)
LIBTPU_FOLDER = os.path.join(sys.prefix, "libtpu")  # `pip install --target` of its own


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation, from Google Cloud's published specifications.

  Attributes:
    name: the generation as Cloud TPU names it.
    hbm_gib: HBM per chip.
    peak_tflops: peak bf16 matmul TFLOP/s per chip (float32 matmuls at JAX's default
      precision run as single bf16 passes on TPU, at the same peak).
    hbm_gbps: HBM bandwidth per chip, GB/s.
    cores_per_name: TensorCores counted per chip in a slice's name (v4-8 and v5p-8 are 4
      chips of 2 cores, "megacore"; v5e-8 and v6e-8 are 8 one-core chips).
    dims: 2 (v5e, v6e: a 2D torus) or 3 (v4, v5p: a 3D torus).
  """

  name: str
  hbm_gib: float
  peak_tflops: float
  hbm_gbps: float
  cores_per_name: int
  dims: int


CHIPS = {
    "v4": Chip("TPU v4", hbm_gib=32, peak_tflops=275, hbm_gbps=1200, cores_per_name=2, dims=3),
    "v5e": Chip("TPU v5e", hbm_gib=16, peak_tflops=197, hbm_gbps=819, cores_per_name=1, dims=2),
    "v5p": Chip("TPU v5p", hbm_gib=95, peak_tflops=459, hbm_gbps=2765, cores_per_name=2, dims=3),
    "v6e": Chip("TPU v6e", hbm_gib=32, peak_tflops=918, hbm_gbps=1640, cores_per_name=1, dims=2),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


class LibtpuMissingError(ConfigError):
  """A TPU plan was asked for, but libtpu (the TPU compiler) is not installed."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `name` as the user wrote it, `topology` as libtpu names it."""

  name: str
  generation: str
  topology: str  # e.g. "v5e:2x4", "v4:2x2x1"
  num_chips: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def _torus(num_chips: int, dims: int) -> tuple[int, ...] | None:
  """The chip grid of a slice of `num_chips` as Cloud TPU lays it out (1, or a power of 2 >= 4)."""
  if num_chips == 1:
    return (1,) * dims
  if num_chips < 4 or num_chips & (num_chips - 1):
    return None
  shape = [2, 2] + [1] * (dims - 2)
  # 2D: 2x2, 2x4, 4x4, 4x8, ...; 3D: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
  order = [1, 0] if dims == 2 else [2] + [2, 1, 0] * 8
  i = 0
  while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < num_chips:
    shape[order[i % len(order)] if dims == 2 else order[i]] *= 2
    i += 1
  return tuple(shape)


def parse_slice(name: str) -> Slice:
  """`v5e-8`, `v5litepod-8`, `v4-8`, `v5p-128` (Cloud TPU's names) or `v5e:2x4`, `v4:2x2x2`.

  Cloud TPU counts TensorCores in v4 and v5p names (v4-8 is 4 chips) and chips in v5e and
  v6e names (v5e-8 is 8 chips).
  """
  known = ", ".join(f"{g}-N" for g in CHIPS)
  hint = (f"use a Cloud TPU name ({known}; e.g. v5e-8, v5e-1, v4-8, v5p-8, v6e-8) or a "
          "topology (e.g. v5e:2x4, v4:2x2x2)")
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  generation = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if generation not in CHIPS:
    raise ConfigError(f"--dry_run_tpu={name!r} names no TPU slice this knows: {hint}.")
  chip = CHIPS[generation]
  if m.group(2):
    count = int(m.group(2))
    num_chips = count // chip.cores_per_name
    shape = _torus(num_chips, chip.dims) if count % chip.cores_per_name == 0 else None
    if shape is None:
      raise ConfigError(f"--dry_run_tpu={name!r}: {count} is not a {generation} slice size "
                        f"(1 chip or a power of 2 >= 4 chips); {hint}.")
  else:
    shape = tuple(int(s) for s in m.group(3).split("x"))
    if len(shape) != chip.dims:
      raise ConfigError(f"--dry_run_tpu={name!r}: a {generation} topology has {chip.dims} "
                        f"dimensions (e.g. {generation}:{'x'.join(['2'] * chip.dims)}).")
  num_chips = 1
  for s in shape:
    num_chips *= s
  return Slice(name, generation, f"{generation}:{'x'.join(map(str, shape))}", num_chips)


def library_path() -> str:
  """Where libtpu's `libtpu.so` is; raises `LibtpuMissingError` with the install command."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path and os.path.isfile(path):
    return path
  spec = importlib.util.find_spec("libtpu")
  candidates = [os.path.join(d, "libtpu.so") for d in (spec.submodule_search_locations or [])
                ] if spec else []
  candidates.append(os.path.join(LIBTPU_FOLDER, "libtpu", "libtpu.so"))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise LibtpuMissingError(
      "compiling for a TPU needs libtpu, the TPU compiler (about 700 MB); install it in a "
      f"folder of its own, so that CPU and GPU runs stay quiet: {sys.executable} -m pip install "
      f"--target {LIBTPU_FOLDER} \"libtpu=={LIBTPU_VERSION}\" (or set TPU_LIBRARY_PATH to a "
      "libtpu.so).")


def compile_only_devices(tpu_slice: Slice | str) -> list[Any]:
  """One compile-only TPU device per chip of the slice, in the slice's device order.

  Nothing runs on them: a mesh over them lowers and compiles programs for that slice.
  The first call loads libtpu; JAX's own backends (CPU here) are started first, before
  libtpu is visible, so that JAX does not try to run on a TPU that is not there.
  """
  tpu_slice = parse_slice(tpu_slice) if isinstance(tpu_slice, str) else tpu_slice
  path = library_path()
  jax.devices()  # start the ordinary backends while libtpu is still out of JAX's sight
  # Without a TPU present libtpu asks the cloud's metadata server who it is and prints
  # a page of warnings; these say "no server, one local worker" instead. libtpu also
  # takes a lock file in the temporary folder so that one process owns a TPU: with nothing
  # to own, any number of compiling processes may load it side by side.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  previous = os.environ.get("TPU_LIBRARY_PATH")
  os.environ["TPU_LIBRARY_PATH"] = path  # read once, when libtpu is loaded
  try:
    kwargs = {"chips_per_host_bounds": (1, 1, 1)} if tpu_slice.num_chips == 1 else {}
    if tpu_slice.chip.cores_per_name == 2:  # both cores of a chip as one device, as JAX runs
      kwargs["chip_config_name"] = "megacore"
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu_slice.topology, **kwargs)
  finally:
    if previous is None:
      del os.environ["TPU_LIBRARY_PATH"]
    else:
      os.environ["TPU_LIBRARY_PATH"] = previous
  devices = list(topology.devices)
  if len(devices) != tpu_slice.num_chips:
    raise RuntimeError(f"libtpu described {tpu_slice.topology} with {len(devices)} chips, "
                       f"expected {tpu_slice.num_chips}; this is a bug.")
  return devices


def num_hosts(devices: list[Any]) -> int:
  """How many host processes a program over `devices` spans."""
  return len({d.process_index for d in devices})
