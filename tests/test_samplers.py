"""The compiled samplers against NumPy transcriptions of the papers' algorithms.

Gaussian data N(MU, S^2) has an exact denoiser D(x; sigma) = (S^2 x + sigma^2 MU) / (S^2 +
sigma^2) and hence an exact ADM eps-model; with it every sampler is a per-sample affine (or,
for DDPM, linear-Gaussian) map of its noise, so we check (1) each sample against a float64
NumPy transcription of EDM Algorithm 1/2, k-diffusion's DPM-Solver++(2M) or the DDPM chain
fed the same noise, (2) the sample mean and variance against the distribution that algorithm
produces, within 5 standard errors, and (3) that this distribution is the data's, up to the
stated discretization error. Then: seeds give identical samples on 1 and 8 devices and for
any batch size; guidance equals DiT's hand-written `forward_with_cfg`; bad configs fail clearly.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffit_jax import config_lib, inference
from diffit_jax.diffusion import edm, gaussian, guidance, respace, samplers

MU, S = 0.3, 0.8
SHAPE = (2, 2, 2)
AB = np.cumprod(1 - gaussian.get_named_beta_schedule("linear", 1000))  # float64 alpha_bar
PARAMS = {"mu": jnp.float32(MU), "s": jnp.float32(S), "v": jnp.float32(0.3)}


def run_config(formulation: str = "adm"):
  """The schema's config of a latent network trained as ADM (learned variance, the release's
  process) or as EDM."""
  config = config_lib.base_config("latent")
  config.diffusion.update(name=formulation, learn_sigma=formulation == "adm")
  return config


def settings(formulation: str = "adm", **fields) -> samplers.SamplerConfig:
  """`run_config(formulation)`'s sampler settings with `fields` replaced."""
  return dataclasses.replace(samplers.SamplerConfig.from_config(run_config(formulation)),
                             **fields)


def gaussian_denoiser(x, sigma, mu=MU, s=S):
  """E[x_0 | x_0 + sigma n = x] for x_0 ~ N(mu, s^2) (works on NumPy and JAX arrays)."""
  return (s ** 2 * x + sigma ** 2 * mu) / (s ** 2 + sigma ** 2)


def adm_apply(params, x_t, t, y):
  """Exact eps-model of the Gaussian data at ORIGINAL timestep t; variance values = v."""
  del y
  ab = jnp.asarray(AB, jnp.float32)[t][:, None, None, None]               # (B, 1, 1, 1)
  sigma = jnp.sqrt((1 - ab) / ab)
  x0 = gaussian_denoiser(x_t / jnp.sqrt(ab), sigma, params["mu"], params["s"])
  eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
  return jnp.concatenate([eps, jnp.full_like(eps, params["v"])], -1)     # (B, H, W, 2C)


def edm_apply(params, x_in, c_noise, y):
  """The raw network F whose preconditioned denoiser is exactly `gaussian_denoiser`."""
  del y
  sigma = jnp.exp(4 * c_noise)[:, None, None, None]                       # (B, 1, 1, 1)
  x = x_in * jnp.sqrt(sigma ** 2 + 0.25)
  c_skip, c_out, _, _ = edm.edm_precond(sigma)
  return (gaussian_denoiser(x, sigma, params["mu"], params["s"]) - c_skip * x) / c_out


def contract_noise(seed, indices, step, shape=SHAPE):
  """The documented noise contract: normal(fold_in(fold_in(key(seed), index), step))."""
  base = jax.random.key(seed)
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, i), step), shape)
  return np.asarray(jax.vmap(draw)(jnp.asarray(indices)), np.float64)


# ----------------------------------------------------------------------------------------------
# NumPy transcriptions (float64).
# ----------------------------------------------------------------------------------------------


