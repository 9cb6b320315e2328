"""`python -m diffit_jax.convert vae --src=PATH --out=DIR`: SD-VAE weights -> Flax VAE checkpoint.

This file owns converting Stable Diffusion VAE weights (e.g. `stabilityai/sd-vae-ft-ema`,
`sd-vae-ft-mse`, downloaded by hand) into `diffit_jax.models.vae.AutoencoderKL`, and
loading the result (`load_vae`). Accepted sources:
  * a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a
    pipeline folder holding them under `vae/`);
  * a bare `.safetensors` file with diffusers key names
    (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...);
  * the original LDM/CompVis naming (`encoder.down.0.block.0.conv1.weight`,
    `mid.attn_1.q` as 1x1 convs, `nin_shortcut`, ...), also inside a full SD checkpoint
    (`first_stage_model.*`), and the usual `module.`/`model.`/`ema.` wrappers.

Everything is read and checked before anything is written: a file that does not fit
raises one `ConversionError` listing missing, unexpected and wrongly shaped keys, and no
destination folder appears. The LDM -> diffusers renaming follows diffusers'
`convert_ldm_vae_checkpoint` (note the LDM decoder numbers its levels bottom-up).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx, traverse_util

from diffit_jax import checkpoint
from diffit_jax.convert.safetensors_io import (ConversionError, check_keys, define_io_flags,
                                               output_path, read_safetensors, strip_prefixes,
                                               torch_shape_of_flax, torch_to_flax)
from diffit_jax.models.vae import LATENT_SCALE, AutoencoderKL, VAEConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")

# Prefixes under which a full LDM / SD checkpoint stores its first-stage autoencoder.
FIRST_STAGE_PREFIXES = ("first_stage_model.", "vae.")

# Training-only tensors of LDM autoencoder checkpoints (discriminator and LPIPS in
# `loss.`, EMA bookkeeping in `model_ema.`): not part of the model, dropped with a note.
IGNORED_PREFIXES = ("loss.", "model_ema.")

# Our module names -> diffusers' (which wraps single modules in one-element lists).
_DIFFUSERS_NAMES = {"downsample": "downsamplers.0", "upsample": "upsamplers.0",
                    "attention": "attentions.0", "to_out": "to_out.0",
                    "kernel": "weight", "scale": "weight"}

# LDM / CompVis names -> diffusers names, applied in order (decoder levels handled apart).
_LDM_RULES = (
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)

# Attention names of diffusers files saved before diffusers 0.14 (`AttentionBlock`).
_LEGACY_DIFFUSERS_RULES = (
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
    (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0."),
)

# LDM stores the attention projections as 1x1 convs (C, C, 1, 1); diffusers as Linear (C, C).
_ATTN_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the `vae` command's flags."""
  define_io_flags(flag_values, "Diffusers VAE folder, or a .safetensors file (diffusers or LDM "
                  "key names).", "Output checkpoint folder (must not exist).")
  flags.DEFINE_integer("norm_num_groups", None, "GroupNorm groups when there is no config.json "
                       "(default 32, the SD VAE).", flag_values=flag_values)


def run(args: flags.FlagValues) -> int:
  """Converts `args.src` and writes the checkpoint `args.out`; nothing is written on error."""
  dst = output_path(args.out, args.overwrite)
  params, config, info = convert_vae(args.src, norm_num_groups=args.norm_num_groups)
  print(f"writing {dst}")
  checkpoint.save_weights(dst, params, overwrite=args.overwrite, metadata={
      "kind": "vae", "config": config.to_dict(), "source": os.path.abspath(args.src), **info})
  print("done")
  return 0


