"""Reading PyTorch safetensors checkpoints and checking them, shared by every converter.

This file owns what all converters in `diffit_jax.convert` need before any model code
runs: reading a `.safetensors` file into numpy without PyTorch (`safetensors.numpy`
semantics; bfloat16 tensors come back as `ml_dtypes.bfloat16`), removing wrapper
prefixes (`module.`, `model.`, `ema.`), a single error type, one key/shape check that
reports every problem at once, and the PyTorch <-> Flax weight layouts.

Layouts: PyTorch `Linear.weight` is (out, in) and Flax `Linear.kernel` is (in, out);
PyTorch `Conv2d.weight` is (out, in, kh, kw) and Flax `Conv.kernel` is (kh, kw, in, out).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numpy as np
from safetensors import safe_open

DEFAULT_PREFIXES = ("module.", "model.", "ema.")

# Longest list shown per category in a `check_keys` error; the rest is counted.
_MAX_LISTED = 12


class ConversionError(ValueError):
  """A source checkpoint that cannot be converted; the message says what and how to fix it."""


def _readable(path: str | os.PathLike) -> str:
  """`path` as a string, if it is a file that may be read as safetensors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file; pass the path of a .safetensors file.")
  if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
    raise ConversionError(
        f"{path}: pickled PyTorch checkpoints are not read (they execute code when loaded). "
        "Re-save it as safetensors, e.g. `safetensors.torch.save_file(state_dict, 'x.safetensors')`.")
  return path


def read_safetensors(path: str | os.PathLike, *,
                     select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """Reads a safetensors file into numpy arrays, without PyTorch.

  Args:
    path: a `.safetensors` file.
    select: optional predicate on key names; only matching tensors are read (so a
      4 GB Stable Diffusion checkpoint need not be loaded whole to get its VAE).

  Returns:
    {key: array} in the stored dtype (float16, float32, bfloat16 as ml_dtypes, ...).

  Raises:
    ConversionError: the file is missing, unreadable, truncated or not safetensors.
  """
  path = _readable(path)
  out, bf16_keys = {}, []
  try:
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        if select is not None and not select(key):
          continue
        # numpy has no bfloat16; those tensors are read through the Flax backend below.
        if f.get_slice(key).get_dtype() == "BF16":
          bf16_keys.append(key)
        else:
          out[key] = f.get_tensor(key)
    if bf16_keys:
      with safe_open(path, framework="flax") as f:
        for key in bf16_keys:
          out[key] = np.asarray(f.get_tensor(key))
  except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError.
    raise ConversionError(
        f"{path}: cannot read as safetensors ({type(e).__name__}: {e}). The file is probably "
        "truncated (an interrupted download) or not a safetensors file; download it again.") from e
  return out


class TensorHeader(NamedTuple):
  """One tensor's entry in a safetensors header: what `read_safetensors_header` returns."""
  shape: tuple[int, ...]
  dtype: str  # the format's name: "F32", "BF16", ...

  @property
  def ndim(self) -> int:
    return len(self.shape)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
  """The names, shapes and dtypes a safetensors file holds, reading only its header.

  The format opens with a little-endian u64 N and N bytes of JSON
  (`{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`); the tensor data
  after it is not read, so this costs the same for a 4 GB file as for a tiny one.

  Raises:
    ConversionError: the file is missing, pickled, or its header is not safetensors.
  """
  path = _readable(path)
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      if size > os.path.getsize(path) - 8:
        raise ValueError(f"a header of {size} bytes in a file of {os.path.getsize(path)}")
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: TensorHeader(tuple(int(n) for n in v["shape"]), str(v["dtype"]))
            for k, v in header.items()}
  except Exception as e:  # struct.error, ValueError (JSON), KeyError, TypeError, OSError
    raise ConversionError(
        f"{path}: cannot read as safetensors ({type(e).__name__}: {e}). The file is probably "
        "not a safetensors file; download it again.") from e


