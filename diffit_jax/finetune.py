"""Fine-tuning: a run's first weights from NVIDIA's release or an earlier run (`config.init_from`).

This file owns reading a fine-tuning source, fitting its weights to the run's network and
putting them into the fresh train state: the run set-up (`run.resolve_run`) calls
`adopt_architecture` and `load_source` before anything is written or compiled, and the
trainer calls `start_from` once the state is initialised.
`config.init_from` names the source:

  * an official `.safetensors` file (NVIDIA's `diffit_256.safetensors`, ...), read and
    checked by `convert.diffit.convert_diffit` (no pickle is ever read);
  * a converted checkpoint folder (`python -m diffit_jax.convert diffit`);
  * a training workdir: its newest intact checkpoint, or `WORKDIR@STEP`, read through
    `checkpoint.load_run_params` (integrity-checked).

Only weights are taken; the optimizer, step, RNG and data position start fresh. The params
and the EMA both start from the source's EMA weights (what samplers use and what NVIDIA
released), or, with `config.init_from_params = "params"`, from a training run's raw weights.

The network's architecture comes from the source unless the config says otherwise
(`adopt_architecture`, before anything else of the run, reading only the source's
architecture: a safetensors header's shapes, a checkpoint's saved config): every
`config.model` field that shapes the network (depth, widths, heads, patch size, stages, ...)
takes the source's value, except the fields set explicitly (the CLI's
`--config.model.depth=...`, passed down as `overrides`), the fields tied to the data
(`in_channels`, `out_channels`), and what may change, which the run's config decides:

  * the number of classes (`num_classes`): the label table's class rows are drawn afresh
    (N(0, 0.02), the official initialisation, from `config.seed`) and its last row, the
    null class of classifier-free guidance (index `num_classes`), keeps the source's null
    row, so the unconditional prediction is the source's. A conditional source made
    unconditional folds its null row into the time embedder's last bias (the run computes
    the source's unconditional prediction exactly); an unconditional source made
    conditional gets a zero null row (the same guarantee).
  * the resolution (`input_size` / `image_size`): the latent model's fixed sin-cos position
    embedding is no parameter and is computed for the new token grid; a relative position
    bias table whose window changed is resized as Swin does (bicubic, PyTorch's
    `interpolate(mode="bicubic", align_corners=False)`, on its (2w-1) x (2w-1) grid of
    offsets, per head); a table whose window stays the same is copied.

The source's weights must then fit the network `config.model` describes (each adapted
tensor is logged); anything else that differs (an architecture field set on the command
line to another value than the source's, other channels) is refused with
`IncompatibleSourceError`, which names the tensors and the model fields that differ. A run
whose workdir already holds checkpoints resumes from them and reads no source: its
architecture is the one its `config.json` saved.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import models
from diffit_jax.config_lib import ConfigError

WEIGHTS = ("ema", "params")  # config.init_from_params
LABEL_TABLE = ("y_embedder", "embedding_table", "embedding")
TIME_BIAS = ("t_embedder", "fc2", "bias")  # the time token's last bias (c = t_emb + y_emb)
BIAS_TABLE = "relative_position_bias_table"
LABEL_INIT_STD = 0.02  # the official label table's N(0, 0.02)
# Model fields that change how, not what, the network computes: free to differ.
IMPLEMENTATION_FIELDS = ("attention", "dtype", "remat", "remat_policy", "scan_blocks",
                         "scan_unroll", "dropout_rate")
# Model fields the run's config decides even when fine-tuning: what can be adapted, what the
# data fixes, and how (not what) the network computes.
RUN_FIELDS = ("name", "num_classes", "input_size", "image_size", "window_size", "in_channels",
              "out_channels") + IMPLEMENTATION_FIELDS
_MAX_LISTED = 6  # tensors named in a refusal; the rest are counted


class IncompatibleSourceError(ConfigError):
  """`config.init_from` cannot be read, or its weights do not fit the run's network."""


