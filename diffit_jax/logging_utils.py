"""What a training run writes for people: scalars, a progress line and image grids.

  * `MetricWriter`: scalars to `workdir/metrics.jsonl` (one JSON object per log step) plus
    `workdir/loss.png`, a loss curve redrawn at every write; and scalars and the EMA sample
    grids to a TensorBoard event file in `workdir` (`tensorboard --logdir workdir`), through
    tensorboardX, so without TensorFlow. A resumed run first drops the JSONL rows logged
    after its checkpoint (`rewind`), so each step keeps one row; TensorBoard shows the
    resumed run's values of the steps logged twice.
  * `Progress`: steps/s, images/s and ETA over the last log interval.
  * `save_image_grid`: a batch of images (uint8, or floats in [-1, 1]) as one PNG.

Only process 0 writes files; the other processes get no-op writers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

from diffit_jax.utils import image_grid, save_png, to_uint8

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"


# Seconds between the event writer's flushes: a run shows up in TensorBoard this soon.
TENSORBOARD_FLUSH_SECS = 10


class MetricWriter:
  """Scalars per step to JSONL (+ PNG curve) and TensorBoard; image grids to TensorBoard.

  Args:
    workdir: the run folder.
    enabled: False on processes other than 0 (nothing is written).
    tensorboard: False: no event file.
    curve_key: the scalar drawn in `loss.png`.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               curve_key: str = "train/loss"):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.curve_path = os.path.join(workdir, CURVE_FILE)
    self.curve_key = curve_key
    self._tensorboard = enabled and tensorboard
    self._tb = None  # opened at the first write, after `rewind` has set `_purge_step`
    self._purge_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def _events(self) -> Any:
    """The tensorboardX writer (None without TensorBoard); a new event file per run."""
    if self._tb is None and self._tensorboard:
      # Here, not at the top: tensorboardX imports torch when it is installed (seconds).
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(self.workdir, purge_step=self._purge_step,
                                            flush_secs=TENSORBOARD_FLUSH_SECS)
      self._purge_step = None  # the marker opens this run's first file only
    return self._tb

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._events() is not None:
      for tag, value in scalars.items():
        self._tb.add_scalar(tag, value, int(step))
    if self.curve_key in scalars:
      self._draw_curve()

  def write_png(self, step: int, tag: str, path: str) -> None:
    """Shows the PNG at `path` (written by process 0) in TensorBoard's Images tab."""
    if self._events() is None:
      return
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    self._tb.add_image(tag, pixels, int(step), dataformats="HWC")

  def rewind(self, step: int) -> None:
    """Drops the JSONL rows of steps after `step` and redraws the curve.

    A run that dies between checkpoints has logged steps that its resumed run trains and
    logs again; this keeps one row per step. The file is replaced atomically (a row cut
    short by a kill goes too). Old event files are left as they are; this run's new one
    opens with a restart marker at `step + 1` (tensorboardX's `purge_step`). TensorBoard
    then hides the older files' events of later steps: its Python loader from the marker
    on, its Rust loader (the default) from each step that a series logs again.
    """
    if self._tb is not None:  # reopened with the marker at the next write
      self._tb.close()
      self._tb = None
    self._purge_step = int(step) + 1
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      text = f.read()
    rows = _parse_rows(text)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) == len(rows) and (not text or text.endswith("\n")):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(tmp, self.path)
    logging.info("%s: dropped %d rows of steps after %d, the step this run starts from (it "
                 "logs those steps again).", self.path, len(rows) - len(kept), step)
    self._draw_curve()

  def _draw_curve(self) -> None:
    steps, values = [], []
    for row in read_metrics(os.path.dirname(self.path)):
      if self.curve_key in row and np.isfinite(row[self.curve_key]):
        steps.append(row["step"])
        values.append(row[self.curve_key])
    if len(steps) < 2:
      if os.path.exists(self.curve_path):  # a curve of rows that were dropped
        os.remove(self.curve_path)
      return
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use("Agg")
      from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:  # the JSONL file is still there
      return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(self.curve_key)
    if min(values) > 0 and max(values) / min(values) > 20:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = self.curve_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, self.curve_path)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Writes out the pending events and closes the event file."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of `workdir/metrics.jsonl` (an empty list if there are none).

  A last line cut short (the run was killed while writing it) is left out.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return _parse_rows(f.read())


def _parse_rows(text: str) -> list[dict[str, float]]:
  # Every complete row ends with a newline: text after the last one was cut short.
  return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


class Progress:
  """Throughput and ETA between calls, from wall-clock time.

  Args:
    total_steps: the step the run ends at.
    batch_size: global images per step.
    start_step: the step the run (re)starts at.
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    """Rates since the previous call: steps_per_sec, images_per_sec, eta_min, seconds."""
    now = time.perf_counter()
    seconds = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / seconds
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size,
            "eta_min": eta / 60.0, "seconds": seconds}

  def reset_clock(self, step: int) -> None:
    """Restarts timing (after a pause such as sampling, so it does not count as training)."""
    self._last_step, self._last_time = step, time.perf_counter()


def format_progress(step: int, total: int, scalars: Mapping[str, float],
                    rates: Mapping[str, float], *, unit: tuple[str, str] = ("step", "steps")
                    ) -> str:
  """One line: step, the scalars, then steps/s, images/s and ETA.

  `unit` names what is counted, singular and plural (the sampler counts batches).
  """
  parts = [f"{unit[0]} {step}/{total}"]
  parts += [f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()]
  eta = rates["eta_min"]
  eta_text = f"{eta:.1f} min" if eta < 120 else f"{eta / 60:.1f} h"
  parts += [f"{rates['steps_per_sec']:.2f} {unit[1]}/s", f"{rates['images_per_sec']:.1f} img/s",
            f"ETA {eta_text}"]
  return " | ".join(parts)


def save_image_grid(path: str, images: np.ndarray, rows: int, *, scale: int = 1) -> None:
  """Writes (N, H, W, C) images, uint8 or floats in [-1, 1], to `path` as one PNG grid of
  `rows` rows (filled row by row), upscaled `scale`x (nearest)."""
  pixels = np.asarray(images)
  if pixels.dtype != np.uint8:
    pixels = np.asarray(to_uint8(pixels.astype(np.float32), rounding=True))
  grid = image_grid(pixels, num_columns=-(-len(pixels) // rows))[..., :3]
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  save_png(path, grid)
  logging.info("Wrote %s", path)