def np_edm_sampler(denoise, sigmas, x, *, heun=True, gammas=None, noises=None, s_noise=1.0):
  """EDM Algorithm 1 (deterministic), and Algorithm 2 when gammas/noises are given."""
  n = len(sigmas) - 1
  for i in range(n):
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    gamma = 0.0 if gammas is None else gammas[i]
    t_hat = t_cur + gamma * t_cur
    x_hat = x + np.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * noises[i] if gamma else x
    d = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d
    if heun and i < n - 1:
      d_prime = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    x = x_next
  return x


def np_dpmpp_2m(denoise, sigmas, x):
  """k-diffusion `sample_dpmpp_2m`, transcribed."""
  t_fn = lambda sigma: -np.log(sigma)
  old_denoised = None
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised
    else:
      t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
      h = t_next - t
      if old_denoised is None:
        x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised
      else:
        r = (t - t_fn(sigmas[i - 1])) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised_d
    old_denoised = denoised
  return x


def adm_sigmas(respacing):
  kept = np.array(sorted(respace.space_timesteps(1000, respacing)))
  return np.append(np.sqrt(1 / AB[kept] - 1)[::-1], 0.0)


# Step counts where the grid's own discretization error on the std is below 1 %; the first
# two cases (the paper's 18-step Heun, 4.8 % off on this narrow Gaussian, and Alg. 2's churn)
# are checked against the NumPy algorithm only.
VE_CASES = {
    # id: (formulation, name, steps, extra config, sigmas, check against the data?)
    "edm_heun_18": ("edm", "heun", 18, {}, edm.karras_sigmas(18), False),
    "edm_heun_churn": ("edm", "heun", 18, dict(s_churn=30.0, s_tmin=0.01, s_tmax=10.0,
                                               s_noise=1.003), edm.karras_sigmas(18), False),
    "edm_heun_50": ("edm", "heun", 50, {}, edm.karras_sigmas(50), True),
    "edm_dpmpp_2m_50": ("edm", "dpmpp_2m", 50, {}, edm.karras_sigmas(50), True),
    "adm_euler_250": ("adm", "euler", 250, {}, adm_sigmas("250"), True),
    "adm_heun_50": ("adm", "heun", 50, {}, adm_sigmas("50"), True),
    "adm_dpmpp_2m_100": ("adm", "dpmpp_2m", 100, {}, adm_sigmas("100"), True),
}


@pytest.mark.parametrize("case", list(VE_CASES))
def test_ode_samplers_match_numpy_algorithms_and_recover_the_data(case):
  formulation, name, steps, extra, sigmas, check_data = VE_CASES[case]
  cfg = settings(formulation, name=name, num_steps=steps, num_classes=None, **extra)
  apply_fn = adm_apply if formulation == "adm" else edm_apply
  sampler = samplers.make_sampler(cfg, apply_fn, SHAPE)
  batch, seed = 4096, 11
  idx = np.arange(batch)
  x = np.asarray(sampler(PARAMS, None, idx, seed), np.float64)
  assert x.shape == (batch,) + SHAPE and sampler.nfe == (2 * steps - 1 if name == "heun" else steps)

  # 1. Every sample equals the float64 NumPy algorithm fed the same noise.
  init_scale = sigmas[0] if formulation == "edm" else np.sqrt(1 + sigmas[0] ** 2)
  x_init = contract_noise(seed, idx, 0) * init_scale
  if name == "dpmpp_2m":
    run = lambda x0: np_dpmpp_2m(gaussian_denoiser, sigmas, x0)
  elif extra.get("s_churn"):
    gammas = np.where((sigmas[:-1] >= extra["s_tmin"]) & (sigmas[:-1] <= extra["s_tmax"]),
                      min(extra["s_churn"] / steps, np.sqrt(2) - 1), 0.0)
    noises = [contract_noise(seed, idx, i + 1) for i in range(steps)]
    run = lambda x0: np_edm_sampler(gaussian_denoiser, sigmas, x0, gammas=gammas,
                                    noises=noises, s_noise=extra["s_noise"])
  else:
    run = lambda x0: np_edm_sampler(gaussian_denoiser, sigmas, x0, heun=name == "heun")
  np.testing.assert_allclose(x, run(x_init), rtol=1e-3, atol=1e-3)
  if extra.get("s_churn"):
    return

  # 2. The deterministic algorithm is affine per sample, x -> a x + b, so its output law is
  # N(b, (a init_scale)^2). With n = 4096 * 8 iid values, the mean's SE is std / sqrt(n) and
  # the variance's relative SE sqrt(2 / n); allow 5 SE.
  b = run(np.zeros(1))[0]
  a = run(np.ones(1))[0] - b
  std = abs(a) * init_scale
  n = x.size
  assert abs(x.mean() - b) < 5 * std / np.sqrt(n)
  assert abs(x.var() / std ** 2 - 1) < 5 * np.sqrt(2 / n)
  if not check_data:
    return
  # 3. The samples recover N(MU, S^2): 5 SE plus the exact prior-mismatch bias of the mean
  # (x_T ignores the data mean: MU * S / sqrt(S^2 + sigma_max^2) = 0.003 for EDM) and 1 % for
  # the grid's discretization error of the std (see the step counts above).
  assert abs(x.mean() - MU) < 5 * S / np.sqrt(n) + 0.004
  assert abs(x.std() / S - 1) < 5 * np.sqrt(1 / (2 * n)) + 0.01


