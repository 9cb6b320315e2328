"""Checkpoints: one small module over Orbax.

This module is the one door to what training and the converters write: it alone opens
Orbax checkpoint managers, reads a run's config.json and a checkpoint's metadata, and finds
the newest intact checkpoint. Two kinds of checkpoint live here:
  * weights-only checkpoints (`save_weights` / `load_weights`): a pytree of arrays
    plus a JSON metadata file (the model config, where the weights came from).
    Converters write these; the sampler and evaluator read them, and
    `load_metadata(path, kind=...)` refuses one of another kind (a VAE for a DiffiT).
  * training checkpoints (`TrainCheckpointer`, `load_run_params`): the train state,
    EMA, optimizer, step, RNG and data iterator position through
    `orbax.checkpoint.CheckpointManager`, laid out as

        WORKDIR/checkpoints/<step>/
          train_state/     step, rng, params, opt_state (StandardSave, sharded arrays)
          ema_params/      the EMA weights alone, so samplers can read just them
          data_iterator/   grain iterator position, one JSON file per process
          config/          the resolved run config (JSON)
          integrity.json   size and crc32 of every file above (Orbax and TensorStore
                           keep no checksums of their own)

A checkpoint is never left half-written: everything is written into a sibling
temporary folder that is renamed into place only once complete (Orbax does the same
for training checkpoints: a step folder appears only when finalized, and a restart
ignores and removes unfinished `*.orbax-checkpoint-tmp-*` folders). The integrity
record is written into that temporary folder after the last array is written and
before the rename, so it is committed with the checkpoint. Restores check it: a
checkpoint whose files changed on disk (a flipped byte, a truncated or deleted file)
is skipped for the newest one that is intact, and set aside in
WORKDIR/rejected_checkpoints/.

The configs saved with weights (`read_run_config`, `recover_run_config`, `converted_config`,
the config `load_run_params` returns) are read back through the schema
(`config_lib.from_saved`), so one written before a field existed has the field's default.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffit_jax import config_lib, files, logging_utils

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
  needed = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))
  files.check_space(path, needed)
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  try:
    with files.writing(path, needed):
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


# The kinds of weights checkpoint the converters write: what each is, and the command that
# writes one (for the message that refuses another kind).
KINDS = {
    "diffit": ("a DiffiT network",
               "python -m diffit_jax.convert diffit --src=diffit_256.safetensors --out=DIR"),
    "vae": ("a VAE", "python -m diffit_jax.convert vae --src=SD_VAE --out=DIR"),
}


class WrongCheckpointError(ValueError):
  """A weights checkpoint of another kind than the one needed, or one without its config."""


def load_metadata(path: str, kind: str | None = None) -> dict:
  """Reads the metadata of a weights checkpoint written by `save_weights`.

  Args:
    path: the checkpoint folder.
    kind: "diffit" or "vae" (`KINDS`): check that the checkpoint is one of that kind and
      carries its model config; None: read it unchecked.

  Raises:
    FileNotFoundError: `path` holds no metadata file.
    WrongCheckpointError: it is not a checkpoint of `kind`, or carries no config; the
      message names the kind found and the command that writes the right kind.
  """
  meta_path = os.path.join(os.path.abspath(path), METADATA_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{path} is not a diffit_jax weights checkpoint (no {METADATA_FILE}); "
        "create one with `python -m diffit_jax.convert`.")
  with open(meta_path) as f:
    metadata = json.load(f)
  if kind is None:
    return metadata
  what, command = KINDS[kind]
  found = metadata.get("kind")
  if found != kind:
    raise WrongCheckpointError(
        f"{path} holds a {found!r} checkpoint, not {what}; create one with `{command}`.")
  if "config" not in metadata:
    raise WrongCheckpointError(
        f"{path} is a {kind!r} checkpoint whose {METADATA_FILE} carries no config; write it "
        f"again with `{command}` (or pass --config where the command takes one).")
  return metadata


def load_weights(path: str, target: Any = None, *, kind: str | None = None
                 ) -> tuple[Any, dict]:
  """Loads a weights checkpoint written by `save_weights`.

  Args:
    path: the checkpoint folder.
    target: optional pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
      giving the structure, dtypes and placement to restore into.
    kind: as for `load_metadata`: refuse a checkpoint of another kind before reading it.

  Returns:
    (tree, metadata).
  """
  metadata = load_metadata(path, kind=kind)
  checkpointer = ocp.StandardCheckpointer()
  weights = os.path.join(os.path.abspath(path), WEIGHTS_DIR)
  tree = checkpointer.restore(weights, target) if target is not None else checkpointer.restore(weights)
  return tree, metadata


# ----------------------------------------------------------------------------------------
# Training checkpoints.

TRAIN_CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"  # the resolved config a training run saves in its workdir
REJECTED_DIR = "rejected_checkpoints"  # in WORKDIR: checkpoints that failed a restore
INTEGRITY_FILE = "integrity.json"
STATE_ITEM, EMA_ITEM, DATA_ITEM, CONFIG_ITEM = "train_state", "ema_params", "data_iterator", "config"


class CorruptCheckpointError(ValueError):
  """A training checkpoint's files changed on disk after it was saved, or none can be restored."""


