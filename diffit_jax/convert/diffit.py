"""`python -m diffit_jax.convert diffit --src=diffit_256.safetensors --out=DIR`: weights in.

This file owns converting NVIDIA's official latent DiffiT state dicts (`diffit_256.safetensors`,
`diffit_512.safetensors`; layout and forward math in `docs/official_checkpoint.md`)
into a diffit_jax weights checkpoint of `diffit_jax.models.latent.LatentDiffiT` and the
official-key <-> parameter-path mapping that the exporter (`export.py`) shares;
`diffit_jax.inference.load(checkpoint=DIR)` loads the result. The file is read without
PyTorch; the model (resolution, depth, width, heads, patch, window, classes, learned sigma) is
detected from tensor shapes, and the matching experiment config
(`configs/imagenet256_latent.py` for 32x32 latents, `configs/imagenet512_latent.py` for 64x64)
travels with the weights, so
`python -m diffit_jax.sample --checkpoint=DIR` needs nothing else.

Everything is read and checked before anything is written: missing, unexpected and wrongly
shaped keys are listed in one `ConversionError`, the `relative_position_index` buffers must
follow the Swin formula and `pos_embed` must be the MAE 2-D sin-cos embedding that
LatentDiffiT computes (both buffers are optional; they are derived, not stored). Layouts:
Linear (out, in) -> (in, out), Conv2d (O, I, kh, kw) -> (kh, kw, I, O), and the per-block
tensors `blocks.{i}.*` are stacked along the leading depth axis of the stacked blocks.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from flax import nnx, traverse_util

from diffit_jax import checkpoint, models
from diffit_jax.config_lib import load_config, shipped_configs_dir
from diffit_jax.convert.safetensors_io import (ConversionError, check_keys, define_io_flags,
                                               output_path, read_safetensors, strip_prefixes,
                                               torch_shape_of_flax, torch_to_flax)
from diffit_jax.models.embeddings import sincos_pos_embed_2d
from diffit_jax.models.latent import LATENT_SIZES, PATCH_SIZES
from diffit_jax.models.tmsa import relative_position_index

# The experiment config of each released resolution, by latent side.
BASE_CONFIGS = {32: "imagenet256_latent.py", 64: "imagenet512_latent.py"}
VAE_FACTOR = 8  # SD-VAE: image side = 8 x latent side.

# A model outside the size table is stored as variant "custom" with explicit sizes.
CUSTOM_VARIANT, SIZE_FIELDS = models.CUSTOM_VARIANT, models.SIZE_FIELDS

# The file's pos_embed may have been computed in float32 by other code: allow rounding.
POS_EMBED_ATOL = 1e-4

# Buffers of the official state dict: derivable, so optional; checked when present.
POS_EMBED = "pos_embed"
RPI_SUFFIX = "attn.relative_position_index"

# Official module names that differ from ours (ours -> official); leaves kernel/embedding -> weight.
_T_EMBEDDER_NAMES = {"fc1": "mlp.0", "fc2": "mlp.2"}
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight"}


# ----------------------------------------------------------------------------------------------
# The CLI.
# ----------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the `diffit` command's flags."""
  define_io_flags(flag_values, "Official latent DiffiT .safetensors (diffit_256 / diffit_512).",
                  "Output checkpoint folder (must not exist).")
  flags.DEFINE_string("config", None, "Experiment config (configs/X.py[:arg]) to store with "
                      "the weights (default: chosen by the detected resolution: "
                      "configs/imagenet256_latent.py for 32x32 latents, "
                      "configs/imagenet512_latent.py for 64x64); its model must match the file.",
                      flag_values=flag_values)


def run(args: flags.FlagValues) -> int:
  """Converts `args.src` and writes the checkpoint `args.out`; nothing is written on error."""
  dst = output_path(args.out, args.overwrite)
  params, config, info = convert_diffit(args.src, config=args.config)
  print(f"writing {dst}")
  checkpoint.save_weights(dst, params, overwrite=args.overwrite, metadata={
      "kind": "diffit", "config": config.to_dict(), "source": os.path.abspath(args.src), **info})
  print(f"done; sample with: python -m diffit_jax.sample --checkpoint={dst} --vae=VAE_DIR")
  return 0


# ----------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------


