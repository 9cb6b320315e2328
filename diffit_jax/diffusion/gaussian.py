"""ADM / IDDPM Gaussian diffusion as pure functions on arrays (the latent DiffiT formulation).

This module owns the discrete-time Gaussian diffusion of Ho et al. 2020 (DDPM) with the
improvements of Nichol & Dhariwal 2021 (IDDPM: cosine schedule, learned-range variance, hybrid
loss) exactly as OpenAI's ADM code (`guided_diffusion/gaussian_diffusion.py`) and DiT
(`diffusion/gaussian_diffusion.py`) implement them; DiffiT's latent models train and sample with
that code [DiffiT App. I.2]. Arrays are NHWC; the channel axis is last. Nothing here holds a
network: losses take a `model_fn(x_t, t, y)` and sampling helpers take the model's output.

The schedule is computed in float64 NumPy (as ADM does) and stored as float32 arrays; ADM also
casts each gathered coefficient to float32, so the numbers match.

References: DDPM (Ho et al. 2020) Eqs. 4, 6, 7, 11; IDDPM (Nichol & Dhariwal 2021) Eqs. 13-17;
ADM (Dhariwal & Nichol 2021).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# model_fn(x_t (B,H,W,C), t (B,) int original timestep, y (B,) int or None) -> (B,H,W,C or 2C).
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

PRED_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
BETA_SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------
# Beta schedules.
# ----------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Betas that discretize a continuous alpha_bar(t), t in [0, 1] [IDDPM Eq. 17].

  Args:
    num_timesteps: number of betas T.
    alpha_bar: cumulative product of (1 - beta) as a function of t in [0, 1].
    max_beta: clip each beta to at most this, to avoid a singularity at t = 1.

  Returns:
    (T,) float64 betas.
  """
  betas = []
  for i in range(num_timesteps):
    t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """ADM's `get_named_beta_schedule`: "linear" (DDPM, rescaled to T) or "cosine" (IDDPM).

  Args:
    name: "linear" (betas 1e-4..0.02 scaled by 1000/T so the schedule is the same in the limit
      of T) or "cosine" (alias "squaredcos_cap_v2", IDDPM Eq. 17 with s = 0.008).
    num_timesteps: number of diffusion steps T.

  Returns:
    (T,) float64 betas.
  """
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
  if name in ("cosine", "squaredcos_cap_v2"):
    return betas_for_alpha_bar(
        num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise ValueError(
      f"Unknown beta schedule {name!r}; use one of {BETA_SCHEDULES} ('squaredcos_cap_v2' is an "
      "alias of 'cosine').")


# ----------------------------------------------------------------------------------------------
# The schedule object.
# ----------------------------------------------------------------------------------------------


class GaussianSchedule(NamedTuple):
  """All per-timestep coefficients of an ADM diffusion, float32, each of shape (T,).

  T is the number of (possibly respaced) steps; index t = 0 is the least noisy step. A
  respaced schedule (see `respace.py`) keeps a subset of an original T_0-step process;
  `timestep_map[t]` is the original index in [0, T_0) that the network receives.
  """
  betas: jax.Array                          # (T,) beta_t
  alphas_cumprod: jax.Array                 # (T,) alpha_bar_t
  alphas_cumprod_prev: jax.Array            # (T,) alpha_bar_{t-1}, alpha_bar_{-1} = 1
  sqrt_alphas_cumprod: jax.Array            # (T,)
  sqrt_one_minus_alphas_cumprod: jax.Array  # (T,)
  log_one_minus_alphas_cumprod: jax.Array   # (T,)
  sqrt_recip_alphas_cumprod: jax.Array      # (T,) 1 / sqrt(alpha_bar_t)
  sqrt_recipm1_alphas_cumprod: jax.Array    # (T,) sqrt(1 / alpha_bar_t - 1)
  posterior_variance: jax.Array             # (T,) beta_tilde_t [DDPM Eq. 7]
  posterior_log_variance_clipped: jax.Array  # (T,) log beta_tilde_t with [0] := [1]
  posterior_mean_coef1: jax.Array           # (T,) coefficient of x_0 in mu_tilde [DDPM Eq. 7]
  posterior_mean_coef2: jax.Array           # (T,) coefficient of x_t in mu_tilde
  log_betas: jax.Array                      # (T,) log beta_t, the learned-range maximum
  fixed_large_log_variance: jax.Array       # (T,) log [beta_tilde_1, beta_1, ..., beta_{T-1}]
  timestep_map: jax.Array                   # (T,) int32 original timestep index

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None
                        ) -> GaussianSchedule:
  """Builds a `GaussianSchedule` from betas, computing in float64 exactly as ADM does.

  Args:
    betas: (T,) betas in (0, 1].
    timestep_map: (T,) original timestep index per step; identity when None.

  Returns:
    The schedule, float32 arrays.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {betas.shape}.")
  if not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError("betas must lie in (0, 1].")
  t_count = betas.shape[0]
  if timestep_map is None:
    timestep_map = np.arange(t_count)
  timestep_map = np.asarray(timestep_map)
  if timestep_map.shape != (t_count,):
    raise ValueError(f"timestep_map must have shape ({t_count},), got {timestep_map.shape}.")

  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return GaussianSchedule(
      betas=f32(betas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      log_one_minus_alphas_cumprod=f32(np.log(1.0 - alphas_cumprod)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1)),
      posterior_variance=f32(posterior_variance),
      # The posterior variance is 0 at t = 0, so ADM clips its log by reusing the t = 1 value.
      posterior_log_variance_clipped=f32(
          np.log(np.append(posterior_variance[1], posterior_variance[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
      posterior_mean_coef2=f32(
          (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
      log_betas=f32(np.log(betas)),
      fixed_large_log_variance=f32(np.log(np.append(posterior_variance[1], betas[1:]))),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
  )


def per_example(values: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example values broadcastable against x: (B,) -> (B, 1, ..., 1); others unchanged.

  The one place the samplers, losses and guidance turn a batch of scalars (timesteps'
  coefficients, sigmas, guidance weights, noise masks) into something that multiplies
  a (B, H, W, C) batch.
  """
  values = jnp.asarray(values)
  if values.ndim != 1:
    return values  # a scalar, or already broadcastable
  return values.reshape(values.shape + (1,) * (x.ndim - 1))  # (B,) -> (B, 1, 1, 1)