@dataclasses.dataclass
class Source:
  """A fine-tuning source's weights, already fitted to the run's network."""
  spec: str                           # config.init_from as given
  params: dict[tuple, np.ndarray]     # {parameter path: float32 array}, the run's structure
  adapted: list[str]                  # one line per tensor that was not copied as is


# ----------------------------------------------------------------------------------------
# Reading a source.


def _split_step(spec: str) -> tuple[str, int | None]:
  """"runs/a@500" -> ("runs/a", 500); a path without a numeric @suffix -> (path, None)."""
  path, at, step = spec.rpartition("@")
  if at and step.isdigit() and os.path.isdir(path):
    return path, int(step)
  return spec, None


def _source_kind(spec: str, weights: str) -> tuple[str, int | None, str]:
  """(path, step, kind) of `config.init_from`: kind is "run", "converted" or "official".

  Raises:
    IncompatibleSourceError: the path is none of those, or `weights` does not apply to it.
  """
  path, step = _split_step(spec)
  field = f"config.init_from={spec}"
  is_run = checkpoint_lib.is_run(path)
  if weights == "params" and not is_run:
    raise IncompatibleSourceError(
        f"config.init_from_params='params' takes the raw weights of a training run, but "
        f"{field} is not a training workdir (released and converted weights are EMA weights "
        "only); set config.init_from_params='ema'.")
  if is_run:
    kind = "run"
  elif checkpoint_lib.is_weights_checkpoint(path):
    kind = "converted"
  elif path.endswith(".safetensors") or os.path.isfile(path):
    kind = "official"
  else:
    raise IncompatibleSourceError(
        f"{field} does not exist or is none of: an official .safetensors file, a folder "
        "written by `python -m diffit_jax.convert diffit`, a training workdir (its "
        "checkpoints/ folder), WORKDIR@STEP.")
  return path, step, kind


def _converted_config(path: str, spec: str) -> ml_collections.ConfigDict:
  """The config of a converted DiffiT checkpoint (`IncompatibleSourceError`: another kind)."""
  try:
    return checkpoint_lib.converted_config(path)
  except checkpoint_lib.WrongCheckpointError as e:
    raise IncompatibleSourceError(f"config.init_from={spec}: {e}") from None


def read_architecture(spec: str, weights: str = "ema") -> Any:
  """The `config.model` of the source `config.init_from` names, reading no weights.

  An official `.safetensors` file's model is detected from the tensor shapes of its header
  (as `convert.diffit.convert_diffit` detects it from the tensors); a converted checkpoint's
  and a training workdir's is the config saved with it.

  Raises:
    IncompatibleSourceError: see `_source_kind`; a file whose header is not an official
      latent DiffiT's.
    FileNotFoundError, files.DamagedFileError: a workdir without a readable config.
    ConfigError: a saved config with a field the schema does not declare.
  """
  from diffit_jax.convert import diffit as convert_diffit  # pylint: disable=g-import-not-at-top
  from diffit_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top

  path, _, kind = _source_kind(spec, weights)
  if kind == "run":  # one run, one architecture: its config.json (or a checkpoint's copy)
    return checkpoint_lib.recover_run_config(path)[0].model
  if kind == "converted":
    return _converted_config(path, spec).model
  try:
    header = safetensors_io.strip_prefixes(safetensors_io.read_safetensors_header(path))
    detected, guessed = convert_diffit.detect_model(header, path)
    return convert_diffit.config_for(detected, guessed, None, path).model
  except safetensors_io.ConversionError as e:
    raise IncompatibleSourceError(f"config.init_from={spec}: {e}") from e


