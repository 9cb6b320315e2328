"""`python -m diffit_jax.convert export --src=CHECKPOINT --out=FILE.safetensors`: weights out.

This file owns writing a latent DiffiT in the official PyTorch layout of NVIDIA's release
(`docs/official_checkpoint.md`), so that the official code loads it with
`load_state_dict(..., strict=True)`: every parameter under its official key in PyTorch layout
(Linear (in, out) -> (out, in), Conv (kh, kw, I, O) -> (O, I, kh, kw), the stacked blocks'
leading depth axis unstacked into `blocks.{i}.*`), plus the `pos_embed` and
`relative_position_index` buffers the official module registers. It is the inverse of
`diffit.py` (whose key mapping it shares): export then convert gives back the same bits.

Sources: a weights checkpoint from `python -m diffit_jax.convert diffit`, or a training
workdir (the EMA parameters of its newest checkpoint, or `--step`, through
`diffit_jax.checkpoint.load_run_params`); either carries its config. Library users with
parameters in memory call `export_params` and `write_safetensors`. The file is written to a
temporary name and renamed, so a crash never leaves a partial `.safetensors` behind.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from absl import flags
from flax import nnx, traverse_util

from diffit_jax import checkpoint, files
from diffit_jax.config_lib import load_config
from diffit_jax.convert.diffit import (POS_EMBED, RPI_SUFFIX, expected_tensors,
                                      official_buffers, param_shapes)
from diffit_jax.convert.safetensors_io import (ConversionError, check_keys, define_io_flags,
                                               flax_conv_to_torch, flax_linear_to_torch,
                                               output_path)


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the `export` command's flags."""
  define_io_flags(flag_values, "A converted weights checkpoint (python -m diffit_jax.convert "
                  "diffit) or a training workdir (the EMA weights of its newest checkpoint).",
                  "Output .safetensors file (must not exist).")
  flags.DEFINE_integer("step", None, "With a training workdir: the checkpoint step (default: "
                       "the newest).", flag_values=flag_values)
  flags.DEFINE_string("config", None, "Override the config stored with the weights "
                      "(configs/X.py[:arg]; rarely needed).", flag_values=flag_values)


def run(args: flags.FlagValues) -> int:
  """Exports `args.src` to `args.out`; nothing is written on error."""
  if not args.out.endswith(".safetensors"):
    raise ConversionError(f"--out {args.out} must end in .safetensors.")
  dst = output_path(args.out, args.overwrite)
  params, config = _load_source(args.src, args.config, args.step)
  print(f"exporting {args.src}")
  tensors = export_params(params, config.model)
  n = sum(v.size for k, v in tensors.items() if not _is_buffer(k))
  print(f"  {len(tensors)} tensors, {n:,} parameters; writing {dst}")
  write_safetensors(tensors, dst, overwrite=args.overwrite, metadata={
      "format": "pt", "producer": "diffit_jax", "source": os.path.abspath(args.src),
      "diffit_jax_config": json.dumps(config.to_dict(), sort_keys=True)})
  print("done")
  return 0


def export_params(params: Any, model_config: Any) -> dict[str, np.ndarray]:
  """Our latent DiffiT parameters as the official state dict.

  Args:
    params: the NNX pure dict of `LatentDiffiT`'s parameters (as `nnx.to_pure_dict` gives and
      weights / training checkpoints store; an `nnx.State` is accepted too), numpy or jax
      arrays (fully addressable: gather FSDP-sharded multi-host arrays first).
    model_config: the latent `config.model` the parameters belong to.

  Returns:
    {official key: float32 array in PyTorch layout}, with `pos_embed` (1, N, D) and every
    block's `relative_position_index` (w^2, w^2) int64.

  Raises:
    ConversionError: the parameters do not fit `model_config` (every problem listed).
  """
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  flat = {tuple(str(p) for p in path): v
          for path, v in traverse_util.flatten_dict(params).items()}
  check_keys({".".join(p): shape for p, shape in param_shapes(model_config).items()},
             {".".join(p): v for p, v in flat.items()}, source="the parameter tree",
             hint=f"config.model is variant {model_config.get('variant')!r}; pass the config "
                  "the model was trained or converted with.")
  host = {path: np.asarray(jax.device_get(v), np.float32) for path, v in flat.items()}
  out = {}
  for key, (path, block, _) in expected_tensors(model_config).items():
    value = host[path] if block is None else host[path][block]  # one block of (depth, ...)
    out[key] = _to_torch(path[-1], value)
  out.update(official_buffers(model_config))
  return out


def write_safetensors(tensors: dict[str, np.ndarray], path: str, *,
                      metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
  """Atomically writes numpy tensors to a `.safetensors` file (temporary file, then rename).

  Args:
    tensors: {key: array}.
    path: destination file; must not exist unless `overwrite`.
    metadata: str -> str header metadata.
    overwrite: replace an existing file.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; choose another destination or pass overwrite.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  try:
    with files.writing(path, sum(np.asarray(v).nbytes for v in tensors.values())):
      safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                                  metadata=metadata)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_source(src: str, config_spec: str | None, step: int | None
                 ) -> tuple[Any, ml_collections.ConfigDict]:
  """(params, config) of a converted weights checkpoint or a training workdir."""
  if not os.path.exists(src):
    raise ConversionError(f"--src {src} does not exist; pass a converted checkpoint folder or a "
                          "training workdir.")
  if checkpoint.is_weights_checkpoint(src):
    try:
      saved = checkpoint.converted_config(src)
    except checkpoint.WrongCheckpointError as e:
      raise ConversionError(str(e)) from None
    if step is not None:
      raise ConversionError("--step applies to training workdirs, not to a weights checkpoint.")
    params, _ = checkpoint.load_weights(src, kind="diffit")
  else:
    params, saved = checkpoint.load_run_params(src, step)  # FileNotFoundError if not a run
  config = load_config(config_spec) if config_spec else saved
  if config.model.name != "latent":
    raise ConversionError(f"the model of {src} is {config.model.name!r}; only the latent "
                          "DiffiT has an official layout to export to.")
  return params, config


def _to_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
  """One of our parameters in PyTorch layout (inverse of `safetensors_io.torch_to_flax`)."""
  if leaf_name == "kernel" and value.ndim == 2:
    return flax_linear_to_torch(value)
  if leaf_name == "kernel" and value.ndim == 4:
    return flax_conv_to_torch(value)
  return np.ascontiguousarray(value)


def _is_buffer(key: str) -> bool:
  return key == POS_EMBED or key.endswith(RPI_SUFFIX)
