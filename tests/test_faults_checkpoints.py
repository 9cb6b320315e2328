"""Fault injection on training checkpoints, through the real CLI (`python -m diffit_jax.main`)
where a run can inject the fault, else through the public API.

Each test copies one shared, trained workdir (checkpoints 2, 4 and 6 of the tiny network of
`helpers.tiny_config`; one metrics row per step) and breaks it the way disks, users and
optimizers do: a flipped byte, a truncated or deleted file, weights blown up to Inf/NaN, a
kill -9 between checkpoints, a config that would keep no checkpoint. The run must then
resume from the newest intact checkpoint (bitwise as if nothing had happened), or stop
with one line that says what is wrong and what to do.

The runs on the broken copies are independent processes whose time on a small CPU is
mostly start-up and compilation, so the `runs` fixture starts them together (three at a
time) and lets them share the cores; each test then checks its own.
"""

import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import files, guards, logging_utils, train
from diffit_jax import run as run_lib
from diffit_jax import sharding as sharding_lib
from helpers import (MNIST_RUNLOCAL, TINY_FLAGS, assert_trees_equal, run_main, run_module,
                     subprocess_env, tiny_config)

STEPS = (2, 4, 6)  # the checkpoints of the shared workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """A workdir trained for 6 steps: checkpoints 2, 4, 6 and metrics rows 1-6."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  out = finish(run_main(workdir, "--config.num_train_steps=6", "--config.log_every_steps=1",
                        "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=3",
                        "--config.sample_every_steps=0"))
  assert checkpoint_lib.TrainCheckpointer(workdir).all_steps() == list(STEPS), out
  return workdir


def finish(proc, returncode=0) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == returncode, out
  return out


def copy_run(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


RESUME_FLAGS = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
                "--config.keep_checkpoints=3", "--config.sample_every_steps=0")


def start_resume(workdir, steps, *flags):
  return run_main(workdir, f"--config.num_train_steps={steps}", *RESUME_FLAGS, *flags)


def resume(workdir, steps, *flags, returncode=0) -> str:
  return finish(start_resume(workdir, steps, *flags), returncode)


def step_dir(workdir, step) -> str:
  return os.path.join(workdir, checkpoint_lib.TRAIN_CHECKPOINT_DIR, str(step))