def read_source(spec: str, weights: str = "ema") -> tuple[dict[tuple, np.ndarray], Any, str]:
  """Reads the weights `config.init_from` names, checked, as host float32 arrays.

  Args:
    spec: an official `.safetensors` file, a converted checkpoint folder, or a training
      workdir (optionally `WORKDIR@STEP`).
    weights: "ema" or "params" (a training run's raw weights).

  Returns:
    ({parameter path: array}, the source's `config.model`, a description for the log).

  Raises:
    IncompatibleSourceError: the path is none of those, or cannot be read.
    FileNotFoundError, checkpoint.CorruptCheckpointError: a workdir without a usable
      checkpoint.
  """
  from diffit_jax.convert import diffit as convert_diffit  # pylint: disable=g-import-not-at-top
  from diffit_jax.convert.safetensors_io import ConversionError  # pylint: disable=g-import-not-at-top

  path, step, kind = _source_kind(spec, weights)
  field = f"config.init_from={spec}"
  try:
    if kind == "run":
      tree, config = checkpoint_lib.load_run_params(path, step, which=weights)
      model = config.model
      what = f"{'raw' if weights == 'params' else 'EMA'} weights of the run {path}" + (
          f" at step {step}" if step is not None else " (newest checkpoint)")
    elif kind == "converted":
      model = _converted_config(path, spec).model
      tree, _ = checkpoint_lib.load_weights(path, kind="diffit")
      what = f"the converted checkpoint {path}"
    else:
      tree, config, _ = convert_diffit.convert_diffit(path)
      model = config.model
      what = f"the official weights {path}"
  except ConversionError as e:
    raise IncompatibleSourceError(f"{field}: {e}") from e
  flat = {tuple(path): np.asarray(jax.device_get(v), np.float32)
          for path, v in traverse_util.flatten_dict(tree).items()}
  bad = [_name(path) for path, v in flat.items() if not np.isfinite(v).all()]
  if bad:
    raise IncompatibleSourceError(f"{field}: {len(bad)} tensor(s) hold NaN/Inf ("
                                  f"{', '.join(bad[:_MAX_LISTED])}); pass another source.")
  return flat, model, what


# ----------------------------------------------------------------------------------------
# Fitting the weights to the run's network.


def resize_bicubic(grid: np.ndarray, size: int) -> np.ndarray:
  """Resizes the two leading axes of `grid` (s, s, ...) to (size, size, ...).

  PyTorch's `interpolate(mode="bicubic", align_corners=False)`, the way Swin resizes its
  relative position bias tables: Keys' cubic kernel with a = -0.75 on the source
  coordinates (i + 0.5) * s / size - 0.5, border samples repeated. Computed in float64.
  """
  s = grid.shape[0]
  a = -0.75
  src = (np.arange(size) + 0.5) * (s / size) - 0.5  # (size,)
  base = np.floor(src).astype(int)
  t = src - base
  # Keys' kernel at distances 1 + t, t, 1 - t, 2 - t from the four taps base-1 .. base+2.
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  taps = np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=1)  # (size, 4)
  matrix = np.zeros((size, s))  # (size, s): output row <- source rows
  for k in range(4):
    np.add.at(matrix, (np.arange(size), np.clip(base - 1 + k, 0, s - 1)), taps[:, k])
  out = np.einsum("is,sj...->ij...", matrix, grid.astype(np.float64))  # rows
  out = np.einsum("jt,it...->ij...", matrix, out)  # columns
  return out.astype(grid.dtype)


def resize_bias_table(table: np.ndarray, rows: int) -> np.ndarray:
  """A relative position bias table (..., (2w-1)^2, heads) resized to `rows` = (2w'-1)^2."""
  s, size = int(round(table.shape[-2] ** 0.5)), int(round(rows ** 0.5))
  lead = table.shape[:-2]
  grid = np.moveaxis(table.reshape(*lead, s, s, table.shape[-1]), (-3, -2), (0, 1))
  out = resize_bicubic(grid, size)  # (size, size, ..., heads)
  return np.moveaxis(out, (0, 1), (-3, -2)).reshape(*lead, rows, table.shape[-1])


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _architecture(model_config: Any) -> dict[str, Any]:
  """The fields of a `config.model` that shape the network, sizes resolved, for messages."""
  fields = dict(model_config)
  if fields["name"] == "latent":
    fields.update(models.latent_sizes(model_config))
    fields.pop("variant")
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()
          if k not in IMPLEMENTATION_FIELDS}


