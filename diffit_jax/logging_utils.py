"""What a training run writes for people: scalars, a progress line and image grids.

  * `MetricWriter`: scalars to TensorBoard (through `clu.metric_writers`) when TensorFlow
    is importable, and always to `workdir/metrics.jsonl` (one JSON object per log step)
    plus `workdir/loss.png`, a loss curve redrawn at every write, so a run without
    TensorFlow can still be read and plotted. A resumed run first drops the JSONL rows
    logged after its checkpoint (`rewind`), so each step keeps one row.
  * `Progress`: steps/s, images/s and ETA over the last log interval.
  * `save_image_grid`: a batch of images in [-1, 1] as one PNG.

Only process 0 writes files; the other processes get no-op writers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np

from diffit_jax.utils import image_grid, save_png, to_uint8

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


class MetricWriter:
  """Writes scalar dicts per step: JSONL (+ PNG curve) always, TensorBoard if possible.

  Args:
    workdir: the run folder.
    enabled: False on processes other than 0 (nothing is written).
    tensorboard: None: use TensorBoard when TensorFlow is importable.
    curve_key: the scalar drawn in `loss.png`.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool | None = None,
               curve_key: str = "train/loss"):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.curve_path = os.path.join(workdir, CURVE_FILE)
    self.curve_key = curve_key
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard is None:
      tensorboard = _tensorflow_available()
    if tensorboard:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TF)
      self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(step, scalars)
    if self.curve_key in scalars:
      self._draw_curve()

  def rewind(self, step: int) -> None:
    """Drops the JSONL rows of steps after `step` and redraws the curve.

    A run that dies between checkpoints has logged steps that its resumed run trains and
    logs again; this keeps one row per step. The file is replaced atomically (a row cut
    short by a kill goes too). TensorBoard event files are left as they are.
    """
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
                    rates: Mapping[str, float]) -> str:
  """One line: step, the scalars, then steps/s, images/s and ETA."""
  parts = [f"step {step}/{total}"]
  parts += [f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()]
  eta = rates["eta_min"]
  eta_text = f"{eta:.1f} min" if eta < 120 else f"{eta / 60:.1f} h"
  parts += [f"{rates['steps_per_sec']:.2f} steps/s", f"{rates['images_per_sec']:.1f} img/s",
            f"ETA {eta_text}"]
  return " | ".join(parts)


def save_image_grid(path: str, images: np.ndarray, rows: int, *, scale: int = 1) -> None:
  """Writes (N, H, W, C) images in [-1, 1] to `path` as one PNG grid of `rows` rows (filled
  row by row), upscaled `scale`x (nearest)."""
  pixels = np.asarray(to_uint8(np.asarray(images, np.float32), rounding=True))
  grid = image_grid(pixels, num_columns=-(-len(pixels) // rows))[..., :3]
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  save_png(path, grid)
  logging.info("Wrote %s", path)