def extract(arr: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """arr[t] broadcastable against x: a scalar for scalar t, (B, 1, ..., 1) for (B,) t.

  ADM's `_extract_into_tensor`.
  """
  return per_example(arr[t], x)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch axes: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# Forward process q and its posterior.
# ----------------------------------------------------------------------------------------------


def q_sample(schedule: GaussianSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array
             ) -> jax.Array:
  """Samples q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) [DDPM Eq. 4].

  Args:
    schedule: the diffusion.
    x0: (B, H, W, C) clean data.
    t: (B,) or scalar step index into `schedule`.
    noise: standard normal noise of x0's shape.

  Returns:
    x_t of x0's shape.
  """
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior_mean_variance(schedule: GaussianSchedule, x0: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) [DDPM Eqs. 6-7].

  Returns:
    (mean of x_t's shape, variance and clipped log-variance broadcastable to it).
  """
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  return (mean, extract(schedule.posterior_variance, t, x_t),
          extract(schedule.posterior_log_variance_clipped, t, x_t))


def predict_x0_from_eps(schedule: GaussianSchedule, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  """x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps [DDPM Eq. 4 inverted]."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: GaussianSchedule, x_t: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
  """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def predict_x0_from_v(schedule: GaussianSchedule, x_t: jax.Array, t: jax.Array,
                      v: jax.Array) -> jax.Array:
  """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho 2022, v-prediction)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def v_target(schedule: GaussianSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array
             ) -> jax.Array:
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


# ----------------------------------------------------------------------------------------------
# Reverse process p.
# ----------------------------------------------------------------------------------------------


class PMeanVariance(NamedTuple):
  """p(x_{t-1} | x_t) and the x_0 prediction it was built from."""
  mean: jax.Array          # (B, H, W, C)
  variance: jax.Array      # broadcastable to mean
  log_variance: jax.Array  # broadcastable to mean
  pred_x0: jax.Array       # (B, H, W, C)


def split_model_output(model_output: jax.Array, x_t: jax.Array, var_type: str
                       ) -> tuple[jax.Array, jax.Array | None]:
  """Splits (B,H,W,2C) learned-variance output into (prediction, var values); checks shapes."""
  channels = x_t.shape[-1]
  if var_type == "learned_range":
    if model_output.shape != x_t.shape[:-1] + (2 * channels,):
      raise ValueError(
          f"var_type='learned_range' needs the model to return {2 * channels} channels "
          f"(prediction + variance values) for {channels}-channel input, got output shape "
          f"{model_output.shape}. Set learn_sigma=True on the model or use a fixed var_type.")
    return model_output[..., :channels], model_output[..., channels:]
  if var_type not in VAR_TYPES:
    raise ValueError(f"Unknown var_type {var_type!r}; use one of {VAR_TYPES}.")
  if model_output.shape != x_t.shape:
    raise ValueError(
        f"var_type={var_type!r} needs the model output to match x_t {x_t.shape}, got "
        f"{model_output.shape}. A learn_sigma model needs var_type='learned_range'.")
  return model_output, None


def p_mean_variance(schedule: GaussianSchedule, model_output: jax.Array, x_t: jax.Array,
                    t: jax.Array, *, pred_type: str = "eps", var_type: str = "learned_range",
                    clip_denoised: bool = False) -> PMeanVariance:
  """ADM's `p_mean_variance` from a given model output.

  With learned range [IDDPM Eq. 15] the variance interpolates in log space between the
  clipped posterior variance (min) and beta_t (max): frac = (v + 1) / 2,
  log Sigma = frac log beta_t + (1 - frac) log beta_tilde_t. The mean is the posterior mean
  [DDPM Eq. 7] at the predicted x_0.

  Args:
    schedule: the (possibly respaced) diffusion.
    model_output: (B, H, W, 2C) for learned_range, else (B, H, W, C).
    x_t: (B, H, W, C) current sample.
    t: (B,) or scalar step index into `schedule` (not the original index).
    pred_type: what the model predicts: "eps", "x0" or "v".
    var_type: "learned_range", "fixed_small" (beta_tilde) or "fixed_large" (beta).
    clip_denoised: clip the x_0 prediction to [-1, 1] (ADM option; DiffiT samples without).

  Returns:
    `PMeanVariance`.
  """
  pred, var_values = split_model_output(model_output, x_t, var_type)
  if var_type == "learned_range":
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t)
    max_log = extract(schedule.log_betas, t, x_t)
    frac = (var_values + 1) / 2  # the model's [-1, 1] maps to [min_var, max_var]
    log_variance = frac * max_log + (1 - frac) * min_log
  elif var_type == "fixed_small":
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
  else:
    log_variance = extract(schedule.fixed_large_log_variance, t, x_t)

  if pred_type == "eps":
    pred_x0 = predict_x0_from_eps(schedule, x_t, t, pred)
  elif pred_type == "x0":
    pred_x0 = pred
  elif pred_type == "v":
    pred_x0 = predict_x0_from_v(schedule, x_t, t, pred)
  else:
    raise ValueError(f"Unknown pred_type {pred_type!r}; use one of {PRED_TYPES}.")
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1, 1)
  mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return PMeanVariance(mean, jnp.exp(log_variance), log_variance, pred_x0)