def convert_vae(src: str, *, norm_num_groups: int | None = None
                ) -> tuple[dict[str, Any], VAEConfig, dict[str, Any]]:
  """Reads and converts SD-VAE weights, writing nothing.

  Args:
    src: a diffusers VAE folder or a `.safetensors` file (see the module docstring).
    norm_num_groups: GroupNorm groups when `src` has no config.json (default 32).

  Returns:
    (params, config, info): params as the NNX pure dict of `AutoencoderKL(config)`'s
    `nnx.Param`s in float32 numpy; info holds metadata worth recording (naming, scale).

  Raises:
    ConversionError: unreadable source, unsupported config, or tensors that do not fit.
  """
  weights_path, config_path = _locate(src)
  print(f"reading {weights_path}")
  state = strip_prefixes(read_safetensors(weights_path))
  for prefix in FIRST_STAGE_PREFIXES:
    if any(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      print(f"  using the {len(state)} '{prefix}*' tensors of a full checkpoint")
      break
  ignored = {k for k in state if k.startswith(IGNORED_PREFIXES)}
  if ignored:
    print(f"  ignoring {len(ignored)} training-only tensors ({', '.join(IGNORED_PREFIXES)})")
    state = {k: v for k, v in state.items() if k not in ignored}

  naming = "ldm" if _is_ldm(state) else "diffusers"
  state = _ldm_to_diffusers(state) if naming == "ldm" else state
  state = _rename(state, _LEGACY_DIFFUSERS_RULES)

  if config_path is not None:
    config, scale = _config_from_json(config_path)
    print(f"  config from {config_path}")
    if norm_num_groups is not None and norm_num_groups != config.norm_num_groups:
      print(f"  NOTE: --norm_num_groups={norm_num_groups} ignored; config.json says "
            f"{config.norm_num_groups}")
  else:
    config, scale = _infer_config(state, norm_num_groups or VAEConfig.norm_num_groups), None
    print(f"  no config.json: inferred from tensor shapes (norm_num_groups={config.norm_num_groups})")
  if scale is not None and abs(scale - LATENT_SCALE) > 1e-9:
    print(f"  NOTE: config.json scaling_factor={scale}, but diffit_jax scales latents by "
          f"LATENT_SCALE={LATENT_SCALE}; models trained on this VAE must account for it.")
  print(f"  {naming} key names, {len(state)} tensors, config {config.to_dict()}")

  expected = _expected_tensors(config)
  hint = "Keys are shown in diffusers naming" + (
      " (the file's LDM names were renamed first)." if naming == "ldm" else ".")
  hint += (f" Is --src an SD AutoencoderKL matching {config_path}?" if config_path else
           " Is --src an SD AutoencoderKL? Without a config.json the architecture is inferred "
           "from tensor shapes; put the model's diffusers config.json beside the weights "
           "(as a folder) for other layouts.")
  check_keys({k: shape for k, (_, shape) in expected.items()}, state, source=weights_path, hint=hint)
  flat = {path: torch_to_flax(path[-1], state[key]).astype(np.float32)
          for key, (path, _) in expected.items()}
  params = traverse_util.unflatten_dict(flat)
  n = sum(v.size for v in flat.values())
  print(f"  converted {len(flat)} tensors, {n / 1e6:.2f} M parameters")
  info = {"naming": naming, "scaling_factor": scale if scale is not None else LATENT_SCALE}
  return params, config, info


def load_vae(path: str, *, dtype: Any = jnp.float32,
             sharding: jax.sharding.Sharding | None = None) -> AutoencoderKL:
  """Rebuilds the VAE from a checkpoint written by `python -m diffit_jax.convert vae`.

  Args:
    path: the checkpoint folder.
    dtype: compute dtype of the returned model (parameters stay float32).
    sharding: where to place every parameter (e.g. replicated over a data-parallel
      mesh: `NamedSharding(mesh, P())`); default: the default device.

  Returns:
    The `AutoencoderKL` with the converted weights.
  """
  metadata = checkpoint.load_metadata(path, kind="vae")
  config = VAEConfig.from_dict(metadata["config"])
  # Build abstractly (no random init of 84 M parameters), then restore into that structure.
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        nnx.to_pure_dict(state))
  params, _ = checkpoint.load_weights(path, target=target)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def diffusers_key(path: tuple[Any, ...]) -> str:
  """The diffusers state-dict key of one of our parameters.

  For example ('encoder', 'mid_block', 'attention', 'to_out', 'kernel') ->
  'encoder.mid_block.attentions.0.to_out.0.weight'.
  """
  return ".".join(_DIFFUSERS_NAMES.get(p, str(p)) for p in path)


