"""The run set-up: a config, a workdir and the command line's overrides -> one checked run.

`resolve_run(config, workdir, overrides)` is where every command gets the run it works on:
training (`train.train_and_evaluate`), `python -m diffit_jax.main --dry_run`, and, with no
config, `sample --workdir` and `convert export` of a workdir (the run its training saved).
On a copy of the config, in this order, before anything is written or compiled:

  1. schema        every field declared, none missing (`config_lib.check_config`);
  2. architecture  a fine-tuning source's network, unless set explicitly
                   (`finetune.adopt_architecture`: a safetensors header's shapes or a saved
                   config, no weights); a workdir with checkpoints keeps its own;
  3. data          the fields left to the dataset filled from it, and data the model cannot
                   take refused (`fit_to_data`: the dataset's description only);
  4. values        every name and value the run will use (`check_values`);
  5. source        the fine-tuning source's weights, read and fitted to the network
                   (`finetune.load_source`); None from scratch or when resuming.

The config comes back frozen: nothing downstream changes it. A dry run (`dry_run=True`)
reads the dataset only when the config leaves fields to it, and no weights. `write_config`
saves the resolved config as WORKDIR/config.json, which `resolve_run(None, workdir)` reads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import ml_collections

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import config_lib, diffusion, files, finetune, models, optim
from diffit_jax.config_lib import ConfigError

STEP_IMPLS = ("jit", "shard_map")  # config.step_impl: see train.make_train_step


class Run(NamedTuple):
  """A run, resolved: what training, a dry run, sampling and export start from."""
  config: ml_collections.FrozenConfigDict  # checked, filled from the data, read-only
  data: Any                     # data.DatasetInfo of config.data (None: not read)
  source: finetune.Source | None  # config.init_from's weights, fitted (None: none read)


def resolve_run(config: ml_collections.ConfigDict | None, workdir: str | None = None,
                overrides: Iterable[str] = (), *, dry_run: bool = False) -> Run:
  """The run `config` describes in `workdir` (module docstring), or the one `workdir` holds.

  Args:
    config: the run's config (not changed: the run gets a checked, frozen copy). None: the
      run a training workdir holds, as its training resolved and saved it
      (WORKDIR/config.json), with neither data nor source read.
    workdir: the run's folder; one that already holds checkpoints resumes with the
      architecture it saved and reads no fine-tuning source.
    overrides: the config fields the user set explicitly (`config.model.depth`, ...): those
      keep the config's values where `config.init_from`'s network would set them. The CLI
      passes those of its command line; a caller in Python gets exactly its config.
    dry_run: read the dataset only if the config leaves fields to it, and no weights.

  Raises:
    ConfigError: a field or value that cannot run (`finetune.IncompatibleSourceError`: the
      fine-tuning source), naming it and the fix.
    FileNotFoundError: no dataset where `config.data.name` points; with `config=None`, a
      workdir without config.json.
  """
  if config is None:
    return Run(ml_collections.FrozenConfigDict(checkpoint_lib.read_run_config(workdir)),
               None, None)
  config = copy.deepcopy(config)
  config_lib.check_config(config)
  finetune.adopt_architecture(config, workdir, overrides)
  info = fit_to_data(config) if not dry_run or config_lib.left_to_data(config) else None
  check_values(config)
  source = None if dry_run else finetune.load_source(config, workdir)
  return Run(ml_collections.FrozenConfigDict(config), info, source)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming a bad field or value of `config` and the fix.

  The schema (`config_lib.check_config`), then `check_values`; nothing is built, read or
  written. `resolve_run` runs the same checks, around filling the config from the data.
  """
  config_lib.check_config(config)
  check_values(config)


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming a training setting that cannot run, and the fix.

  Every name and value the run will use, for a config whose fields the schema has checked.
  """
  left = config_lib.left_to_data(config)
  if left:
    raise ConfigError(
        f"{', '.join(left)} leave these fields to the dataset, but they were not filled from "
        "it: training fills them when it starts (python -m diffit_jax.main); to sample, pass "
        "the run's --workdir, whose config.json holds them, or set them.")
  name = config.diffusion.name
  if name not in ("edm", "adm"):
    raise ConfigError(f"config.diffusion.name={name!r}; use 'edm' (image space) or 'adm' "
                      "(latent).")
  if config.step_impl not in STEP_IMPLS:
    raise ConfigError(f"config.step_impl={config.step_impl!r}; use one of {STEP_IMPLS}.")
  p = float(config.diffusion.class_dropout_prob)
  if not 0.0 <= p < 1.0:
    raise ConfigError(f"config.diffusion.class_dropout_prob={p} must be in [0, 1).")
  scale = float(config.sampler.guidance.scale)
  conditional_only = [f"{field}={off} (it is {value})" for field, value, off in (
      ("config.diffusion.class_dropout_prob", p, 0), ("config.sampler.guidance.scale", scale, 1))
                      if value != off]
  if not config.model.num_classes and conditional_only:
    raise ConfigError(
        "An unconditional model (config.model.num_classes=0) has no class labels to drop or "
        f"to guide with: set {' and '.join(conditional_only)}, or config.model.num_classes to "
        "the number of classes for a class-conditional model.")
  learn_sigma = config.model.name == "latent" and config.model.learn_sigma
  if name == "adm" and bool(learn_sigma) != bool(config.diffusion.learn_sigma):
    raise ConfigError("config.model.learn_sigma and config.diffusion.learn_sigma must agree (the "
                      "learned-variance channels are what the hybrid loss trains).")
  for key in ("num_train_steps", "batch_size", "log_every_steps"):
    if int(config[key]) <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be a positive integer.")
  keep = config.keep_checkpoints
  if keep is not None and int(keep) <= 0:
    raise ConfigError(f"config.keep_checkpoints={keep} would keep no checkpoint: the run could "
                      "neither resume nor be sampled from. Set it to a positive number (e.g. 3).")
  optim.validate_ema_config(config.ema)
  optim.validate_optimizer_config(config.optimizer)
  for group, check in (("model", lambda: models.model_kwargs(config.model)),
                       ("sampler", lambda: _check_sampler(config))):
    try:
      check()
    except ValueError as e:
      raise ConfigError(f"config.{group}: {e}") from e
  if config.eval.every_steps and not (config.eval.inception and config.eval.reference):
    raise ConfigError("config.eval.every_steps > 0 needs config.eval.inception and "
                      "config.eval.reference (see python -m diffit_jax.evaluate), or set it to 0.")


def _check_sampler(config: ml_collections.ConfigDict) -> None:
  diffusion.samplers.validate(diffusion.SamplerConfig.from_config(config),
                              models.input_shape(config.model)[1:])


def fit_to_data(config: ml_collections.ConfigDict) -> Any:
  """Fills the fields `config` leaves to the dataset; refuses data the model cannot take.

  Reads the dataset's description only (a built dataset's `dataset_info.json`, the first
  latent record); nothing is written or compiled. The fields holding their
  `config_lib.FROM_DATA` value are set from it (`config_lib.fill_from_data`), then the run is
  refused, with the fields to set, when:
    * the stored images share one size other than `config.data.image_size` (they would be
      silently up- or downscaled), unless `config.data.allow_resize`;
    * the network's input differs from what `config.data` yields;
    * a class-conditional model meets data without labels, or more classes than it has.

  Returns:
    The `data.DatasetInfo` of `config.data`.

  Raises:
    ConfigError: as above, or `config.data` names data that cannot be read.
    FileNotFoundError: no dataset where `config.data.name` points.
  """
  # Imported here: the train step itself needs no input pipeline (see train_and_evaluate).
  from diffit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    info = data_lib.get_dataset_info(config.data)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e
  filled = config_lib.fill_from_data(config, info.example_shape, info.num_classes)
  if filled:
    logging.info("From the dataset %s: %s.", config.data.name, ", ".join(filled))
  _check_stored_size(config, info)
  data, model = config.data, config.model
  want, have = tuple(models.input_shape(model)[1:]), tuple(info.example_shape)
  if want != have:
    side = "input_size" if model.name == "latent" else "image_size"
    fix = " and ".join(f"config.model.{k}={v}" for k, v, old in (
        (side, have[0], want[0]), ("in_channels", have[2], want[2])) if v != old)
    raise ConfigError(
        f"The model takes {'x'.join(map(str, want))} inputs, but {data.name} yields "
        f"{'x'.join(map(str, have))} examples (H x W x C): set {fix}.")
  num_classes = int(model.num_classes)
  if num_classes and not info.num_classes:
    raise ConfigError(
        f"config.model.num_classes={num_classes} makes a class-conditional model, but "
        f"{data.name} has no class labels: for an unconditional model set "
        "config.model.num_classes=0, config.diffusion.class_dropout_prob=0 and "
        "config.sampler.guidance.scale=1.")
  if info.num_classes > num_classes > 0:
    raise ConfigError(f"{data.name} has {info.num_classes} classes, more than "
                      f"config.model.num_classes={num_classes}: set config.model.num_classes="
                      f"{info.num_classes}.")
  return info


def _check_stored_size(config: ml_collections.ConfigDict, info: Any) -> None:
  """Refuses images stored at one size other than `config.data.image_size`, unless resized
  on purpose (`config.data.allow_resize`)."""
  data = config.data
  if info.stored_shape is None or data.allow_resize:
    return
  (h, w, _), size = info.stored_shape, info.example_shape[0]
  if (h, w) != (size, size):
    how = "upscale" if size > min(h, w) else "center-crop and downscale"
    fix = (f"set config.data.image_size={h} and config.model.image_size={h} (0 in both "
           "takes the dataset's, as configs/custom_folder.py does)" if h == w else
           "rebuild it square (python -m diffit_jax.data build --resolution=N)")
    raise ConfigError(
        f"{data.name} holds {h}x{w} images, but config.data.image_size={size} would {how} "
        f"them: {fix}, or set config.data.allow_resize=True to resize them.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json; warns about fields that differ from the previous run's.

  A previous config.json that does not parse is moved aside (kept, not overwritten) with one
  warning: this run's config, and each checkpoint's own copy, say what the run is.
  """
  path = os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
  new = json.loads(config.to_json())
  try:
    old = json.loads(checkpoint_lib.read_run_config(workdir).to_json())
  except FileNotFoundError:
    old = None
  except files.DamagedFileError as e:
    old = None
    logging.warning("%s; moved it to %s and wrote this run's config in its place.", e.problem,
                    files.move_aside(path))
  except config_lib.ConfigError as e:  # written by a diffit_jax with other fields
    old = None
    logging.warning("%s; writing this run's config in its place.", e)
  if old is not None:
    flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (
        flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
    changed = sorted(k for k in set(flat(old)) | set(flat(new)) if flat(old).get(k) != flat(new).get(k))
    if changed:
      logging.warning("Config differs from the previous run in this workdir: %s", changed)
  files.write_json(path, new)