# ----------------------------------------------------------------------------------------------
# Likelihood terms and the hybrid loss.
# ----------------------------------------------------------------------------------------------


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
              ) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """ADM's tanh approximation of the standard normal CDF."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array
                                        ) -> jax.Array:
  """log-likelihood of data discretized to 256 bins in [-1, 1] [DDPM Eq. 13], in nats.

  Args:
    x: targets in [-1, 1].
    means: Gaussian means, x's shape.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    Elementwise log-probabilities, x's shape.
  """
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: GaussianSchedule, model_output: jax.Array, x0: jax.Array,
                 x_t: jax.Array, t: jax.Array, *, pred_type: str = "eps",
                 var_type: str = "learned_range", clip_denoised: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
  """One term of the variational bound in bits per dimension [DDPM Eq. 5, IDDPM Eqs. 4-6].

  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized
  decoder NLL -log p(x_0 | x_1) at t = 0.

  Args:
    schedule: the diffusion.
    model_output: the model's output at (x_t, t).
    x0: (B, H, W, C) clean data.
    x_t: (B, H, W, C) noised data.
    t: (B,) step indices.
    pred_type, var_type, clip_denoised: as in `p_mean_variance`.

  Returns:
    ((B,) bits per dim, (B, H, W, C) x_0 prediction).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  out = p_mean_variance(schedule, model_output, x_t, t, pred_type=pred_type,
                        var_type=var_type, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
  kl = kl / np.log(2.0)
  log_scales = jnp.broadcast_to(0.5 * out.log_variance, x0.shape)
  decoder_nll = -discretized_gaussian_log_likelihood(x0, out.mean, log_scales)
  decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl), out.pred_x0


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
  """Uniform timestep sampling, t ~ U{0, ..., T-1} (ADM's `UniformSampler`): (B,) int32."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def loss_keys(rng: jax.Array | None, level: jax.Array | None, noise: jax.Array | None,
              level_name: str) -> tuple[jax.Array | None, jax.Array | None]:
  """(level key, noise key) for a loss that draws what it is not given.

  Given both the noise level and the noise, a loss draws nothing and needs no key.
  """
  if level is not None and noise is not None:
    return None, None
  if rng is None:
    missing = " and ".join(n for n, v in ((level_name, level), ("noise", noise)) if v is None)
    raise ValueError(f"The loss draws {missing} from rng, but rng is None; pass rng, or pass "
                     f"both {level_name} and noise.")
  level_rng, noise_rng = jax.random.split(rng)
  return level_rng, noise_rng


def adm_loss(schedule: GaussianSchedule, model_fn: ModelFn, x0: jax.Array, y: Any,
             rng: jax.Array | None = None, *, t: jax.Array | None = None,
             noise: jax.Array | None = None,
             pred_type: str = "eps", var_type: str = "learned_range",
             rescale_vb: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The ADM/IDDPM training loss (`training_losses` with loss_type MSE): L_simple + L_vlb.

  With learned-range variance this is IDDPM's hybrid loss [IDDPM Eq. 16] with lambda = 1, as
  DiT and DiffiT train it; `rescale_vb=True` is ADM's RESCALED_MSE, which multiplies the VB
  term by T/1000 (the identity at T = 1000). DiffiT uses MSE, i.e. rescale_vb=False.

  Args:
    schedule: the training diffusion (usually not respaced).
    model_fn: `model_fn(x_t, t_original, y)`; returns (B,H,W,2C) for learned_range.
    x0: (B, H, W, C) clean data (latents for the latent model).
    y: (B,) class labels (dropped to the null class by the caller or model), or None.
    rng: PRNG key for t and the noise; None when both are given.
    t: optional (B,) step indices instead of sampling them.
    noise: optional (B, H, W, C) noise instead of sampling it.
    pred_type: "eps", "x0" or "v"; the MSE target follows it.
    var_type: "learned_range" (VB term added) or a fixed variance (MSE only).
    rescale_vb: ADM's RESCALED_MSE.

  Returns:
    ((B,) loss per example, aux dict of (B,) "mse", "vb" and "t").
  """
  t_rng, noise_rng = loss_keys(rng, t, noise, "t")
  # 1. t ~ U{0..T-1} [DDPM Alg. 1] and eps ~ N(0, I).
  if t is None:
    t = sample_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  # 2. x_t ~ q(x_t | x_0) [DDPM Eq. 4].
  x_t = q_sample(schedule, x0, t, noise)
  # 3. The network sees the original timestep index.
  model_output = model_fn(x_t, schedule.timestep_map[t], y).astype(jnp.float32)
  pred, var_values = split_model_output(model_output, x_t, var_type)
  # 4. L_vlb for Sigma only: the mean is frozen so the VB term cannot move it [IDDPM Sec. 3.1].
  if var_type == "learned_range":
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)  # (B,H,W,2C)
    vb, _ = vb_terms_bpd(schedule, frozen, x0, x_t, t, pred_type=pred_type,
                         var_type=var_type, clip_denoised=False)
    if rescale_vb:
      vb = vb * (schedule.num_timesteps / 1000.0)
  else:
    vb = jnp.zeros(x0.shape[:1], jnp.float32)
  # 5. L_simple = ||target - prediction||^2 [DDPM Eq. 14], averaged over dimensions.
  if pred_type == "eps":
    target = noise
  elif pred_type == "x0":
    target = x0
  elif pred_type == "v":
    target = v_target(schedule, x0, t, noise)
  else:
    raise ValueError(f"Unknown pred_type {pred_type!r}; use one of {PRED_TYPES}.")
  mse = mean_flat((target - pred) ** 2)
  # 6. L_hybrid = L_simple + L_vlb [IDDPM Eq. 16].
  return mse + vb, {"mse": mse, "vb": vb, "t": t}