def define_io_flags(flag_values, src_help: str, out_help: str) -> None:
  """Every converter's `--src`, `--out` and `--overwrite` flags (absl, in `flag_values`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("src", None, src_help, required=True, flag_values=flag_values)
  flags.DEFINE_string("out", None, out_help, required=True, flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=flag_values)


def output_path(out: str, overwrite: bool) -> str:
  """`--out` as an absolute path; refuses one that exists unless `--overwrite`."""
  path = os.path.abspath(out)
  if os.path.exists(path) and not overwrite:
    raise ConversionError(f"--out {path} already exists; choose another or pass --overwrite.")
  return path


def strip_prefixes(state: Mapping[str, np.ndarray],
                   prefixes: Iterable[str] = DEFAULT_PREFIXES) -> dict[str, np.ndarray]:
  """Removes wrapper prefixes that every key shares (e.g. `module.` from DataParallel).

  A prefix is removed only when ALL keys carry it, repeatedly (`module.ema.x` -> `x`),
  so a real parameter that happens to start with `model.` is never renamed.

  Args:
    state: {key: array}.
    prefixes: candidate prefixes.

  Returns:
    A new dict with the shared prefixes removed.
  """
  prefixes = tuple(prefixes)
  state = dict(state)
  changed = True
  while changed and state:
    changed = False
    for p in prefixes:
      if all(k.startswith(p) for k in state):
        state = {k[len(p):]: v for k, v in state.items()}
        changed = True
  return state


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def check_keys(expected_shapes: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray],
               *, source: str = "checkpoint", hint: str = "") -> None:
  """Checks that `state` has exactly the expected keys and shapes; raises ONE error listing all problems.

  Args:
    expected_shapes: {key: shape} the target model needs (in the source's layout).
    state: {key: array} read from the source.
    source: a name for the source in the message (e.g. its path).
    hint: a sentence appended to the message, e.g. how to pick the right config.

  Raises:
    ConversionError: listing missing, unexpected and wrongly-shaped keys (long lists truncated).
  """
  missing = sorted(k for k in expected_shapes if k not in state)
  unexpected = sorted(k for k in state if k not in expected_shapes)
  wrong = sorted(
      f"{k}: file {tuple(state[k].shape)}, expected {tuple(expected_shapes[k])}"
      for k in expected_shapes if k in state and tuple(state[k].shape) != tuple(expected_shapes[k]))
  if not (missing or unexpected or wrong):
    return
  parts = [f"{source} does not fit the model ({len(expected_shapes)} tensors expected, "
           f"{len(state)} in the file):"]
  if missing:
    parts.append(_listing("missing", missing))
  if unexpected:
    parts.append(_listing("unexpected", unexpected))
  if wrong:
    parts.append(_listing("wrong shape", wrong))
  if hint:
    parts.append(hint)
  raise ConversionError("\n".join(parts))


def torch_linear_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) -> Flax kernel (in, out)."""
  return np.ascontiguousarray(w.T)  # (in, out)


def flax_linear_to_torch(k: np.ndarray) -> np.ndarray:
  """Flax Linear kernel (in, out) -> PyTorch weight (out, in)."""
  return np.ascontiguousarray(k.T)  # (out, in)


def torch_conv_to_flax(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (kh, kw, in, out)


def flax_conv_to_torch(k: np.ndarray) -> np.ndarray:
  """Flax Conv kernel (kh, kw, in, out) -> PyTorch weight (out, in, kh, kw)."""
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))  # (out, in, kh, kw)


def torch_shape_of_flax(leaf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax parameter, by its leaf name and rank.

  `kernel` of rank 2 is a Linear, of rank 4 a Conv2d; everything else (`bias`,
  `scale`, embeddings) has the same shape in both frameworks.
  """
  if leaf_name == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  if leaf_name == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def torch_to_flax(leaf_name: str, w: np.ndarray) -> np.ndarray:
  """Converts one PyTorch tensor into the layout of the Flax leaf `leaf_name` (see `torch_shape_of_flax`)."""
  if leaf_name == "kernel" and w.ndim == 2:
    return torch_linear_to_flax(w)
  if leaf_name == "kernel" and w.ndim == 4:
    return torch_conv_to_flax(w)
  return np.ascontiguousarray(w)
