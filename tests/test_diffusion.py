"""Diffusion processes against independent references: closed-form NumPy, diffusers, ADM.

Covers `diffit_jax.diffusion.{gaussian,respace,edm,guidance,process}`: beta schedules and posterior
coefficients (closed form and diffusers' DDPMScheduler / DDIMScheduler, including a
learned-range step), ADM's `space_timesteps` examples, the hybrid loss against a float64
NumPy transcription of ADM's `training_losses`, EDM preconditioning and loss, and the guidance
weights and channel selection, and the process `from_config` builds from a run config.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffit_jax import config_lib, diffusion
from diffit_jax.diffusion import edm, gaussian, guidance, respace, samplers
from helpers import assert_trees_equal, nhwc

# ----------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------


def test_named_beta_schedules_closed_form():
  np.testing.assert_allclose(gaussian.get_named_beta_schedule("linear", 1000),
                             np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
  # ADM rescales the linear endpoints by 1000 / T.
  np.testing.assert_allclose(gaussian.get_named_beta_schedule("linear", 250),
                             np.linspace(4e-4, 0.08, 250), rtol=1e-12)
  # IDDPM Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008.
  t_count = 1000
  f = np.cos((np.arange(t_count + 1) / t_count + 0.008) / 1.008 * np.pi / 2) ** 2
  expected = np.minimum(1 - f[1:] / f[:-1], 0.999)
  np.testing.assert_allclose(gaussian.get_named_beta_schedule("cosine", t_count), expected,
                             rtol=1e-10)


def test_betas_match_diffusers():
  from diffusers import DDPMScheduler
  for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    np.testing.assert_allclose(gaussian.get_named_beta_schedule(ours, 1000),
                               sched.betas.numpy(), rtol=1e-5, atol=1e-8)


def test_schedule_coefficients_closed_form():
  betas = gaussian.get_named_beta_schedule("cosine", 100)
  s = gaussian.schedule_from_betas(betas)
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)  # DDPM Eq. 7
  check = lambda ours, ref: np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-6)
  check(s.alphas_cumprod, ab)
  check(s.posterior_variance[1:], post_var[1:])
  assert float(s.posterior_variance[0]) == 0.0
  check(s.posterior_log_variance_clipped[0], np.log(post_var[1]))
  check(s.posterior_log_variance_clipped[1:], np.log(post_var[1:]))
  check(s.posterior_mean_coef1, np.sqrt(ab_prev) * betas / (1 - ab))
  check(s.posterior_mean_coef2, np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab))
  check(s.fixed_large_log_variance[1:], np.log(betas[1:]))
  np.testing.assert_array_equal(np.asarray(s.timestep_map), np.arange(100))
  assert s.betas.dtype == jnp.float32 and s.num_timesteps == 100


# ----------------------------------------------------------------------------------------------
# Respacing.
# ----------------------------------------------------------------------------------------------

# Outputs of ADM's own `space_timesteps` (guided_diffusion/respace.py) for its docstring example
# and the strings DiffiT and DDIM use.
ADM_300_10_15_20 = [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107, 114, 121, 128, 135, 142,
                    149, 157, 164, 171, 178, 185, 192, 199, 200, 205, 210, 216, 221, 226, 231,
                    236, 242, 247, 252, 257, 263, 268, 273, 278, 283, 289, 294, 299]
ADM_1000_250_HEAD = list(range(0, 160, 4))
ADM_1000_250_TAIL = [963, 967, 971, 975, 979, 983, 987, 991, 995, 999]
ADM_1000_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666,
               708, 749, 791, 832, 874, 916, 957, 999]


def test_space_timesteps_adm_examples():
  assert sorted(respace.space_timesteps(300, [10, 15, 20])) == ADM_300_10_15_20
  assert sorted(respace.space_timesteps(300, "10,15,20")) == ADM_300_10_15_20
  kept = sorted(respace.space_timesteps(1000, "250"))
  assert len(kept) == 250 and sum(kept) == 124875
  assert kept[:40] == ADM_1000_250_HEAD and kept[-10:] == ADM_1000_250_TAIL
  assert sorted(respace.space_timesteps(1000, "25")) == ADM_1000_25
  assert sorted(respace.space_timesteps(10, "3,3")) == [0, 2, 4, 5, 7, 9]
  assert respace.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
  assert sorted(respace.space_timesteps(1000, "ddim7")) == [0, 143, 286, 429, 572, 715, 858]
  assert respace.space_timesteps(1000, "1000") == set(range(1000))


@pytest.mark.parametrize("bad, match", [
    ("ddim300", "no integer stride"),
    ("ddimx", "must be followed by a step count"),
    ("abc", "use a step count"),
    ("10,x", "use a step count"),
    ("0", ">= 1"),
    ("2000", "cannot keep 2000"),
])
def test_space_timesteps_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    respace.space_timesteps(1000, bad)


def test_respaced_schedule_keeps_marginals_and_maps_to_original_steps():
  base = respace.create_schedule("linear", 1000)
  spaced = respace.create_schedule("linear", 1000, "10")
  kept = np.array(sorted(respace.space_timesteps(1000, "10")))
  np.testing.assert_array_equal(np.asarray(spaced.timestep_map), kept)
  np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod),
                             np.asarray(base.alphas_cumprod)[kept], rtol=1e-6)
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[kept]
  np.testing.assert_allclose(np.asarray(spaced.betas),
                             1 - ab / np.concatenate([[1.0], ab[:-1]]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Single sampler steps against diffusers.
# ----------------------------------------------------------------------------------------------


def _nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


@pytest.mark.parametrize("respacing", ["", "50"])
def test_ddpm_learned_range_step_matches_diffusers(respacing):
  import torch
  from diffusers import DDPMScheduler
  sched = respace.create_schedule("linear", 1000, respacing)
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                      variance_type="learned_range", clip_sample=False)
  if respacing:  # diffusers' custom timesteps recompute betas from the kept alpha_bar as ADM
    ref.set_timesteps(timesteps=np.asarray(sched.timestep_map)[::-1].tolist())
  rng = np.random.default_rng(0)
  for k in (sched.num_timesteps - 1, sched.num_timesteps // 2, 1, 0):
    t_orig = int(sched.timestep_map[k])
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    out = np.concatenate([rng.standard_normal((2, 4, 4, 3)),
                          np.tanh(rng.standard_normal((2, 4, 4, 3)))], -1).astype(np.float32)
    gen = torch.Generator().manual_seed(k)
    theirs = ref.step(_nchw(out), t_orig, _nchw(x), generator=gen)
    noise = nhwc(torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(k)))
    x_prev, x0 = samplers.ddpm_step(sched, jnp.asarray(out), jnp.asarray(x), k,
                                    jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(x0), nhwc(theirs.pred_original_sample),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_prev), nhwc(theirs.prev_sample),
                               rtol=1e-4, atol=1e-4)


def test_ddim_step_matches_diffusers():
  from diffusers import DDIMScheduler
  sched = respace.create_schedule("linear", 1000, "ddim50")
  ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                      set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
  ref.set_timesteps(50)
  np.testing.assert_array_equal(ref.timesteps.numpy(), np.asarray(sched.timestep_map)[::-1])
  rng = np.random.default_rng(1)
  for k in (49, 30, 1, 0):
    t_orig = int(sched.timestep_map[k])
    x, eps, noise = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(3))
    theirs = ref.step(_nchw(eps), t_orig, _nchw(x), eta=0.5, variance_noise=_nchw(noise))
    x_prev, x0 = samplers.ddim_step(sched, jnp.asarray(eps), jnp.asarray(x), k,
                                    jnp.asarray(noise), eta=0.5, var_type="fixed_small")
    np.testing.assert_allclose(np.asarray(x0), nhwc(theirs.pred_original_sample),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_prev), nhwc(theirs.prev_sample),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# q, p and the hybrid loss.
# ----------------------------------------------------------------------------------------------


def test_q_sample_and_posterior_closed_form():
  betas = gaussian.get_named_beta_schedule("linear", 1000)
  s = gaussian.schedule_from_betas(betas)
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, 4, 2, 2, 3))
  t = np.array([0, 1, 500, 999])
  e = lambda a: a[t][:, None, None, None]
  x_t = np.asarray(gaussian.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                                     jnp.asarray(noise, jnp.float32)))
  np.testing.assert_allclose(x_t, np.sqrt(e(ab)) * x0 + np.sqrt(1 - e(ab)) * noise, atol=1e-5)
  mean, var, _ = gaussian.q_posterior_mean_variance(s, jnp.asarray(x0, jnp.float32),
                                                    jnp.asarray(x_t), jnp.asarray(t))
  # Posterior mean of q(x_{t-1} | x_t, x_0) [DDPM Eq. 7].
  b = e(betas)
  expected = (np.sqrt(e(ab_prev)) * b * x0 + np.sqrt(1 - b) * (1 - e(ab_prev)) * x_t) / (1 - e(ab))
  np.testing.assert_allclose(np.asarray(mean), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(var)[:, 0, 0, 0], (b * (1 - e(ab_prev)) / (1 - e(ab)))
                             [:, 0, 0, 0], rtol=1e-5)


def test_eps_x0_v_predictions_give_the_same_mean():
  s = respace.create_schedule("cosine", 1000)
  rng = np.random.default_rng(0)
  x0, noise = (jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.float32) for _ in range(2))
  t = jnp.array([3, 400, 990])
  x_t = gaussian.q_sample(s, x0, t, noise)
  outs = {"eps": noise, "x0": x0, "v": gaussian.v_target(s, x0, t, noise)}
  means = [gaussian.p_mean_variance(s, out, x_t, t, pred_type=p, var_type="fixed_small")
           for p, out in outs.items()]
  for m in means:
    np.testing.assert_allclose(np.asarray(m.pred_x0), np.asarray(x0), atol=2e-3)
    np.testing.assert_allclose(np.asarray(m.mean), np.asarray(means[1].mean), atol=2e-3)


def _np_adm_hybrid_loss(betas, model_np, x0, t, t_model, noise):
  """A float64 transcription of ADM `training_losses` (MSE, LEARNED_RANGE, EPSILON)."""
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
  coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
  coef2 = (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
  e = lambda a: a[t][:, None, None, None]
  mean_flat = lambda a: a.mean(axis=(1, 2, 3))
  x_t = np.sqrt(e(ab)) * x0 + np.sqrt(1 - e(ab)) * noise
  out = model_np(x_t, t_model)
  c = x0.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  mse = mean_flat((noise - eps) ** 2)
  pred_x0 = np.sqrt(1 / e(ab)) * x_t - np.sqrt(1 / e(ab) - 1) * eps
  model_mean = e(coef1) * pred_x0 + e(coef2) * x_t
  frac = (v + 1) / 2
  model_logvar = frac * np.log(e(betas)) + (1 - frac) * e(post_logvar)
  true_mean = e(coef1) * x0 + e(coef2) * x_t
  true_logvar = e(post_logvar)
  kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
              + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
  kl = mean_flat(kl) / np.log(2)
  cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  inv_std = np.exp(-0.5 * model_logvar)
  cdf_plus = cdf(inv_std * (x0 - model_mean + 1 / 255))
  cdf_min = cdf(inv_std * (x0 - model_mean - 1 / 255))
  log_probs = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                       np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                                np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
  nll = -mean_flat(log_probs) / np.log(2)
  vb = np.where(t == 0, nll, kl)
  return mse + vb, mse, vb


@pytest.mark.parametrize("respacing", ["", "100"])
def test_hybrid_loss_matches_numpy_transcription_of_adm(respacing):
  sched = respace.create_schedule("linear", 1000, respacing)
  kept = np.asarray(sched.timestep_map)
  betas64 = gaussian.get_named_beta_schedule("linear", 1000)
  if respacing:
    betas64, _ = respace.respace_betas(betas64, set(kept.tolist()))

  def model_np(x_t, t_model):  # depends on x_t and the ORIGINAL timestep
    eps = 0.8 * x_t + 1e-3 * t_model[:, None, None, None]
    return np.concatenate([eps, np.tanh(x_t)], -1)

  def model_fn(x_t, t_model, y):
    del y
    eps = 0.8 * x_t + 1e-3 * t_model.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([eps, jnp.tanh(x_t)], -1)

  rng = np.random.default_rng(0)
  x0 = np.clip(rng.standard_normal((6, 4, 4, 2)), -1, 1)  # includes the +-1 edge bins
  noise = rng.standard_normal((6, 4, 4, 2))
  t = np.array([0, 0, 1, 2, sched.num_timesteps // 2, sched.num_timesteps - 1])
  loss_fn = jax.jit(lambda x0, t, noise: gaussian.adm_loss(
      sched, model_fn, x0, None, jax.random.key(0), t=t, noise=noise))
  loss, aux = loss_fn(jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                      jnp.asarray(noise, jnp.float32))
  ref_loss, ref_mse, ref_vb = _np_adm_hybrid_loss(betas64, model_np, x0, t, kept[t], noise)
  np.testing.assert_allclose(np.asarray(aux["mse"]), ref_mse, rtol=1e-4)
  # float32 vs float64: the t = 0 decoder NLL differs by about 1e-4 relative.
  np.testing.assert_allclose(np.asarray(aux["vb"]), ref_vb, rtol=5e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=5e-4, atol=1e-5)


def test_vb_term_does_not_train_the_mean():
  sched = respace.create_schedule("linear", 1000)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(np.clip(rng.standard_normal((4, 2, 2, 2)), -1, 1), jnp.float32)
  out = jnp.asarray(rng.standard_normal((4, 2, 2, 4)) * 0.3, jnp.float32)
  t = jnp.array([0, 5, 300, 900])

  def terms(out):
    _, aux = gaussian.adm_loss(sched, lambda *_: out, x0, None, jax.random.key(1), t=t)
    return aux

  g_vb, g_mse = jax.jit(lambda o: (jax.grad(lambda o: terms(o)["vb"].sum())(o),
                                    jax.grad(lambda o: terms(o)["mse"].sum())(o)))(out)
  assert np.all(np.asarray(g_vb[..., :2]) == 0)        # eps channels: stop-gradient
  assert np.any(np.asarray(g_vb[..., 2:]) != 0)        # variance channels: trained by L_vlb
  assert np.all(np.asarray(g_mse[..., 2:]) == 0)       # L_simple ignores the variance


def test_sample_timesteps_uniform():
  t = np.asarray(gaussian.sample_timesteps(jax.random.key(0), 20000, 10))
  assert t.min() == 0 and t.max() == 9
  counts = np.bincount(t, minlength=10)
  # Each count is Binomial(20000, 0.1): sd = 42.4; allow 5 sd.
  assert np.all(np.abs(counts - 2000) < 5 * 42.4)


# ----------------------------------------------------------------------------------------------
# EDM.
# ----------------------------------------------------------------------------------------------


def test_edm_preconditioning_and_denoiser_formula():
  sigma = np.array([0.002, 0.5, 3.0, 80.0])
  c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in edm.edm_precond(sigma))
  sd = 0.5
  np.testing.assert_allclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 2, 2, 3)).astype(np.float32)
  seen = {}

  def net_fn(x_in, c_noise_in, y):
    seen["x_in"], seen["c_noise"] = x_in, c_noise_in
    return jnp.sin(x_in)

  d = np.asarray(edm.edm_denoise(net_fn, jnp.asarray(x), jnp.asarray(sigma), None))
  b = lambda a: a[:, None, None, None]
  np.testing.assert_allclose(np.asarray(seen["x_in"]), b(c_in) * x, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(seen["c_noise"]), c_noise, rtol=1e-6)
  np.testing.assert_allclose(d, b(c_skip) * x + b(c_out) * np.sin(b(c_in) * x), rtol=1e-5,
                             atol=1e-6)


def test_edm_loss_formula_and_sigma_distribution():
  rng = np.random.default_rng(0)
  x0, noise = (rng.standard_normal((3, 2, 2, 3)).astype(np.float32) for _ in range(2))
  sigma = np.array([0.1, 1.0, 10.0], np.float32)
  net_fn = lambda x_in, c_noise, y: 0.5 * x_in
  loss, aux = edm.edm_loss(net_fn, jnp.asarray(x0), None, jax.random.key(0),
                           sigma=jnp.asarray(sigma), noise=jnp.asarray(noise))
  b = lambda a: a[:, None, None, None].astype(np.float64)
  x = x0 + b(sigma) * noise
  c_skip = 0.25 / (b(sigma) ** 2 + 0.25)
  c_out = b(sigma) * 0.5 / np.sqrt(b(sigma) ** 2 + 0.25)
  c_in = 1 / np.sqrt(b(sigma) ** 2 + 0.25)
  denoised = c_skip * x + c_out * 0.5 * c_in * x
  weight = (sigma.astype(np.float64) ** 2 + 0.25) / (sigma.astype(np.float64) * 0.5) ** 2
  expected = weight * ((denoised - x0) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)

  # ln sigma ~ N(-1.2, 1.2^2): with n = 20000, the SE of the mean is 1.2/sqrt(n) = 0.0085
  # and of the std about 1.2/sqrt(2n) = 0.006; allow 5 SE.
  log_sigma = np.log(np.asarray(edm.sample_training_sigmas(jax.random.key(3), 20000)))
  assert abs(log_sigma.mean() + 1.2) < 5 * 0.0085
  assert abs(log_sigma.std() - 1.2) < 5 * 0.006


def test_karras_sigmas_eq5():
  sigmas = edm.karras_sigmas(18)
  i = np.arange(18)
  expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-12)
  assert sigmas[-1] == 0 and np.isclose(sigmas[0], 80) and np.isclose(sigmas[-2], 0.002)
  assert np.all(np.diff(sigmas) < 0)


# ----------------------------------------------------------------------------------------------
# Guidance.
# ----------------------------------------------------------------------------------------------


def test_power_cosine_weights_formula():
  t = np.array([0, 1, 250, 500, 750, 999])
  w = np.asarray(guidance.power_cosine_weight(jnp.asarray(t), 4.4, 4.0, 1000))
  expected = 1 + 3.4 * 0.5 * (1 - np.cos(np.pi * (1 - t / 1000) ** 4))
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  assert abs(w[0] - 4.4) < 1e-6 and abs(w[-1] - 1) < 1e-6  # w at t = 0, ~1 at t = T - 1
  g = guidance.Guidance(scale=4.4, schedule="power_cosine", power=4.0, channels=3, interval=None,
                        null_class=1000, num_timesteps=1000)
  np.testing.assert_allclose(np.asarray(guidance.guidance_weight(g, t=jnp.asarray(t))),
                             expected, rtol=1e-6)


def test_guidance_interval():
  g = guidance.Guidance(scale=3.0, schedule="constant", power=4.0, channels=3,
                        interval=(0.3, 2.0), null_class=1000, num_timesteps=1000)
  w = [float(guidance.guidance_weight(g, sigma=jnp.float32(s))) for s in (0.1, 0.3, 1.0, 2.0, 5)]
  assert w == [1.0, 1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("channels", [3, None])
def test_cfg_touches_only_the_guided_channels(channels):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 2, 2, 4)), jnp.float32)
  y = jnp.array([3, 1, 4, 1])

  def apply_fn(params, x, t, y):  # 4 eps channels + 4 variance channels, label dependent
    scale = (1 + y.astype(jnp.float32) / 10)[:, None, None, None]
    return jnp.concatenate([x * scale + t[:, None, None, None], jnp.tanh(x) * scale], -1)

  t = jnp.array([5, 6, 7, 8], jnp.float32)
  w = 2.5
  out = np.asarray(guidance.cfg_forward(apply_fn, None, x, t, y, w, channels=channels,
                                        null_class=10))
  cond = np.asarray(apply_fn(None, x, t, y))
  uncond = np.asarray(apply_fn(None, x, t, jnp.full_like(y, 10)))
  k = 3 if channels == 3 else 4  # None guides all 4 eps channels, never the variance
  np.testing.assert_allclose(out[..., :k], uncond[..., :k] + w * (cond[..., :k] - uncond[..., :k]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[..., k:], cond[..., k:])


def test_combine_cfg_per_example_weights():
  cond = jnp.ones((2, 1, 1, 4))
  uncond = jnp.zeros((2, 1, 1, 4))
  out = np.asarray(guidance.combine_cfg(cond, uncond, jnp.array([2.0, 3.0]), 3))
  np.testing.assert_array_equal(out[:, 0, 0], [[2, 2, 2, 1], [3, 3, 3, 1]])


def test_power_cosine_math_matches_mdt_expression():
  # MDT / DiffiT: scale_step = (1 - cos(((1 - t/1000) ** pow) * pi)) / 2.
  for t in (0, 123, 999):
    step = (1 - math.cos(((1 - t / 1000) ** 4) * math.pi)) * 1 / 2
    assert abs(float(guidance.power_cosine_weight(t, 4.6)) - ((4.6 - 1) * step + 1)) < 1e-5


# ----------------------------------------------------------------------------------------------
# The process a config describes.
# ----------------------------------------------------------------------------------------------


def test_from_config_builds_the_configured_process():
  config = config_lib.base_config("image")
  config.diffusion.update(sigma_data=0.6, p_mean=-1.0, p_std=1.5)
  process = diffusion.from_config(config)
  assert isinstance(process, diffusion.EDM) and process.name == "edm"
  assert (process.sigma_data, process.p_mean, process.p_std) == (0.6, -1.0, 1.5)
  np.testing.assert_array_equal(
      process.sample_t(jax.random.key(1), 16),
      edm.sample_training_sigmas(jax.random.key(1), 16, -1.0, 1.5))

  config = config_lib.base_config("latent")
  config.diffusion.update(name="adm", beta_schedule="cosine", num_timesteps=50,
                          prediction="v", learn_sigma=True)
  process = diffusion.from_config(config)
  assert isinstance(process, diffusion.ADM) and process.name == "adm"
  assert (process.var_type, process.pred_type, process.num_timesteps) == ("learned_range", "v", 50)
  assert_trees_equal(process.schedule,
                     respace.create_schedule("cosine", 50))
  t = np.asarray(process.sample_t(jax.random.key(0), 1000))
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == 49
  config.diffusion.learn_sigma = False
  assert diffusion.from_config(config).var_type == "fixed_large"

  for field, value, match in (("name", "ddpm", "'edm', 'adm'"), ("prediction", "score", "eps"),
                              ("beta_schedule", "sigmoid", "cosine")):
    bad = config_lib.base_config("latent")
    bad.diffusion.update(name="adm")
    bad.diffusion[field] = value
    with pytest.raises(ValueError, match=match):
      diffusion.from_config(bad)


@pytest.mark.parametrize("name", ["edm", "adm"])
def test_loss_with_given_t_and_noise_needs_no_rng(name):
  config = config_lib.base_config("image" if name == "edm" else "latent")
  config.diffusion.update(name=name, learn_sigma=name == "adm", num_timesteps=100)
  process = diffusion.from_config(config)
  channels = 2
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(np.clip(rng.standard_normal((4, 4, 4, channels)), -1, 1), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = process.sample_t(jax.random.key(2), 4)

  def model_fn(x, t_in, y):  # (B,H,W,C) -> (B,H,W,C), or 2C for the learned variance
    del y
    out = 0.7 * x + 0.01 * t_in.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([out, jnp.tanh(x)], -1) if name == "adm" else out

  loss, aux = process.loss(model_fn, x0, None, t=t, noise=noise)  # no rng
  assert loss.shape == (4,) and np.all(np.isfinite(np.asarray(loss)))
  with_rng, _ = process.loss(model_fn, x0, None, t=t, noise=noise, rng=jax.random.key(9))
  np.testing.assert_array_equal(loss, with_rng)
  raw = (gaussian.adm_loss(process.schedule, model_fn, x0, None, t=t, noise=noise,
                           var_type="learned_range") if name == "adm" else
         edm.edm_loss(model_fn, x0, None, sigma=t, noise=noise))
  np.testing.assert_array_equal(loss, raw[0])
  assert set(aux) == ({"mse", "vb", "t"} if name == "adm" else {"mse", "sigma"})
  # What is not given is drawn from rng, and a missing rng says what to pass.
  drawn, _ = process.loss(model_fn, x0, None, t=t, rng=jax.random.key(3))
  assert drawn.shape == (4,) and not np.array_equal(drawn, loss)
  level = "t" if name == "adm" else "sigma"
  with pytest.raises(ValueError, match=f"draws noise from rng.*both {level} and noise"):
    process.loss(model_fn, x0, None, t=t)
  with pytest.raises(ValueError, match=f"draws {level} and noise"):
    process.loss(model_fn, x0, None)


def test_adm_schedule_is_built_on_first_use_outside_any_trace():
  """`from_config` makes no arrays (a multi-process run checks its config before JAX starts);
  the schedule, first needed inside one jitted function, serves the next one too."""
  config = config_lib.base_config("latent")
  config.diffusion.update(name="adm", learn_sigma=True, num_timesteps=100)
  process = diffusion.from_config(config)
  assert "schedule" not in vars(process)  # not built yet
  model_fn = lambda x, t, y: jnp.concatenate([0.5 * x, jnp.tanh(x)], -1)
  x0, noise, t = np.zeros((2, 2, 2, 2), np.float32), np.ones((2, 2, 2, 2), np.float32), [1, 50]
  loss = lambda x0, t, noise: process.loss(model_fn, x0, None, t=t, noise=noise)[0]
  first = jax.jit(loss)(x0, jnp.asarray(t), noise)
  assert not isinstance(vars(process)["schedule"].betas, jax.core.Tracer)  # concrete
  second = jax.jit(lambda *a: 2 * loss(*a))(x0, jnp.asarray(t), noise)
  np.testing.assert_allclose(second, 2 * first, rtol=1e-6)
  assert_trees_equal(process.schedule,
                     respace.create_schedule("linear", 100))