def convert_diffit(src: str, *, config: str | ml_collections.ConfigDict | None = None
                   ) -> tuple[dict[str, Any], ml_collections.ConfigDict, dict[str, Any]]:
  """Reads, checks and converts an official latent DiffiT state dict, writing nothing.

  Args:
    src: a `.safetensors` file in the official layout (prefixes `module.`, `model.`, `ema.`
      are accepted).
    config: the experiment config to pair the weights with (a `path[:arg]` or a ConfigDict);
      its model must match the file. None picks one by the detected resolution.

  Returns:
    (params, config, info): params is the NNX pure dict of the model's `nnx.Param`s as
    float32 numpy arrays (blocks stacked on a leading depth axis); config the resolved
    experiment config; info metadata worth recording (the detected model, source dtype).

  Raises:
    ConversionError: unreadable file, tensors that do not fit, or buffers that disagree.
  """
  print(f"reading {src}")
  state = strip_prefixes(read_safetensors(src))
  if not state:
    raise ConversionError(f"{src} holds no tensors; pass an official latent DiffiT checkpoint.")
  dtypes = sorted({str(v.dtype) for k, v in state.items() if not k.endswith(RPI_SUFFIX)})
  detected, guessed = detect_model(state, src)
  print(f"  {len(state)} tensors ({', '.join(dtypes)}); detected {describe(detected)}")
  if dtypes != ["float32"]:
    print("  NOTE: parameters are stored as float32 (the file's lower precision is upcast).")
  config = config_for(detected, guessed, config, src)
  model_config = config.model

  expected = expected_tensors(model_config)
  depth = models.latent_sizes(model_config)["depth"]
  shapes = {key: shape for key, (_, _, shape) in expected.items()}
  shapes.update(_buffer_shapes(model_config, state))
  check_keys(shapes, state, source=src, hint=(
      f"The file was read as {describe(detected)}. Is --src an official latent DiffiT "
      "checkpoint (diffit_256.safetensors / diffit_512.safetensors), complete and unmodified?"))
  _check_buffers(model_config, state, src)

  flat, done_blocks = {}, 0
  for key, (path, block, _) in expected.items():
    if block is None:
      flat[path] = torch_to_flax(path[-1], state.pop(key)).astype(np.float32)
  block_paths = sorted({path for path, block, _ in expected.values() if block is not None})
  for path in block_paths:  # (depth, ...) per parameter: one stacked module
    keys = [official_key(path, i) for i in range(depth)]
    flat[path] = np.stack([torch_to_flax(path[-1], state.pop(k)).astype(np.float32)
                           for k in keys])  # (depth, ...)
    done_blocks += 1
    print(f"  [{done_blocks}/{len(block_paths)}] blocks.*.{'.'.join(keys[0].split('.')[2:])}: "
          f"{depth} x {tuple(flat[path].shape[1:])}")
  params = traverse_util.unflatten_dict(flat)
  n = sum(v.size for v in flat.values())
  print(f"  converted {len(expected)} tensors, {n:,} parameters")
  info = {"detected": detected, "source_dtypes": dtypes, "num_params": int(n)}
  return params, config, info