def test_ddpm_learned_variance_matches_exact_chain_and_recovers_the_data():
  sampler = samplers.make_sampler(settings(name="ddpm", num_steps=100, num_classes=None),
                                  adm_apply, SHAPE)
  x = np.asarray(sampler(PARAMS, None, np.arange(4096), 3), np.float64)

  # The ancestral chain is linear-Gaussian: x_{t-1} = A x_t + c + std z [DDPM Alg. 2,
  # IDDPM Eq. 15 with frac = (v + 1) / 2]. Propagate mean and variance exactly in float64.
  kept = np.array(sorted(respace.space_timesteps(1000, "100")))
  ab = AB[kept]
  ab_prev = np.append(1.0, ab[:-1])
  betas = 1 - ab / ab_prev
  post_var = betas * (1 - ab_prev) / (1 - ab)
  log_var = (0.65 * np.log(betas)
             + 0.35 * np.log(np.append(post_var[1], post_var[1:])))        # v = 0.3
  mean, var = 0.0, 1.0
  for k in range(len(kept) - 1, -1, -1):
    gain = np.sqrt(ab[k]) * S ** 2 / (ab[k] * S ** 2 + 1 - ab[k])         # d E[x0|x_t] / dx_t
    offset = MU - gain * np.sqrt(ab[k]) * MU
    c1 = betas[k] * np.sqrt(ab_prev[k]) / (1 - ab[k])
    c2 = (1 - ab_prev[k]) * np.sqrt(1 - betas[k]) / (1 - ab[k])
    mean, var = (c1 * gain + c2) * mean + c1 * offset, (c1 * gain + c2) ** 2 * var
    if k > 0:
      var += np.exp(log_var[k])
  n = x.size
  assert abs(x.mean() - mean) < 5 * np.sqrt(var / n)
  assert abs(x.var() / var - 1) < 5 * np.sqrt(2 / n)
  # 100 respaced steps with a fixed v = 0.3 recover N(MU, S^2) to within 2 %.
  assert abs(mean - MU) < 0.02 and abs(np.sqrt(var) / S - 1) < 0.02, (mean, var)