def _int_keys(tree: Any) -> Any:
  """Orbax stores dict keys as strings; NNX list indices are ints. Restores them."""
  if isinstance(tree, Mapping):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}
  return tree


def _first_line(error: BaseException, limit: int = 200) -> str:
  """An exception as one short line (TensorStore errors run to many lines)."""
  text = str(error).strip().splitlines()
  line = f"{type(error).__name__}: {text[0] if text else ''}"
  return line if len(line) <= limit else line[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------
# Integrity records: size and crc32 of every file of a training checkpoint.
#
# Cost: one sequential read of the checkpoint on process 0 when it is committed and again
# when it is restored, at zlib's crc32 speed (~1.3 GB/s on one core of a small CPU). For a
# 561 M-parameter model (weights, EMA and two Adam moments in float32: ~9 GB) that is ~7 s
# per checkpoint, in Orbax's background thread (zlib releases the GIL), so training does
# not wait for it.


def _file_digest(path: str) -> dict[str, Any]:
  """{"size", "crc32"} of one file, read in 16 MiB chunks."""
  crc, size = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return {"size": size, "crc32": f"{crc:08x}"}


def _item_files(step_dir: str) -> list[str]:
  """The files of a checkpoint's items (its sub-folders), relative to `step_dir`.

  Orbax's own files at the top of the folder are left out: it rewrites them while
  committing, after the record is written.
  """
  files = []
  for item in sorted(os.listdir(step_dir)):
    for root, _, names in os.walk(os.path.join(step_dir, item)):
      files += [os.path.relpath(os.path.join(root, name), step_dir) for name in names]
  return sorted(files)


def write_integrity_record(step_dir: str) -> None:
  """Writes `step_dir/integrity.json`: the size and crc32 of every file of its items."""
  files = {rel: _file_digest(os.path.join(step_dir, rel)) for rel in _item_files(step_dir)}
  path = os.path.join(step_dir, INTEGRITY_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"algorithm": "crc32", "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def has_integrity_record(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, INTEGRITY_FILE))


def verify_integrity(step_dir: str, items: tuple[str, ...] | None = None) -> str | None:
  """Checks a checkpoint's files against its integrity record.

  Args:
    step_dir: a checkpoint folder (`WORKDIR/checkpoints/<step>`) that has a record.
    items: check only these items' files (e.g. ("ema_params", "config")); None: all.

  Returns:
    None if every recorded file is there with its size and crc32, else why not (one line).
  """
  try:
    with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its {INTEGRITY_FILE} is unreadable ({_first_line(e)})"
  for rel, expected in sorted(files.items()):
    if items is not None and rel.split(os.sep)[0] not in items:
      continue
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"{rel} is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
      return f"{rel} has {size} bytes, not the {expected['size']} it was saved with (truncated?)"
    if _file_digest(path)["crc32"] != expected["crc32"]:
      return f"{rel} fails its crc32 check (its bytes changed on disk after it was saved)"
  return None


def _leaf_table(tree: Any) -> dict[str, tuple]:
  """{"params/encoder/0/...": (shape, dtype)} of a pytree of arrays or array metadata."""
  def name(key):
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
  return {"/".join(name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _structure_mismatch(step_dir: str, items: Mapping[str, Any]) -> str | None:
  """How the arrays saved in `step_dir` differ from `items` ({item: abstract tree}), from
  the checkpoint's metadata alone (None: they fit). Finds a changed config before any
  array is read."""
  for item, tree in items.items():
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / item)
    saved, wanted = _leaf_table(getattr(saved, "tree", saved)), _leaf_table(tree)
    for path in sorted(set(saved) | set(wanted)):
      if saved.get(path) != wanted.get(path):
        have = "absent" if path not in saved else f"{saved[path][0]} {saved[path][1]}"
        want = "absent" if path not in wanted else f"{wanted[path][0]} {wanted[path][1]}"
        return f"{item}/{path} is {have} in the checkpoint but {want} in this run"
  return None


def from_process_0(flag: bool, barrier: str) -> bool:
  """Process 0's value of `flag` on every process (it alone reads the files).

  `barrier` names a barrier, unique within the run, that the others wait at while
  process 0 reads (a barrier waits minutes; a collective might time out sooner).
  """
  if jax.process_count() == 1:
    return flag
  ocp.multihost.sync_global_processes(barrier)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


@contextlib.contextmanager
def lock_for_run(folder: str, *, what: str, advice: str) -> Iterator[None]:
  """Holds `FOLDER/diffit_jax.lock` while the block runs: one writer per folder.

  Process 0 takes the lock for all the processes of a run (they are one writer); when it
  is refused, every process raises `files.FolderInUseError` (process 0's names the holder).

  Args:
    folder: the folder written (a workdir, a sampler's --out); created if missing.
    what: what the run is, for the message ("training run").
    advice: what a refused user should do ("pass another --workdir").
  """
  lock, refused = None, None
  if jax.process_index() == 0:
    lock = files.FolderLock(os.path.join(folder, files.LOCK_FILE), what=what, advice=advice)
    try:
      lock.acquire()
    except files.FolderInUseError as e:
      lock, refused = None, e
  if not from_process_0(refused is None, f"diffit_jax:lock:{os.path.basename(folder)}"):
    raise refused or files.FolderInUseError(
        f"{folder} is in use by another {what} (process 0 names it); {advice}.")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _on_every_process(flag: bool) -> bool:
  """True on every process if `flag` is True on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


# ----------------------------------------------------------------------------------------
# Training checkpoints.


class TrainCheckpointer:
  """Saves and restores training checkpoints in `WORKDIR/checkpoints` (layout above).

  Saves are asynchronous: `save` returns once the arrays are copied off the devices
  (so the caller may donate them to the next step), and the files are written in the
  background; `wait_until_finished` blocks until the last one is finalized. Checkpoint
  folders must be on a local or mounted file system shared by all processes (the
  integrity record is written and read with plain file I/O).

  Args:
    workdir: the run folder.
    max_to_keep: keep only the newest N checkpoints (None keeps all).
    async_save: write in a background thread.
  """

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, TRAIN_CHECKPOINT_DIR)
    self._async_save = async_save
    self._saving_step = None  # the step being (or last) saved; None once its failure is reported
    self._saving_bytes = 0
    self._disk_filled = False
    # Always Orbax's async checkpointer: only it runs a callback between writing the last
    # file and committing the folder, which is where the integrity record is written.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_record))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest finalized checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _write_record(self) -> None:
    """Orbax's post-finalization callback (process 0, background thread, every process's
    files written): records the uncommitted folder, which is then renamed into place."""
    final = self.step_dir(self._saving_step)
    tmp = glob.glob(glob.escape(final) + ocp.path.atomicity.TMP_DIR_SUFFIX + "*")
    write_integrity_record(tmp[0] if len(tmp) == 1 else final)

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
    self._wait()  # the previous save's callback is done with its step
    # A checkpoint that cannot fit is not started: the disk is not filled to the last byte,
    # and the run stops here with one line (a disk that fills meanwhile is reported too).
    latest = self.latest_step()
    needed = max(sum(int(x.nbytes) for x in jax.tree.leaves(state)),
                 files.tree_bytes(self.step_dir(latest)) if latest is not None else 0)
    files.check_space(self.step_dir(step), needed, resume=self._resume_note(latest))
    self._saving_step, self._saving_bytes = int(step), needed
    with self._full_disk_reported():
      self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if not self._async_save:
      self._wait()

  @contextlib.contextmanager
  def _full_disk_reported(self):
    """A full disk while checkpoint `_saving_step` is written -> `files.OutOfSpaceError`, with
    its unfinished folder removed (the checkpoints before it are untouched)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not files.is_out_of_space(e):
        raise
      if self._saving_step is None:  # the failure of a save already reported
        return
      final = self.step_dir(self._saving_step)
      error = files.OutOfSpaceError(final, self._saving_bytes,
                                    resume=self._resume_note(self.latest_step()))
      with contextlib.suppress(Exception):  # the same failure, from its background writes
        self._manager.close()  # lets Orbax's writes that are still running end first
      if jax.process_index() == 0:
        # A write that was still running may have recreated a file: look until it stays gone.
        for _ in range(50):
          leftovers = glob.glob(glob.escape(final) + ocp.path.atomicity.TMP_DIR_SUFFIX + "*")
          if not leftovers:
            break
          for tmp in leftovers:
            files.remove(tmp)
          time.sleep(0.1)
      self._saving_step, self._disk_filled = None, True  # reported once, not at close again
      raise error from e

  @staticmethod
  def _resume_note(latest: int | None) -> str:
    return (f"; it resumes from checkpoint {latest}" if latest is not None else
            "; it starts from scratch (no checkpoint was completed)")

  def _wait(self) -> None:
    with self._full_disk_reported():
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Mapping[str, Any], *,
              data_iterator: Any = None) -> dict[str, Any]:
    """Restores checkpoint `step` into the structure, dtypes and shardings given.

    Does not check the integrity record (`restore_latest` does).

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
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    state = dict(restored[STATE_ITEM])
    if EMA_ITEM in abstract_state:
      state[EMA_ITEM] = restored[EMA_ITEM]
    return state

  def restore_latest(self, abstract_state: Mapping[str, Any], *, data_iterator: Any = None,
                     check: Callable[[dict[str, Any]], str | None] | None = None
                     ) -> tuple[int | None, dict[str, Any] | None]:
    """Restores the newest checkpoint that is intact, loads and passes `check`.

    Checkpoints are tried newest first. One whose files fail its integrity record, that
    has no record and fails to load, or that `check` rejects is skipped with one warning
    line; once an older one restores, the skipped ones are moved to
    WORKDIR/rejected_checkpoints/ (so the run can write those steps again, and the
    evidence is kept). Every process takes the same decisions: process 0 reads the files,
    and a load that fails on any process fails on all.

    Args:
      abstract_state: as for `restore`.
      data_iterator: as for `restore`.
      check: `check(state) -> None`, or why the restored state is unusable (e.g. NaNs).

    Returns:
      (step, state), or (None, None) if there is no checkpoint.

    Raises:
      CorruptCheckpointError: there are checkpoints but none can be restored.
      ValueError: a checkpoint's arrays do not fit `abstract_state` (another config).
    """
    rejected = []  # (step, why)
    abstract_state = dict(abstract_state)
    abstract_items = {STATE_ITEM: {k: v for k, v in abstract_state.items() if k != EMA_ITEM}}
    if EMA_ITEM in abstract_state:
      abstract_items[EMA_ITEM] = abstract_state[EMA_ITEM]
    for step in sorted(self.all_steps(), reverse=True):
      step_dir, why = self.step_dir(step), None
      if has_integrity_record(step_dir):
        why = verify_integrity(step_dir) if jax.process_index() == 0 else None
        if not from_process_0(why is None, f"diffit_jax:verify_checkpoint_{step}"):
          why = why or "its files fail the integrity check (see process 0's log)"
      else:
        logging.warning("Checkpoint %s has no %s (written by an older diffit_jax?); loading it "
                        "unchecked.", step_dir, INTEGRITY_FILE)
      if why is None:
        try:
          mismatch = _structure_mismatch(step_dir, abstract_items)
        except Exception as e:  # pylint: disable=broad-except  (an unreadable metadata file)
          mismatch, why = None, f"its metadata does not load ({_first_line(e)})"
        if mismatch:  # the files are fine: it is this run's config that differs
          raise ValueError(
              f"Checkpoint {step_dir} does not fit this run's train state: {mismatch} (a "
              "different model, optimizer or mesh config?). Rerun with the config it was "
              f"written with ({step_dir}/{CONFIG_ITEM}) or use a fresh --workdir.")
      if why is None:
        try:
          state, error = self.restore(step, abstract_state, data_iterator=data_iterator), None
        except Exception as e:  # pylint: disable=broad-except  (summarised in the log line)
          state, error = None, e
        if not _on_every_process(error is None):
          why = f"it does not load ({_first_line(error) if error else 'on another process'})"
        elif check is not None:
          why = check(state)
      if why is None:
        self._set_aside(rejected)
        return step, state
      logging.warning("Skipping checkpoint %s: %s; trying the previous one.", step_dir, why)
      rejected.append((step, why))
    if rejected:
      reasons = "; ".join(f"{step}: {why}" for step, why in rejected)
      raise CorruptCheckpointError(
          f"No checkpoint in {self.directory} can be restored ({reasons}). Nothing was moved or "
          "deleted. To start from scratch, move that folder away or use a fresh --workdir.")
    return None, None

  def _set_aside(self, rejected: list[tuple[int, str]]) -> None:
    """Moves skipped checkpoints to WORKDIR/rejected_checkpoints/ (process 0)."""
    if not rejected:
      return
    if jax.process_index() == 0:
      folder = os.path.join(self.workdir, REJECTED_DIR)
      os.makedirs(folder, exist_ok=True)
      for step, _ in rejected:
        dst, n = os.path.join(folder, str(step)), 1
        while os.path.exists(dst):
          dst, n = os.path.join(folder, f"{step}-{n}"), n + 1
        os.rename(self.step_dir(step), dst)
        logging.warning("Moved the skipped checkpoint %d to %s (delete it once inspected).",
                        step, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("diffit_jax:set_aside_checkpoints")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until the last save is committed (`files.OutOfSpaceError`: the disk filled)."""
    self._wait()

  def close(self) -> None:
    try:
      self._wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._disk_filled:  # else: the full disk, already reported
          raise


def _restore_params(step_dir: str) -> dict:
  """The `params` of a training checkpoint's train state as host numpy arrays, without
  reading the optimizer state saved beside them."""
  path = epath.Path(step_dir) / STATE_ITEM
  handler = ocp.PyTreeCheckpointHandler()
  meta = handler.metadata(path)
  meta = {"params": getattr(meta, "tree", meta)["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  with ocp.Checkpointer(handler) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=meta, restore_args=restore_args, partial_restore=True))["params"]


RUN_WEIGHTS = ("ema", "params")  # which weights of a training run `load_run_params` reads


def is_run(path: str) -> bool:
  """Whether `path` is a training workdir (it has a checkpoints/ folder)."""
  return os.path.isdir(os.path.join(path, TRAIN_CHECKPOINT_DIR))


def is_weights_checkpoint(path: str) -> bool:
  """Whether `path` is a weights checkpoint written by `save_weights` (a converter's)."""
  return os.path.isfile(os.path.join(path, METADATA_FILE))


def _newest_intact(directory: str, steps: list[int], items: tuple[str, ...],
                   read: Callable[[int], Any]) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """The newest of `steps` whose `items` pass its integrity record and that `read` loads.

  Returns:
    (step, read(step), skipped), or (None, None, skipped) if none does; skipped holds
    (step, why) of each newer one passed over. A checkpoint without a record (written by
    an older diffit_jax) is read unchecked.
  """
  skipped = []
  for step in sorted(steps, reverse=True):
    step_dir = os.path.join(directory, str(step))
    why = verify_integrity(step_dir, items) if has_integrity_record(step_dir) else None
    if why is None:
      try:
        return step, read(step), skipped
      except Exception as e:  # pylint: disable=broad-except  (the caller reports it)
        why = f"it does not load ({_first_line(e)})"
    skipped.append((step, why))
  return None, None, skipped


def load_run_params(workdir: str, step: int | None = None, *, which: str = "ema"
                    ) -> tuple[dict, config_lib.ConfigDict]:
  """The weights of a training run, for samplers, exporters and fine-tuning.

  The files read are checked against the checkpoint's integrity record first.

  Args:
    workdir: the run folder given to `python -m diffit_jax.main`.
    step: which checkpoint; None: the newest intact one (a broken newer one is skipped
      with a warning).
    which: "ema": the EMA weights (what sampling uses); "params": the trained weights of
      the train state, without reading the optimizer state beside them.

  Returns:
    (params, config): the parameters as a pure nested dict of host numpy arrays (the
    structure of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; put them into a model
    with `nnx.replace_by_pure_dict`), and the run's resolved config, read through the
    schema (`config_lib.from_saved`).

  Raises:
    CorruptCheckpointError: checkpoint `step` (or, with step None, every one) is broken.
  """
  if which not in RUN_WEIGHTS:
    raise ValueError(f"which={which!r}; use one of {RUN_WEIGHTS}.")
  directory = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR)
  if not is_run(workdir):
    raise FileNotFoundError(
        f"{workdir} holds no training checkpoints (no {TRAIN_CHECKPOINT_DIR}/ folder); pass "
        "the --workdir of a `python -m diffit_jax.main` run.")
  # Orbax warns about every item this reader leaves alone (train state, data iterator):
  # 'Item "train_state" was found in the checkpoint, but could not be restored', and that
  # the folder is read-only. Expected here, so those messages are dropped meanwhile.
  unread_items_note = logging_utils.DropMessages(logging_utils.ORBAX_UNREAD_ITEM_NOTE,
                                                 *logging_utils.ORBAX_READ_ONLY_NOTES)
  logging.getLogger("absl").addFilter(unread_items_note)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                                      create=False),
      item_handlers={EMA_ITEM: ocp.PyTreeCheckpointHandler(),
                     CONFIG_ITEM: ocp.JsonCheckpointHandler()})

  def restore(step: int) -> tuple[dict, dict]:
    """(params, config) of checkpoint `step`."""
    config_arg = {CONFIG_ITEM: ocp.args.JsonRestore()}
    if which == "params":
      params = _restore_params(os.path.join(directory, str(step)))
      config = manager.restore(step, args=ocp.args.Composite(**config_arg))[CONFIG_ITEM]
      return params, config
    ema_meta = manager.item_metadata(step)[EMA_ITEM]
    ema_meta = getattr(ema_meta, "tree", ema_meta)
    # Host numpy arrays: independent of the mesh the run was saved from.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ema_meta)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{EMA_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args)}, **config_arg))
    return restored[EMA_ITEM], restored[CONFIG_ITEM]

  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is None and not steps:
      raise FileNotFoundError(f"{directory} has no finished checkpoint yet.")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{directory} has no checkpoint for step {step}; it has {steps}.")
    item = STATE_ITEM if which == "params" else EMA_ITEM
    found, restored, broken = _newest_intact(directory, steps if step is None else [step],
                                             (item, CONFIG_ITEM), restore)
  finally:
    manager.close()
    logging.getLogger("absl").removeFilter(unread_items_note)
  for skipped, why in broken:
    logging.warning("Skipping checkpoint %s: %s.", os.path.join(directory, str(skipped)), why)
  if found is None:
    reasons = "; ".join(f"{s}: {why}" for s, why in broken)
    raise CorruptCheckpointError(
        f"No usable {'trained' if which == 'params' else 'EMA'} weights in {directory} "
        f"({reasons}).")
  params, config = restored
  return _int_keys(params), config_lib.from_saved(
      dict(config), os.path.join(directory, str(found), CONFIG_ITEM))


