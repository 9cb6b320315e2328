"""ADM-compatible evaluation against a reference: statistics, caching, and the metrics dict.

The flow is that of the ADM evaluator's `main()`: reference activations (for
precision/recall) and statistics (the reference batch's precomputed `mu`, `sigma`,
`mu_s`, `sigma_s` when it carries them, else computed), sample activations and
statistics, then Inception Score, FID, sFID, precision and recall.

Computed reference statistics are cached in an `.npz` with ADM's key names (plus
`pool`, the pool_3 activations precision/recall needs, and a `metadata` JSON string
identifying the source and the Inception weights); a cache file is itself a valid
reference. `Evaluator` bundles all of it for the CLI (`diffit_jax/evaluate.py`) and for
periodic FID in the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Iterable

import jax
import numpy as np

from diffit_jax import checkpoint
from diffit_jax.convert.inception import load_inception
from diffit_jax.evaluation import metrics
from diffit_jax.evaluation.features import Activations, FeatureExtractor
from diffit_jax.evaluation.images import IMAGE_KEY, npz_keys, open_images
from diffit_jax.models.inception import InceptionV3

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM reference batch keys.
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """What the metrics need from a reference set."""
  fid: metrics.FIDStatistics  # pool_3 statistics (ADM's mu, sigma)
  sfid: metrics.FIDStatistics  # mixed_6/conv statistics (ADM's mu_s, sigma_s)
  pool: np.ndarray | None = None  # (N, 2048) pool_3 activations; None: no precision/recall

  @classmethod
  def from_activations(cls, acts: Activations) -> "ReferenceStats":
    return cls(fid=metrics.FIDStatistics.from_features(acts.pool),
               sfid=metrics.FIDStatistics.from_features(acts.spatial), pool=acts.pool)

  def save(self, path: str, *, metadata: dict | None = None) -> None:
    """Atomically writes an `.npz` with ADM's keys, `pool` if known, and `metadata` JSON."""
    arrays = dict(mu=self.fid.mu, sigma=self.fid.sigma, mu_s=self.sfid.mu, sigma_s=self.sfid.sigma,
                  metadata=np.array(json.dumps(metadata or {})))
    if self.pool is not None:
      arrays["pool"] = self.pool
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path: str) -> tuple["ReferenceStats", dict]:
    """Reads statistics (ADM reference batch or a file written by `save`) and their metadata."""
    keys = npz_keys(path)
    missing = [k for k in STATS_KEYS if k not in keys]
    if missing:
      raise ValueError(f"{path} lacks the statistics {missing} (keys: {keys}).")
    with np.load(path) as npz:  # Loads members lazily: arr_0 is not read.
      stats = cls(fid=metrics.FIDStatistics(npz["mu"], npz["sigma"]),
                  sfid=metrics.FIDStatistics(npz["mu_s"], npz["sigma_s"]),
                  pool=npz["pool"] if "pool" in keys else None)
      metadata = json.loads(str(npz["metadata"])) if "metadata" in keys else {}
    return stats, metadata


def compute_metrics(ref: ReferenceStats, samples: Activations, *,
                    precision_recall: bool = True) -> dict[str, float | int | None]:
  """ADM's five numbers for sample activations against a reference.

  Args:
    ref: reference statistics (and pool_3 activations for precision/recall).
    samples: Inception activations of the samples.
    precision_recall: compute precision and recall (the costliest part: all pairwise
      distances); skipped, and reported as None, also when `ref.pool` is None.

  Returns:
    {"inception_score", "fid", "sfid", "precision", "recall", "num_samples",
     "num_reference"}; precision, recall and num_reference may be None.
  """
  result: dict[str, float | int | None] = {
      "inception_score": metrics.inception_score(samples.logits),
      "fid": metrics.frechet_distance(metrics.FIDStatistics.from_features(samples.pool), ref.fid),
      "sfid": metrics.frechet_distance(metrics.FIDStatistics.from_features(samples.spatial),
                                       ref.sfid),
      "precision": None,
      "recall": None,
      "num_samples": len(samples),
      "num_reference": None if ref.pool is None else len(ref.pool),
  }
  if precision_recall and ref.pool is not None:
    result["precision"], result["recall"] = metrics.precision_recall(ref.pool, samples.pool)
  return result


