"""Metric math against NumPy/SciPy transcriptions of the ADM evaluator's formulas.

The `adm_*` functions below transcribe openai/guided-diffusion `evaluations/evaluator.py`
(`FIDStatistics.frechet_distance` with `scipy.linalg.sqrtm`, `compute_inception_score`,
`ManifoldEstimator.manifold_radii` / `evaluate_pr` with float32 distances), written
for the tests only; the package computes the same quantities differently (eigenvalues
instead of `sqrtm`, JAX distance tiles with a running top-k).
"""

import warnings

import numpy as np
import pytest
from scipy import linalg

from diffit_jax.evaluation import metrics


# ---- ADM transcriptions -------------------------------------------------------------


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sqrtm warns on singular input; ADM passes disp=False.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(logits, split_size=5000):
  logits = logits.astype(np.float32)
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def adm_distances(u, v):
  u, v = u.astype(np.float32), v.astype(np.float32)
  norm_u = np.sum(u * u, 1).reshape(-1, 1)
  norm_v = np.sum(v * v, 1).reshape(1, -1)
  return np.maximum(norm_u - 2 * u @ v.T + norm_v, 0.0)


def adm_radii(features, k=3):
  d = adm_distances(features, features)
  return np.partition(d, np.arange(k + 1), axis=1)[:, k]


def adm_precision_recall(ref, sample, k=3):
  r_ref, r_sample = adm_radii(ref, k), adm_radii(sample, k)
  d = adm_distances(ref, sample)[..., None]  # (N_ref, N_sample, 1)
  ref_in = np.any(d <= r_sample[:, None], axis=1)  # radii_2 of shape (N_sample, 1)
  sample_in = np.any(d <= r_ref[:, None, None], axis=0)
  return float(np.mean(sample_in)), float(np.mean(ref_in))


def stats(x):
  return metrics.FIDStatistics.from_features(x)


# ---- Fréchet distance ---------------------------------------------------------------


@pytest.mark.parametrize("n, dim", [(400, 32), (60, 64), (20, 64), (10, 256)])
@pytest.mark.parametrize("keep_factor", [True, False])
def test_frechet_distance_matches_adm(n, dim, keep_factor):
  """Well-conditioned (n > dim: Cholesky) and rank-deficient (n <= dim) covariances, the
  latter through the features factor or, without it, through `eigh`."""
  rng = np.random.default_rng(n + dim)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = (rng.normal(size=(n, dim)) * 1.2 + 0.3).astype(np.float32)
  a, b = stats(x), stats(y)
  assert (a.factor is not None) == (n <= dim)
  if not keep_factor:
    a, b = a._replace(factor=None), b._replace(factor=None)
  expected = adm_frechet_distance(a.mu.astype(np.float64), a.sigma, b.mu.astype(np.float64),
                                  b.sigma)
  np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(metrics.frechet_distance(b, a), expected, rtol=1e-6)
  # Mixed: only one side carries a factor.
  np.testing.assert_allclose(metrics.frechet_distance(a, b._replace(factor=None)), expected,
                             rtol=1e-6)


def test_frechet_distance_near_singular_scaled_features():
  """A covariance with eigenvalues spanning 12 orders of magnitude, as dead Inception units give."""
  rng = np.random.default_rng(0)
  scales = np.logspace(-6, 0, 48)
  x = (rng.normal(size=(200, 48)) * scales).astype(np.float64)
  y = (rng.normal(size=(200, 48)) * scales[::-1]).astype(np.float64)
  a, b = stats(x), stats(y)
  expected = adm_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
  np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-6)