def latest_step(workdir: str) -> int | None:
  """The newest finished training checkpoint's step in `workdir` (None: there is none)."""
  if not is_run(workdir):
    return None
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


# ----------------------------------------------------------------------------------------
# The configs saved with weights: WORKDIR/config.json, a copy in each training checkpoint,
# and a converted checkpoint's metadata. Each is read back through the schema
# (`config_lib.from_saved`): a field it lacks takes the schema's default.


def read_run_config(workdir: str) -> config_lib.ConfigDict:
  """WORKDIR/config.json: the resolved config a training run saved when it started.

  Raises:
    FileNotFoundError: there is none (a folder that is not a training run's).
    files.DamagedFileError: it does not parse; the message names it and what to do.
    config_lib.ConfigError: it holds a field the schema does not declare.
  """
  path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {CONFIG_FILE} (training writes it when it "
                            "starts); pass --config=THE_RUN'S_CONFIG.")
  return config_lib.from_saved(files.read_json(path, advice=(
      "Pass --config=THE_RUN'S_CONFIG to use that config instead, or move the file aside and "
      f"resume the training run (python -m diffit_jax.main --workdir={workdir} ...), which "
      "writes it again.")), path)


def _checkpointed_config(workdir: str) -> tuple[int, config_lib.ConfigDict] | None:
  """(step, config) of the newest checkpoint whose saved config is intact; None if none."""
  directory = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None

  def read(step: int) -> dict:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      return dict(checkpointer.restore(epath.Path(directory) / str(step) / CONFIG_ITEM))

  steps = [int(e) for e in os.listdir(directory) if e.isdigit()]
  step, config, _ = _newest_intact(directory, steps, (CONFIG_ITEM,), read)
  if step is None:
    return None
  return step, config_lib.from_saved(config, os.path.join(directory, str(step), CONFIG_ITEM))


