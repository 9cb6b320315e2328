"""The config schema (every field a run reads, with its default) and loading `configs/*.py`.

`base_config(model)` returns a ConfigDict holding every field once, with its default and
a comment: each config in `configs/` starts from it and overrides what differs, so every
declared field exists in every config and `--config.a.b=v` can override any of them.
`check_config` refuses a field the schema does not declare (naming the closest one) or
one that is missing; the code reads fields as plain attributes, so defaults live here only.

`config.model` has one sub-schema per network (`MODEL_SCHEMAS`, chosen by
`config.model.name`): its fields are the network's constructor arguments, and the two
networks share few of them. The other groups are the union over the formulations, each
field commented with what uses it: they are read by name (never passed on whole), and
switching, say, the sampler on the command line then needs no other config file.

A few fields may be left to the dataset (`FROM_DATA`: `config.data.image_size=0`,
`config.model.num_classes=-1`, ...): training fills them when it starts
(`fill_from_data`, through `run.fit_to_data`) and saves the filled config with the run.

`load_config("configs/ffhq64.py:runlocal")` imports the file and calls
`get_config("runlocal")`, the same thing `--config=configs/ffhq64.py:runlocal` does through
`DEFINE_config_file`; a config file lists the `:arg` variants it accepts in `ARGS`. The
configs ship with the package: a bare name (`load_config("ffhq64:runlocal")`,
`--config=mnist_demo`) loads the shipped one from any folder.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

ConfigDict = ml_collections.ConfigDict
placeholder = ml_collections.config_dict.placeholder


class ConfigError(ValueError):
  """A config names a field the schema does not declare, or holds a value that cannot run."""


# ----------------------------------------------------------------------------------------
# The schema.


def image_model() -> ConfigDict:
  """`config.model` of the image-space DiffiT (`models.ImageDiffiT`'s arguments)."""
  return ConfigDict(dict(
      name="image",
      image_size=32,               # input side H = W, in pixels; 0: config.data's (FROM_DATA)
      in_channels=3,               # image channels in; 0: config.data's
      out_channels=3,              # channels predicted; 0: in_channels
      channels=(128, 256, 256),    # width of each stage (one stage per entry)
      num_blocks=(2, 2, 2),        # DiffiT ResBlocks per stage
      window_size=4,               # TMSA window side (capped at the stage's resolution)
      time_dim=512,                # time token width
      frequency_size=128,          # sinusoidal frequencies of the time embedding
      head_dim=64,                 # attention heads = width / head_dim
      num_groups=32,               # GroupNorm groups
      mlp_ratio=4.0,               # transformer MLP hidden width / width
      dropout_rate=0.0,            # dropout on the MLP's hidden layer
      num_classes=0,               # 0: unconditional; else class-conditional (+1 null class);
                                   # -1: the dataset's number of classes
      attention="auto",            # "auto" | "xla" | "cudnn" (the attention kernel)
      dtype="float32",             # compute dtype, "float32" | "bfloat16" (weights stay fp32)
  ))


def latent_model() -> ConfigDict:
  """`config.model` of the latent DiffiT (`models.LatentDiffiT`'s arguments)."""
  return ConfigDict(dict(
      name="latent",
      variant="XL/2",              # size table row "S|B|L|XL/patch", or "custom" (below)
      input_size=32,               # latent side (image side / 8); 0: the dataset's
      in_channels=4,               # latent channels; 0: the dataset's
      num_classes=1000,            # 0: unconditional; else class-conditional (+1 null class);
                                   # -1: the dataset's number of classes
      learn_sigma=True,            # also predict the variance (must match diffusion.learn_sigma)
      window_size=0,               # TMSA window side in tokens; 0: the whole grid
      mlp_ratio=4.0,               # transformer MLP hidden width / width
      remat=False,                 # rematerialise each block in the backward pass
      remat_policy="nothing",      # what a rematerialised block keeps (models.latent)
      scan_blocks=False,           # run the blocks as one jax.lax.scan (faster compile)
      scan_unroll=1,               # blocks per scan iteration
      attention="auto",            # "auto" | "xla" | "cudnn" (the attention kernel)
      dtype="float32",             # compute dtype, "float32" | "bfloat16" (weights stay fp32)
      depth=placeholder(int),      # variant="custom" only: blocks
      hidden_size=placeholder(int),  # variant="custom" only: token width
      num_heads=placeholder(int),  # variant="custom" only: attention heads
      patch_size=placeholder(int),  # variant="custom" only: patch side
  ))


MODEL_SCHEMAS = {"image": image_model, "latent": latent_model}


def data_config() -> ConfigDict:
  """`config.data`: what `diffit_jax.data.create_train_iterator` reads."""
  return ConfigDict(dict(
      name="mnist_demo",           # "mnist_demo" | "tfds:NAME" | "folder:DIR" | "latents:DIR"
      split="train",               # tfds split
      image_size=32,               # output side; 0: the dataset's own; ignored for latents
      channels=1,                  # 1 or 3 (grey is tiled, RGB reduced to luma); 0: the
                                   # dataset's own; ignored for latents
      allow_resize=False,          # True: images stored at another size than image_size are
                                   # center-cropped and resized; False: such data is refused
      random_flip=False,           # random horizontal flip (latents: the stored mirror)
      shuffle=True,                # a fresh order of the records every epoch
      data_dir="",                 # tfds data_dir ("": tfds' default)
      manual_dir="",               # tfds manual_dir (imagenet2012)
      num_workers=0,               # grain worker processes (0: in the training process)
      worker_buffer_size=1,        # batches each worker prepares ahead
  ))


def mesh_config() -> ConfigDict:
  """`config.mesh`: one ("data", "fsdp") mesh; -1 takes every device left."""
  return ConfigDict(dict(
      data=-1,                     # data-parallel axis size
      fsdp=1,                      # > 1 shards large weights, EMA and Adam moments (ZeRO-3)
      fsdp_min_size=2 ** 18,       # arrays this large or larger are sharded over "fsdp"
  ))


def diffusion_config() -> ConfigDict:
  """`config.diffusion`: the diffusion process and its training loss."""
  return ConfigDict(dict(
      name="edm",                  # "edm" (EDM's preconditioned loss) | "adm" (IDDPM's hybrid)
      class_dropout_prob=0.0,      # label dropout for classifier-free guidance
      sigma_data=0.5,              # edm only: data std
      p_mean=-1.2,                 # edm only: training ln(sigma) ~ N(p_mean, p_std^2)
      p_std=1.2,                   # edm only
      num_timesteps=1000,          # adm only: diffusion steps
      beta_schedule="linear",      # adm only: "linear" | "cosine"
      prediction="eps",            # adm only: what the network predicts
      learn_sigma=False,           # adm only: learned-range variance (hybrid loss)
  ))


def sampler_config() -> ConfigDict:
  """`config.sampler`: the sampler of grids, FID and `python -m diffit_jax.sample`."""
  return ConfigDict(dict(
      name="heun",                 # edm: "heun" | "euler" ...; adm: "ddpm" | "ddim"
      num_steps=18,
      respacing="",                # adm only: ADM's timestep_respacing ("ddim25", "10,15,20");
                                   # replaces num_steps; "": num_steps evenly spread steps
      sigma_min=0.002,             # edm only
      sigma_max=80.0,              # edm only
      rho=7.0,                     # edm only: time-step spacing exponent
      churn=0.0,                   # edm only: stochasticity (S_churn)
      churn_tmin=0.0,              # edm only: churn where churn_tmin <= sigma <= churn_tmax
      churn_tmax=0.0,              # edm only: (S_tmin, S_tmax); 0: no upper bound
      churn_noise=1.0,             # edm only: the churn's noise scale (S_noise)
      eta=0.0,                     # adm only: DDIM's eta
      clip_denoised=False,         # adm only: clip x0 to [-1, 1]
      guidance=ConfigDict(dict(
          scale=1.0,               # classifier-free guidance scale (1: none)
          schedule="constant",     # "constant" | "power_cosine"
          power=4.0,               # power_cosine only: its exponent
          channels=0,              # guide only the first N channels (0: all)
          interval=(),             # (lo, hi): guide only where lo < sigma <= hi; (): always
      )),
  ))


def base_config(model: str = "image") -> ConfigDict:
  """Every field a run reads, with its default, for a `model` ("image" or "latent") network.

  The configs in `configs/` start from this and override what differs.
  """
  if model not in MODEL_SCHEMAS:
    raise ConfigError(f"config.model.name={model!r}; use one of {tuple(MODEL_SCHEMAS)}.")
  config = ConfigDict()
  config.seed = 0                  # weights init, data order, noise
  # Fine-tuning (diffit_jax/finetune.py): first weights from an official .safetensors, a
  # converted checkpoint or a training WORKDIR[@STEP]; "": from scratch. Weights only.
  config.init_from = ""
  config.init_from_params = "ema"  # which weights of a training run: "ema" | "params"
  config.model = MODEL_SCHEMAS[model]()
  config.diffusion = diffusion_config()
  config.data = data_config()
  config.vae = ""                  # latent models: a converted SD VAE, to decode sample grids
  config.batch_size = 256          # global batch, split over every device
  config.num_train_steps = 100_000
  config.optimizer = ConfigDict(dict(
      name="adam",                 # "adam" | "adamw"
      learning_rate=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,            # adamw only
      warmup_steps=0,              # linear learning-rate warm-up (0: none)
      grad_clip_norm=0.0,          # clip the global gradient norm (0: no clipping)
  ))
  config.ema = ConfigDict(dict(
      decay=0.0,                   # constant EMA decay (e.g. 0.9999), or
      halflife_kimg=0.0,           # EDM's half-life in thousands of images, and
      rampup_ratio=0.0,            # its ramp-up (half-life <= ratio x images seen); 0: none
  ))
  config.sampler = sampler_config()
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000  # 0: only at the end (and on SIGTERM)
  config.sample_every_steps = 10_000     # EMA sample grids in WORKDIR/samples; 0: none
  config.keep_checkpoints = 3            # newest checkpoints kept
  config.sample_grid = ConfigDict(dict(
      classes=(),                  # class-conditional: one row per class (): the first 10
      per_class=8,                 # class-conditional: samples per row
      num_images=64,               # unconditional: samples in the grid
      seed=0,
      scale=1,                     # draw each pixel scale x scale
      num_steps=0,                 # sampler steps of the grids; 0: config.sampler.num_steps
  ))
  config.eval = ConfigDict(dict(
      every_steps=0,               # periodic FID; 0: off
      num_samples=50_000,
      batch_size=256,
      inception="",                # a converted Inception (python -m diffit_jax.convert inception)
      reference="",                # reference statistics or images (python -m diffit_jax.evaluate)
  ))
  config.mesh = mesh_config()
  config.step_impl = "jit"         # or "shard_map": data parallel with an explicit all-reduce
  # Multi-process runs: a coordinator here or in JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES,
  # JAX_PROCESS_ID); auto=True lets JAX detect TPU pods, SLURM, etc.
  config.distributed = ConfigDict(dict(
      coordinator_address="",      # host:port of process 0
      num_processes=0,             # 0: from the environment
      process_id=-1,               # -1: from the environment
      auto=False,
  ))
  return config


# ----------------------------------------------------------------------------------------
# Checking a config against the schema.


def field_paths(config: Any, prefix: str = "config") -> dict[str, bool]:
  """{dotted path: whether it is a group} of every field and group in `config`."""
  paths = {}
  for key in config.keys():
    value, path = config[key], f"{prefix}.{key}"
    group = isinstance(value, (ConfigDict, dict))
    paths[path] = group
    if group:
      paths.update(field_paths(value, path))
  return paths


def unknown_field(path: str, declared: list[str], model: str) -> ConfigError:
  """The error for a field not in `declared`, naming the closest one (a sibling first)."""
  parent, _, key = path.rpartition(".")
  siblings = {p.rpartition(".")[2]: p for p in declared if p.rpartition(".")[0] == parent}
  elsewhere = {p.rpartition(".")[2]: p for p in reversed(declared)}  # a misplaced field
  close = [names[k] for names in (siblings, elsewhere)
           for k in difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)]
  where = f" of the {model!r} model" if parent == "config.model" else ""
  hint = f"; did you mean {close[0]}?" if close else f"; the fields there are {sorted(siblings)}."
  return ConfigError(f"{path} is not a field{where}{hint}")