def detect_model(state: dict[str, np.ndarray], source: str = "checkpoint"
                 ) -> tuple[dict[str, Any], set[str]]:
  """Reads the model's hyper-parameters off the tensor shapes of an official state dict.

  Where a tensor needed for one field is absent, the XL/2 default stays and the field is
  marked guessed; `check_keys` then reports the file's actual problem.

  Args:
    state: {official key: array}, prefixes already stripped.
    source: a name for the file in error messages.

  Returns:
    (fields, guessed): fields holds input_size, in_channels, num_classes, learn_sigma,
    mlp_ratio, window_size (0 = the whole grid) and the sizes depth, hidden_size,
    num_heads, patch_size; guessed names the fields no tensor determined.

  Raises:
    ConversionError: the tensors are not those of a latent DiffiT at all.
  """
  guessed = set()

  def shape(*keys: str, rank: int = 2) -> tuple[int, ...] | None:
    for key in keys:  # a tensor of the wrong rank is left to `check_keys` to report
      if key in state and state[key].ndim == rank:
        return tuple(state[key].shape)
    return None

  blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
  if not blocks:
    raise ConversionError(
        f"{source} has no `blocks.N.*` tensors; it is not a latent DiffiT state dict "
        f"(its first keys: {sorted(state)[:5]}). Pass diffit_256.safetensors or "
        "diffit_512.safetensors.")
  block_keys = lambda suffix: [f"blocks.{i}.{suffix}" for i in blocks]

  conv = shape("x_embedder.proj.weight", rank=4)  # (D, C, p, p)
  hidden = conv or shape("t_embedder.mlp.2.weight", *block_keys("attn.proj.weight"))
  if hidden is None:
    raise ConversionError(f"{source}: no tensor gives the model width (x_embedder.proj.weight, "
                          "t_embedder.mlp.2.weight, blocks.N.attn.proj.weight are all absent); "
                          "it is not a latent DiffiT state dict.")
  hidden = hidden[0]
  in_channels, patch = (conv[1], conv[2]) if conv else (4, 2)
  if conv is None:
    guessed.update({"in_channels", "patch_size"})

  grid, window, heads = _token_grid(shape, block_keys, source, guessed)
  fc1 = shape(*block_keys("mlp.fc1.weight"))  # (mlp_hidden, D)
  mlp_ratio = fc1[0] / hidden if fc1 else 4.0
  if fc1 is None:
    guessed.add("mlp_ratio")
  final = shape("final_layer.linear.weight")  # (p*p*C_out, D)
  out_channels = final[0] // (patch * patch) if final else 2 * in_channels
  if final is None:
    guessed.add("learn_sigma")
  table_y = shape("y_embedder.embedding_table.weight")  # (classes + 1, D)
  num_classes = table_y[0] - 1 if table_y else 0
  return dict(
      input_size=grid * patch, in_channels=in_channels, num_classes=num_classes,
      learn_sigma=out_channels != in_channels, mlp_ratio=mlp_ratio,
      window_size=0 if window == grid else window,
      depth=blocks[-1] + 1, hidden_size=hidden, num_heads=heads, patch_size=patch), guessed


def _token_grid(shape, block_keys, source: str, guessed: set[str]) -> tuple[int, int, int]:
  """(token grid side, window side, heads) of `detect_model`, from pos_embed and the blocks'
  relative position tables; adds the fields no tensor determined to `guessed`."""
  table = shape(*block_keys("attn.relative_position_bias_table"))  # ((2w-1)^2, heads)
  rpi = shape(*block_keys(RPI_SUFFIX))  # (w^2, w^2)
  if table is not None:
    window = _side((math.isqrt(table[0]) + 1) // 2, table[0], lambda w: (2 * w - 1) ** 2,
                   "relative_position_bias_table rows", source)
    heads = table[1]
  else:
    heads = 16
    guessed.add("num_heads")
    window = _side(math.isqrt(rpi[0]), rpi[0], lambda w: w * w,
                   "relative_position_index rows", source) if rpi else None
  pos = shape(POS_EMBED, rank=3)  # (1, N, D)
  if pos is not None:
    grid = _side(math.isqrt(pos[1]), pos[1], lambda g: g * g, "pos_embed tokens", source)
  elif window is not None:
    grid = window  # without pos_embed, assume the released global window
    guessed.update({"input_size", "window_size"})
  else:
    raise ConversionError(f"{source}: neither pos_embed nor any relative_position_bias_table "
                          "is present, so the token grid cannot be determined; it is not a "
                          "complete latent DiffiT state dict.")
  return grid, grid if window is None else window, heads


def _side(candidate: int, count: int, count_of, what: str, source: str) -> int:
  """The side s with count_of(s) == count (a square grid), or a clear error."""
  if candidate < 1 or count_of(candidate) != count:
    raise ConversionError(f"{source}: {what} = {count} does not describe a square token grid; "
                          "the file is not an official latent DiffiT checkpoint.")
  return candidate


def describe(fields: dict[str, Any]) -> str:
  """A one-line description of a detected model, e.g. 'XL/2 at 256 px (latent 32x32x4), ...'."""
  grid = fields["input_size"] // fields["patch_size"]
  window = fields["window_size"] or grid
  name = variant_name(fields)
  name = "a custom-size model" if name == CUSTOM_VARIANT else name
  return (f"{name} at {fields['input_size'] * VAE_FACTOR} px (latent "
          f"{fields['input_size']}x{fields['input_size']}x{fields['in_channels']}): depth "
          f"{fields['depth']}, width {fields['hidden_size']}, {fields['num_heads']} heads, patch "
          f"{fields['patch_size']}, {grid}x{grid} tokens, "
          + ("global attention" if window == grid else f"{window}x{window} windows")
          + f", mlp ratio {fields['mlp_ratio']:g}, {fields['num_classes']} classes"
          + (", learned sigma" if fields["learn_sigma"] else ""))


