"""Smoke test of experiments/benchmark.py and a check of the FLOP count its MFU uses.

The benchmark runs in quick mode on the tiny variant with one timing round; the test
checks what it writes, never how fast anything was (timings on a shared CPU are noise).
"""

import json
import os
import sys

import pytest

from helpers import REPO

# experiments/ is not a package: its scripts import each other as top-level modules.
sys.path.insert(0, os.path.join(REPO, "experiments"))
import bench_model  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmark")
  benchmark.main(["--quick", "--variants", "tiny", "--input_size", "8", "--sampler_variant", "tiny",
              "--repeats", "1", "--no-torch_compile", "--no-xl_compile", "--out_dir", str(out)])
  return out


def test_quick_run_writes_json_and_markdown(written):
  import jax  # pylint: disable=g-import-not-at-top
  name = f"benchmark_{jax.devices()[0].platform}"
  with open(written / f"{name}.json") as f:
    report = json.load(f)
  for key in ("command", "machine", "settings", "load_average_start", "load_average_end",
              "variants", "sampler", "xl2_train_step_compile", "targets"):
    assert key in report, key
  assert report["machine"]["cpu_count"] >= 1
  r = report["variants"]["tiny"]
  for key in ("forward_flops_per_image", "analytic_forward_flops_per_image", "params",
              "times", "images_per_s", "mfu", "jax_over_torch", "matmul_peak_flops_per_s",
              "load_average_per_round"):
    assert key in r, key
  assert r["jax"]["train_compile_s"] > 0 and r["jax"]["forward_compile_s"] > 0
  assert "host_peak_rss_gib" in r["jax"]["train_memory"]
  for name_ in ("jax_train", "jax_forward", "torch_eager_train", "torch_eager_forward"):
    assert r["images_per_s"][name_] > 0 and r["mfu"][name_] > 0
    assert r["times"][name_]["median_s"] > 0
  assert set(r["jax_over_torch"]) == {"train_vs_torch_eager", "forward_vs_torch_eager"}
  # Both frameworks built the same network.
  assert r["torch_eager"]["params"] == r["params"]
  for key in ("ddpm_250_guided", "edm_heun_18"):
    s = report["sampler"][key]
    assert s["extrapolated"] and s["seconds_per_image"] > 0 and s["compile_s"] > 0
    for field in ("overhead_fraction", "overhead_fraction_trivial_network",
                  "network_seconds_per_image", "official_nfe", "measured_nfe"):
      assert field in s, field
  assert report["sampler"]["edm_heun_18"]["official_nfe"] == 35
  target = report["targets"]["tiny train >= 1.3x torch eager"]
  # The bound: the ratio at 100% MFU is 1 / torch's MFU; the target needs 1.3x torch's MFU.
  mfu_eager = r["mfu"]["torch_eager_train"]
  assert target["ceiling"] == pytest.approx(1 / mfu_eager, rel=1e-2)
  assert target["mfu_needed"] == pytest.approx(1.3 * mfu_eager, rel=1e-2, abs=1e-3)
  assert target["value"] == pytest.approx(r["jax_over_torch"]["train_vs_torch_eager"], abs=1e-3)
  assert (written / f"{name}.md").read_text().startswith("# diffit_jax benchmark")


def independent_matmul_flops(depth, hidden, heads, patch, input_size=32, in_channels=4,
                             learn_sigma=True, mlp_ratio=4.0):
  """2 x (multiply-adds of every matmul) of one latent DiffiT forward on one image.

  Written from the weight shapes: every per-token linear layer costs 2 x tokens x its
  weight count, the time-token linears 2 x their weight count, and global attention
  2 x 2 x tokens^2 x width per block (q k^T, then the weights times v).
  """
  del heads  # the head split does not change the count
  d, n = hidden, (input_size // patch) ** 2
  c_out = 2 * in_channels if learn_sigma else in_channels
  per_token_weights = (patch * patch * in_channels * d
                       + depth * (3 * d * d + d * d + 2 * int(mlp_ratio * d) * d)
                       + d * patch * patch * c_out)
  time_token_weights = 256 * d + d * d + depth * 3 * d * d
  return 2 * (n * per_token_weights + time_token_weights + depth * 2 * n * n * d)


@pytest.mark.parametrize("variant", ["S/2", "B/2", "XL/2"])
def test_mfu_flops_match_analytic_matmul_count(variant):
  from diffit_jax import models  # pylint: disable=g-import-not-at-top
  config = bench_model.model_config(variant)
  sizes = models.latent_variant(variant)
  expected = independent_matmul_flops(sizes["depth"], sizes["hidden_size"], sizes["num_heads"],
                                      sizes["patch_size"])
  assert bench_model.analytic_forward_flops(config) == pytest.approx(expected, rel=1e-9)
  # What MFU divides by: XLA's count of the forward, which adds the elementwise work.
  xla = models.forward_flops(config, batch_size=2) / 2
  assert xla == pytest.approx(expected, rel=0.02)
  assert xla >= expected  # XLA counts the matmuls plus elementwise ops, never fewer


def test_mfu_flops_of_the_smoke_run_match(written):
  import jax  # pylint: disable=g-import-not-at-top
  with open(written / f"benchmark_{jax.devices()[0].platform}.json") as f:
    r = json.load(f)["variants"]["tiny"]
  t = bench_model.TINY
  expected = independent_matmul_flops(t["depth"], t["hidden_size"], t["num_heads"],
                                      t["patch_size"], input_size=8)
  assert r["analytic_forward_flops_per_image"] == pytest.approx(expected, rel=1e-9)
  # The tiny net has 16 tokens of width 64: elementwise work is a larger share than at
  # full size, so only the ordering and a loose bound are checked here.
  assert expected <= r["forward_flops_per_image"] <= 1.25 * expected


@pytest.mark.parametrize("policy", ["dots_no_batch", "dots"])
def test_remat_policies_give_the_same_gradients(policy):
  """`remat_policy` only changes what the backward pass stores, never the gradients."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from diffit_jax.models import latent  # pylint: disable=g-import-not-at-top

  def grads(**kw):
    model = latent.LatentDiffiT(input_size=8, patch_size=2, hidden_size=32, depth=2,
                                num_heads=4, num_classes=10, rngs=nnx.Rngs(0), **kw)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)  # random weights: the zero-initialised head hides nothing
    state = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype)
                         if a.dtype == jnp.float32 else a, state)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t, y = jnp.array([3, 700]), jnp.array([1, 10])
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(x, t, y) ** 2)
    return jax.jit(jax.grad(loss))(state)

  plain = grads()
  for ours, ref in zip(jax.tree.leaves(grads(remat=True, remat_policy=policy)),
                       jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_unknown_remat_policy_is_refused():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from diffit_jax.models import latent  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="remat_policy"):
    latent.LatentDiffiT(input_size=8, hidden_size=32, depth=1, num_heads=4, num_classes=0,
                        remat=True, remat_policy="everything", rngs=nnx.Rngs(0))