def largest_data_file(workdir, step, item) -> str:
  """The biggest TensorStore data chunk of one item (e.g. "ema_params") of a checkpoint."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(
      step_dir(workdir, step), item)) for name in names if os.path.basename(root) == "d"]
  return max(files, key=os.path.getsize)


def flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def lines_with(out, text) -> list[str]:
  return [line for line in out.splitlines() if text in line]


def assert_finite(tree):
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


def assert_one_row_per_step(workdir, last):
  steps = [r["step"] for r in logging_utils.read_metrics(workdir)]
  assert steps == list(range(1, last + 1)), steps


# ----------------------------------------------------------------------------------------
# The faults: each breaks its own copy of the trained workdir and runs the CLI on it. They
# run in worker threads (subprocesses and files only; the checks on checkpoints are the
# tests'), and what a test inspects after a later run changed the workdir is a copy.


def flipped_newest_ema(trained, root) -> dict:
  workdir = copy_run(trained, root / "flipped")
  flip_byte(largest_data_file(workdir, 6, checkpoint_lib.EMA_ITEM))
  before = str(root / "flipped_before_resume")
  shutil.copytree(workdir, before)
  return dict(workdir=workdir, before=before, out=resume(workdir, 8))


def truncated_state_and_deleted_ema(trained, root) -> dict:
  workdir = copy_run(trained, root / "truncated")
  path = largest_data_file(workdir, 6, checkpoint_lib.STATE_ITEM)  # weights + Adam moments
  os.truncate(path, os.path.getsize(path) // 2)
  os.remove(largest_data_file(workdir, 4, checkpoint_lib.EMA_ITEM))
  return dict(workdir=workdir, out=resume(workdir, 6))


def every_ema_flipped(trained, root) -> dict:
  workdir = copy_run(trained, root / "no_intact")
  for step in STEPS:
    flip_byte(largest_data_file(workdir, step, checkpoint_lib.EMA_ITEM))
  return dict(workdir=workdir, out=resume(workdir, 6, returncode=2))


def diverged_then_rerun(trained, root) -> dict:
  """A learning rate of 1e39 turns the weights to Inf/NaN; then a sane rerun."""
  workdir = copy_run(trained, root / "nan")
  out = resume(workdir, 30, "--config.optimizer.learning_rate=1e39",
               "--config.checkpoint_every_steps=7", "--config.log_every_steps=5", returncode=2)
  diverged = str(root / "nan_diverged")
  shutil.copytree(workdir, diverged)
  return dict(diverged=diverged, out=out, rerun=resume(workdir, 8))


def keep_nothing(trained, root) -> dict:
  del trained
  (root / "keep_zero").mkdir()
  workdir = root / "keep_zero" / "run"
  return dict(workdir=workdir, out=finish(run_main(workdir, "--config.keep_checkpoints=0"),
                                          returncode=2))


def start_endless_run(workdir, until_step):
  """A run that checkpoints nothing, once it has logged `until_step` (still running)."""
  proc = run_main(workdir, "--config.num_train_steps=100000", "--config.log_every_steps=1",
                  "--config.checkpoint_every_steps=0", "--config.sample_every_steps=0")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(r["step"] >= until_step for r in logging_utils.read_metrics(workdir)):
      break
    time.sleep(0.1)
  assert proc.poll() is None, proc.communicate()[0]
  return proc


def killed_then_resumed(trained, root) -> dict:
  """kill -9 at step 9 or later of a run that checkpoints nothing past 6; then a resume."""
  workdir = copy_run(trained, root / "killed")
  proc = start_endless_run(workdir, until_step=9)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed = {r["step"]: r for r in logging_utils.read_metrics(workdir)}
  after_kill = str(root / "killed_after_kill")
  shutil.copytree(workdir, after_kill)
  return dict(workdir=workdir, after_kill=after_kill, killed=killed, out=resume(workdir, 10))


def two_trainers_then_holder_killed(trained, root) -> dict:
  """A second `main` on a workdir whose run is still training; then that run is killed
  (kill -9 leaves its lock file behind) and the same command starts again."""
  workdir = copy_run(trained, root / "two_trainers")
  first = start_endless_run(workdir, until_step=8)
  try:
    with open(os.path.join(workdir, files.LOCK_FILE)) as f:
      holder = json.load(f)
    second = resume(workdir, 8, returncode=2)
    rows_meanwhile = len(logging_utils.read_metrics(workdir))
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  lock_after_kill = os.path.exists(os.path.join(workdir, files.LOCK_FILE))
  return dict(workdir=workdir, first_pid=first.pid, holder=holder, second=second,
              rows_meanwhile=rows_meanwhile, lock_after_kill=lock_after_kill,
              third=resume(workdir, 8))


def damaged_run_metadata(trained, root) -> dict:
  """config.json truncated, a torn line in the middle of metrics.jsonl, and the newest
  checkpoint's integrity.json emptied; then `sample --workdir` and the same training
  command."""
  workdir = copy_run(trained, root / "damaged_metadata")
  config_path = os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
  with open(config_path) as f:
    config_text = f.read()
  with open(config_path, "w") as f:
    f.write(config_text[:30])
  metrics_path = os.path.join(workdir, logging_utils.METRICS_FILE)
  with open(metrics_path) as f:
    lines = f.readlines()
  with open(metrics_path, "w") as f:
    f.writelines(lines[:3] + ['{"step": 4, "train/lo\x00\x00\n'] + lines[3:])
  open(os.path.join(step_dir(workdir, 6), checkpoint_lib.INTEGRITY_FILE), "w").close()
  sampled = run_module("diffit_jax.sample", f"--workdir={workdir}", "--num_samples=2",
                       "--batch_size=2", f"--out={root / 'damaged_metadata_samples'}")
  return dict(workdir=workdir, config_text=config_text, lines=lines, sampled=sampled,
              out=resume(workdir, 8))


# The trained workdir on a real size-limited filesystem (a tmpfs in a mount namespace of the
# test's own, see conftest.run_on_small_disk) with 100 KB free: the run stops before
# checkpoint 8 (the check for room), then again with that check off (the disk fills inside
# Orbax); then the filler is removed and the same command resumes.
DISK_FULL_SCRIPT = r"""
cp -r "$TRAINED" "$MNT/run"
show() { echo "== $1 rc=$2"; ls -a "$MNT/run/checkpoints"; }
fill 4
"$@" > "$OUT/nospace.txt" 2>&1; show nospace $?
fill 100
"$@" > "$OUT/precheck.txt" 2>&1; show precheck $?
NO_SPACE_CHECK=1 "$@" > "$OUT/midwrite.txt" 2>&1; show midwrite $?
rm "$MNT/filler"
"$@" > "$OUT/freed.txt" 2>&1; show freed $?
cp -r "$MNT/run" "$OUT/run"
"""

# `main` whose check for room before a checkpoint is switched off by NO_SPACE_CHECK=1, so
# that the disk fills while Orbax writes the checkpoint.
MAIN_WITHOUT_SPACE_CHECK = r"""
import os, sys
from diffit_jax import files, main
if os.environ.get("NO_SPACE_CHECK"):
  files.check_space = lambda *args, **kwargs: None
