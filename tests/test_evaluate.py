"""End to end: `python -m diffit_jax.evaluate` on a random-weight FID Inception.

The CLI runs in-process (`evaluate.main`) on 8 host CPU devices with a global batch of
8, so the batch is sharded one image per device and the 6-image sets fill a padded
batch. Images are tiny (the network resizes them to 299x299 anyway).
"""

import json
import os

import numpy as np
import pytest
from flax import nnx

from diffit_jax import evaluate
from diffit_jax.convert import inception as convert
from diffit_jax.evaluation import ReferenceStats
from diffit_jax.evaluation.features import _rebatch

N = 6  # One padded global batch of 8.


def random_inception_params(seed=0):
  """He-normal kernels and random BatchNorm statistics, drawn with NumPy (fast)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(convert.abstract_inception())
  flat = {}
  for path, leaf in nnx.to_flat_state(state):
    shape, name = leaf.shape, str(path[-1])
    if name == "kernel" and len(shape) == 4:
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape)
    elif name == "kernel":
      value = rng.normal(0, 0.05, shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0, 0.2, shape)
    flat[tuple(str(p) for p in path)] = value.astype(np.float32)
  nested = {}
  for path, value in flat.items():
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return nested


def images(seed, n=N, brightness=100.0):
  """Smooth random colour fields plus pixel noise: one 'distribution' per brightness."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(0, 40, size=(n, 4, 4, 3))
  smooth = coarse.repeat(8, axis=1).repeat(8, axis=2)  # (n, 32, 32, 3)
  noise = rng.normal(0, 10, size=smooth.shape)
  return np.clip(brightness + smooth + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  ckpt = str(root / "inception")
  convert.save_inception(ckpt, random_inception_params(), source="random", sha256="0" * 64)
  files = {}
  for name, seed, brightness in (("a", 1, 100.0), ("b", 2, 100.0), ("c", 3, 170.0)):
    files[name] = str(root / f"{name}.npz")
    np.savez(files[name], images(seed, brightness=brightness))
  return root, ckpt, files


def run(setup, ref, samples, out_name, *extra):
  root, ckpt, files = setup
  out = root / "results" / out_name
  argv = [f"--ref={files.get(ref, ref)}", f"--samples={files.get(samples, samples)}",
          f"--inception={ckpt}", f"--out={out}", "--batch_size=8", "--noprogress", *extra]
  assert evaluate.main(argv) == 0
  with open(out) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def results(setup):
  """The core CLI runs, shared by the tests below (each costs an Inception pass per set)."""
  return {"same": run(setup, "a", "b", "same.json"),  # Computes and caches A's statistics.
          "shifted": run(setup, "a", "c", "shifted.json"),
          "self": run(setup, "a", "a", "self.json")}


def test_same_distribution_scores_lower_fid_than_shifted(results):
  same, shifted = results["same"], results["shifted"]
  assert 0 < same["fid"] < shifted["fid"]
  assert same["sfid"] > 0 and shifted["sfid"] > 0  # sFID on 6 images is too noisy to order.
  for result in (same, shifted):
    assert result["num_samples"] == result["num_reference"] == N
    assert result["inception_score"] >= 1.0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


def test_batch_against_itself(results):
  result = results["self"]
  # Zero up to rounding: FIDs between different sets here are ~1e3.
  assert abs(result["fid"]) < 1e-4 and abs(result["sfid"]) < 1e-4
  assert result["precision"] == result["recall"] == 1.0


def test_reference_cache_is_written_and_reused(setup, results, capsys):
  root, _, files = setup
  cache = root / "results" / "a.inception_stats.npz"  # Written by the first run, next to --out.
  assert cache.exists()
  stats, meta = ReferenceStats.load(str(cache))
  assert meta["source"] == os.path.abspath(files["a"]) and stats.pool.shape == (N, 2048)
  # The cache is itself a reference: statistics plus the pool activations for P/R.
  from_stats = run(setup, str(cache), "b", "from_stats.json")
  for key in ("fid", "sfid", "precision", "recall"):
    assert from_stats[key] == pytest.approx(results["same"][key], rel=1e-9, abs=1e-12)
  # A cache made with other Inception weights is recomputed, not trusted.
  stats.save(str(cache), metadata={**meta, "inception": "other"})
  capsys.readouterr()
  recomputed = run(setup, "a", "b", "recomputed.json")
  assert "recomputing" in capsys.readouterr().out
  assert recomputed["fid"] == pytest.approx(results["same"]["fid"], rel=1e-9)
  assert ReferenceStats.load(str(cache))[1] == meta


def test_precomputed_reference_statistics_win(setup, results):
  """As ADM: a reference batch's mu/sigma/mu_s/sigma_s are used for FID; arr_0 for P/R."""
  root, _, files = setup
  a_stats, _ = ReferenceStats.load(str(root / "results" / "a.inception_stats.npz"))
  adm_batch = root / "adm_like.npz"  # C's images with A's statistics.
  np.savez(adm_batch, arr_0=np.load(files["c"])["arr_0"], mu=a_stats.fid.mu,
           sigma=a_stats.fid.sigma, mu_s=a_stats.sfid.mu, sigma_s=a_stats.sfid.sigma)
  result = run(setup, str(adm_batch), "a", "adm_like.json")
  assert abs(result["fid"]) < 1e-4 and abs(result["sfid"]) < 1e-4  # A's own statistics...
  assert result["recall"] == results["shifted"]["precision"]  # ...P/R against C's images.
  assert result["precision"] == results["shifted"]["recall"]


def test_rebatching_pads_and_keeps_order():
  stream = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate((3, 9, 1, 2))]
  batches = list(_rebatch(stream, 4))
  assert [len(b) for b in batches] == [4, 4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches)[:, 0, 0, 0],
                                np.concatenate([b[:, 0, 0, 0] for b in stream]))
  with pytest.raises(ValueError, match="image size changed"):
    list(_rebatch([np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 3, 3, 3), np.uint8)], 4))
  with pytest.raises(ValueError, match="NCHW"):
    list(_rebatch([np.zeros((1, 3, 8, 8), np.uint8)], 4))


def test_clear_errors_for_bad_files(setup, tmp_path, capsys):
  _, ckpt, files = setup
  no_images = tmp_path / "stats_only.npz"
  np.savez(no_images, mu=np.zeros(3))
  floats = tmp_path / "floats.npz"
  np.savez(floats, np.zeros((2, 8, 8, 3), np.float32))
  cases = [
      ([f"--ref={files['a']}", f"--samples={tmp_path / 'missing.npz'}"], "does not exist"),
      ([f"--ref={files['a']}", f"--samples={no_images}"], "has no 'arr_0' images"),
      ([f"--ref={files['a']}", f"--samples={floats}"], "must be uint8 images"),
      ([f"--ref={no_images}", f"--samples={files['a']}"], "neither images"),
      ([f"--ref={files['a']}", f"--samples={files['b']}", "--batch_size=12"], "multiple"),
  ]
  for argv, message in cases:
    assert evaluate.main([*argv, f"--inception={ckpt}", "--noprogress"]) == 2
    assert message in capsys.readouterr().err
  assert evaluate.main([f"--ref={files['a']}", f"--samples={files['b']}",
                        f"--inception={tmp_path}", "--noprogress"]) == 2
  assert "not a diffit_jax weights checkpoint" in capsys.readouterr().err