def recover_run_config(workdir: str) -> tuple[config_lib.ConfigDict, str]:
  """(config, where it was read) of the run in `workdir`: its config.json or, where that is
  damaged or gone, the newest checkpoint's own copy (each checkpoint holds one, covered by
  its integrity record), with a warning. What a resumed run or a fine-tuning source falls
  back on.

  Raises:
    FileNotFoundError, files.DamagedFileError: no config.json and no checkpoint's copy.
  """
  try:
    return read_run_config(workdir), os.path.join(workdir, CONFIG_FILE)
  except (FileNotFoundError, files.DamagedFileError) as e:
    saved = _checkpointed_config(workdir)
    if saved is None:
      raise
    logging.warning("%s Using the config saved in checkpoint %d.", e, saved[0])
    return saved[1], f"checkpoint {saved[0]} of {workdir}"


def converted_config(path: str) -> config_lib.ConfigDict:
  """The experiment config saved with a converted DiffiT checkpoint (`python -m
  diffit_jax.convert diffit`), reading no weights.

  Raises:
    FileNotFoundError, WrongCheckpointError: see `load_metadata(path, kind="diffit")`.
  """
  return config_lib.from_saved(load_metadata(path, kind="diffit")["config"],
                               os.path.join(path, METADATA_FILE))