sys.exit(main.main())
"""


def disk_full_during_checkpoint(trained, root, run_on_small_disk) -> dict:
  if run_on_small_disk is None:
    return dict(skip="no mount namespace here (unshare -m needs root or user namespaces)")
  out, mnt = root / "disk_full", root / "disk_full_mnt"
  out.mkdir()
  script = out / "main_without_space_check.py"
  script.write_text(MAIN_WITHOUT_SPACE_CHECK)
  command = [sys.executable, str(script), f"--config={MNIST_RUNLOCAL}",
             f"--workdir={mnt / 'run'}", *TINY_FLAGS, *RESUME_FLAGS, "--config.num_train_steps=8"]
  size_kb = files.tree_bytes(trained) // 1024 + 2048
  proc = run_on_small_disk(DISK_FULL_SCRIPT.replace('"$@"', shlex.join(command)), mnt, size_kb,
                           subprocess_env(TRAINED=trained, OUT=str(out)), timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return dict(listing=proc.stdout, **{name: (out / f"{name}.txt").read_text()
                                      for name in ("nospace", "precheck", "midwrite", "freed")},
              workdir=str(out / "run"))


FAULTS = (flipped_newest_ema, truncated_state_and_deleted_ema, every_ema_flipped,
          diverged_then_rerun, keep_nothing, killed_then_resumed,
          two_trainers_then_holder_killed, damaged_run_metadata, disk_full_during_checkpoint)


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory, run_on_small_disk) -> dict[str, concurrent.futures.Future]:
  """{fault: the future of its runs}: all started at once, three processes at a time."""
  root = tmp_path_factory.mktemp("faults")
  extra = {disk_full_during_checkpoint: (run_on_small_disk,)}
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    yield {fault.__name__: pool.submit(fault, trained, root, *extra.get(fault, ()))
           for fault in FAULTS}


# ----------------------------------------------------------------------------------------
# Silent corruption: every file of a checkpoint is checked against its integrity record.


def test_flipped_byte_in_newest_ema_falls_back_to_the_previous_checkpoint(trained, runs):
  run = runs["flipped_newest_ema"].result()
  workdir, out = run["workdir"], run["out"]

  # Samplers and exporters: the newest intact EMA, or a clear error for the broken step.
  ema, _ = checkpoint_lib.load_run_params(run["before"])
  assert_trees_equal(ema, checkpoint_lib.load_run_params(trained, 4)[0])
  with pytest.raises(checkpoint_lib.CorruptCheckpointError, match="ema_params/.*crc32"):
    checkpoint_lib.load_run_params(run["before"], step=6)

  # Training resumes from 4, says once why 6 was skipped, and redoes 5-6 bit for bit.
  skipped = lines_with(out, "Skipping checkpoint")
  assert len(skipped) == 1 and "/6" in skipped[0] and "crc32" in skipped[0], out
  assert lines_with(out, "Resuming from"), out
  assert lines_with(out, "Resuming from")[0].endswith("/4."), out
  assert checkpoint_lib.TrainCheckpointer(workdir).all_steps() == [4, 6, 8]
  assert_trees_equal(checkpoint_lib.load_run_params(workdir, 6)[0],
                     checkpoint_lib.load_run_params(trained, 6)[0])
  assert os.path.isdir(os.path.join(workdir, checkpoint_lib.REJECTED_DIR, "6"))  # kept aside
  assert_one_row_per_step(workdir, 8)


def test_truncated_and_deleted_files_fall_back_to_an_intact_checkpoint(trained, runs):
  run = runs["truncated_state_and_deleted_ema"].result()
  workdir, out = run["workdir"], run["out"]
  skipped = lines_with(out, "Skipping checkpoint")
  assert len(skipped) == 2, out
  assert "/6" in skipped[0] and "truncated" in skipped[0], out
  assert "/4" in skipped[1] and "missing" in skipped[1], out
  assert "different model" not in out and "TensorStore" not in out, out
  assert lines_with(out, "Resuming from")[0].endswith("/2."), out
  for step in (4, 6):  # rewritten, identical to the originals
    assert_trees_equal(checkpoint_lib.load_run_params(workdir, step)[0],
                       checkpoint_lib.load_run_params(trained, step)[0])


def test_no_intact_checkpoint_stops_with_one_clear_line(runs):
  run = runs["every_ema_flipped"].result()
  out = run["out"]
  errors = lines_with(out, "error: No checkpoint")
  assert len(errors) == 1 and "fresh --workdir" in errors[0], out
  assert "TensorStore" not in out, out
  # Nothing was moved or deleted: the user decides.
  assert checkpoint_lib.TrainCheckpointer(run["workdir"]).all_steps() == list(STEPS)


# ----------------------------------------------------------------------------------------
# Poisoned weights and a config that would keep nothing.


def test_nan_weights_are_never_checkpointed(runs):
  """No Inf/NaN checkpoint is saved, the error names a checkpoint that really is good, and
  a sane rerun resumes from it."""
  run = runs["diverged_then_rerun"].result()
  out = run["out"]
  assert "NaN/Inf" in out, out
  good = [line for line in out.splitlines() if "The newest good checkpoint is step" in line]
  assert good, out
  named = int(good[-1].split("The newest good checkpoint is step ")[1].split()[0])
  steps = checkpoint_lib.TrainCheckpointer(run["diverged"]).all_steps()
  assert named in steps, (named, steps)
  for step in steps:
    assert_finite(checkpoint_lib.load_run_params(run["diverged"], step)[0])
  # The sane rerun (which exited with 0) resumed from that checkpoint.
  assert lines_with(run["rerun"], "Resuming from")[0].endswith(f"/{named}."), run["rerun"]


def test_resume_skips_a_checkpoint_with_nan_weights(trained, tmp_path):
  """A NaN checkpoint written by an older version (intact files, poisoned values) is not
  resumed from either: the public API, with the trainer's state check."""
  workdir = copy_run(trained, tmp_path)
  config = tiny_config()
  mesh = sharding_lib.create_mesh(config.mesh)
  setup, _ = train.create_train_state(config, mesh, initialize=False)
  abstract = setup.abstract_state._asdict()
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, max_to_keep=None)
  state = ckpt.restore(6, abstract)
  state["ema_params"] = jax.tree.map(lambda x: x * np.nan, state["ema_params"])
  ckpt.save(8, state)
  ckpt.wait_until_finished()
  is_finite = guards.make_state_check(setup.shardings, mesh)
  step, restored = ckpt.restore_latest(
      abstract, check=lambda s: None if is_finite(train.TrainState(**s)) else "NaN")
  ckpt.close()
  assert step == 6
  assert_finite(restored["ema_params"])
  assert checkpoint_lib.TrainCheckpointer(workdir).all_steps() == [2, 4, 6]
  assert os.listdir(os.path.join(workdir, checkpoint_lib.REJECTED_DIR)) == ["8"]


