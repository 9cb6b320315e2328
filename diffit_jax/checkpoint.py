"""Checkpoints: one small module over Orbax.

Two kinds of checkpoint live here:
  * weights-only checkpoints (`save_weights` / `load_weights`): a pytree of arrays
    plus a JSON metadata file (the model config, where the weights came from).
    Converters write these; the sampler and evaluator read them.
  * training checkpoints (`TrainCheckpointer`, `load_ema_params`): the train state,
    EMA, optimizer, step, RNG and data iterator position through
    `orbax.checkpoint.CheckpointManager`, laid out as

        WORKDIR/checkpoints/<step>/
          train_state/     step, rng, params, opt_state (StandardSave, sharded arrays)
          ema_params/      the EMA weights alone, so samplers can read just them
          data_iterator/   grain iterator position, one JSON file per process
          config/          the resolved run config (JSON)

A checkpoint is never left half-written: everything is written into a sibling
temporary folder that is renamed into place only once complete (Orbax does the same
for training checkpoints: a step folder appears only when finalized, and a restart
ignores and removes unfinished `*.orbax-checkpoint-tmp-*` folders).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"


def save_weights(path: str, tree: Any, *, metadata: dict, overwrite: bool = False) -> None:
  """Atomically writes a pytree of arrays and its JSON metadata to the folder `path`.

  Args:
    path: destination folder; must not exist unless `overwrite`.
    tree: nested dict of arrays (numpy or jax).
    metadata: JSON-serialisable dict stored beside the weights (e.g. the model config).
    overwrite: replace an existing checkpoint at `path`.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; choose another destination or pass overwrite.")
  json.dumps(metadata)  # Fail before writing anything if metadata is not serialisable.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, WEIGHTS_DIR), tree)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def load_metadata(path: str) -> dict:
  """Reads the metadata of a weights checkpoint written by `save_weights`."""
  meta_path = os.path.join(os.path.abspath(path), METADATA_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{path} is not a diffit_jax weights checkpoint (no {METADATA_FILE}); "
        "create one with `python -m diffit_jax.convert`.")
  with open(meta_path) as f:
    return json.load(f)


def load_weights(path: str, target: Any = None) -> tuple[Any, dict]:
  """Loads a weights checkpoint written by `save_weights`.

  Args:
    path: the checkpoint folder.
    target: optional pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
      giving the structure, dtypes and placement to restore into.

  Returns:
    (tree, metadata).
  """
  metadata = load_metadata(path)
  checkpointer = ocp.StandardCheckpointer()
  weights = os.path.join(os.path.abspath(path), WEIGHTS_DIR)
  tree = checkpointer.restore(weights, target) if target is not None else checkpointer.restore(weights)
  return tree, metadata


# ----------------------------------------------------------------------------------------
# Training checkpoints.

TRAIN_CHECKPOINT_DIR = "checkpoints"
STATE_ITEM, EMA_ITEM, DATA_ITEM, CONFIG_ITEM = "train_state", "ema_params", "data_iterator", "config"


def _int_keys(tree: Any) -> Any:
  """Orbax stores dict keys as strings; NNX list indices are ints. Restores them."""
  if isinstance(tree, Mapping):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}
  return tree


class TrainCheckpointer:
  """Saves and restores training checkpoints in `WORKDIR/checkpoints` (layout above).

  Saves are asynchronous: `save` returns once the arrays are copied off the devices
  (so the caller may donate them to the next step), and the files are written in the
  background; `wait_until_finished` blocks until the last one is finalized.

  Args:
    workdir: the run folder.
    max_to_keep: keep only the newest N checkpoints (None keeps all).
    async_save: write in a background thread.
  """

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest finalized checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Mapping[str, Any], *, data_iterator: Any = None,
           config: Mapping[str, Any] | None = None) -> None:
    """Starts saving checkpoint `step`.

    Args:
      step: the number of optimizer steps taken.
      state: the train state as a mapping of pytrees of jax arrays; its "ema_params"
        entry is stored as its own item.
      data_iterator: a grain iterator whose position is saved (None: not saved).
      config: the JSON-serialisable run config.
    """
    state = dict(state)
    items = {STATE_ITEM: ocp.args.StandardSave({k: v for k, v in state.items()
                                                if k != EMA_ITEM})}
    if EMA_ITEM in state:
      items[EMA_ITEM] = ocp.args.StandardSave(state[EMA_ITEM])
    if data_iterator is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(dict(config))
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Mapping[str, Any], *,
              data_iterator: Any = None) -> dict[str, Any]:
    """Restores checkpoint `step` into the structure, dtypes and shardings given.

    Args:
      step: a step from `all_steps()`.
      abstract_state: mapping of pytrees of `jax.ShapeDtypeStruct` (with shardings),
        including "ema_params", as `save` received it.
      data_iterator: a grain iterator to move to the saved position (in place).

    Returns:
      The train state as a dict of pytrees of arrays.
    """
    abstract_state = dict(abstract_state)
    items = {STATE_ITEM: ocp.args.StandardRestore({k: v for k, v in abstract_state.items()
                                                   if k != EMA_ITEM})}
    if EMA_ITEM in abstract_state:
      items[EMA_ITEM] = ocp.args.StandardRestore(abstract_state[EMA_ITEM])
    if data_iterator is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(
          f"Checkpoint {self.directory}/{step} does not match this run's train state "
          "(a different model, optimizer or mesh config?). Use a fresh --workdir or the "
          f"config the checkpoint was written with ({e})") from e
    state = dict(restored[STATE_ITEM])
    if EMA_ITEM in abstract_state:
      state[EMA_ITEM] = restored[EMA_ITEM]
    return state

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_ema_params(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """The EMA weights of a training run, for samplers and exporters.

  Args:
    workdir: the run folder given to `python -m diffit_jax.main`.
    step: which checkpoint; None: the newest.

  Returns:
    (params, config): the EMA parameters as a pure nested dict of host numpy arrays
    (the structure of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; put them into a
    model with `nnx.replace_by_pure_dict`), and the run's resolved config as a dict.
  """
  directory = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"{workdir} holds no training checkpoints (no {TRAIN_CHECKPOINT_DIR}/ folder); pass "
        "the --workdir of a `python -m diffit_jax.main` run.")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={EMA_ITEM: ocp.PyTreeCheckpointHandler(),
                     CONFIG_ITEM: ocp.JsonCheckpointHandler()})
  try:
    steps = list(manager.all_steps())
    if step is None:
      if not steps:
        raise FileNotFoundError(f"{directory} has no finished checkpoint yet.")
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{directory} has no checkpoint for step {step}; it has {steps}.")
    metadata = manager.item_metadata(step)
    ema_meta = metadata[EMA_ITEM]
    ema_meta = getattr(ema_meta, "tree", ema_meta)
    # Host numpy arrays: independent of the mesh the run was saved from.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ema_meta)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        EMA_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args),
        CONFIG_ITEM: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  return _int_keys(restored[EMA_ITEM]), dict(restored[CONFIG_ITEM])