def test_ddim_eta0_is_euler_on_the_adm_grid():
  kwargs = dict(num_steps=20, num_classes=None)
  ddim = samplers.make_sampler(settings(name="ddim", **kwargs), adm_apply, SHAPE)
  euler = samplers.make_sampler(settings(name="euler", **kwargs), adm_apply, SHAPE)
  idx = np.arange(64)
  np.testing.assert_allclose(np.asarray(ddim(PARAMS, None, idx, 5)),
                             np.asarray(euler(PARAMS, None, idx, 5)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_steps_accept_per_example_timesteps(step):
  sched = respace.create_schedule("linear", 1000, "10")
  rng = np.random.default_rng(0)
  x, noise = (jnp.asarray(rng.standard_normal((3, 2, 2, 2)), jnp.float32) for _ in range(2))
  out = jnp.asarray(np.tanh(rng.standard_normal((3, 2, 2, 4))), jnp.float32)
  t = jnp.array([0, 4, 9])
  fn = (samplers.ddpm_step if step == "ddpm"
        else lambda *a: samplers.ddim_step(*a, eta=0.7))
  batched, _ = fn(sched, out, x, t, noise)
  for i in range(3):
    single, _ = fn(sched, out[i:i + 1], x[i:i + 1], int(t[i]), noise[i:i + 1])
    np.testing.assert_allclose(np.asarray(batched[i:i + 1]), np.asarray(single), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Guidance, determinism, compilation.
# ----------------------------------------------------------------------------------------------

NUM_CLASSES = 10


def conditional_apply(params, x_t, t, y):
  """Exact eps-model of class-conditional data N(MU + 0.2 y, S^2); label 10 = N(MU, S^2)."""
  mu = params["mu"] + 0.2 * jnp.where(y == NUM_CLASSES, 0, y).astype(jnp.float32)
  return adm_apply(dict(params, mu=mu[:, None, None, None]), x_t, t, None)


def dit_forward_with_cfg(params, x, t, y, scale=4.0, power=4.0):
  """DiT / DiffiT `forward_with_cfg`, written out: [cond; uncond] halves, first 3 channels."""
  batch = x.shape[0]
  out = conditional_apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          jnp.concatenate([y, jnp.full_like(y, NUM_CLASSES)]))
  eps, rest = out[..., :3], out[..., 3:]
  cond_eps, uncond_eps = eps[:batch], eps[batch:]
  w = 1 + (scale - 1) * 0.5 * (1 - jnp.cos(jnp.pi * (1 - t / 1000) ** power))
  half_eps = uncond_eps + w[:, None, None, None] * (cond_eps - uncond_eps)
  return jnp.concatenate([half_eps, rest[:batch]], -1)


GUIDED = settings(name="ddpm", num_steps=20, guidance_scale=4.0, guidance_schedule="power_cosine",
                  guidance_power=4.0, guidance_channels=3, num_classes=NUM_CLASSES)
SHAPE4 = (2, 2, 4)


def test_guided_sampler_equals_dit_forward_with_cfg():
  guided = samplers.make_sampler(GUIDED, conditional_apply, SHAPE4)
  manual = samplers.make_sampler(dataclasses.replace(GUIDED, guidance_scale=1.0),
                                 dit_forward_with_cfg, SHAPE4)
  labels, idx = np.arange(16) % NUM_CLASSES, np.arange(16)
  ours = np.asarray(guided(PARAMS, labels, idx, 0))
  np.testing.assert_allclose(ours, np.asarray(manual(PARAMS, labels, idx, 0)), rtol=1e-4,
                             atol=1e-4)


def test_same_seed_same_samples_on_1_and_8_devices_and_any_batch():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 host devices"
  meshes = {"8 auto": Mesh(np.array(devices), ("data",)),
            "1": Mesh(np.array(devices[:1]), ("data",)),
            "8 explicit": jax.make_mesh((8,), ("data",))}
  labels, idx = np.arange(16) % NUM_CLASSES, np.arange(16)
  reference = None
  for label, mesh in meshes.items():
    sampler = samplers.make_sampler(GUIDED, conditional_apply, SHAPE4, mesh=mesh)
    params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
    full = sampler(params, labels, idx, 42)
    assert full.sharding.spec == P("data"), label
    full = np.asarray(full)
    # Across device counts XLA compiles a different per-device program, which may round
    # differently (observed: 3e-6 absolute after 20 steps); different noise would differ by O(1).
    reference = full if reference is None else reference
    np.testing.assert_allclose(full, reference, rtol=1e-5, atol=1e-5, err_msg=label)
    if label == "8 auto":
      # On one mesh, a ragged batch (padded internally) and the second half are bit-identical.
      np.testing.assert_array_equal(np.asarray(sampler(params, labels[3:8], idx[3:8], 42)),
                                    full[3:8])
      np.testing.assert_array_equal(np.asarray(sampler(params, labels[8:], idx[8:], 42)),
                                    full[8:])
      other_seed = np.asarray(sampler(params, labels, idx, 43))
      assert np.abs(other_seed - full).max() > 0.1


def test_params_are_arguments_and_compile_once():
  sampler = samplers.make_sampler(settings(name="ddim", num_steps=10, num_classes=None),
                                  adm_apply, SHAPE)
  idx = np.arange(8)
  a = np.asarray(sampler(PARAMS, None, idx, 0))
  b = np.asarray(sampler(dict(PARAMS, mu=jnp.float32(-2.0)), None, idx, 1))
  assert sampler.jitted._cache_size() == 1
  assert abs(a.mean() - b.mean()) > 1.0


def test_nnx_model_through_nnx_apply_fn():
  from flax import nnx

  class TinyEps(nnx.Module):
    def __init__(self, channels, *, rngs):
      self.proj = nnx.Linear(channels + 1, 2 * channels, rngs=rngs)

    def __call__(self, x, t, y):
      t_map = jnp.broadcast_to((t / 1000.0)[:, None, None, None], x.shape[:-1] + (1,))
      return jnp.tanh(self.proj(jnp.concatenate([x, t_map], -1)))        # (B, H, W, 2C)

  apply_fn, state = inference.nnx_apply_fn(TinyEps(2, rngs=nnx.Rngs(0)))
  sampler = samplers.make_sampler(settings(name="ddpm", num_steps=5, num_classes=None),
                                  apply_fn, SHAPE)
  x = np.asarray(sampler(state, None, np.arange(8), 0))
  assert x.shape == (8,) + SHAPE and np.all(np.isfinite(x))


@pytest.mark.parametrize("cfg, match", [
    (dict(name="plms"), "Unknown sampler 'plms'"),
    (dict(name="ddpm", formulation="edm"), "discrete ADM formulation"),
    (dict(respacing="ddim300"), "no integer stride"),
    (dict(respacing="fast"), "Bad respacing"),
    (dict(name="heun", s_churn=10.0), "s_churn > 0"),
    (dict(guidance_scale=2.0, num_classes=None), "needs a class-conditional model"),
    (dict(guidance_scale=2.0, guidance_schedule="cosine"), "Unknown guidance_schedule"),
    (dict(name="heun", formulation="edm", guidance_scale=2.0, guidance_schedule="power_cosine",
          num_classes=1000), "power-cosine"),
    (dict(guidance_scale=2.0, guidance_channels=5), "guidance_channels=5"),
    (dict(guidance_scale=2.0, guidance_channels=1, guidance_interval=(3.0, 1.0)), "lo < hi"),
])
def test_bad_configs_fail_with_a_clear_message(cfg, match):
  cfg = dict(cfg)
  with pytest.raises(ValueError, match=match):
    samplers.make_sampler(settings(cfg.pop("formulation", "adm"), **cfg), adm_apply, SHAPE)


@pytest.mark.parametrize("field, value, match", [
    ("diffusion.name", "vp", r"config.diffusion.name='vp'; use one of \('edm', 'adm'\)"),
    ("sampler.num_step", 10, "config.sampler.num_step is not a field; did you mean "
                             "config.sampler.num_steps"),
])
def test_a_bad_process_or_a_misspelt_sampler_field_fails_with_a_clear_message(field, value,
                                                                             match):
  """The config is the sampler's one source: its process and its schema's fields."""
  config = run_config()
  group, key = field.split(".")
  config[group][key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(config)
    samplers.SamplerConfig.from_config(config)


def test_guidance_without_labels_fails_clearly():
  sampler = samplers.make_sampler(
      settings(name="ddpm", guidance_scale=2.0, num_steps=2, guidance_channels=None),
      adm_apply, SHAPE)
  with pytest.raises(ValueError, match="needs class labels"):
    sampler(PARAMS, None, np.arange(8), 0)


def test_official_settings_come_from_the_configs():
  """The released sampling settings live in configs/ and reach the sampler through the one
  config -> SamplerConfig mapping (`SamplerConfig.from_config`)."""
  configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  from_file = lambda name: samplers.SamplerConfig.from_config(
      config_lib.load_config(os.path.join(configs, name)))
  in256 = from_file("imagenet256_latent.py")
  assert in256.guidance == guidance.Guidance(
      scale=4.4, schedule="power_cosine", power=4.0, channels=3, interval=None, null_class=1000,
      num_timesteps=1000)
  assert (in256.name, in256.nfe, in256.clip_denoised, in256.process.var_type) == (
      "ddpm", 250, False, "learned_range")
  in512 = from_file("imagenet512_latent.py")
  assert (in512.guidance_scale, in512.guidance_schedule) == (1.49, "constant")
  cifar = from_file("cifar10.py")
  assert (cifar.formulation, cifar.name, cifar.nfe, cifar.num_classes) == ("edm", "heun", 35, None)
  assert settings(name="ddim", respacing="ddim25").nfe == 25
  assert settings(respacing="10,15,20").steps == 45
  config = run_config()
  config.sampler.update(name="euler", num_steps=7)
  cfg = samplers.SamplerConfig.from_config(config)
  assert cfg.name == "euler" and cfg.num_steps == 7


def test_every_sampler_default_is_the_schemas():
  """The schema (`config_lib.base_config`) is the one home of the sampler's defaults: the
  settings of a bare config are its values, and the process decides the rest."""
  for formulation in ("edm", "adm"):
    config = run_config(formulation)
    sampler, g = config.sampler, config.sampler.guidance
    cfg = samplers.SamplerConfig.from_config(config)
    assert (cfg.name, cfg.num_steps, cfg.respacing, cfg.eta, cfg.clip_denoised) == (
        sampler.name, sampler.num_steps, sampler.respacing, sampler.eta, sampler.clip_denoised)
    assert (cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.s_churn, cfg.s_tmin, cfg.s_noise) == (
        sampler.sigma_min, sampler.sigma_max, sampler.rho, sampler.churn, sampler.churn_tmin,
        sampler.churn_noise)
    assert cfg.s_tmax == (sampler.churn_tmax or float("inf"))
    assert (cfg.guidance_scale, cfg.guidance_schedule, cfg.guidance_power) == (
        g.scale, g.schedule, g.power)
    assert cfg.guidance_channels == (g.channels or None)
    assert cfg.guidance_interval == (tuple(g.interval) or None)
    assert cfg.num_classes == (config.model.num_classes or None)
    assert cfg.formulation == formulation
  assert (cfg.name, cfg.num_steps, cfg.guidance_channels) == ("heun", 18, None)
  adm = cfg.process
  assert (adm.beta_schedule, adm.num_timesteps, adm.pred_type, adm.var_type) == (
      config.diffusion.beta_schedule, config.diffusion.num_timesteps,
      config.diffusion.prediction, "learned_range")
  edm_process = samplers.SamplerConfig.from_config(run_config("edm")).process
  assert edm_process.sigma_data == config.diffusion.sigma_data
  # A setting of the config reaches the sampler; the trainer's grids may shorten the chain.
  config.sampler.guidance.update(scale=2.0, interval=(0.5, 3.0))
  config.sampler.respacing = "ddim25"
  cfg = samplers.SamplerConfig.from_config(config)
  assert (cfg.guidance_scale, cfg.guidance_interval, cfg.steps) == (2.0, (0.5, 3.0), 25)
  assert samplers.SamplerConfig.from_config(config, num_steps=4).steps == 4
  with pytest.raises(TypeError, match="takes a SamplerConfig"):
    samplers.make_sampler(dict(name="ddpm"), adm_apply, SHAPE)


@pytest.mark.parametrize("cfg", [GUIDED, settings("edm", name="heun", num_steps=4,
                                                  num_classes=NUM_CLASSES)],
                         ids=["adm_ddpm", "edm_heun"])
def test_given_x_T_equals_the_seeded_draw(cfg):
  """Passing `initial_noise(seed, ...)` as x_T is the seeded run; the same x_T under another
  seed changes only the stochastic steps (none for Heun)."""
  apply = conditional_apply if cfg.name == "ddpm" else edm_apply
  sampler = samplers.make_sampler(cfg, apply, SHAPE4)
  labels, idx = np.arange(8) % NUM_CLASSES, np.arange(3, 11)
  seeded = np.asarray(sampler(PARAMS, labels, idx, 5))
  x_T = samplers.initial_noise(5, idx, SHAPE4)
  # Another compiled program (x_T an argument, not drawn inside), so XLA may fuse
  # `x_T * sigma_max` differently: equal to float32 rounding, where other noise is O(1) off.
  np.testing.assert_allclose(np.asarray(sampler(PARAMS, labels, idx, 5, x_T=x_T)), seeded,
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(x_T, contract_noise(5, idx, 0, SHAPE4).astype(np.float32))
  other_seed = np.asarray(sampler(PARAMS, labels, idx, 6, x_T=np.asarray(x_T)))
  if cfg.name == "heun":  # deterministic: the noise is all there is
    np.testing.assert_array_equal(other_seed, np.asarray(sampler(PARAMS, labels, idx, 5,
                                                                 x_T=x_T)))
  # Another x_T, another result (the ancestral DDPM chain forgets most of its start).
  assert np.abs(np.asarray(sampler(PARAMS, labels, idx, 5, x_T=-x_T)) - seeded).max() > 1e-2
  # A ragged batch is padded with x_T too.
  np.testing.assert_allclose(np.asarray(sampler(PARAMS, labels[:3], idx[:3], 5, x_T=x_T[:3])),
                             seeded[:3], rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="x_T must have shape"):
    sampler(PARAMS, labels, idx, 5, x_T=x_T[:, :1])


def test_ddim_respacing_evaluates_adms_ddim_timesteps():
  seen = []

  def recording_apply(params, x_t, t, y):
    jax.debug.callback(lambda t: seen.append(int(np.asarray(t)[0])), t)
    return adm_apply(params, x_t, t, y)

  cfg = settings(name="ddim", respacing="ddim25", num_classes=None)
  assert cfg.steps == cfg.nfe == 25
  np.asarray(samplers.make_sampler(cfg, recording_apply, SHAPE)(PARAMS, None, np.arange(8), 0))
  jax.effects_barrier()  # every callback has run
  assert sorted(set(seen)) == list(range(0, 1000, 40))  # ADM's "ddim25": stride 40


def test_batch_is_split_over_data_and_fsdp():
  from diffit_jax import sharding
  mesh = sharding.create_mesh(dict(data=2, fsdp=4))
  sampler = samplers.make_sampler(GUIDED, conditional_apply, SHAPE4, mesh=mesh)
  labels, idx = np.arange(16) % NUM_CLASSES, np.arange(16)
  out = sampler(jax.device_put(PARAMS, sharding.replicated(mesh)), labels, idx, 42)
  assert out.sharding.spec == P(("data", "fsdp"))
  one = samplers.make_sampler(GUIDED, conditional_apply, SHAPE4,
                              mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(one(PARAMS, labels, idx, 42)),
                             rtol=1e-5, atol=1e-5)