def test_keep_checkpoints_zero_is_refused_before_anything_is_written(runs):
  run = runs["keep_nothing"].result()
  assert "config.keep_checkpoints=0" in run["out"], run["out"]
  assert not run["workdir"].exists()
  with pytest.raises(ValueError, match="keep_checkpoints=-2"):
    run_lib.validate_config(tiny_config(keep_checkpoints=-2))


# ----------------------------------------------------------------------------------------
# A kill -9 between checkpoints: the replayed steps are logged once.


def test_sigkill_between_checkpoints_then_resume_logs_each_step_once(runs):
  run = runs["killed_then_resumed"].result()
  workdir, killed = run["workdir"], run["killed"]
  assert checkpoint_lib.TrainCheckpointer(run["after_kill"]).latest_step() == 6
  rows = logging_utils.read_metrics(workdir)
  assert_one_row_per_step(workdir, 10)
  for row in rows:  # the exact resume replays the killed run's losses
    if row["step"] in killed:
      assert row["train/loss"] == killed[row["step"]]["train/loss"], row


def test_rewind_drops_later_and_torn_rows_and_redraws_the_curve(tmp_path):
  """What the resumed run does first: the JSONL keeps rows up to the restored step, and
  loss.png is the curve of exactly those rows."""
  pytest.importorskip("matplotlib")
  writer = logging_utils.MetricWriter(str(tmp_path / "run"), tensorboard=False)
  for step in range(1, 6):
    writer.write_scalars(step, {"train/loss": 1.0 / step})
  with open(writer.path, "a") as f:
    f.write('{"step": 6, "train/lo')  # killed mid-write
  writer.rewind(3)
  assert [r["step"] for r in logging_utils.read_metrics(str(tmp_path / "run"))] == [1, 2, 3]
  assert open(writer.path).read().endswith("}\n")
  reference = logging_utils.MetricWriter(str(tmp_path / "ref"), tensorboard=False)
  for step in range(1, 4):
    reference.write_scalars(step, {"train/loss": 1.0 / step})
  np.testing.assert_array_equal(np.asarray(Image.open(writer.curve_path)),
                                np.asarray(Image.open(reference.curve_path)))


