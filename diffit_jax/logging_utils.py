"""What a training run writes for people: scalars, a progress line and image grids.

  * `MetricWriter`: scalars to `workdir/metrics.jsonl` (one JSON object per log step) plus
    `workdir/loss.png`, a loss curve redrawn at every write; and scalars and the EMA sample
    grids to a TensorBoard event file in `workdir` (`tensorboard --logdir workdir`), through
    tensorboardX, so without TensorFlow. A resumed run first drops the JSONL rows logged
    after its checkpoint (`rewind`), so each step keeps one row; TensorBoard shows the
    resumed run's values of the steps logged twice.
  * `Progress`: steps/s, images/s and ETA over the last log interval, printed by
    `format_progress`; `ProgressLines`: the same style of line for any long loop over
    items (data build, Inception features), in place of progress bars.
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

from diffit_jax import files
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
    row = json.dumps({"step": int(step), **scalars}) + "\n"
    with files.writing(self.path, len(row), resume="; it resumes from the newest checkpoint"):
      with open(self.path, "a") as f:
        f.write(row)
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
    with open(self.path, "rb") as f:
      text = f.read().decode(errors="replace")
    rows, damaged = _parse_rows(text)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) == len(rows) and not damaged and (not text or text.endswith("\n")):
      return
    if damaged:  # kept as it was, beside the rows that could be read
      aside = files.move_aside(self.path)
      logging.warning("%s is damaged: %d of its lines are not metrics rows (the first is line "
                      "%d); moved it to %s and kept its %d readable rows.", self.path,
                      len(damaged), damaged[0], aside, len(rows))
    tmp = self.path + ".tmp"
    with files.writing(self.path, len(text), remove_on_failure=(tmp,)):
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
    try:
      with files.writing(self.curve_path, remove_on_failure=(tmp,)):
        fig.savefig(tmp)
        os.replace(tmp, self.curve_path)
    finally:
      plt.close(fig)

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

  A last line cut short (the run was killed while writing it) is left out, and so are
  lines that are not rows (a damaged file; a resumed run sets the file aside and keeps its
  rows, see `MetricWriter.rewind`).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    return _parse_rows(f.read().decode(errors="replace"))[0]


def _parse_rows(text: str) -> tuple[list[dict[str, float]], list[int]]:
  """(the rows, the 1-based numbers of the complete lines that are not rows)."""
  rows, damaged = [], []
  # Every complete row ends with a newline: text after the last one was cut short.
  for number, line in enumerate(text.split("\n")[:-1], 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
    else:
      damaged.append(number)
  return rows, damaged


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


# Library log messages (the starts of their format strings) that a user cannot act on.
TFDS_OPENCV_NOTE = "OpenCV is not installed."  # tfds decodes with PIL, as diffit_jax wants
# Orbax on a read-only CheckpointManager, which is what readers of a run want.
ORBAX_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True, setting",
                         "Given directory is read only")
# Orbax, for each checkpoint item a reader leaves alone (a sampler reads only the EMA weights).
ORBAX_UNREAD_ITEM_NOTE = 'Item "%s" was found in the checkpoint, but could not be restored'


class DropMessages(logging.Filter):
  """Drops the log records whose message (its format string) starts with one of `prefixes`.

  For a library's note that a user cannot act on, e.g.
  `logging.getLogger("absl").addFilter(DropMessages("OpenCV is not installed"))`; every
  other record of that logger still shows.
  """

  def __init__(self, *prefixes: str):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def drop_messages(*prefixes: str, logger: str = "absl") -> None:
  """Adds `DropMessages(*prefixes)` to `logger`, unless it has that filter already."""
  target = logging.getLogger(logger)
  if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in target.filters):
    target.addFilter(DropMessages(*prefixes))


class DropOutOfSpaceReports(logging.Filter):
  """Drops library log records about a full disk: Orbax logs each failed write of a
  checkpoint with its traceback, asyncio each failed task nobody awaited. The command
  reports the full disk once, as one `error:` line (`files.OutOfSpaceError`).

  Once a full disk was logged, Orbax's and asyncio's later tracebacks go too: they are that
  failure's aftermath (e.g. "cannot schedule new futures after shutdown" from a background
  write still running while the command exits).
  """

  def __init__(self):
    super().__init__()
    self.disk_filled = False

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if (error is not None and files.is_out_of_space(error)) or (
        error is None and files.mentions_out_of_space(record.getMessage())):
      self.disk_filled = True
      return False
    aftermath = error is not None and any(
        part in record.pathname for part in (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}"))
    return not (self.disk_filled and aftermath)


def _eta_text(minutes: float) -> str:
  return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def format_progress(step: int, total: int, scalars: Mapping[str, float],
                    rates: Mapping[str, float], *, unit: tuple[str, str] = ("step", "steps")
                    ) -> str:
  """One line: step, the scalars, then steps/s, images/s and ETA.

  `unit` names what is counted, singular and plural (the sampler counts batches).
  """
  parts = [f"{unit[0]} {step}/{total}"]
  parts += [f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()]
  parts += [f"{rates['steps_per_sec']:.2f} {unit[1]}/s", f"{rates['images_per_sec']:.1f} img/s",
            f"ETA {_eta_text(rates['eta_min'])}"]
  return " | ".join(parts)


class ProgressLines:
  """Progress through `total` items as lines in `format_progress`'s style, not a bar.

  `update(n)` counts items done and prints `LABEL done/total | rate UNIT/s | ETA ...` at most
  every `every_secs` seconds, and always once all are done (or at `close()`), so a log
  file holds a few readable lines and a terminal shows that work goes on.

  Args:
    label: what is being done, e.g. "inception features".
    total: the number of items (None: unknown; no ETA).
    unit: the items' unit in the rate.
    every_secs: the least time between two lines.
    enabled: False prints nothing (other processes, or a quiet run).
  """

  def __init__(self, label: str, total: int | None, *, unit: str = "img",
               every_secs: float = 10.0, enabled: bool = True):
    self.label, self.total, self.unit = label, total, unit
    self.every_secs, self.enabled = every_secs, enabled
    self.done, self._shown = 0, -1
    self._start = self._last = time.perf_counter()

  def line(self) -> str:
    """The current progress line."""
    seconds = max(time.perf_counter() - self._start, 1e-9)
    rate = self.done / seconds
    parts = [f"{self.label} {self.done}/{self.total if self.total is not None else '?'}",
             f"{rate:.1f} {self.unit}/s"]
    if self.done == self.total:
      parts.append(f"done in {seconds:.1f} s")
    elif self.total is not None:
      parts.append(f"ETA {_eta_text((self.total - self.done) / max(rate, 1e-9) / 60)}")
    return " | ".join(parts)

  def _show(self) -> None:
    if self.enabled and self._shown != self.done:
      print(self.line(), flush=True)
      self._shown, self._last = self.done, time.perf_counter()

  def update(self, n: int = 1) -> None:
    """Counts `n` more items done; prints a line when it is time or all are done."""
    self.done += n
    if self.done == self.total or time.perf_counter() - self._last >= self.every_secs:
      self._show()

  def close(self) -> None:
    """Prints the last line, unless it was just printed."""
    self._show()


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