def variant_name(fields: dict[str, Any]) -> str:
  """'XL/2' etc. when the sizes are a row of `LATENT_SIZES`, else `CUSTOM_VARIANT`."""
  for name, sizes in LATENT_SIZES.items():
    if fields["patch_size"] in PATCH_SIZES and all(fields[k] == v for k, v in sizes.items()):
      return f"{name}/{fields['patch_size']}"
  return CUSTOM_VARIANT


def _default_config_path(input_size: int) -> str:
  """The shipped config of the released model at `input_size` (the 256 px one otherwise)."""
  return os.path.join(shipped_configs_dir(), BASE_CONFIGS.get(input_size, BASE_CONFIGS[32]))


def config_for(detected: dict[str, Any], guessed: set[str],
                   config: str | ml_collections.ConfigDict | None = None,
                   source: str = "the checkpoint") -> ml_collections.ConfigDict:
  """The experiment config to store with converted weights.

  Args:
    detected, guessed: what `detect_model` returned.
    config: a config (`path[:arg]` or ConfigDict) whose model must match `detected` (except
      guessed fields); None loads the released config of the detected resolution
      (`BASE_CONFIGS`) and sets its model to `detected`.
    source: a name for the file in error messages.

  Returns:
    An unlocked copy of the config.

  Raises:
    ConversionError: the given config's model differs from the file's (every field listed).
  """
  if config is not None:
    spec = config if isinstance(config, str) else "the given config"
    config = load_config(config) if isinstance(config, str) else config
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    if config.model.name != "latent":
      raise ConversionError(f"{spec} describes a {config.model.name!r} model; official "
                            "DiffiT checkpoints are latent models. Pass a latent config or none.")
    have = model_fields(config.model)
    diff = [f"  {k}: file {detected[k]!r}, config {have[k]!r}" for k in detected
            if k not in guessed and detected[k] != have[k]]
    if diff:
      raise ConversionError(
          f"{source} does not match the model of {spec}:\n" + "\n".join(diff)
          + f"\nThe file is {describe(detected)}. Drop --config to pick the config by the "
          "detected resolution, or pass the matching one (configs/imagenet256_latent.py for "
          "32x32 latents, configs/imagenet512_latent.py for 64x64).")
    return config

  path = _default_config_path(detected["input_size"])
  config = ml_collections.ConfigDict(load_config(path).to_dict())  # an unlocked copy
  print(f"  config: {path}")
  if detected["input_size"] not in BASE_CONFIGS:
    print(f"  NOTE: {detected['input_size']}x{detected['input_size']} latents are neither of the "
          f"released resolutions; starting from {os.path.basename(path)}, check its sampler "
          "settings or pass --config.")
  model = config.model
  name = variant_name(detected)
  for k in SIZE_FIELDS:
    model[k] = None  # only variant="custom" reads them
  model.variant = name
  if name == CUSTOM_VARIANT:
    model.update({k: detected[k] for k in SIZE_FIELDS})
  model.update({k: detected[k] for k in ("input_size", "in_channels", "num_classes",
                                         "learn_sigma", "mlp_ratio", "window_size")})
  config.data.image_size = detected["input_size"] * VAE_FACTOR
  config.data.channels = detected["in_channels"]
  config.diffusion.learn_sigma = detected["learn_sigma"]
  if detected["num_classes"] == 0:
    config.sampler.guidance.scale = 1.0  # an unconditional model cannot be guided
  return config


def model_fields(model_config: Any) -> dict[str, Any]:
  """The comparable fields of a latent `config.model` (the keys `detect_model` returns)."""
  sizes = models.latent_sizes(model_config)
  grid = model_config.input_size // sizes["patch_size"]
  window = model_config.window_size or 0
  return dict(
      input_size=model_config.input_size, in_channels=model_config.in_channels,
      num_classes=model_config.num_classes, learn_sigma=model_config.learn_sigma,
      mlp_ratio=model_config.mlp_ratio, window_size=0 if window == grid else window,
      **sizes)


# ----------------------------------------------------------------------------------------------
# Official keys <-> our parameters (shared with export.py).
# ----------------------------------------------------------------------------------------------