# ----------------------------------------------------------------------------------------
# The disk the run shares: a second trainer, damaged metadata, a full disk.


def test_a_second_trainer_is_refused_and_a_dead_holders_lock_is_taken_over(trained, runs):
  run = runs["two_trainers_then_holder_killed"].result()
  # The running trainer holds the lock, naming itself.
  assert run["holder"]["pid"] == run["first_pid"] and run["holder"]["what"] == "training run"
  # The second is refused at start with one line naming the holder and what to do; it wrote
  # nothing (the first run's rows go on; no checkpoint of its own).
  errors = lines_with(run["second"], "error:")
  assert len(errors) == 1, run["second"]
  assert f"pid {run['first_pid']}" in errors[0] and "pass another --workdir" in errors[0]
  assert "Traceback" not in run["second"], run["second"]
  assert "Resuming from" not in run["second"] and "Compiled" not in run["second"]
  assert run["rows_meanwhile"] >= 8
  # kill -9 leaves the lock behind; the same command takes it over with one line and
  # resumes from the newest checkpoint, logging each step once.
  assert run["lock_after_kill"]
  taken = lines_with(run["third"], "Taking over")
  assert len(taken) == 1 and f"pid {run['first_pid']}" in taken[0], run["third"]
  assert "no longer running" in taken[0]
  assert lines_with(run["third"], "Resuming from")[0].endswith("/6."), run["third"]
  assert_one_row_per_step(run["workdir"], 8)
  assert not os.path.exists(os.path.join(run["workdir"], files.LOCK_FILE))  # released at exit
  assert_trees_equal(checkpoint_lib.load_run_params(run["workdir"], 6)[0],
                     checkpoint_lib.load_run_params(trained, 6)[0])