def _check_declared(config: Any, model: str) -> None:
  """Raises ConfigError for a field of `config` that `base_config(model)` does not declare."""
  have, want = field_paths(config), field_paths(base_config(model))
  for path, group in have.items():
    if path in want and want[path] == group:
      continue
    if path in want:
      raise ConfigError(f"{path} must be {'a group of fields' if want[path] else 'a value'}.")
    parent = path.rpartition(".")[0]
    if parent in have and parent not in want:
      continue  # reported for the parent
    raise unknown_field(path, list(want), model)


def check_config(config: Any) -> None:
  """Raises ConfigError unless `config` has exactly the fields of `base_config(model)`.

  An unknown field is named with the closest declared one, e.g. "config.optimizer.learnig_rate
  is not a field; did you mean config.optimizer.learning_rate?".
  """
  model = config.model.name if "model" in config and "name" in config.model else "image"
  _check_declared(config, model)
  want = field_paths(base_config(model))
  missing = [p for p in want if p not in field_paths(config)]
  if missing:
    raise ConfigError(f"{missing[0]} is missing: a config starts from "
                      "diffit_jax.config_lib.base_config(), which declares every field.")


def from_saved(saved: Mapping[str, Any], source: str) -> ConfigDict:
  """A config saved as JSON (a run's config.json, a checkpoint's copy), read back through the
  schema.

  A field the saved copy lacks (it was written before the field existed) takes the schema's
  default; one the schema does not declare is refused, as `check_config` refuses it.

  Args:
    saved: the saved config, as `json.load` returns it.
    source: where it was read, for messages.

  Returns:
    An unlocked config with every field of `base_config(model)`.

  Raises:
    ConfigError: a field the schema does not declare (named with `source`).
  """
  saved = ConfigDict(saved)
  model = saved.model.name if "model" in saved and "name" in saved.model else "image"
  try:
    config = base_config(model)
    _check_declared(saved, model)
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None

  def fill(group: ConfigDict, values: ConfigDict, prefix: str) -> None:
    for key in values.keys():
      if isinstance(group[key], ConfigDict):
        fill(group[key], values[key], f"{prefix}.{key}")
        continue
      try:
        group[key] = values[key]  # JSON lists become the schema's tuples
      except TypeError as e:
        raise ConfigError(f"{source}: {prefix}.{key}={values[key]!r}: {e}") from None
  fill(config, saved, "config")
  return config