def _field_differences(source_model: Any, run_model: Any) -> list[str]:
  source, run = _architecture(source_model), _architecture(run_model)
  return [f"{k}={source.get(k)!r} (this run: {run.get(k)!r})" for k in sorted(set(source) | set(run))
          if source.get(k) != run.get(k) and k not in ("num_classes", "input_size", "image_size",
                                                        "window_size")]


def target_shapes(model_config: Any) -> dict[tuple, tuple[int, ...]]:
  """{parameter path: shape} of the network `model_config` describes (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: models.build_model(model_config, rngs=nnx.Rngs(0)))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {tuple(path): tuple(leaf.shape) for path, leaf in flat.items()}


def fit(source: dict[tuple, np.ndarray], source_model: Any, run_model: Any, *,
        seed: int = 0, spec: str = "the source") -> tuple[dict[tuple, np.ndarray], list[str]]:
  """The source's weights fitted to the network `run_model` describes (module docstring).

  Args:
    source: {parameter path: array} of the source.
    source_model: the source's `config.model`.
    run_model: the run's `config.model`.
    seed: draws the new label rows.
    spec: the source, for messages.

  Returns:
    ({parameter path: float32 array} with exactly the run's paths and shapes, one line per
    adapted tensor).

  Raises:
    IncompatibleSourceError: a tensor that cannot be adapted (all of them named).
  """
  if source_model.name != run_model.name:
    raise IncompatibleSourceError(
        f"config.init_from={spec} is a {source_model.name!r} DiffiT but this run "
        f"trains a {run_model.name!r} one; use a config of the source's kind.")
  shapes = target_shapes(run_model)
  out, adapted, problems = {}, [], []
  null_row = source[LABEL_TABLE][-1] if LABEL_TABLE in source else None  # (D,)
  for path, shape in shapes.items():
    value = source.get(path)
    new_classes = value is None or (value.shape != shape and value.shape[1:] == shape[1:])
    if path == LABEL_TABLE and new_classes:
      table = np.random.default_rng(seed).normal(0.0, LABEL_INIT_STD, shape)  # (classes+1, D)
      table[-1] = 0.0 if null_row is None else null_row
      out[path] = table.astype(np.float32)
      adapted.append(f"{_name(path)}: {shape[0] - 1} classes drawn afresh ("
                     + (f"the source had {value.shape[0] - 1}" if value is not None
                        else "the source is unconditional")
                     + "), null-class row " + ("kept" if null_row is not None else "zero"))
    elif value is None:
      problems.append(f"{_name(path)} {shape}: absent in the source")
    elif value.shape == shape:
      out[path] = value
    elif (path[-1] == BIAS_TABLE and value.shape[:-2] == shape[:-2]
          and value.shape[-1] == shape[-1]):
      out[path] = resize_bias_table(value, shape[-2])
      adapted.append(f"{_name(path)}: {value.shape} -> {shape} (bicubic, new window)")
    else:
      problems.append(f"{_name(path)}: source {value.shape}, this run {shape}")
  for path in sorted(set(source) - set(shapes), key=_name):
    if path == LABEL_TABLE and TIME_BIAS in out and out[TIME_BIAS].shape == null_row.shape:
      # A conditional source made unconditional.
      out[TIME_BIAS] = out[TIME_BIAS] + null_row
      adapted.append(f"{_name(TIME_BIAS)}: + the source's null-class row (the run is "
                     "unconditional)")
    else:
      problems.append(f"{_name(path)} {source[path].shape}: absent in this run")
  if problems:
    listed = "; ".join(problems[:_MAX_LISTED]) + (
        f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
    fields = _field_differences(source_model, run_model)
    hint = (f" The source's config.model has {', '.join(fields)}: set those fields to the "
            "source's values" if fields else " Make config.model describe the source's network")
    raise IncompatibleSourceError(
        f"config.init_from={spec} does not fit this run's network: {len(problems)} tensor(s) "
        f"differ ({listed}).{hint}; only num_classes and the resolution can change when "
        "fine-tuning.")
  return out, adapted


# ----------------------------------------------------------------------------------------
# The run set-up's two calls (`run.resolve_run`), and the trainer's one.


def adopt_architecture(config: ml_collections.ConfigDict, workdir: str | None,
                       overrides: Iterable[str] = ()) -> list[str]:
  """Sets the `config.model` fields that the fine-tuning source decides (module docstring).

  Args:
    config: the run's config; changed in place (nothing when `config.init_from` is empty).
    workdir: the run's workdir. One that already holds checkpoints resumes with the
      architecture its `config.json` saved, so the source need not exist any more.
    overrides: the fields the user set explicitly (`config.model.depth`, ...), which keep
      the run's values: the CLI passes those of its command line
      (`config_lib.overridden_paths`); none by default.

  Returns:
    One `field=value` per field changed (also logged).

  Reads only the source's architecture (`read_architecture`: no weights); `load_source`
  reads the weights.

  Raises:
    IncompatibleSourceError: see `read_architecture`.
  """
  if not config.init_from:
    return []
  if workdir and checkpoint_lib.latest_step(workdir) is not None:
    saved, what = checkpoint_lib.recover_run_config(workdir)
    source_model = saved.model
  else:
    source_model = read_architecture(config.init_from, config.init_from_params)
    what = f"config.init_from={config.init_from}"
  set_here = {p.removeprefix("config.model.") for p in overrides}
  changed = []
  for field, value in dict(source_model).items():
    if field in RUN_FIELDS or field in set_here or field not in config.model:
      continue
    value = tuple(value) if isinstance(value, list) else value
    if config.model[field] != value:
      config.model[field] = value
      changed.append(f"{field}={value!r}")
  if changed:
    logging.info("The network's architecture from %s: %s.", what, ", ".join(changed))
  return changed


def load_source(config: ml_collections.ConfigDict, workdir: str) -> Source | None:
  """Reads and fits `config.init_from` for a run about to start in `workdir`.

  Called by `run.resolve_run` before anything is written or compiled, so a source that
  does not fit costs nothing. Returns None when there is nothing to load: no `config.init_from`, or a
  `workdir` that already holds checkpoints (the run resumes from its own).

  Raises:
    IncompatibleSourceError: see `read_source` and `fit`.
  """
  weights = config.init_from_params
  if weights not in WEIGHTS:
    raise IncompatibleSourceError(f"config.init_from_params={weights!r}; use one of {WEIGHTS}.")
  if not config.init_from:
    return None
  if checkpoint_lib.latest_step(workdir) is not None:
    logging.info("%s holds checkpoints: resuming from them, not from config.init_from=%s.",
                 workdir, config.init_from)
    return None
  flat, source_model, what = read_source(config.init_from, weights)
  params, adapted = fit(flat, source_model, config.model, seed=config.seed,
                        spec=config.init_from)
  logging.info("Fine-tuning from %s: %d tensors, %d adapted%s", what, len(params), len(adapted),
               "".join(f"\n  {line}" for line in adapted))
  return Source(config.init_from, params, adapted)


def start_from(source: Source, state: Any, shardings: Any) -> Any:
  """The freshly initialised train state with params and EMA replaced by the source's.

  Args:
    source: from `load_source`.
    state: the train state `train.create_train_state` initialised (step 0, fresh
      optimizer state, which holds no weights' values).
    shardings: the state's shardings (`Setup.shardings`).

  Returns:
    The state with `params` and `ema_params` (separate buffers) holding the source's weights.
  """
  host = traverse_util.unflatten_dict(source.params)

  def place(tree_shardings):
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host, tree_shardings)

  return state._replace(params=place(shardings.params), ema_params=place(shardings.ema_params))