def test_damaged_config_metrics_and_integrity_record(trained, runs):
  run = runs["damaged_run_metadata"].result()
  workdir, out = run["workdir"], run["out"]
  # `sample --workdir`: one line naming the file and what to do; nothing written.
  sampled = run["sampled"]
  assert sampled.returncode == 2, sampled.stdout + sampled.stderr
  assert "Traceback" not in sampled.stderr, sampled.stderr
  (error,) = lines_with(sampled.stderr, "error:")
  assert f"{workdir}/config.json is damaged" in error and "--config=" in error, error
  # Training resumes: the damaged config.json is kept aside and rewritten, the torn metrics
  # row is set aside with the file, the checkpoint whose record is damaged is skipped.
  (config_line,) = lines_with(out, "config.json is damaged")
  assert "config.json.damaged" in config_line, out
  with open(os.path.join(workdir, "config.json.damaged")) as f:
    assert f.read() == run["config_text"][:30]
  with open(os.path.join(workdir, checkpoint_lib.CONFIG_FILE)) as f:
    rewritten = json.load(f)
  assert rewritten == {**json.loads(run["config_text"]), "num_train_steps": 8}  # this run's
  (metrics_line,) = lines_with(out, "metrics.jsonl is damaged")
  assert "line 4" in metrics_line and "kept its 6 readable rows" in metrics_line, out
  with open(os.path.join(workdir, "metrics.jsonl.damaged")) as f:
    assert len(f.readlines()) == len(run["lines"]) + 1
  assert_one_row_per_step(workdir, 8)
  (skipped,) = lines_with(out, "Skipping checkpoint")
  assert "/6" in skipped and "integrity.json" in skipped, out
  assert lines_with(out, "Resuming from")[0].endswith("/4."), out
  assert "Traceback" not in out, out
  for step in (6, 8):  # step 6 recomputed bit for bit from 4
    assert checkpoint_lib.verify_integrity(step_dir(workdir, step)) is None
  assert_trees_equal(checkpoint_lib.load_run_params(workdir, 6)[0],
                     checkpoint_lib.load_run_params(trained, 6)[0])


def test_a_full_disk_stops_with_one_line_and_the_same_command_resumes(trained, runs):
  run = runs["disk_full_during_checkpoint"].result()
  if "skip" in run:
    pytest.skip(run["skip"])
  listing = run["listing"]
  # 4 KB free: the lock file fits, config.json does not: it is named, and kept as it was.
  (error,) = lines_with(run["nospace"], "error:")
  assert "out of space writing" in error and "/run/config.json:" in error, error
  assert "== nospace rc=2" in listing and "Traceback" not in run["nospace"]
  for name in ("precheck", "midwrite"):
    out = run[name]
    assert f"== {name} rc=2" in listing, (listing, out)
    (error,) = lines_with(out, "error:")
    assert "out of space writing" in error and "/checkpoints/8:" in error, out
    assert "needs about" in error and "resumes from checkpoint 6" in error, error
    # No traceback, no library's report of the failed writes: the line is all.
    assert "Traceback" not in out and "RESOURCE_EXHAUSTED" not in out, out
    assert "Event loop is closed" not in out, out
  # Nothing half-written is left, the checkpoints before are untouched...
  after = listing.split("== midwrite")[1].split("==")[0]
  assert "orbax-checkpoint-tmp" not in listing, listing
  assert after.split() == ["rc=2", ".", "..", "2", "4", "6"], listing
  # ...and with space freed the same command resumes from 6 and saves 8.
  assert "== freed rc=0" in listing, (listing, run["freed"])
  assert lines_with(run["freed"], "Resuming from")[0].endswith("/6."), run["freed"]
  workdir = run["workdir"]
  assert not [name for name in os.listdir(workdir) if ".tmp" in name], os.listdir(workdir)
  assert checkpoint_lib.TrainCheckpointer(workdir).all_steps() == [4, 6, 8]
  assert_trees_equal(checkpoint_lib.load_run_params(workdir, 6)[0],
                     checkpoint_lib.load_run_params(trained, 6)[0])
  assert_one_row_per_step(workdir, 8)