# ----------------------------------------------------------------------------------------
# Fields taken from the dataset.

# Values that leave a field to the dataset, filled when training starts (`fill_from_data`):
# a preset for one's own images (configs/custom_folder.py) then fits any resolution.
FROM_DATA = {
    "data.image_size": 0, "data.channels": 0,                  # the images as stored
    "model.image_size": 0, "model.input_size": 0,              # the side config.data yields
    "model.in_channels": 0, "model.out_channels": 0,           # its channels (out: in's)
    "model.num_classes": -1,                                   # the dataset's classes
}


def left_to_data(config: Any) -> list[str]:
  """The fields of `config` that hold their FROM_DATA value, as `config.a.b=v` strings."""
  left = []
  for path, value in FROM_DATA.items():
    group, key = path.split(".")
    if key in config[group] and config[group][key] == value:
      left.append(f"config.{path}={value}")
  return left


def fill_from_data(config: Any, example_shape: tuple[int, int, int], num_classes: int
                   ) -> list[str]:
  """Sets the fields left to the dataset (FROM_DATA) in place; returns them, set.

  Args:
    config: a config; changed in place.
    example_shape: (H, W, C) of one example as `config.data` yields it (images after their
      center crop, or one latent).
    num_classes: the dataset's number of classes (0: it has no labels).

  Raises:
    ConfigError: `config.model.num_classes=-1` for a dataset without classes.
  """
  h, _, c = (int(n) for n in example_shape)
  data, model = config.data, config.model
  is_latent_data = str(data.name).startswith("latents:")
  wanted = {("data", "image_size"): None if is_latent_data else h,
            ("data", "channels"): None if is_latent_data else c,
            ("model", "image_size"): h, ("model", "input_size"): h,
            ("model", "in_channels"): c, ("model", "num_classes"): num_classes}
  filled = []
  for (group, key), value in wanted.items():
    if key in config[group] and value is not None and config[group][key] == FROM_DATA[
        f"{group}.{key}"]:
      if key == "num_classes" and not value:
        raise ConfigError(
            f"config.model.num_classes=-1 takes the classes of the dataset, but {data.name} has "
            "none (its images were not in class sub-folders): train an unconditional model "
            "(config.model.num_classes=0, config.diffusion.class_dropout_prob=0, "
            "config.sampler.guidance.scale=1) or rebuild the dataset from class sub-folders.")
      config[group][key] = value
      filled.append(f"config.{group}.{key}={value}")
  if "out_channels" in model and model.out_channels == FROM_DATA["model.out_channels"]:
    model.out_channels = model.in_channels
    filled.append(f"config.model.out_channels={model.out_channels}")
  return filled


