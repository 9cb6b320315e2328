"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-*.pth`) -> Flax FID Inception.

    python -m diffit_jax.convert inception \\
        --src=pt_inception-2015-12-05-6726825d.pth --out=checkpoints/inception_fid

The `.pth` is the one pytorch-fid publishes as `FID_WEIGHTS_URL` (a port of the
2015-12-05 TensorFlow graph that the ADM evaluator runs); users download it by hand,
nothing here touches the network. It is read without PyTorch and without running
code from the file, by the restricted unpickler of `safe_pickle` (a `.pth` is a pickle).

Every parameter of `diffit_jax.models.inception.InceptionV3` must be found with the
right shape and every key of the file must be used (`fc.bias` and BatchNorm's
`num_batches_tracked` are the only keys deliberately dropped), or nothing is written.
`load_inception(path)` rebuilds the model from the converted checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Mapping

import jax
import numpy as np
from absl import flags
from flax import nnx

from diffit_jax import checkpoint
from diffit_jax.convert import safe_pickle
from diffit_jax.convert.safetensors_io import ConversionError, define_io_flags, output_path
from diffit_jax.models.inception import InceptionV3

MODEL_NAME = "inception_v3_fid_2015_12_05"

# Flax leaf name -> PyTorch parameter name inside the same module.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
# Keys of pytorch-fid's state dict that the model does not use (see models/inception.py).
_UNUSED_KEY = re.compile(r"^fc\.bias$|\.num_batches_tracked$")
# pytorch-fid (like torch.hub) puts the first 8 hex digits of the file's SHA-256 in its name.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads pytorch-fid's `.pth` as NumPy arrays, executing no code (see `safe_pickle`).

  Raises:
    ConversionError: the file is missing, corrupt, not a state dict, or asks for a global
      a state dict never needs.
  """
  return safe_pickle.read_torch_state_dict(path, hint=(
      "Download pytorch-fid's Inception weights by hand (pytorch_fid.inception.FID_WEIGHTS_URL, "
      "pt_inception-2015-12-05-6726825d.pth)."))


# ----------------------------------------------------------------------------------
# Key and layout mapping.
# ----------------------------------------------------------------------------------


def abstract_inception() -> InceptionV3:
  """The model with abstract (shape-only) parameters: nothing is initialised."""
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=1)
def _abstract_split() -> tuple[nnx.GraphDef, nnx.State]:
  # Tracing the model takes seconds; load_inception reuses one trace.
  return nnx.split(abstract_inception())


def _flat_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  _, state = _abstract_split()
  return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _torch_key(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  return ".".join([*modules, _TORCH_LEAF[leaf]])


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # (O, I, kH, kW) -> (kH, kW, I, O)
  if path[-1] == "kernel" and array.ndim == 2:
    return array.T  # nn.Linear (out, in) -> (in, out)
  return array


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Maps pytorch-fid's Inception state dict to the nested parameter dict of `InceptionV3`.

  Args:
    state_dict: {torch parameter name: array}, e.g. from `read_torch_state_dict`.

  Returns:
    Nested dict of float32 arrays mirroring `nnx.to_pure_dict(nnx.state(InceptionV3(...)))`.

  Raises:
    ConversionError: listing every missing, misshapen or unexpected key.
  """
  problems, used, flat = [], set(), {}
  for path, shape in _flat_param_shapes().items():
    key = _torch_key(path)
    if key not in state_dict:
      problems.append(f"missing {key}")
      continue
    used.add(key)
    array = _to_flax_layout(path, np.asarray(state_dict[key], dtype=np.float32))
    if array.shape != shape:
      problems.append(f"{key}: expected shape {shape} after conversion, got {array.shape}")
      continue
    flat[path] = array
  unexpected = sorted(k for k in state_dict if k not in used and not _UNUSED_KEY.search(k))
  if unexpected:
    shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
    problems.append(f"{len(unexpected)} unexpected keys: {shown}")
  if problems:
    hint = ""
    if any(k.startswith("AuxLogits.") for k in state_dict) or any("fc" in p for p in problems):
      hint = (" This looks like torchvision's ImageNet Inception-v3 (1000 classes, aux head),"
              " not the FID network; use pytorch-fid's pt_inception-2015-12-05-*.pth.")
    raise ConversionError("the state dict is not pytorch-fid's FID Inception: "
                     + "; ".join(problems[:12]) + ("; ..." if len(problems) > 12 else "") + hint)
  nested: dict = {}
  for path, array in flat.items():
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
  return nested


# ----------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_inception(path: str, params: dict, *, source: str, sha256: str = "",
                   overwrite: bool = False) -> None:
  """Writes converted Inception parameters as a diffit_jax weights checkpoint.

  Args:
    path: destination folder.
    params: nested parameter dict (`convert_state_dict`, or `nnx.to_pure_dict(nnx.state(model))`).
    source: where the weights came from (recorded in the metadata).
    sha256: SHA-256 of the source file; evaluation caches key on it.
    overwrite: replace an existing checkpoint.
  """
  metadata = {"model": MODEL_NAME, "source": source, "source_sha256": sha256}
  checkpoint.save_weights(path, params, metadata=metadata, overwrite=overwrite)


def load_inception(path: str) -> InceptionV3:
  """Loads a checkpoint written by this converter into an `InceptionV3`.

  Args:
    path: the checkpoint folder (`python -m diffit_jax.convert inception --out=...`).

  Returns:
    The FID Inception, eval-mode, parameters as float32 arrays.
  """
  metadata = checkpoint.load_metadata(path)
  if metadata.get("model") != MODEL_NAME:
    raise ValueError(
        f"{path} holds a {metadata.get('model')!r} checkpoint, not the FID Inception "
        f"({MODEL_NAME!r}); create one with `python -m diffit_jax.convert inception`.")
  graphdef, abstract_state = _abstract_split()
  state = jax.tree.map(lambda x: x, abstract_state)  # A fresh State; the cached one stays abstract.
  params, _ = checkpoint.load_weights(path, target=nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the `inception` command's flags."""
  define_io_flags(flag_values, "pytorch-fid's pt_inception-2015-12-05-*.pth (downloaded by "
                  "hand).", "Output checkpoint folder.")


def run(args: flags.FlagValues) -> int:
  """Converts `args.src` into the checkpoint folder `args.out`; writes nothing on error."""
  output_path(args.out, args.overwrite)
  state_dict = read_torch_state_dict(args.src)
  sha256 = _sha256(args.src)
  match = _HASH_IN_NAME.search(os.path.basename(args.src))
  if match and not sha256.startswith(match.group(1)):
    raise ConversionError(
        f"{args.src}: its SHA-256 starts {sha256[:len(match.group(1))]}, but the file name says "
        f"{match.group(1)}; the download is incomplete or corrupt. Download it again.")
  params = convert_state_dict(state_dict)
  save_inception(args.out, params, source=os.path.basename(args.src), sha256=sha256,
                 overwrite=args.overwrite)
  print(f"wrote the FID Inception ({MODEL_NAME}) to {args.out}")
  return 0
