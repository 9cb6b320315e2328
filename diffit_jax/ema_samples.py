"""What the trainer draws from its EMA weights: sample grids and the periodic FID.

Both sample through one `inference.Pipeline` (the run's sampler and decoder on the
training mesh), so a grid or an FID's images are what `python -m diffit_jax.sample` draws
from the same weights, seed and labels.

  * `SampleWriter`: `WORKDIR/samples/step_XXXXXX.png`, `config.sample_grid` with the same
    seed every time, so grids from successive steps are comparable.
  * `evaluate_fid`: FID etc. of `config.eval.num_samples` samples (`diffit_jax.evaluation`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from diffit_jax import inference, logging_utils
from diffit_jax import sharding as sharding_lib

SAMPLES_DIR = "samples"


class SampleWriter:
  """EMA sample grids: `WORKDIR/samples/step_XXXXXX.png`, one row per class.

  Class-conditional models show `config.sample_grid.classes` (default the first
  min(num_classes, 10)) with `per_class` samples each; unconditional ones `num_images`.
  Latent models are decoded with the VAE at `config.vae` when it is set; otherwise the
  first three latent channels are shown. The same seed every time, so grids from
  successive steps are comparable. `config.sample_grid.num_steps` (0: config.sampler's)
  makes the grids cheaper than the samples `python -m diffit_jax.sample` draws.
  """

  def __init__(self, config: ml_collections.ConfigDict, pipeline: inference.Pipeline,
               workdir: str):
    grid = config.sample_grid
    num_classes = int(config.model.num_classes)
    if num_classes:
      classes = list(grid.classes or range(min(num_classes, 10)))
      self.labels = np.repeat(np.asarray(classes, np.int32), int(grid.per_class))
      self.num, self.rows = len(self.labels), len(classes)
    else:
      self.labels, self.num = None, int(grid.num_images)
      self.rows = max(1, int(math.sqrt(self.num)))
    self.seed = int(grid.seed)
    self.scale = int(grid.scale)
    self.pipeline = pipeline.with_num_steps(int(grid.num_steps))
    self.folder = os.path.join(workdir, SAMPLES_DIR)

  def __call__(self, ema_params: Any, step: int) -> str:
    """Samples the grid for `step` and writes it (process 0); returns the PNG path."""
    start = time.perf_counter()
    x = sharding_lib.to_host(self.pipeline.images(ema_params, self.labels, np.arange(self.num),
                                                  self.seed))
    path = os.path.join(self.folder, f"step_{step:06d}.png")
    if jax.process_index() == 0:
      logging_utils.save_image_grid(path, x, self.rows, scale=self.scale)
    logging.info("Sample grid for step %d (%d images, %d NFE) in %.1f s.", step, self.num,
                 self.pipeline.sampler.nfe, time.perf_counter() - start)
    return path


FID_SEED = 1_000_003  # the periodic FID at step s samples with seed FID_SEED + s


def evaluate_fid(config: ml_collections.ConfigDict, pipeline: inference.Pipeline,
                 ema_params: Any, step: int, evaluator: Any) -> dict[str, float]:
  """FID etc. of `config.eval.num_samples` EMA samples (uniform random classes).

  The images are exactly those of `python -m diffit_jax.sample --workdir=WORKDIR
  --num_samples=N --labels=random --seed=FID_SEED+step` from the same weights.
  """
  n, batch = int(config.eval.num_samples), int(config.eval.batch_size)
  seed = FID_SEED + step
  labels = inference.draw_labels("random", n, int(config.model.num_classes), seed)

  def batches():
    for start in range(0, n, batch):
      idx = np.arange(start, min(start + batch, n))
      x = sharding_lib.to_host(pipeline.images(
          ema_params, None if labels is None else labels[idx], idx, seed))
      yield np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]

  scores = evaluator(batches(), total=n, precision_recall=False)
  return {f"eval/{k}": float(v) for k, v in scores.items() if v is not None}


def fid_evaluator(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The periodic FID's `evaluation.Evaluator`, or None when `config.eval.every_steps` is 0.

  Its reference statistics are cached in WORKDIR/fid_reference.npz.
  """
  if not config.eval.every_steps:
    return None
  from diffit_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.Evaluator(config.eval.inception, config.eval.reference,
                              cache_path=os.path.join(workdir, "fid_reference.npz"),
                              progress=False)