# ----------------------------------------------------------------------------------------
# Loading config files.


def shipped_configs_dir() -> str:
  """The folder of the configs that ship with diffit_jax.

  An installed wheel holds them in the package `diffit_jax.configs` (setup.py maps the
  repository's `configs/` there); a checkout, or an editable install of one, has them in
  `configs/` beside the `diffit_jax` package.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  for folder in (os.path.join(package, "configs"),
                 os.path.join(os.path.dirname(package), "configs")):
    if os.path.isdir(folder):
      return folder
  raise ConfigError(f"diffit_jax at {package} has no configs: reinstall it "
                    "(`pip install diffit_jax`), or pass the path of a config file.")


def shipped_configs() -> list[str]:
  """The names of the shipped configs, e.g. ["cifar10", ..., "mnist_demo"]."""
  return sorted(name[:-3] for name in os.listdir(shipped_configs_dir())
                if name.endswith(".py") and not name.startswith("_"))


def _resolve(path: str) -> str:
  """The config file `path` names: itself if it exists, else a shipped config.

  A bare name (`mnist_demo`, `mnist_demo.py`) is a shipped config, from any folder; so is
  `configs/NAME.py` (the commands in the configs' docstrings) outside a checkout.
  """
  if os.path.exists(path):
    return path
  folder, name = os.path.split(path)
  stem = name[:-3] if name.endswith(".py") else name
  names = shipped_configs()
  if folder in ("", "configs") and stem in names:
    return os.path.join(shipped_configs_dir(), stem + ".py")
  shipped = ", ".join(names)
  if folder:
    raise FileNotFoundError(f"config file {path} does not exist; pass an existing file or the "
                            f"name of a shipped config ({shipped}).")
  raise FileNotFoundError(f"no config named {path!r}; the shipped configs are {shipped} "
                          "(e.g. --config=mnist_demo), or pass the path of a config file.")


def _split(spec: str, relative_to: str | None) -> tuple[str, str | None]:
  path, _, arg = spec.partition(":")
  if relative_to is not None and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  return _resolve(path), arg or None


def _import(path: str):
  name = "_diffit_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None).")
  return module


def config_args(path: str) -> tuple[str, ...]:
  """The `:arg` variants the config file at `path` accepts (its `ARGS`)."""
  return tuple(getattr(_import(_split(path, None)[0]), "ARGS", ()))


def load_config(spec: str, relative_to: str | None = None) -> ConfigDict:
  """Loads `path[:arg]`, returns `get_config(arg)` checked against the schema.

  Args:
    spec: a config file path or the name of a shipped config (`mnist_demo`, see
      `shipped_configs`), optionally followed by `:arg`, one of the file's `ARGS`. A path
      that exists wins over a name.
    relative_to: a file whose folder relative paths are resolved against (pass
      `__file__` from inside a config to load a sibling).

  Raises:
    FileNotFoundError: no such file, and no shipped config of that name.
    ConfigError: an `arg` the file does not list, or a field the schema does not declare.
  """
  path, arg = _split(spec, relative_to)
  module = _import(path)
  args = tuple(getattr(module, "ARGS", ()))
  if arg is not None and arg not in args:
    name = spec.partition(":")[0] if relative_to is None else path  # as the user wrote it
    valid = (f"use one of {', '.join(f'{name}:{a}' for a in args)} or {name} alone" if args
             else f"{name} takes none")
    raise ConfigError(f"config {name} has no variant {arg!r}; {valid}.")
  config = module.get_config(arg)
  check_config(config)
  return config


def overridden_paths(argv: Sequence[str], name: str = "config") -> list[str]:
  """The dotted fields of the `--NAME.a.b=v` / `--[no]NAME.a.b` overrides in a command line
  `argv`, e.g. `["config.model.depth"]`. Only a CLI entry point knows its command line."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
  return [f"config.{m.group(1)}" for m in map(pattern.match, argv) if m]


class _ConfigFileParser(ConfigFileFlagParser):
  """`load_config` for `--config=path[:arg]`; also checks the overrides' field names."""

  def __init__(self, name: str, argv: Sequence[str]):
    super().__init__(name, lock_config=True)
    self._argv = argv  # absl gives a flag parser only the flag's value, not the overrides

  def parse(self, path):
    config = load_config(path)
    fields = field_paths(config)
    for field in overridden_paths(self._argv, self.name):
      if field not in fields:
        raise unknown_field(field, list(fields), config.model.name)
    if self._lock_config:
      config.lock()
    return config


def DEFINE_config_file(name: str, help_string: str, *, flag_values: flags.FlagValues,
                       argv: Sequence[str], required: bool = True
                       ) -> flags.FlagHolder:  # pylint: disable=invalid-name
  """A `--NAME=X[:arg]` flag (a shipped config's name or a file) read by `load_config`, with
  `--NAME.a.b=v` overrides, defined in a command's `flag_values`; `argv` is the command line
  it parses (the overrides are read from it)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True, sys_argv=list(argv))
  flag_values[name].parser = _ConfigFileParser(name, argv)
  if required:
    flags.mark_flag_as_required(name, flag_values=flag_values)
  return holder
