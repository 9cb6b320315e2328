"""Checkpoints: one small module over Orbax.

Two kinds of checkpoint live here:
  * weights-only checkpoints (`save_weights` / `load_weights`): a pytree of arrays
    plus a JSON metadata file (the model config, where the weights came from).
    Converters write these; the sampler and evaluator read them.
  * training checkpoints (the train state, EMA, optimizer, step, RNG and data
    iterator position) through `orbax.checkpoint.CheckpointManager`.

A checkpoint is never left half-written: everything is written into a sibling
temporary folder that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

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