def test_frechet_distance_closed_form():
  """Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
  got = metrics.frechet_distance(metrics.FIDStatistics(mu1, np.diag(v1)),
                                 metrics.FIDStatistics(mu2, np.diag(v2)))
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize("keep_factor", [True, False])
def test_frechet_distance_of_a_set_with_itself_is_zero(keep_factor):
  x = np.random.default_rng(2).normal(size=(30, 64)).astype(np.float32)  # rank-deficient
  a = stats(x) if keep_factor else stats(x)._replace(factor=None)
  # Zero eigenvalues of the rank-deficient S^2 come back as +-1e-16 |S|^2; their square roots
  # leave ~1e-8 relative (ADM's sqrtm does the same).
  assert abs(metrics.frechet_distance(a, a)) < 1e-7 * np.trace(a.sigma)


def test_statistics_are_adms():
  x = np.random.default_rng(3).normal(size=(50, 7)).astype(np.float32)
  s = stats(x)
  np.testing.assert_array_equal(s.mu, np.mean(x, axis=0))
  np.testing.assert_array_equal(s.sigma, np.cov(x, rowvar=False))


def test_frechet_distance_rejects_mismatched_statistics():
  a = stats(np.zeros((3, 4)) + np.arange(12).reshape(3, 4))
  b = stats(np.zeros((3, 5)) + np.arange(15).reshape(3, 5))
  with pytest.raises(ValueError, match="statistics do not match"):
    metrics.frechet_distance(a, b)
  with pytest.raises(ValueError, match="NaN or Inf"):
    stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


# ---- Inception Score ----------------------------------------------------------------


def test_inception_score_matches_adm():
  """Three splits of 5000, the last one short, as ADM splits 12003 samples."""
  logits = (np.random.default_rng(4).normal(size=(12003, 1008)) * 3).astype(np.float32)
  np.testing.assert_allclose(metrics.inception_score(logits), adm_inception_score(logits),
                             rtol=1e-5)


def test_inception_score_limits():
  assert metrics.inception_score(np.zeros((20, 10))) == pytest.approx(1.0)  # p(y|x) = p(y)
  confident = np.eye(10) * 50.0  # Each sample certain of a different class.
  assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
  # Split size matters: two splits of 5 samples over 5 classes each.
  assert metrics.inception_score(confident, split_size=5) == pytest.approx(5.0, rel=1e-6)


# ---- Precision and recall -----------------------------------------------------------


def _integer_features(seed, n, shift=0):
  # Small integers: every distance is exact in float16, so ADM's float16 path and the
  # float32 transcription agree bit for bit, ties included.
  return (np.random.default_rng(seed).integers(0, 4, size=(n, 8)) + shift).astype(np.float32)


def test_precision_recall_matches_adm_exactly():
  ref = _integer_features(5, 150)
  sample = np.concatenate([_integer_features(6, 90), _integer_features(7, 30, shift=3)])
  # batch_size 64: several tiles per axis, last ones partial.
  np.testing.assert_array_equal(metrics.manifold_radii(ref, batch_size=64), adm_radii(ref))
  got = metrics.precision_recall(ref, sample, batch_size=64)
  expected = adm_precision_recall(ref, sample)
  assert got == expected
  assert 0 < got[0] < 1 and 0 < got[1] <= 1


def test_precision_recall_float32_fallback():
  """Features whose float16 distances overflow: ADM recomputes the tile in float32."""
  ref = _integer_features(8, 80) * 300
  sample = _integer_features(9, 70, shift=1) * 300
  got = metrics.precision_recall(ref, sample, batch_size=32)
  assert got == adm_precision_recall(ref, sample)


def test_precision_recall_continuous_features():
  rng = np.random.default_rng(10)
  ref = rng.normal(size=(300, 16)).astype(np.float32)
  sample = (rng.normal(size=(250, 16)) * 1.3 + 0.4).astype(np.float32)
  got = metrics.precision_recall(ref, sample, batch_size=128)
  expected = adm_precision_recall(ref, sample)
  # float16 vs float32 distances may flip a borderline point or two.
  np.testing.assert_allclose(got, expected, atol=2.5 / 250)


def test_precision_recall_of_a_set_with_itself_is_one():
  x = np.random.default_rng(11).normal(size=(100, 32)).astype(np.float32)
  assert metrics.precision_recall(x, x, batch_size=48) == (1.0, 1.0)


def test_precision_recall_needs_more_than_k_points():
  with pytest.raises(ValueError, match="at least 4 rows"):
    metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