def _fingerprint(path: str, inception_id: str) -> dict:
  """Identifies a reference source and the Inception weights, to validate a cache."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    files = open_images(path).files
    stats = [os.stat(f) for f in files]
    size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
  else:
    stat = os.stat(path)
    size, mtime, files = stat.st_size, stat.st_mtime_ns, [path]
  return {"format": _CACHE_FORMAT, "source": path, "num_files": len(files), "size": size,
          "mtime_ns": mtime, "inception": inception_id}


def load_reference(path: str, extractor: FeatureExtractor, *, cache_path: str | None = None,
                   inception_id: str = "", progress: bool = True) -> ReferenceStats:
  """Reference statistics from an ADM batch, a statistics file or an image folder.

  * `.npz` with `arr_0` images: activations are computed (or read from `cache_path`
    when it was written for the same file and Inception weights). If the file also
    carries `mu`, `sigma`, `mu_s`, `sigma_s` (ADM's reference batches do), those are
    used for FID/sFID, as ADM's `read_statistics` does; the images still give the
    pool_3 activations for precision/recall.
  * `.npz` with only the statistics (e.g. a cache file): used as is; precision/recall
    need its `pool` activations, which only our cache files carry.
  * a folder of image files: as `arr_0` (one image size).

  Args:
    path: the reference.
    extractor: computes activations when needed.
    cache_path: where computed statistics are cached; None disables caching.
    inception_id: identifies the Inception weights in the cache (e.g. their SHA-256).
    progress: print progress lines.

  Returns:
    The `ReferenceStats`.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference {path} does not exist.")
  precomputed = None
  if not os.path.isdir(path):
    keys = npz_keys(path)
    has_stats = all(k in keys for k in STATS_KEYS)
    if IMAGE_KEY not in keys:
      if not has_stats:
        raise ValueError(f"reference {path} has neither images ({IMAGE_KEY}) nor statistics "
                         f"({', '.join(STATS_KEYS)}); keys: {keys}.")
      return ReferenceStats.load(path)[0]
    if has_stats:
      precomputed, _ = ReferenceStats.load(path)
  fingerprint = _fingerprint(path, inception_id)
  ref = None
  if cache_path and os.path.exists(cache_path):
    try:
      cached, metadata = ReferenceStats.load(cache_path)
    except ValueError as e:
      print(f"ignoring unreadable reference cache {cache_path}: {e}")
    else:
      if metadata == fingerprint and cached.pool is not None:
        ref = cached
      else:
        print(f"reference cache {cache_path} was made for another reference or Inception; "
              "recomputing it")
  if ref is None:
    source = open_images(path)
    acts = extractor(source.batches(extractor.batch_size), total=len(source),
                     progress=progress, desc="reference features")
    ref = ReferenceStats.from_activations(acts)
    if cache_path and jax.process_index() == 0:
      ref.save(cache_path, metadata=fingerprint)
  if precomputed is not None:
    ref = dataclasses.replace(ref, fid=precomputed.fid, sfid=precomputed.sfid)
  return ref


def inception_identity(path: str) -> str:
  """The Inception checkpoint's source SHA-256 (from its metadata), else its path."""
  return checkpoint.load_metadata(path).get("source_sha256") or os.path.abspath(path)


class Evaluator:
  """ADM metrics against one reference; what the CLI and the training loop call.

  Example (periodic FID in a training loop, EMA samples streamed as uint8 batches):

    evaluator = Evaluator(config.inception, config.fid_reference,
                          cache_path=os.path.join(workdir, "fid_reference.npz"), mesh=mesh)
    ...
    scores = evaluator(sample_batches(ema_params, config.fid_num_samples),
                       total=config.fid_num_samples, precision_recall=False)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items() if v is not None})
  """

  def __init__(self, inception: str | InceptionV3, reference: str | ReferenceStats, *,
               cache_path: str | None = None, batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None, progress: bool = True):
    """Loads the Inception; the reference is read on first use.

    Args:
      inception: a converted Inception checkpoint folder, or the model itself.
      reference: path (see `load_reference`) or precomputed `ReferenceStats`.
      cache_path: file caching computed reference statistics; None disables it.
      batch_size: global Inception batch size (a multiple of the devices `mesh` splits a
        batch over).
      mesh: the run's mesh (`diffit_jax.sharding.create_mesh`); default all devices.
      progress: print progress lines.
    """
    if isinstance(inception, str):
      self.inception_id = inception_identity(inception)
      inception = load_inception(inception)
    else:
      self.inception_id = ""
    self.extractor = FeatureExtractor(inception, batch_size=batch_size, mesh=mesh)
    self.progress = progress
    self._reference_source = reference
    self._cache_path = cache_path
    self._reference = reference if isinstance(reference, ReferenceStats) else None

  @property
  def reference(self) -> ReferenceStats:
    if self._reference is None:
      self._reference = load_reference(self._reference_source, self.extractor,
                                       cache_path=self._cache_path,
                                       inception_id=self.inception_id, progress=self.progress)
    return self._reference

  def activations(self, images: np.ndarray | Iterable[np.ndarray], *,
                  total: int | None = None) -> Activations:
    """Inception activations of images ((N, H, W, 3) uint8, or an iterable of batches)."""
    return self.extractor(images, total=total, progress=self.progress, desc="sample features")

  def __call__(self, images: np.ndarray | Iterable[np.ndarray], *, total: int | None = None,
               precision_recall: bool = True) -> dict[str, float | int | None]:
    """Evaluates samples; see `compute_metrics` for the returned dict."""
    ref = self.reference
    return compute_metrics(ref, self.activations(images, total=total),
                           precision_recall=precision_recall)