def _expected_tensors(config: VAEConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
  """{diffusers key: (our parameter path, PyTorch shape)} for every parameter of the model."""
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {diffusers_key(path): (path, torch_shape_of_flax(path[-1], s.shape))
          for path, s in flat.items()}


def _locate(src: str) -> tuple[str, str | None]:
  """(weights file, config.json or None) of a source path."""
  if os.path.isdir(src):
    for folder in (src, os.path.join(src, "vae")):
      for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
          config = os.path.join(folder, "config.json")
          return os.path.join(folder, name), config if os.path.isfile(config) else None
    raise ConversionError(
        f"{src} is a folder without {WEIGHT_FILES[0]} (nor vae/{WEIGHT_FILES[0]}); pass a diffusers "
        "AutoencoderKL folder or a .safetensors file.")
  if not os.path.isfile(src):
    raise ConversionError(f"--src {src} does not exist; pass a diffusers VAE folder or a .safetensors file.")
  # A diffusers file taken out of its folder may still have its config beside it; an
  # arbitrary file's neighbouring config.json may belong to something else.
  config = os.path.join(os.path.dirname(src), "config.json")
  use_config = os.path.basename(src) in WEIGHT_FILES and os.path.isfile(config)
  return src, config if use_config else None


def _rename(state: dict[str, np.ndarray], rules) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


def _is_ldm(state: dict[str, np.ndarray]) -> bool:
  return any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid."))
             for k in state)


def _ldm_to_diffusers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames LDM/CompVis VAE keys to diffusers keys and turns 1x1-conv attention weights into Linear ones."""
  # LDM numbers decoder levels from the lowest resolution's end (`up.{n-1}` runs first);
  # diffusers numbers them in execution order.
  levels = [int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
  n_up = max(levels, default=-1) + 1

  def up_level(m: re.Match) -> str:
    kind = {"block": "resnets", "upsample": "upsamplers.0"}[m.group(2)]
    return f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.{kind}."

  out = {}
  for key, value in _rename(state, _LDM_RULES).items():
    key = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.", up_level, key)
    if _ATTN_WEIGHT.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # (C_out, C_in, 1, 1) -> (C_out, C_in)
    out[key] = value
  return out


def _config_from_json(path: str) -> tuple[VAEConfig, float | None]:
  """VAEConfig and scaling_factor from a diffusers `config.json`; rejects non-SD variants."""
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: cannot read the diffusers config ({e}); fix or delete it.") from e
  unsupported = []
  if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    unsupported.append(f"_class_name={cfg['_class_name']!r} (only AutoencoderKL)")
  if cfg.get("act_fn", "silu") != "silu":
    unsupported.append(f"act_fn={cfg['act_fn']!r} (only 'silu')")
  if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", [])):
    unsupported.append(f"down_block_types={cfg['down_block_types']}")
  if any(t != "UpDecoderBlock2D" for t in cfg.get("up_block_types", [])):
    unsupported.append(f"up_block_types={cfg['up_block_types']}")
  for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    if not cfg.get(flag, True):
      unsupported.append(f"{flag}=False")
  if cfg.get("shift_factor") or cfg.get("latents_mean") or cfg.get("latents_std"):
    unsupported.append("latent shift/mean/std normalisation (not the SD VAE)")
  if unsupported:
    raise ConversionError(
        f"{path} describes a VAE that diffit_jax does not implement: {'; '.join(unsupported)}. "
        "Only the Stable Diffusion AutoencoderKL layout (e.g. sd-vae-ft-ema / sd-vae-ft-mse) is supported.")
  fields = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "latent_channels", "norm_num_groups")
  try:
    config = VAEConfig(**{k: cfg[k] for k in fields if k in cfg})
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from e
  return config, cfg.get("scaling_factor")


def _infer_config(state: dict[str, np.ndarray], norm_num_groups: int) -> VAEConfig:
  """Reads the architecture off tensor shapes (GroupNorm groups cannot be, so they are given).

  Where a tensor needed for inference is absent the SD default stays, and `check_keys`
  then reports the file's actual problem.
  """
  d = VAEConfig()
  chs = []
  while (w := state.get(f"encoder.down_blocks.{len(chs)}.resnets.0.conv1.weight")) is not None:
    chs.append(w.shape[0])
  layers = 0
  while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state:
    layers += 1

  def dim(key: str, axis: int, default: int) -> int:
    return state[key].shape[axis] if key in state else default

  try:
    return VAEConfig(
        in_channels=dim("encoder.conv_in.weight", 1, d.in_channels),  # (C0, in, 3, 3)
        out_channels=dim("decoder.conv_out.weight", 0, d.out_channels),  # (out, C0, 3, 3)
        block_out_channels=tuple(chs) or d.block_out_channels,
        layers_per_block=layers or d.layers_per_block,
        latent_channels=dim("post_quant_conv.weight", 0, d.latent_channels),  # (lat, lat, 1, 1)
        norm_num_groups=norm_num_groups)
  except ValueError as e:
    raise ConversionError(f"inferred an invalid VAE config: {e} Pass --norm_num_groups.") from e