def official_key(path: tuple[str, ...], block: int | None = None) -> str:
  """The official state-dict key of one of our parameters.

  ('t_embedder', 'fc1', 'kernel') -> 't_embedder.mlp.0.weight';
  ('blocks', 'attn', 'qkv', 'kernel'), block 3 -> 'blocks.3.attn.qkv.weight'.
  """
  names = [str(p) for p in path]
  if names[0] == "t_embedder":
    names[1] = _T_EMBEDDER_NAMES[names[1]]
  if names[0] == "blocks":
    names.insert(1, str(block))
  names[-1] = _LEAF_NAMES.get(names[-1], names[-1])
  return ".".join(names)


def param_shapes(model_config: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{our parameter path: shape} of the latent DiffiT `model_config` describes.

  Built abstractly (`nnx.eval_shape`: nothing is allocated). Block parameters carry a
  leading depth axis.

  Raises:
    ConversionError: the config describes an impossible model (e.g. width not divisible by heads).
  """
  try:
    abstract = nnx.eval_shape(lambda: models.build_model(model_config, rngs=nnx.Rngs(0)))
  except ValueError as e:
    raise ConversionError(f"cannot build the latent DiffiT the tensors describe: {e}") from e
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {path: tuple(leaf.shape) for path, leaf in sorted(flat.items())}


def expected_tensors(model_config: Any
                     ) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
  """{official key: (our parameter path, block index or None, PyTorch shape)} of every parameter.

  Block parameters (a leading depth axis in our model) appear once per block in the
  official layout.
  """
  out = {}
  for path, shape in param_shapes(model_config).items():
    if path[0] == "blocks":
      for i in range(shape[0]):
        out[official_key(path, i)] = (path, i, torch_shape_of_flax(path[-1], shape[1:]))
    else:
      out[official_key(path)] = (path, None, torch_shape_of_flax(path[-1], shape))
  return out


def official_buffers(model_config: Any) -> dict[str, np.ndarray]:
  """The official state dict's buffers: `pos_embed` (1, N, D) float32 and every block's
  `relative_position_index` (w^2, w^2) int64 (PyTorch's index dtype)."""
  sizes = models.latent_sizes(model_config)
  grid = model_config.input_size // sizes["patch_size"]
  window = model_config.window_size or grid
  buffers = {POS_EMBED: sincos_pos_embed_2d(sizes["hidden_size"], grid)[None]}  # (1, N, D)
  index = relative_position_index(window).astype(np.int64)  # (w^2, w^2)
  buffers.update({f"blocks.{i}.{RPI_SUFFIX}": index for i in range(sizes["depth"])})
  return buffers


def _buffer_shapes(model_config: Any, state: dict[str, np.ndarray]
                   ) -> dict[str, tuple[int, ...]]:
  """Expected shapes of the buffers the file carries (absent ones are fine)."""
  return {k: v.shape for k, v in official_buffers(model_config).items() if k in state}


def _check_buffers(model_config: Any, state: dict[str, np.ndarray], source: str) -> None:
  """Checks present buffers against the Swin index and our sin-cos embedding; one error for all."""
  ours = official_buffers(model_config)
  problems = []
  bad_index = [k for k, v in ours.items()
               if k.endswith(RPI_SUFFIX) and k in state and not np.array_equal(state[k], v)]
  if bad_index:
    problems.append(
        f"  {len(bad_index)} relative_position_index buffer(s) ({', '.join(bad_index[:3])}"
        f"{', ...' if len(bad_index) > 3 else ''}) differ from the Swin index "
        "(r1 - r2 + w - 1) * (2w - 1) + (c1 - c2 + w - 1): the model orders its relative "
        "position bias table differently, which diffit_jax does not implement.")
  if POS_EMBED in state:
    theirs = state[POS_EMBED].astype(np.float32)
    err = float(np.abs(theirs - ours[POS_EMBED]).max())
    if err > POS_EMBED_ATOL:
      grid = int(round(ours[POS_EMBED].shape[1] ** 0.5))
      row_first = ours[POS_EMBED].reshape(grid, grid, -1).transpose(1, 0, 2).reshape(
          ours[POS_EMBED].shape)  # token (r, c) gets (c, r)'s embedding: row first
      why = (" It matches the row-first ordering: the model was trained with (row, column) "
             "swapped." if np.abs(theirs - row_first).max() <= POS_EMBED_ATOL else "")
      problems.append(
          f"  pos_embed differs from the MAE 2-D sin-cos embedding (column first) by up to "
          f"{err:.3g} (tolerance {POS_EMBED_ATOL}).{why} diffit_jax computes the official "
          "embedding and cannot use another.")
  if problems:
    raise ConversionError(f"{source} has buffers that do not match the official model:\n"
                          + "\n".join(problems))
