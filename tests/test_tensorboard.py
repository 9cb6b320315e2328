"""TensorBoard event files of a training run, read back by TensorBoard's own loader.

The run (the tiny network of `helpers.tiny_config`) writes its scalars and EMA sample grids
with tensorboardX; `tensorboard`'s `EventAccumulator` (what `tensorboard --logdir` runs
without its Rust loader) reads them, checking every record's CRC, and must see the rows of
`metrics.jsonl` and the pixels of `samples/step_XXXXXX.png`, also after a resume that logs
steps again.
"""

import io
import os
import shutil

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import logging_utils, train
from helpers import tiny_config


def load_events(workdir: str):
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  return accumulator.Reload()


def test_scalars_and_sample_grids_survive_a_resume(tmp_path):
  """Steps 1-4 with checkpoints 2 and 4; checkpoint 4 lost (a kill before it was saved);
  the resumed run logs steps 3 and 4 again: TensorBoard shows each step once, as the
  JSONL file does, with the resumed run's values."""
  workdir = str(tmp_path / "run")
  config = tiny_config(num_train_steps=4, log_every_steps=1, checkpoint_every_steps=2,
                       sample_every_steps=2)
  train.train_and_evaluate(config, workdir)
  shutil.rmtree(os.path.join(workdir, checkpoint_lib.TRAIN_CHECKPOINT_DIR, "4"))
  train.train_and_evaluate(config, workdir)
  assert len([f for f in os.listdir(workdir) if "tfevents" in f]) == 2  # one per run

  events = load_events(workdir)
  rows = logging_utils.read_metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4]
  tags = sorted(rows[0].keys() - {"step"})
  assert {"train/loss", "train/learning_rate", "train/steps_per_sec"} <= set(tags)
  assert sorted(events.Tags()["scalars"]) == tags
  for tag in tags:
    logged = [(e.step, e.value) for e in events.Scalars(tag)]
    # Stored as float32; steps_per_sec differs between the two runs, so this also checks
    # that the resumed run's values of steps 3 and 4 won.
    assert logged == [(row["step"], np.float32(row[tag])) for row in rows], tag

  assert events.Tags()["images"] == ["samples/ema"]
  grids = events.Images("samples/ema")
  assert [e.step for e in grids] == [2, 4]
  for grid in grids:
    png = np.asarray(Image.open(os.path.join(workdir, "samples", f"step_{grid.step:06d}.png")))
    shown = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)))
    assert (grid.height, grid.width) == png.shape[:2] == shown.shape[:2]
    # The grid is grayscale (MNIST); TensorBoard gets it as RGB.
    np.testing.assert_array_equal(shown, np.repeat(png[..., None], 3, axis=-1))
